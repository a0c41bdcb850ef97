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

from moeshard_compile.kernels import ops as kernel_ops
from passes.lower import ACTIVATIONS

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
    out_YD: torch.Tensor

    def ffn_in_args(self, activation: str):
        return (self.x_XD, self.rows_R, self.offs_E, self.w_in_EDF, self.w_gate_EDF, self.b_in_EF, self.b_gate_EF, activation)

    def ffn_out_args(self, h_RF: torch.Tensor, accumulate: bool):
        return (h_RF, self.offs_E, self.w_out_EFD, self.b_out_ED, self.dest_R, self.scale_R, self.out_YD, accumulate)


def make_case(counts, *, D=12, F=10, dtype=torch.float32, gated=True, bias=True, scale=True, store=False, seed=0) -> Case:
    """Random weights of unit-ish output scale; every third row has routing weight 0.

    store=True gives distinct destination rows (a permutation), as storing requires.
    """
    g = torch.Generator().manual_seed(seed)
    E, R = len(counts), sum(counts)
    X = Y = R + 3

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
        dest_R=torch.randperm(Y, generator=g)[:R] if store else torch.randint(0, Y, (R,), generator=g),
        scale_R=scale_R if scale else None,
        out_YD=randn(Y, D),
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


def ffn_out_float64(case: Case, h_RF: torch.Tensor, accumulate: bool) -> torch.Tensor:
    """out_YD' row by row, in float64; a zero routing weight adds exactly 0."""
    out_YD, E = case.out_YD.double().clone(), case.offs_E.shape[0]
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
        out_YD[dest] = out_YD[dest] + y_D if accumulate else y_D
    return out_YD


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


def check_ffn_out(fn, case: Case, h_RF: torch.Tensor, accumulate: bool) -> None:
    h_RF = with_inf_in_dropped_row(case, h_RF)
    before_YD = case.out_YD.clone()
    out_YD = fn(*case.ffn_out_args(h_RF, accumulate))
    assert torch.equal(case.out_YD, before_YD), "the op modified its input out_YD"
    assert out_YD.shape == case.out_YD.shape and out_YD.dtype == case.out_YD.dtype
    torch.testing.assert_close(out_YD.double(), ffn_out_float64(case, h_RF, accumulate), **tolerance(out_YD.dtype))


# ---------------------------------------------------------------- reference path (CPU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gated,bias", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_reference_matches_per_row_loop(routing, gated, bias, dtype):
    activation = "silu" if gated else "gelu"
    for accumulate in (True, False):
        case = make_case(ROUTINGS[routing], dtype=dtype, gated=gated, bias=bias, store=not accumulate)
        h_RF = check_ffn_in(ffn_in, case, activation)
        check_ffn_out(ffn_out, case, h_RF, accumulate)
        check_ffn_out(ffn_out, replace(case, scale_R=None), h_RF, accumulate)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_reference_activations(activation):
    for gated in (True, False):
        check_ffn_in(ffn_in, make_case(ROUTINGS["random"], gated=gated, dtype=torch.float64), activation)


def test_reference_bf16_accumulates_in_fp32():
    case = make_case(ROUTINGS["random"], dtype=torch.bfloat16)
    h_RF = check_ffn_in(ffn_in, case, "relu")
    check_ffn_out(ffn_out, case, h_RF, accumulate=True)


def test_reference_ignores_rows_past_the_last_offset():
    """Rows past offs_E[-1] belong to no expert: zero in h, no contribution to out."""
    case = make_case([2, 3])
    case = replace(case, offs_E=torch.tensor([2, 4]))
    h_RF = check_ffn_in(ffn_in, case, "relu")
    assert torch.equal(h_RF[4], torch.zeros_like(h_RF[4]))
    check_ffn_out(ffn_out, case, h_RF, accumulate=True)


def test_fake_rejects_mismatched_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = make_case(ROUTINGS["random"])
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(Exception, match="disagree on D"):
            ffn_in(case.x_XD[:, :5], *case.ffn_in_args("relu")[1:])
        with pytest.raises(Exception, match="unknown activation"):
            ffn_in(*case.ffn_in_args("swish"))
        with pytest.raises(Exception, match="disagree on F"):
            ffn_out(*case.ffn_out_args(torch.empty(case.rows_R.shape[0], 3), True))


@pytest.mark.parametrize("routing", ["random", "empty_experts"])
@pytest.mark.parametrize("gated_bias_scale", [(True, True, True), (False, False, False)])
def test_opcheck(routing, gated_bias_scale):
    # Inference-only ops (no autograd formula, as moeshard::grouped_mm): inputs do not require grad.
    gated, bias, scale = gated_bias_scale
    accumulate = scale
    case = make_case(ROUTINGS[routing], gated=gated, bias=bias, scale=scale, store=not accumulate)
    h_RF = ffn_in(*case.ffn_in_args("gelu_tanh"))
    for op, args in [(ffn_in, case.ffn_in_args("gelu_tanh")), (ffn_out, case.ffn_out_args(h_RF, accumulate))]:
        result = torch.library.opcheck(op, args)
        assert result == {name: "SUCCESS" for name in result}, result


def test_ops_under_inductor_on_cpu():
    case = make_case(ROUTINGS["empty_experts"])

    def expert_ffn(x_XD, rows_R, offs_E, w_in_EDF, w_gate_EDF, b_in_EF, b_gate_EF, w_out_EFD, b_out_ED, dest_R, scale_R, out_YD):
        h_RF = ffn_in(x_XD, rows_R, offs_E, w_in_EDF, w_gate_EDF, b_in_EF, b_gate_EF, "silu")
        return ffn_out(h_RF * 2, offs_E, w_out_EFD, b_out_ED, dest_R, scale_R, out_YD, True) + 1

    args = (case.x_XD, case.rows_R, case.offs_E, case.w_in_EDF, case.w_gate_EDF, case.b_in_EF, case.b_gate_EF,
            case.w_out_EFD, case.b_out_ED, case.dest_R, case.scale_R, case.out_YD)
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


@given(
    counts=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=8),
    block_m=st.sampled_from([1, 4, 16]),
)
def test_tile_schedule(counts, block_m):
    """Every row of every expert in exactly one tile of that expert; padding tiles say expert E."""
    grouped_ffn = require_triton()
    offs_E = torch.tensor(counts).cumsum(0)
    expert_T, start_T = grouped_ffn.tile_schedule(offs_E, sum(counts), block_m)
    assert expert_T.shape[0] == sum(counts) // block_m + len(counts)
    expected = [(e, start) for e, c in enumerate(counts) for start in range(int(offs_E[e]) - c, int(offs_E[e]), block_m)]
    real = [(e, s) for e, s in zip(expert_T.tolist(), start_T.tolist()) if e < len(counts)]
    assert real == expected
    assert expert_T.tolist()[len(real):] == [len(counts)] * (expert_T.shape[0] - len(real))


def test_kernel_activations_match_the_lowering():
    assert set(require_triton().ACTIVATION_CODES) == set(ACTIVATIONS)


def test_tf32_only_when_allowed():
    """fp32 dots use TF32 exactly when torch allows it for CUDA matmuls; other dtypes never ask."""
    grouped_ffn, matmul = require_triton(), torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        for allowed in (False, True):
            matmul.allow_tf32 = allowed
            assert grouped_ffn._input_precision_tf32(torch.float32) is allowed
            assert grouped_ffn._input_precision_tf32(torch.bfloat16) is False
    finally:
        matmul.allow_tf32 = before


# ---------------------------------------------------------------- Triton kernels, in subprocesses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def require_triton():
    """The kernel tests fail (never skip) without triton: it is in the test extras."""
    if not kernel_ops.HAS_TRITON:
        pytest.fail("triton is not installed; it is a test dependency: pip install -e '.[test]'")
    from moeshard_compile.kernels import grouped_ffn

    return grouped_ffn


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
    """Both kernels under TRITON_INTERPRET=1 on CPU tensors vs the float64 loop (cases: interpret_cases)."""
    stdout = run_self("interpret", interpret=True)
    assert stdout.count("ok ") == len(list(interpret_cases())), stdout


def test_triton_kernels_compile_for_sm90():
    """Triton's compiler accepts both kernels for sm_90 (fp32 and bf16, every flag), down to a cubin."""
    stdout = run_self("compile", interpret=False)
    assert stdout.count("ok ") == len(list(compile_cases())), stdout


def interpret_cases():
    """(routing, dtype, gated, bias, activation) covering every routing, dtype and activation."""
    activations = list(ACTIVATIONS)
    i = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for routing in ("random", "empty_experts", "one_expert_has_all", "single_expert"):
            yield routing, dtype, i % 2 == 0, i % 3 != 2, activations[i % len(activations)]
            i += 1


def run_interpreted() -> None:
    """Small shapes, none a multiple of the 16-wide blocks; several M-, N- and K-tiles each."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder

    from moeshard_compile.kernels.grouped_ffn import TileConfig, launch_ffn_in, launch_ffn_out

    # The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584, 3.6 to 3.9 at least):
    # give it the values; on a GPU bf16 products are exact in the fp32 accumulator, as here.
    create_dot = InterpreterBuilder.create_dot

    def create_dot_bf16_as_fp32(self, a, b, d, *args):
        a, b = (self.cast_impl(t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t for t in (a, b))
        return create_dot(self, a, b, d, *args)

    InterpreterBuilder.create_dot = create_dot_bf16_as_fp32
    config = TileConfig(block_m=16, block_n=16, block_k=16)
    for routing, dtype, gated, bias, activation in interpret_cases():
        counts = [c * 5 for c in ROUTINGS[routing]]  # 45 rows for one expert: 3 M-tiles
        for accumulate in (True, False):
            case = make_case(counts, D=37, F=21, dtype=dtype, gated=gated, bias=bias, store=not accumulate, seed=len(counts))
            h_RF = check_ffn_in(lambda *a: launch_ffn_in(*a, config=config), case, activation)
            check_ffn_out(lambda *a: launch_ffn_out(*a, config=config), case, h_RF, accumulate)
        print("ok", routing, dtype, "gated" if gated else "plain", "bias" if bias else "no bias", activation, flush=True)


def compile_cases():
    for dtype in ("fp32", "bf16"):
        for gated, bias, activation in ((True, True, "gelu_tanh"), (False, False, "tanh")):
            yield "ffn_in", dtype, dict(GATED=gated, HAS_B_IN=bias, HAS_B_GATE=bias and gated,
                                        ACTIVATION=kernel_activation(activation), ALLOW_TF32=dtype == "fp32" and gated)
        for accumulate in (True, False):
            yield "ffn_out", dtype, dict(HAS_BIAS=True, HAS_SCALE=accumulate, ACCUMULATE=accumulate, ALLOW_TF32=False)


def kernel_activation(name: str) -> int:
    from moeshard_compile.kernels.grouped_ffn import ACTIVATION_CODES

    return ACTIVATION_CODES[name]


def run_compile() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moeshard_compile.kernels import grouped_ffn

    config = grouped_ffn.DEFAULT_CONFIG
    blocks = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
    index_args = {"rows_ptr", "offs_ptr", "expert_ptr", "start_ptr", "dest_ptr"}
    for name, dtype, flags in compile_cases():
        kernel = getattr(grouped_ffn, f"_{name}_kernel")
        constexprs = {**flags, **blocks}
        fp32_args = {"scale_ptr", "out_ptr"} if flags.get("ACCUMULATE") else {"scale_ptr"}
        signature = {
            arg: "constexpr" if arg in constexprs
            else "*i64" if arg in index_args
            else "*fp32" if arg in fp32_args
            else f"*{dtype}" if arg.endswith("_ptr")
            else "i32"
            for arg in kernel.arg_names
        }
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
            options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
        )
        assert compiled.asm.get("cubin"), f"{name} {dtype}: no cubin"
        print("ok", name, dtype, flags, flush=True)


if __name__ == "__main__":
    {"interpret": run_interpreted, "compile": run_compile}[sys.argv[1]]()
