"""What moeshard does when it must not (or cannot) rewrite: the model keeps its exact results,
and the report says why."""

import json

import pytest
import torch
import torch.nn as nn
from helpers import assert_close_to_eager
from moe_zoo import MoEBlock, MoEConfig

from moeshard_compile import passes
import moeshard_compile.passes.lower
import moeshard_compile.passes.pipeline

STYLES = ["index", "mask", "dense"]


def _compile(model, tmp_path, fullgraph=True):
    return torch.compile(model, backend="moeshard", fullgraph=fullgraph, options={"inductor": False, "dump_dir": tmp_path})


def _report(tmp_path) -> dict:
    return json.loads((tmp_path / "report.json").read_text())


# --- (a) autograd on --------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_autograd_on_compiles_unchanged(tmp_path, style):
    """Parameters require grad and no torch.no_grad(): the graph runs unchanged, with autograd."""
    torch.manual_seed(0)
    model = MoEBlock(MoEConfig(style=style)).eval()
    x = torch.randn(2, 5, 8)
    out = _compile(model, tmp_path)(x)
    ref = model(x)
    assert_close_to_eager(out.detach(), ref.detach())
    assert out.requires_grad == ref.requires_grad

    regions = _report(tmp_path)["regions"]
    assert len(regions) == 1
    assert regions[0]["status"] == "skipped"
    assert "torch.no_grad" in regions[0]["reason"]
    assert "moeshard.gather_grouped_ffn_in" not in (tmp_path / "graph_0_after.py").read_text()

    # Gradients through the compiled (unchanged) graph equal eager ones.
    expert = model.moe.expert_list()[0].w_in.weight
    (grad_compiled,) = torch.autograd.grad(out.square().sum(), expert, allow_unused=True)
    (grad_eager,) = torch.autograd.grad(ref.square().sum(), expert, allow_unused=True)
    assert (grad_compiled is None) == (grad_eager is None)
    if grad_eager is not None:
        assert_close_to_eager(grad_compiled, grad_eager)


def test_graph_without_moe_keeps_inplace_ops(tmp_path):
    """A graph with no MoE region goes through unchanged: an in-place method whose result is not
    used (`h.mul_(2)`) still mutates h."""

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            h = self.lin(x)
            h.mul_(2)
            return h

    torch.manual_seed(0)
    model = InPlace().eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        out = _compile(model, tmp_path)(x)
        assert_close_to_eager(out, model(x))
    assert _report(tmp_path)["regions"] == []


def test_effect_only_nodes_survive_the_rewrite(tmp_path):
    """Dynamo traces torch.vmap as nesting calls nobody reads (kept for their effect): removing
    what the rewrite made dead must leave them, or the vmapped code fails at run time."""

    class VmapThenMoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = MoEBlock(MoEConfig(style="index"))

        def forward(self, x):
            return self.moe(torch.vmap(lambda row: row * row.sigmoid())(x))

    torch.manual_seed(0)
    model = VmapThenMoE().eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert_close_to_eager(_compile(model, tmp_path)(x), model(x))
    assert [r["status"] for r in _report(tmp_path)["regions"]] == ["rewritten"]


# --- (b) dropout active (training mode) -------------------------------------------------------


def _with_dropout(style: str, p: float) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(MoEBlock(MoEConfig(style=style)), nn.Dropout(p))


@pytest.mark.parametrize("style", ["index", "dense"])
def test_dropout_in_training_mode_compiles_unchanged(tmp_path, style):
    model = _with_dropout(style, 0.5).train()
    x = torch.randn(2, 5, 8)
    compiled = _compile(model, tmp_path)
    with torch.no_grad():
        # inductor=False runs the FX graph eagerly: the one dropout draws from the global
        # generator exactly as eager does, so equal seeds give equal masks.
        torch.manual_seed(1234)
        out = compiled(x)
        torch.manual_seed(1234)
        ref = model(x)
    assert (out == 0).any()  # dropout really was active
    assert_close_to_eager(out, ref)

    report = _report(tmp_path)
    assert [r["status"] for r in report["regions"]] == ["skipped"]
    assert "model.eval()" in report["regions"][0]["reason"]
    assert any("model.eval()" in f["reason"] for f in report["fallbacks"])
    assert "moeshard.gather_grouped_ffn_in" not in (tmp_path / "graph_0_after.py").read_text()


@pytest.mark.parametrize("mode", ["eval", "train_p0"])
def test_inactive_dropout_is_rewritten(tmp_path, mode):
    model = _with_dropout("index", 0.5).eval() if mode == "eval" else _with_dropout("index", 0.0).train()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        out = _compile(model, tmp_path)(x)
        assert_close_to_eager(out, model(x))
    report = _report(tmp_path)
    assert [r["status"] for r in report["regions"]] == ["rewritten"]
    assert report["fallbacks"] == []


# --- (c) weights changed after compilation ----------------------------------------------------


def _change_weights(model: MoEBlock, how: str) -> None:
    experts = model.moe.expert_list()
    with torch.no_grad():
        if how == "inplace_mul":
            experts[0].w_in.weight.mul_(2)
            experts[3].w_out.weight.add_(0.5)
        elif how == "load_state_dict":
            model.load_state_dict({k: torch.randn_like(v) for k, v in model.state_dict().items()})
        elif how == "load_state_dict_assign":
            model.load_state_dict({k: torch.randn_like(v) for k, v in model.state_dict().items()}, assign=True)
        elif how == "reassign_parameter":
            experts[1].w_out.weight = nn.Parameter(torch.randn_like(experts[1].w_out.weight))
        else:
            raise ValueError(how)


@pytest.mark.parametrize("how", ["inplace_mul", "load_state_dict", "load_state_dict_assign", "reassign_parameter"])
def test_changed_expert_weights_are_used(tmp_path, how):
    torch.manual_seed(0)
    model = MoEBlock(MoEConfig(gated=True)).eval()
    x = torch.randn(2, 5, 8)
    compiled = _compile(model, tmp_path)
    with torch.no_grad():
        before = compiled(x)
        assert_close_to_eager(before, model(x))
        assert _report(tmp_path)["regions"][0]["status"] == "rewritten"
        _change_weights(model, how)
        ref = model(x)
        assert (ref - before).abs().max() > 1e-3  # the change matters for this input
        assert_close_to_eager(compiled(x), ref)


def test_inplace_change_restacks_without_recompiling(tmp_path):
    """The in-place case is served by restacking in the same compiled graph, not by a recompile."""
    torch.manual_seed(0)
    model = MoEBlock(MoEConfig()).eval()
    x = torch.randn(2, 5, 8)
    compiled = _compile(model, tmp_path)
    with torch.no_grad():
        compiled(x)
        _change_weights(model, "inplace_mul")
        assert_close_to_eager(compiled(x), model(x))
    assert not (tmp_path / "graph_1_before.py").exists()
    assert len(_report(tmp_path)["regions"]) == 1


# --- (d) regions the rewrite cannot handle ----------------------------------------------------


def test_wrapped_activation_module_is_read_by_what_it_computes(tmp_path):
    """transformers' Mixtral experts with act_fn wrapped in a Sequential: a submodule of act_fn
    is the activation's code, identified numerically, and the region is rewritten. (Other
    submodules inside stacked experts, as Muse Spark's post_expert_norm, are skipped: test_zoo.)"""
    from transformers import MixtralConfig, MixtralModel

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
    )
    model = MixtralModel(config).eval()
    model.layers[0].mlp.experts.act_fn = nn.Sequential(nn.SiLU())
    ids = torch.randint(0, 32, (1, 6))
    with torch.no_grad():
        out = _compile(model, tmp_path)(ids).last_hidden_state
        assert_close_to_eager(out, model(ids).last_hidden_state)
    (region,) = _report(tmp_path)["regions"]
    assert (region["module"], region["status"], region["activation"]) == ("layers.0.mlp.experts", "rewritten", "silu")


def _failing_lower_region(monkeypatch, fail_on_call: int):
    """Make the lowering raise RuntimeError("boom") on its `fail_on_call`-th call (0-based).

    passes.pipeline does `from .lower import lower_region`, so the name it calls lives in
    passes.pipeline; patching passes.lower alone would not reach it. Both are patched."""
    real = moeshard_compile.passes.lower.lower_region
    calls = []

    def lower_region(gm, region, index, plan=None, kernel="fused"):
        calls.append(index)
        if len(calls) - 1 == fail_on_call:
            raise RuntimeError("boom")
        return real(gm, region, index, plan, kernel)

    monkeypatch.setattr(moeshard_compile.passes.lower, "lower_region", lower_region)
    monkeypatch.setattr(moeshard_compile.passes.pipeline, "lower_region", lower_region)
    return calls


def _check_fallback(tmp_path, model, x, num_regions):
    with torch.no_grad():
        out = _compile(model, tmp_path)(x)
        assert_close_to_eager(out, model(x))
    report = _report(tmp_path)
    assert len(report["regions"]) == num_regions
    for region in report["regions"]:
        assert region["status"] == "skipped"
        assert "boom" in region["reason"]
    assert any("boom" in f["reason"] for f in report["fallbacks"])
    assert "moeshard.gather_grouped_ffn_in" not in (tmp_path / "graph_0_after.py").read_text()


def test_lowering_failure_keeps_original_graph(monkeypatch, tmp_path):
    """The only region's lowering fails: the model still runs, unchanged, and says why."""
    calls = _failing_lower_region(monkeypatch, fail_on_call=0)
    torch.manual_seed(0)
    _check_fallback(tmp_path, MoEBlock(MoEConfig()).eval(), torch.randn(2, 5, 8), num_regions=1)
    assert calls  # the patched lowering really was reached


def test_lowering_failure_in_second_region_keeps_original_graph(monkeypatch, tmp_path):
    """The first region lowers, the second fails: the whole graph falls back to the original."""
    calls = _failing_lower_region(monkeypatch, fail_on_call=1)
    torch.manual_seed(0)
    model = nn.Sequential(MoEBlock(MoEConfig()), MoEBlock(MoEConfig())).eval()
    _check_fallback(tmp_path, model, torch.randn(2, 5, 8), num_regions=2)
    assert len(calls) == 2


def test_recognition_failure_keeps_original_graph(monkeypatch, tmp_path):
    """A recogniser that raises must not break the model: the graph compiles unchanged."""

    def recognise(gm):
        raise RuntimeError("boom")

    monkeypatch.setattr(passes, "recognise", recognise)
    torch.manual_seed(0)
    model = MoEBlock(MoEConfig()).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert_close_to_eager(_compile(model, tmp_path)(x), model(x))
    report = _report(tmp_path)
    assert [(r["module"], r["form"], r["status"]) for r in report["regions"]] == [("moe.experts", "expert_bank", "skipped")]
    assert report["fallbacks"] == [{"graph": 0, "reason": "recognition failed: RuntimeError: boom"}]


@pytest.mark.parametrize("style", STYLES)
def test_empty_batch(tmp_path, style):
    """T = 0 tokens: rewritten, and the (empty) output has eager's shape."""
    model = MoEBlock(MoEConfig(style=style)).eval()
    x = torch.randn(0, 5, 8)
    with torch.no_grad():
        assert_close_to_eager(_compile(model, tmp_path)(x), model(x))
    assert [r["status"] for r in _report(tmp_path)["regions"]] == ["rewritten"]


def test_kernel_choice_failure_keeps_original_graph(monkeypatch, tmp_path):
    """Choosing the expert kernel fails: the model still runs, unchanged, and the report says why."""
    calls = []

    def failing_choice(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("boom")

    monkeypatch.setattr(moeshard_compile.backend, "choose_kernels", failing_choice)
    torch.manual_seed(0)
    _check_fallback(tmp_path, MoEBlock(MoEConfig()).eval(), torch.randn(2, 5, 8), num_regions=1)
    assert calls
