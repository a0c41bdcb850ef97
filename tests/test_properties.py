"""Property: for any hand-written MoE the compiled model equals eager and the region is rewritten."""

import torch
from hypothesis import given, note
from hypothesis import strategies as st

import moeshard_compile
from helpers import assert_close_to_eager
from moe_zoo import ACTIVATIONS, MoEBlock, MoEConfig

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


@st.composite
def moe_configs(draw):
    router = draw(st.sampled_from(["softmax_topk", "softmax_topk_renorm", "topk_softmax", "switch"]))
    num_experts = draw(st.integers(1, 16))
    container = draw(st.sampled_from(["list", "dict", "stacked"]))  # stacked: 3-D parameters read as w[e]
    top_k = 1 if router == "switch" else draw(st.integers(1, min(4, num_experts)))
    return MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        d_model=draw(st.sampled_from([4, 8, 12])),
        d_ff=draw(st.sampled_from([4, 8, 20])),
        activation=draw(st.sampled_from(sorted(ACTIVATIONS))),
        gated=draw(st.booleans()),
        bias=draw(st.booleans()) if container != "stacked" else False,
        style=draw(st.sampled_from(["index", "mask", "dense"])),
        container=container,
        router=router,
        capacity=draw(st.integers(1, 6)),
        skew=draw(st.sampled_from(["none", "hot", "empty"])),
    )


@given(
    cfg=moe_configs(),
    dtype=st.sampled_from(DTYPES),
    batch=st.integers(1, 3),
    seq=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_compiled_equals_eager(cfg, dtype, batch, seq, seed):
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = MoEBlock(cfg).eval().to(dtype)
    x = torch.randn(batch, seq, cfg.d_model, dtype=dtype)
    report = moeshard_compile.Report()
    opts = moeshard_compile.Options(inductor=False)

    backend = moeshard_compile.backend.make_backend(opts, report)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
    note(str(report))
    assert [r["status"] for r in report.regions] == ["rewritten"], report.regions
    region = report.regions[0]
    assert (region["num_experts"], region["d_model"], region["gated"]) == (cfg.num_experts, cfg.d_model, cfg.gated)
    assert region["top_k"] == cfg.top_k  # proven from the routing code, not guessed
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
