"""The rewritten graph's structure: one grouped computation per region, no per-expert work left."""

import operator

import pytest
import torch
import torch.fx as fx

import hf_tiny
import moeshard_compile
from moeshard_compile import passes
from moe_zoo import MoEBlock, MoEConfig

FFN_IN = torch.ops.moeshard.gather_grouped_ffn_in.default
FFN_OUT = torch.ops.moeshard.grouped_ffn_out_scatter.default
PER_EXPERT_OPS = {torch.nonzero, torch._C._nn.linear, operator.setitem, "index_add_", "nonzero"}


def is_per_expert(node: fx.Node) -> bool:
    one_arg_where = node.target is torch.where and len(node.args) == 1  # nonzero in disguise
    return node.target in PER_EXPERT_OPS or one_arg_where


def rewritten_graphs(model, *args, dropless=False, **kwargs) -> list[fx.GraphModule]:
    """Compile with moeshard (no Inductor) and return the rewritten graph of each Dynamo graph."""
    report = moeshard_compile.Report()
    backend = moeshard_compile.backend.make_backend(moeshard_compile.Options(inductor=False, dropless=dropless), report)
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*args, **kwargs)
    return report.rewritten_graphs


def count(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target == target)


@pytest.mark.parametrize("style", ["index", "mask", "dense"])
@pytest.mark.parametrize("gated", [False, True])
def test_loop_becomes_one_grouped_computation(style, gated):
    cfg = MoEConfig(num_experts=8, top_k=2, style=style, gated=gated)
    (gm,) = rewritten_graphs(MoEBlock(cfg).eval(), torch.randn(2, 5, cfg.d_model))
    (ffn_in,) = [n for n in gm.graph.nodes if n.target == FFN_IN]
    assert count(gm, FFN_OUT) == 1 and (ffn_in.args[4] is not None) == gated  # w_gate
    leftovers = [n for n in gm.graph.nodes if is_per_expert(n)]
    # the router's linear stays; nothing per expert does
    assert [n.target for n in leftovers] == [torch._C._nn.linear], leftovers
    # one grouping of the rows by expert, and the slots summed by a reduction
    assert count(gm, torch.ops.moeshard.group_by_expert.default) == 1 and count(gm, torch.sort) == 0
    assert count(gm, torch.index_add) == 0


def test_weights_are_graph_inputs_stacked_once():
    cfg = MoEConfig(num_experts=5, top_k=2, bias=True)
    model = MoEBlock(cfg).eval()
    (gm,) = rewritten_graphs(model, torch.randn(2, 3, cfg.d_model))
    stacked = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("moe0_")]
    assert sorted(n.name for n in stacked) == ["moe0_b_in_ef", "moe0_b_out_ed", "moe0_w_in_edf", "moe0_w_out_efd"]
    stacks = [n for n in gm.graph.nodes if n.target in (torch.stack, torch.cat)]
    stacked_inputs = {a.op for n in stacks for a in n.args[0]}
    assert "placeholder" not in stacked_inputs  # no per-call stacking of parameters


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
def test_stacked_experts_use_parameter_views(implementation):
    model = hf_tiny.mixtral(implementation).eval()
    (gm,) = rewritten_graphs(model, **hf_tiny.inputs(model))
    assert (count(gm, FFN_IN), count(gm, FFN_OUT)) == (2, 2)  # 2 layers
    assert count(gm, torch.bmm) == 0 and count(gm, torch.nonzero) == 0


def test_switch_capacity_mask_kept_and_removed():
    model = hf_tiny.switch(expert_capacity=3).eval()
    kwargs = hf_tiny.inputs(model)

    def capacity_compares(gm):
        return [n for n in gm.graph.nodes if n.target in (operator.le, "le") and n.args[1] == 3]

    (kept,) = rewritten_graphs(model, **kwargs)
    assert len(capacity_compares(kept)) == 2  # Switch's cumsum(one_hot) <= capacity, per MoE layer
    torch._dynamo.reset()
    (dropless,) = rewritten_graphs(model, dropless=True, **kwargs)
    assert capacity_compares(dropless) == []


def test_a_wrong_top_k_bound_is_caught_at_compile_time(monkeypatch):
    """The verifier evaluates the routing: a wrong bound skips the region, and the model stays exact."""
    import moeshard_compile.passes.combine_columns

    monkeypatch.setattr(moeshard_compile.passes.combine_columns, "nnz_bound", lambda *args: 1)
    cfg = MoEConfig(num_experts=4, top_k=2, style="dense")
    model, x = MoEBlock(cfg).eval(), torch.randn(2, 3, cfg.d_model)
    report = moeshard_compile.explain(model, x)
    (row,) = report.regions
    assert row["status"] == "skipped" and "a token has 2 experts, more than the proven bound top_k=1" in row["reason"]


def test_a_wrong_top_k_bound_fails_loudly_at_run_time(monkeypatch):
    """Past the verifier, the lowering re-checks the bound at run time: a wrong one raises, naming the module."""
    import moeshard_compile.passes.combine_columns

    monkeypatch.setattr(moeshard_compile.passes.combine_columns, "nnz_bound", lambda *args: 1)
    monkeypatch.setattr(passes, "verify", lambda *args: None)
    cfg = MoEConfig(num_experts=4, top_k=2, style="dense")
    model = MoEBlock(cfg).eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"in moe\.experts, a token has more than top_k=1 non-zero, non-NaN routing weights: the bound proven"):
        torch.compile(model, backend="moeshard", fullgraph=True, options={"inductor": False})(torch.randn(2, 3, cfg.d_model))


@pytest.mark.parametrize("style", ["index", "mask", "dense"])
def test_top_k_bound_survives_dynamic_shapes(style):
    """The recompiled graph (symbolic token count) keeps the proven K, not the dense bound E."""
    cfg = MoEConfig(num_experts=5, top_k=2, style=style)
    model = MoEBlock(cfg).eval()
    report = moeshard_compile.Report()
    backend = moeshard_compile.backend.make_backend(moeshard_compile.Options(inductor=False), report)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        for shape in [(2, 5), (3, 4)]:
            compiled(torch.randn(*shape, cfg.d_model))
    assert [r["top_k"] for r in report.regions] == [2, 2]
