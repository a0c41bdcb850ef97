"""moeshard::gather_grouped_ffn_in and moeshard::grouped_ffn_out_scatter against a float64 per-row loop.

Reference path (what runs on CPU): in this process, plus opcheck and one Inductor compile.
Triton kernels: in subprocesses (this file run as a script), so that TRITON_INTERPRET=1 is set
before triton is imported there and never leaks into, or depends on, other tests' triton imports:
  `interpret` runs the kernels on CPU tensors under Triton's interpreter;
  `compile`   compiles them for sm_90 down to a cubin (no GPU needed), which catches what the
              interpreter does not (it runs the kernel's Python, not Triton's compiler).
"""

from __future__ import annotations

import bisect
import os
import subprocess
import sys
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import grouping_by_definition
from moeshard_compile.kernels import ops as kernel_ops
from moeshard_compile.passes.op_contract import ACTIVATIONS

ffn_in = torch.ops.moeshard.gather_grouped_ffn_in.default
ffn_out = torch.ops.moeshard.grouped_ffn_out_scatter.default

ROUTINGS = {
    "random": [3, 1, 4, 0, 2, 5],
    "empty_experts": [0, 3, 0, 0, 4, 0],
    "one_expert_has_all": [0, 0, 9, 0],
    "single_expert": [6],
    "no_rows": [0, 0, 0],
}


@dataclass
class Case:
    """One grouped FFN: tokens x_XD, the rows' tokens rows_R, weights, and the combine's inputs."""

    x_XD: torch.Tensor
    rows_R: torch.Tensor
    offs_E: torch.Tensor
    w_in_EDF: torch.Tensor
    w_gate_EDF: torch.Tensor | None
    b_in_EF: torch.Tensor | None
    b_gate_EF: torch.Tensor | None
    w_out_EFD: torch.Tensor
    b_out_ED: torch.Tensor | None
    dest_R: torch.Tensor
    scale_R: torch.Tensor | None

    def ffn_in_args(self, activation: str):
        return (self.x_XD, self.rows_R, self.offs_E, self.w_in_EDF, self.w_gate_EDF, self.b_in_EF, self.b_gate_EF, activation)

    def ffn_out_args(self, h_RF: torch.Tensor):
        return (h_RF, self.offs_E, self.w_out_EFD, self.b_out_ED, self.dest_R, self.scale_R)


def make_case(counts, *, D=12, F=10, dtype=torch.float32, gated=True, bias=True, scale=True, seed=0) -> Case:
    """Random weights of unit-ish output scale; every third row has routing weight 0; dest_R a permutation."""
    g = torch.Generator().manual_seed(seed)
    E, R = len(counts), sum(counts)
    X = R + 3

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    scale_R = torch.rand(R, generator=g) + 0.5
    scale_R[::3] = 0.0
    return Case(
        x_XD=randn(X, D),
        rows_R=torch.randint(0, X, (R,), generator=g),
        offs_E=torch.tensor(counts, dtype=torch.int64).cumsum(0),
        w_in_EDF=randn(E, D, F, std=D**-0.5),
        w_gate_EDF=randn(E, D, F, std=D**-0.5) if gated else None,
        b_in_EF=randn(E, F) if bias else None,
        b_gate_EF=randn(E, F) if bias and gated else None,
        w_out_EFD=randn(E, F, D, std=F**-0.5),
        b_out_ED=randn(E, D) if bias else None,
        dest_R=torch.randperm(R, generator=g),
        scale_R=scale_R if scale else None,
    )


def expert_of(offs_E: torch.Tensor, r: int) -> int:
    """The expert whose group holds row r (E for rows past offs_E[-1])."""
    return bisect.bisect_right(offs_E.tolist(), r)


def ffn_in_float64(case: Case, activation: str) -> torch.Tensor:
    """h_RF row by row, in float64."""
    act, E = ACTIVATIONS[activation], case.offs_E.shape[0]
    h_RF = torch.zeros(case.rows_R.shape[0], case.w_in_EDF.shape[2], dtype=torch.float64)
    for r, token in enumerate(case.rows_R.tolist()):
        e = expert_of(case.offs_E, r)
        if e == E:
            continue
        x_D = case.x_XD[token].double()
        h_F = x_D @ case.w_in_EDF[e].double() + (case.b_in_EF[e].double() if case.b_in_EF is not None else 0)
        if case.w_gate_EDF is None:
            h_RF[r] = act(h_F)
        else:
            g_F = x_D @ case.w_gate_EDF[e].double() + (case.b_gate_EF[e].double() if case.b_gate_EF is not None else 0)
            h_RF[r] = act(g_F) * h_F
    return h_RF


def ffn_out_float64(case: Case, h_RF: torch.Tensor) -> torch.Tensor:
    """y_RD row by row, in float64; a zero routing weight gives exactly 0; rows no one stores to stay 0."""
    E = case.offs_E.shape[0]
    y_RD = torch.zeros(h_RF.shape[0], case.w_out_EFD.shape[2], dtype=torch.float64)
    for r, dest in enumerate(case.dest_R.tolist()):
        e = expert_of(case.offs_E, r)
        if e == E:
            continue
        y_D = h_RF[r].double() @ case.w_out_EFD[e].double()
        if case.b_out_ED is not None:
            y_D = y_D + case.b_out_ED[e].double()
        if case.scale_R is not None:
            s = case.scale_R[r].item()
            y_D = y_D * s if s != 0 else torch.zeros_like(y_D)
        y_RD[dest] = y_D
    return y_RD


def with_inf_in_dropped_row(case: Case, h_RF: torch.Tensor) -> torch.Tensor:
    """h with inf in a row whose routing weight is 0: its y is inf/nan, its contribution must be 0."""
    h_RF = h_RF.clone()
    if case.scale_R is not None and h_RF.shape[0] > 0:
        h_RF[0] = float("inf")  # make_case gives row 0 weight 0
    return h_RF


def tolerance(dtype: torch.dtype) -> dict:
    return {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-4, rtol=1e-4)}.get(
        dtype, dict(atol=3e-2, rtol=3e-2)
    )


def check_ffn_in(fn, case: Case, activation: str) -> torch.Tensor:
    h_RF = fn(*case.ffn_in_args(activation))
    assert h_RF.shape == (case.rows_R.shape[0], case.w_in_EDF.shape[2]) and h_RF.dtype == case.x_XD.dtype
    torch.testing.assert_close(h_RF.double(), ffn_in_float64(case, activation), **tolerance(h_RF.dtype))
    return h_RF


def check_ffn_out(fn, case: Case, h_RF: torch.Tensor) -> None:
    h_RF = with_inf_in_dropped_row(case, h_RF)
    y_RD = fn(*case.ffn_out_args(h_RF))
    assert y_RD.shape == (h_RF.shape[0], case.w_out_EFD.shape[2]) and y_RD.dtype == h_RF.dtype
    torch.testing.assert_close(y_RD.double(), ffn_out_float64(case, h_RF), **tolerance(y_RD.dtype))


# ---------------------------------------------------------------- reference path (CPU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gated,bias", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_reference_matches_per_row_loop(routing, gated, bias, dtype):
    activation = "silu" if gated else "gelu"
    case = make_case(ROUTINGS[routing], dtype=dtype, gated=gated, bias=bias)
    h_RF = check_ffn_in(ffn_in, case, activation)
    check_ffn_out(ffn_out, case, h_RF)
    check_ffn_out(ffn_out, replace(case, scale_R=None), h_RF)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_reference_activations(activation):
    for gated in (True, False):
        check_ffn_in(ffn_in, make_case(ROUTINGS["random"], gated=gated, dtype=torch.float64), activation)


def test_reference_bf16():
    case = make_case(ROUTINGS["random"], dtype=torch.bfloat16)
    h_RF = check_ffn_in(ffn_in, case, "relu")
    check_ffn_out(ffn_out, case, h_RF)


def test_reference_ignores_rows_past_the_last_offset():
    """Rows past offs_E[-1] belong to no expert: zero in h, nothing stored for them."""
    case = make_case([2, 3])
    case = replace(case, offs_E=torch.tensor([2, 4]))
    h_RF = check_ffn_in(ffn_in, case, "relu")
    assert torch.equal(h_RF[4], torch.zeros_like(h_RF[4]))
    check_ffn_out(ffn_out, case, h_RF)


def test_fake_rejects_mismatched_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = make_case(ROUTINGS["random"])
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(Exception, match="disagree on D"):
            ffn_in(case.x_XD[:, :5], *case.ffn_in_args("relu")[1:])
        with pytest.raises(Exception, match="unknown activation"):
            ffn_in(*case.ffn_in_args("swish"))
        with pytest.raises(Exception, match="disagree on F"):
            ffn_out(*case.ffn_out_args(torch.empty(case.rows_R.shape[0], 3)))


@pytest.mark.parametrize("routing", ["random", "empty_experts"])
@pytest.mark.parametrize("gated_bias_scale", [(True, True, True), (False, False, False)])
def test_opcheck(routing, gated_bias_scale):
    # Inference-only ops (no autograd formula, as moeshard::grouped_mm): inputs do not require grad.
    gated, bias, scale = gated_bias_scale
    case = make_case(ROUTINGS[routing], gated=gated, bias=bias, scale=scale)
    h_RF = ffn_in(*case.ffn_in_args("gelu_tanh"))
    for op, args in [(ffn_in, case.ffn_in_args("gelu_tanh")), (ffn_out, case.ffn_out_args(h_RF))]:
        result = torch.library.opcheck(op, args)
        assert result == {name: "SUCCESS" for name in result}, result


def test_ops_under_inductor_on_cpu():
    case = make_case(ROUTINGS["empty_experts"])

    def expert_ffn(x_XD, rows_R, offs_E, w_in_EDF, w_gate_EDF, b_in_EF, b_gate_EF, w_out_EFD, b_out_ED, dest_R, scale_R):
        h_RF = ffn_in(x_XD, rows_R, offs_E, w_in_EDF, w_gate_EDF, b_in_EF, b_gate_EF, "silu")
        return ffn_out(h_RF * 2, offs_E, w_out_EFD, b_out_ED, dest_R, scale_R) + 1

    args = (case.x_XD, case.rows_R, case.offs_E, case.w_in_EDF, case.w_gate_EDF, case.b_in_EF, case.b_gate_EF,
            case.w_out_EFD, case.b_out_ED, case.dest_R, case.scale_R)
    compiled = torch.compile(expert_ffn, backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(*args), expert_ffn(*args))


def test_package_imports_without_triton():
    """triton is not a runtime dependency: without it the ops register (quietly) and run the reference."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, moeshard_compile.kernels.ops as k\n"
        "assert not k.HAS_TRITON\n"
        "x = torch.randn(3, 4); w = torch.randn(2, 4, 5)\n"
        "h = torch.ops.moeshard.gather_grouped_ffn_in(x, torch.tensor([0, 2, 1]), torch.tensor([1, 3]), w, None, None, None, 'relu')\n"
        "assert torch.allclose(h[0], torch.relu(x[0] @ w[0])) and torch.allclose(h[2], torch.relu(x[1] @ w[1]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "triton" not in done.stderr.lower(), done.stderr


# ---------------------------------------------------------------- the tile schedule


def test_kernel_activations_match_the_lowering():
    require_triton()
    from moeshard_compile.kernels.activations import ACTIVATION_CODES

    assert set(ACTIVATION_CODES) == set(ACTIVATIONS)


def test_tf32_only_when_allowed():
    """fp32 dots use TF32 exactly when torch allows it for CUDA matmuls; other dtypes never ask."""
    require_triton()
    from moeshard_compile.kernels.launch import _input_precision_tf32

    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        for allowed in (False, True):
            matmul.allow_tf32 = allowed
            assert _input_precision_tf32(torch.float32) is allowed
            assert _input_precision_tf32(torch.bfloat16) is False
    finally:
        matmul.allow_tf32 = before


# ---------------------------------------------------------------- Triton kernels, in subprocesses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def require_triton():
    """The kernel tests fail (never skip) without triton: it is in the test extras."""
    if not kernel_ops.HAS_TRITON:
        pytest.fail("triton is not installed; it is a test dependency: pip install -e '.[test]'")


def test_persistent_tma_only_where_it_applies():
    """The default takes the persistent TMA kernel for 2-byte dtypes only, and the launch falls back
    to pointer loads for weights a TMA descriptor cannot describe."""
    require_triton()
    from moeshard_compile.kernels.launch import _use_tma
    from moeshard_compile.kernels.tile_config import default_config

    bf16, fp32 = default_config(torch.bfloat16), default_config(torch.float32)
    assert bf16.persistent_tma and not fp32.persistent_tma
    # the programs split between sparse and crowded experts only where the rows come by TMA (measured faster there)
    assert bf16.stream_tile_cost > 0 and default_config(torch.bfloat16, tma_rows=False).stream_tile_cost == 0
    cpu = torch.device("cpu")  # Triton's interpreter runs descriptors, so only the layouts decide here
    w_EDF = torch.empty(4, 32, 48, dtype=torch.bfloat16)
    assert _use_tma(bf16, cpu, w_EDF, None)
    assert not _use_tma(replace(bf16, persistent_tma=False), cpu, w_EDF)
    assert not _use_tma(bf16, cpu, torch.empty(4, 48, 32, dtype=torch.bfloat16).transpose(1, 2))
    assert not _use_tma(bf16, cpu, torch.empty(4, 32, 21, dtype=torch.bfloat16))  # 42-byte rows
    assert not _use_tma(bf16, cpu, torch.empty(4 * 32 * 48 + 1, dtype=torch.bfloat16)[1:].view(4, 32, 48))
    assert not _use_tma(bf16, cpu, w_EDF, torch.empty(4, 32, 21, dtype=torch.bfloat16))  # gate too


def run_self(mode: str, interpret: bool) -> str:
    require_triton()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), mode], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_triton_kernels_interpreted():
    """Both kernels under TRITON_INTERPRET=1 on CPU tensors vs the float64 loop (interpret_cases), and their tile schedule."""
    stdout = run_self("interpret", interpret=True)
    assert stdout.count("ok ") == len(list(interpret_cases())) + 3, stdout  # + the schedule, the split, the grouping


def test_triton_kernels_compile_for_sm90():
    """Triton's compiler accepts both kernels for sm_90 (fp32 and bf16, every flag, the default tiles),
    down to a cubin whose shared memory fits an H100."""
    stdout = run_self("compile", interpret=False)
    assert stdout.count("ok ") == len(list(compile_cases())) + 4, stdout  # + the counting sort's kernels


def interpret_cases():
    """(routing, dtype, gated, bias, activation, (D, F)) covering every routing, dtype and activation,
    with D and F that the 16-wide blocks divide (unmasked loads) and that they do not."""
    activations = list(ACTIVATIONS)
    i = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for routing in ROUTINGS:
            yield routing, dtype, i % 2 == 0, i % 3 != 2, activations[i % len(activations)], [(37, 21), (32, 48)][i % 2]
            i += 1


def run_interpreted() -> None:
    """Small shapes, none a multiple of the 16-wide blocks; several M-, N- and K-tiles each."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder

    from moeshard_compile.kernels.ffn_in import launch_ffn_in
    from moeshard_compile.kernels.ffn_out import launch_ffn_out
    from moeshard_compile.kernels.tile_config import TileConfig

    # The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584, 3.6 to 3.9 at least):
    # give it the values; on a GPU bf16 products are exact in the fp32 accumulator, as here.
    create_dot = InterpreterBuilder.create_dot

    def create_dot_bf16_as_fp32(self, a, b, d, *args):
        a, b = (self.cast_impl(t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t for t in (a, b))
        return create_dot(self, a, b, d, *args)

    InterpreterBuilder.create_dot = create_dot_bf16_as_fp32
    for i, (routing, dtype, gated, bias, activation, (D, F)) in enumerate(interpret_cases()):
        config = TileConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2, zigzag=i % 2 == 1,
                            persistent_tma=i % 4 >= 2, tma_rows=i % 8 >= 5, stream_tile_cost=(0.0, 1.0, 0.5)[i % 3])
        counts = [c * 5 for c in ROUTINGS[routing]]  # 45 rows for one expert: 3 M-tiles
        case = make_case(counts, D=D, F=F, dtype=dtype, gated=gated, bias=bias, seed=len(counts))
        h_RF = check_ffn_in(lambda *a: launch_ffn_in(*a, config=config), case, activation)
        check_ffn_out(lambda *a: launch_ffn_out(*a, config=config), case, h_RF)
        print("ok", routing, dtype, "gated" if gated else "plain", "bias" if bias else "no bias", activation, D, F, flush=True)
    check_tile_schedule()
    check_program_split()
    check_group_by_expert()


def check_group_by_expert() -> None:
    """The counting sort's two kernels against the definitions of their five outputs: one chunk or
    several per block (E up to 512: chunks of 16 to 1024 rows, up to MAX_BLOCKS blocks), with
    empty experts, one crowded expert and no rows."""
    from moeshard_compile.kernels.group_rows import launch_group_by_expert

    generator = torch.Generator().manual_seed(0)
    for rows, experts, top_k in [(0, 4, 1), (1, 1, 1), (37, 5, 1), (2100, 64, 2), (1000, 3, 1), (513, 130, 3),
                                 (300, 256, 1), (20000, 64, 1), (2500, 512, 8)]:
        for routing in ("random", "one_expert", "every_third"):
            ids_S = torch.randint(0, experts, (rows,), generator=generator)
            if routing == "one_expert":
                ids_S[:] = experts - 1
            elif routing == "every_third":
                ids_S = ids_S - ids_S % 3
            weight_S = torch.rand(rows, generator=generator).to(torch.bfloat16)
            got = launch_group_by_expert(ids_S, weight_S, experts, top_k)
            want = grouping_by_definition(ids_S, weight_S, experts, top_k)
            for name, g, w in zip(("order", "token", "weight", "counts", "offs"), got, want):
                assert torch.equal(g, w), (name, rows, experts, routing)
    # ids outside [0, E) are left out of every group; the others keep their places
    ids_S = torch.tensor([2, 7, 0, -1, 2, 1])
    order_S, token_S, _, counts_E, offs_E = launch_group_by_expert(ids_S, torch.rand(6), 3, 2)
    assert order_S[:4].tolist() == [2, 5, 0, 4] and token_S[:4].tolist() == [1, 2, 0, 2]
    assert counts_E.tolist() == [1, 1, 2] and offs_E.tolist() == [1, 2, 4]
    print("ok group_by_expert", flush=True)


def check_tile_schedule() -> None:
    """The in-kernel schedule on random counts: every row of every expert in exactly one tile of
    that expert, tiles in expert order (any order with ZIGZAG); the programs past the last real
    tile say expert E."""
    import random

    import triton

    from moeshard_compile.kernels.schedule import num_tiles

    rng = random.Random(0)
    for trial in range(60):
        zigzag = trial % 2 == 1
        counts = [rng.choice([0, 0, 1, 3, 4, 5, 9, 17]) for _ in range(rng.randint(1, 9))]
        block_m, num_n = rng.choice([1, 4, 8]), rng.choice([1, 3])
        E, R = len(counts), sum(counts)
        programs = num_tiles(R, E, block_m) * num_n
        expert_P = torch.full((programs,), -1, dtype=torch.int64)
        m_PM = torch.full((programs, block_m), -2, dtype=torch.int64)
        offs_E = torch.tensor(counts).cumsum(0)
        schedule_kernel[(programs,)](offs_E, expert_P, m_PM, R, E, NUM_N=num_n, BLOCK_M=block_m,
                                     E_POW2=triton.next_power_of_2(E), ZIGZAG=zigzag)
        expert_P, n_P = expert_P // num_n, expert_P % num_n
        assert n_P.tolist() == [p % num_n for p in range(programs)], counts
        real = expert_P < E
        assert not real[real.long().sum():].any(), f"a padding tile before a real one: {counts}"
        assert (expert_P[~real] >= E).all(), counts
        if zigzag and int(real.sum()) >= 2 * num_n:  # the second tile is the last expert's last one
            assert expert_P[num_n] == max(e for e, c in enumerate(counts) if c), (counts, expert_P.tolist())
        for n in range(num_n):
            tiles = [(e, [r for r in rows if r >= 0])
                     for e, rows, p in zip(expert_P.tolist(), m_PM.tolist(), range(programs)) if p % num_n == n and e < E]
            rows_covered = [(e, r) for e, rows in tiles for r in rows]
            expected = [(e, r) for e in range(E) for r in range(int(offs_E[e]) - counts[e], int(offs_E[e]))]
            assert (sorted(rows_covered) if zigzag else rows_covered) == expected, (counts, block_m, zigzag)
    print("ok schedule", flush=True)


def check_program_split() -> None:
    """_share on random counts and program counts: every tile of every expert goes to exactly one
    program; the sparse experts' (one M tile or less) to the first p_s programs and the others' to
    the rest; and p_s is a split with the fewest waves (cdiv(tiles, programs), the stream tiles
    weighted by the cost), found here by trying every split."""
    import math
    import random

    import triton

    from moeshard_compile.kernels.schedule import num_tiles

    rng = random.Random(1)
    for trial in range(40):
        counts = [rng.choice([0, 1, 3, 4, 9, 17, 30]) for _ in range(rng.randint(1, 9))]
        block_m, num_n, cost = rng.choice([4, 8]), rng.choice([1, 3]), rng.choice([0.5, 1.0, 2.0])
        E, R = len(counts), sum(counts)
        programs = rng.randint(1, 12)
        capacity = num_tiles(R, E, block_m) * num_n
        tiles_PT = torch.full((programs, capacity), -1, dtype=torch.int64)
        step_P = torch.zeros(programs, dtype=torch.int64)
        share_kernel[(programs,)](torch.tensor(counts).cumsum(0), tiles_PT, step_P, R, E, capacity, NUM_N=num_n,
                                  BLOCK_M=block_m, E_POW2=triton.next_power_of_2(E), STREAM_TILE_COST=cost)
        tiles_E = [math.ceil(c / block_m) for c in counts]
        stream_E = [c <= block_m for c in counts]
        got = sorted(t for t in tiles_PT.flatten().tolist() if t >= 0)
        want = sorted((e * capacity + m) * num_n + n for e in range(E) for m in range(tiles_E[e]) for n in range(num_n))
        assert got == want, (counts, block_m, programs)
        stream_total = sum(t for t, s in zip(tiles_E, stream_E) if s) * num_n
        mma_total = sum(tiles_E) * num_n - stream_total
        stream_P = [all(stream_E[t // num_n // capacity] for t in row if t >= 0) and any(t >= 0 for t in row)
                    for row in tiles_PT.tolist()]
        p_s = sum(stream_P)
        assert stream_P == [p < p_s for p in range(programs)], (counts, stream_P)
        if stream_total and mma_total and programs > 1:
            def waves(p: int) -> float:
                return max(math.ceil(stream_total / p) * cost, math.ceil(mma_total / (programs - p)))
            splits = range(1, min(programs - 1, stream_total) + 1)  # no stream program without a tile
            assert step_P[0] == p_s and waves(p_s) == min(map(waves, splits)), (counts, programs, p_s)
    print("ok split", flush=True)


if kernel_ops.HAS_TRITON:  # a module-level kernel: the interpreter resolves _tile in this module's globals
    import triton
    import triton.language as tl

    from moeshard_compile.kernels.schedule import _schedule, _share, _tile

    @triton.jit
    def schedule_kernel(offs_ptr, expert_ptr, m_ptr, R, E, NUM_N: tl.constexpr, BLOCK_M: tl.constexpr,
                        E_POW2: tl.constexpr, ZIGZAG: tl.constexpr):
        """Writes each program's expert * NUM_N + N block, and its rows (-1 where masked)."""
        pid = tl.program_id(0)
        starts, ends, tiles, tile_ends = _schedule(offs_ptr, R, E, BLOCK_M, E_POW2)
        expert, row_start, m, m_mask, n_block = _tile(pid, starts, ends, tiles, tile_ends, NUM_N, BLOCK_M, E_POW2,
                                                      ZIGZAG)
        tl.store(expert_ptr + pid, expert * NUM_N + n_block)
        tl.store(m_ptr + pid * BLOCK_M + tl.arange(0, BLOCK_M), tl.where(m_mask, m, -1))

    @triton.jit
    def share_kernel(offs_ptr, tiles_ptr, step_ptr, R, E, CAPACITY, NUM_N: tl.constexpr, BLOCK_M: tl.constexpr,
                     E_POW2: tl.constexpr, STREAM_TILE_COST: tl.constexpr):
        """Writes each program's step and its tiles, as (expert * CAPACITY + M tile of the expert) * NUM_N + N block."""
        pid = tl.program_id(0)
        starts, ends, tiles, _ = _schedule(offs_ptr, R, E, BLOCK_M, E_POW2)
        first, total, step, tiles = _share(starts, ends, tiles, NUM_N, BLOCK_M, STREAM_TILE_COST)
        tile_ends = tl.cumsum(tiles, 0)
        tl.store(step_ptr + pid, step)
        i = 0
        for tile_id in range(first, total, step):
            expert, row_start, m, m_mask, n_block = _tile(tile_id, starts, ends, tiles, tile_ends, NUM_N, BLOCK_M,
                                                          E_POW2, False)
            first_row = tl.sum(tl.where(tl.arange(0, E_POW2) == expert, starts, 0), 0)
            m_tile = (row_start - first_row) // BLOCK_M
            tl.store(tiles_ptr + pid * CAPACITY + i, (expert * CAPACITY + m_tile) * NUM_N + n_block)
            i += 1


def compile_cases():
    """(kernel, dtype, flags, persistent_tma): every kernel flavour; bf16 in both loop structures."""
    for dtype in ("fp32", "bf16"):
        for gated, bias, activation in ((True, True, "gelu_tanh"), (False, False, "tanh")):
            yield "ffn_in", dtype, dict(GATED=gated, HAS_B_IN=bias, HAS_B_GATE=bias and gated,
                                        ACTIVATION=kernel_activation(activation), ALLOW_TF32=dtype == "fp32" and gated), dtype == "bf16" and gated
        for scale in (True, False):
            yield "ffn_out", dtype, dict(HAS_BIAS=scale, HAS_SCALE=scale, ALLOW_TF32=dtype == "fp32" and scale), \
                dtype == "bf16" and scale


def kernel_activation(name: str) -> int:
    from moeshard_compile.kernels.activations import ACTIVATION_CODES

    return ACTIVATION_CODES[name]


H100_SHARED_MEMORY = 232448  # bytes per block, sm_90 opt-in maximum


# Strides that are 1 for contiguous tensors (Triton specializes them to constants, as on the GPU)
UNIT_STRIDES = {"ffn_in": ("stride_xD", "stride_wF", "stride_gF", "stride_bF", "stride_bgF", "stride_hF"),
                "ffn_out": ("stride_hF", "stride_wD", "stride_bD", "stride_yD")}


def run_compile() -> None:
    """Both kernels for sm_90 with the default tiles, specialized as the GPU launch specializes them
    (16-divisible pointers and strides, unit strides constant, so loads pipeline as there)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moeshard_compile.kernels.tile_config import default_config

    index_args = {"rows_ptr", "offs_ptr", "dest_ptr"}
    for name, dtype, flags, tma in compile_cases():
        config = default_config(torch.float32 if dtype == "fp32" else torch.bfloat16, flags.get("GATED", False))
        assert not tma or config.persistent_tma, f"{name} {dtype}: the default config has no persistent TMA kernel"
        kernel = getattr(importlib.import_module(f"moeshard_compile.kernels.{name}"), f"_{name}_kernel")
        constexprs = {**flags, "NUM_N": 6, "E_POW2": 64, "EVEN_K": dtype == "bf16", "EVEN_N": dtype == "bf16",
                      "ZIGZAG": not tma, "PERSISTENT_TMA": tma, "TMA_ROWS": tma and dtype == "bf16",
                      "STREAM_TILE_COST": config.stream_tile_cost, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                      "BLOCK_K": config.block_k, **{arg: 1 for arg in UNIT_STRIDES[name]}}
        signature = {
            arg: "constexpr" if arg in constexprs
            else "*i64" if arg in index_args
            else "*fp32" if arg == "scale_ptr"
            else f"*{dtype}" if arg.endswith("_ptr")
            else "i32"
            for arg in kernel.arg_names
        }
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
                 if signature[arg] == "i32" and arg not in ("R", "E") or signature[arg].startswith("*")}
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
            options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
        )
        assert compiled.asm.get("cubin"), f"{name} {dtype}: no cubin"
        ptx = compiled.asm["ptx"]
        if dtype == "bf16" or flags["ALLOW_TF32"]:  # fp32 without TF32 is IEEE: FMAs, no tensor cores
            assert "wgmma.mma_async" in ptx, f"{name} {dtype}: no wgmma"
        assert ("cp.async.bulk.tensor" in ptx) == tma, f"{name} {dtype}: TMA loads {'missing' if tma else 'unexpected'}"
        # the default tiles must fit an H100's shared memory (227 KiB per block), or launches fail there
        assert compiled.metadata.shared <= H100_SHARED_MEMORY, f"{name} {dtype}: {compiled.metadata.shared} bytes"
        print("ok", name, dtype, flags, "persistent tma" if tma else "one tile per program", flush=True)
    compile_group_kernels()


def compile_group_kernels() -> None:
    """The counting sort's kernels at E 64 (chunks of 128 rows) and E 512 (16 rows)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moeshard_compile.kernels import group_rows

    for kernel in (group_rows._block_counts_kernel, group_rows._place_rows_kernel):
        for e_pow2 in (64, 512):
            constexprs = {"CHUNK": max(16, group_rows.ONE_HOT_ELEMENTS // e_pow2), "E_POW2": e_pow2,
                          "BLOCK_ROWS": group_rows.ONE_HOT_ELEMENTS // e_pow2}
            constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
            signature = {arg: "constexpr" if arg in constexprs
                         else "*bf16" if arg in ("weight_ptr", "weight_sorted_ptr")
                         else "*i32" if arg in ("ids_ptr", "block_counts_ptr")
                         else "*i64" if arg.endswith("_ptr") else "i32" for arg in kernel.arg_names}
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=4))
            assert compiled.asm.get("cubin"), kernel.fn.__name__
            print("ok", kernel.fn.__name__, e_pow2, flush=True)


if __name__ == "__main__":
    {"interpret": run_interpreted, "compile": run_compile}[sys.argv[1]]()
