"""Property: for any hand-written MoE the compiled model equals eager and the region is rewritten."""

import torch
from hypothesis import given, note
from hypothesis import strategies as st

import moeshard_compile
from helpers import assert_close_to_eager
from moe_zoo import MoEBlock, MoEConfig, moe_configs

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


@given(
    cfg=moe_configs(),
    dtype=st.sampled_from(DTYPES),
    batch=st.integers(1, 3),
    seq=st.integers(1, 7),
    seed=st.integers(0, 2**16),
    kernel=st.sampled_from(["fused", "grouped_mm"]),
)
def test_compiled_equals_eager(cfg, dtype, batch, seq, seed, kernel):
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = MoEBlock(cfg).eval().to(dtype)
    x = torch.randn(batch, seq, cfg.d_model, dtype=dtype)
    report = moeshard_compile.Report()
    opts = moeshard_compile.Options(inductor=False, expert_kernel=kernel)

    backend = moeshard_compile.backend.make_backend(opts, report)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
    note(str(report))
    assert [r["status"] for r in report.regions] == ["rewritten"], report.regions
    region = report.regions[0]
    assert (region["num_experts"], region["d_model"], region["gated"]) == (cfg.num_experts, cfg.d_model, cfg.gated)
    assert region["top_k"] == cfg.top_k  # proven from the routing code, not guessed
    runs_grouped_mm = kernel == "grouped_mm" and dtype == torch.bfloat16 and not cfg.d_model % 8 and not region["d_ff"] % 8
    assert region["kernel"].startswith("grouped_mm (forced)" if runs_grouped_mm else "fused ("), region["kernel"]
    assert_close_to_eager(out, ref)


@given(
    cfg=moe_configs(d_ff=st.sampled_from([8, 16])).filter(lambda c: c.d_model % 8 == 0),
    batch=st.integers(1, 3),
    seq=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_grouped_mm_kernel_equals_eager(cfg, batch, seq, seed):
    """The torch._grouped_mm way of running the experts, on every expert form the corpus draws
    (gated or not, biases, every activation, skewed and empty experts), in bf16: its only dtype."""
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = MoEBlock(cfg).eval().to(torch.bfloat16)
    x = torch.randn(batch, seq, cfg.d_model, dtype=torch.bfloat16)
    report = moeshard_compile.Report()
    backend = moeshard_compile.backend.make_backend(
        moeshard_compile.Options(inductor=False, expert_kernel="grouped_mm"), report)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
    note(str(report))
    assert [(r["status"], r["kernel"]) for r in report.regions] == [("rewritten", "grouped_mm (forced)")]
    assert "grouped_mm_ffn_in" in report.rewritten_graphs[0].code
    assert_close_to_eager(out, ref)


@given(seed=st.integers(0, 2**16), num_experts=st.integers(2, 16), top_k=st.integers(1, 4))
def test_degenerate_routing(seed, num_experts, top_k):
    """Every token to one expert (all others empty), in all three dispatch spellings."""
    top_k = min(top_k, num_experts)
    for style in ("index", "mask", "dense"):
        torch._dynamo.reset()
        torch.manual_seed(seed)
        cfg = MoEConfig(num_experts=num_experts, top_k=top_k, style=style, skew="hot")
        model = MoEBlock(cfg).eval()
        x = torch.randn(2, 5, cfg.d_model)
        with torch.no_grad():
            ids_TK, _, _ = model.moe.route(model.norm(x).reshape(-1, cfg.d_model))
            assert (ids_TK[:, 0] == 0).all()  # the skew really sends every token to expert 0
            out = torch.compile(model, backend="moeshard", fullgraph=True, options={"inductor": False})(x)
            assert_close_to_eager(out, model(x))
