"""The fused Triton kernels on a CUDA GPU against float64, with poisoned outputs.

Runs where CUDA is (the device machine: `python -m pytest -q tests/test_kernels_gpu.py`); CI has
no GPU, so there the module is skipped and tests/test_kernels.py covers the kernels through
Triton's interpreter and an sm_90 compile.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from helpers import grouping_by_definition
from moeshard_compile.kernels import ops  # noqa: F401  (registers the fused ops)
from moeshard_compile.passes.op_contract import ACTIVATIONS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device machine)")
if torch.cuda.is_available():
    from moeshard_compile.kernels.ffn_in import launch_ffn_in
    from moeshard_compile.kernels.ffn_out import launch_ffn_out
    from moeshard_compile.kernels.tile_config import STREAM_TILE_COST, default_config

ffn_in = torch.ops.moeshard.gather_grouped_ffn_in.default
ffn_out = torch.ops.moeshard.grouped_ffn_out_scatter.default
COUNTS = {
    "random": None,
    "empty_experts": [0, 300, 0, 0, 517, 0, 1, 0],
    "one_expert_has_all": [0, 0, 0, 1000, 0, 0, 0, 0],
    "no_rows": [0] * 8,
}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}  # relative to max |ref|


def poison_allocator(dtype: torch.dtype) -> None:
    """Fill the caching allocator's free blocks with NaN, so that an output row the kernel does not
    write shows up as NaN instead of a lucky zero."""
    free = torch.cuda.mem_get_info()[0]
    block = torch.empty(min(free // 4, 1 << 30), dtype=torch.uint8, device="cuda")
    block.view(torch.float16 if dtype != torch.float32 else torch.float32)[:].fill_(float("nan"))
    del block


def float64_reference(x_XD, rows_R, offs_E, w_in, w_gate, b_in, b_gate, w_out, b_out, dest_R, scale_R, activation):
    act, start = ACTIVATIONS[activation], 0
    h_RF = torch.zeros(rows_R.shape[0], w_in.shape[2], dtype=torch.float64, device="cuda")
    y_RD = torch.zeros(rows_R.shape[0], w_out.shape[2], dtype=torch.float64, device="cuda")
    for e, end in enumerate(offs_E.tolist()):
        x_ND = x_XD[rows_R[start:end]].double()
        h_NF = x_ND @ w_in[e].double() + b_in[e].double()
        h_NF = act(x_ND @ w_gate[e].double() + b_gate[e].double()) * h_NF if w_gate is not None else act(h_NF)
        h_RF[start:end] = h_NF
        y_RD[dest_R[start:end]] = (h_NF @ w_out[e].double() + b_out[e].double()) * scale_R[start:end, None].double()
        start = end
    return h_RF, y_RD


@pytest.mark.parametrize("dtype,loop", [(dtype, loop) for dtype in (torch.bfloat16, torch.float16, torch.float32)
                                        for loop in ("default", "per_tile", "split_rows")
                                        if dtype.itemsize == 2 or loop != "split_rows"])
@pytest.mark.parametrize("routing", list(COUNTS))
@pytest.mark.parametrize("gated", [False, True])
def test_kernels_match_float64_on_gpu(dtype, routing, gated, loop):
    """D and F not multiples of the blocks; fresh random inputs each run; zero routing weights kept.

    loop: the ops' default kernels (persistent TMA in bf16 and fp16), one program per tile with
    pointer loads (the fallback for other layouts, and fp32's default), or the persistent kernels
    with rows by TMA and the programs split between sparse and crowded experts in both (the
    default does so in ffn_in only where F >= 2 D)."""
    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**32)
    E, X, D, F = 8, 700, 264, 328
    counts = COUNTS[routing] or torch.randint(0, 300, (E,), generator=g, device="cuda").tolist()
    R = sum(counts)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * std).to(dtype)

    x_XD = randn(X, D)
    rows_R = torch.randint(0, X, (R,), generator=g, device="cuda")
    offs_E = torch.tensor(counts, device="cuda").cumsum(0)
    w_in, w_gate = randn(E, D, F, std=D**-0.5), randn(E, D, F, std=D**-0.5) if gated else None
    b_in, b_gate = randn(E, F), randn(E, F) if gated else None
    w_out, b_out = randn(E, F, D, std=F**-0.5), randn(E, D)
    dest_R = torch.randperm(R, generator=g, device="cuda")
    scale_R = torch.rand(R, generator=g, device="cuda").to(dtype)
    scale_R[::5] = 0
    activation = "silu" if gated else "gelu"
    h_ref, y_ref = float64_reference(x_XD, rows_R, offs_E, w_in, w_gate, b_in, b_gate, w_out, b_out,
                                     dest_R, scale_R, activation)

    run_in, run_out = ffn_in, ffn_out
    if loop != "default":
        config = default_config(dtype, gated)
        config = (dataclasses.replace(config, persistent_tma=False) if loop == "per_tile" else
                  dataclasses.replace(config, tma_rows=True, stream_tile_cost=STREAM_TILE_COST))
        run_in = functools.partial(launch_ffn_in, config=config)
        run_out = functools.partial(launch_ffn_out, config=config)
    poison_allocator(dtype)
    h_RF = run_in(x_XD, rows_R, offs_E, w_in, w_gate, b_in, b_gate, activation)
    poison_allocator(dtype)
    y_RD = run_out(h_RF, offs_E, w_out, b_out, dest_R, scale_R)
    torch.cuda.synchronize()
    for got, ref in ((h_RF, h_ref), (y_RD, y_ref)):
        assert got.dtype == dtype and not got.isnan().any(), "an output element was not written"
        if R:
            err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
            assert err < TOLERANCE[dtype], err


def test_fused_ops_lower_through_inductor_on_gpu():
    """Under torch.compile the Triton kernels appear in Inductor's output code (not an opaque extern call)."""
    from torch._inductor.utils import run_and_get_code

    E, X, D, F = 4, 300, 128, 256
    x_XD = torch.randn(X, D, device="cuda", dtype=torch.bfloat16)
    w_in = torch.randn(E, D, F, device="cuda", dtype=torch.bfloat16) * D**-0.5
    w_out = torch.randn(E, F, D, device="cuda", dtype=torch.bfloat16) * F**-0.5
    ids_X = torch.randint(0, E, (X,), device="cuda")

    def experts(x_XD, ids_X):
        order_X = torch.sort(ids_X, stable=True).indices
        offs_E = ids_X.new_zeros(E).scatter_add(0, ids_X, torch.ones_like(ids_X)).cumsum(0)
        h = ffn_in(x_XD * 2, order_X, offs_E, w_in, None, None, None, "relu")
        return ffn_out(h, offs_E, w_out, None, order_X, None) + 1

    out, (code,) = run_and_get_code(torch.compile(experts, fullgraph=True), x_XD, ids_X)
    assert "_ffn_in_kernel" in code and "_ffn_out_kernel" in code
    torch.testing.assert_close(out, experts(x_XD, ids_X), atol=2e-2, rtol=2e-2)


# Not Switch in bf16: it rounds the router's probabilities to bf16 before its argmax, and eager and
# compiled kernels break the frequent ties differently (a routing difference, not an arithmetic one;
# bench/moe_layer.py shows Inductor alone off by the same amount).
@pytest.mark.parametrize("model_name,dtype", [("switch", torch.float32), ("mixtral", torch.float32),
                                              ("mixtral", torch.bfloat16)])
def test_backend_runs_the_kernels_on_gpu(model_name, dtype):
    """torch.compile(model, backend="moeshard") on CUDA: the Triton kernels in the output code, eager's result."""
    import hf_tiny
    from torch._inductor.utils import run_and_get_code

    import moeshard_compile

    torch.manual_seed(torch.seed() % 2**32)
    model = getattr(hf_tiny, model_name)().eval().to("cuda", dtype)
    kwargs = {k: v.to("cuda") for k, v in hf_tiny.inputs(model, batch=4, seq=32).items()}
    compiled = torch.compile(model, backend=moeshard_compile.moeshard_backend, fullgraph=True)
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, **kwargs)
        expected = model(**kwargs)[0]
    assert any("_ffn_in_kernel" in code and "_ffn_out_kernel" in code and "_place_rows_kernel" in code for code in codes)
    err = ((out[0].double() - expected.double()).abs().max() / expected.double().abs().max()).item()
    assert err < (3e-2 if dtype == torch.bfloat16 else 1e-4), err


@pytest.mark.parametrize("rows,experts,top_k", [(0, 8, 1), (5, 8, 1), (16384, 64, 1), (32768, 128, 2), (60000, 256, 8),
                                               (4096, 3, 1), (300000, 64, 2), (2000, 1024, 4)])
@pytest.mark.parametrize("routing", ["random", "one_expert_has_all", "skew"])
def test_group_by_expert_on_gpu(rows, experts, top_k, routing):
    """The Triton counting sort is torch.sort's stable order, and its other outputs follow from it
    (outputs poisoned first: an unwritten row fails)."""
    poison_allocator(torch.float32)
    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**32)
    ids_S = torch.randint(0, experts, (rows,), generator=g, device="cuda")
    if routing == "one_expert_has_all":
        ids_S[:] = experts // 2
    elif routing == "skew":  # a tenth of the experts take most rows
        ids_S = torch.where(torch.rand(rows, generator=g, device="cuda") < 0.8, ids_S % max(1, experts // 10), ids_S)
    weight_S = torch.rand(rows, generator=g, device="cuda")
    got = torch.ops.moeshard.group_by_expert(ids_S, weight_S, experts, top_k)
    for name, g_, want in zip(("order", "token", "weight", "counts", "offs"), got,
                              grouping_by_definition(ids_S, weight_S, experts, top_k)):
        assert torch.equal(g_, want), name
