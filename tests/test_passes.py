"""The passes as functions of graphs: recognise reads a captured graph without changing it,
prepare adds only the nodes it marks, and rewrite turns the graph into one that computes the
same values from the stacked weights it asks for."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import spellings
from graph_capture import copy_graph, on_graph
from moeshard_compile import passes
from moeshard_compile.passes.op_contract import GROUP_BY_EXPERT, op
from moeshard_compile.passes.pipeline import _EMITTED, is_impure

FORMS = ["mixtral", "switch_capacity", "gathered_weights_einsum", "dense_einsum_stack", "llama4"]


def _inputs(gm: fx.GraphModule, example_inputs: list) -> dict[fx.Node, object]:
    return dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs))


def _stacked(sources: list[passes.WeightSource], gm: fx.GraphModule, example_inputs: list) -> list[torch.Tensor]:
    """What the backend feeds the rewritten graph after its own inputs: each source stacked."""
    values = _inputs(gm, example_inputs)
    return [t for s in sources for t in s.stack([values[n] for n in s.inputs]).present().values()]


@pytest.mark.parametrize("name", FORMS)
def test_recognise_leaves_the_graph_as_it_is(name):
    def run(gm, example_inputs):
        code = gm.graph.python_code("self").src
        regions = passes.recognise(gm)
        return regions, code, gm.graph.python_code("self").src

    regions, before, after = on_graph(spellings.make(name), run, torch.randn(2, 5, 16))
    assert [r.status for r in regions] == [passes.Status.RECOGNISED] and after == before


@pytest.mark.parametrize("name", FORMS)
def test_prepare_adds_only_marked_nodes_the_graph_does_not_read(name):
    def run(gm, example_inputs):
        before = set(gm.graph.nodes)
        regions = passes.recognise(gm)
        passes.prepare(gm, regions)
        return [n for n in gm.graph.nodes if n not in before], regions

    added, (region,) = on_graph(spellings.make(name), run, torch.randn(2, 5, 16))
    assert all(n.meta.get(_EMITTED) for n in added)
    outside = {u for n in added for u in n.users if u not in added}
    assert not outside, outside  # dead until the rewrite reads them
    routing = region.routing
    assert routing is not None and (routing.combine_TE is not None or routing.ids_TK is not None)


@pytest.mark.parametrize("name", FORMS)
def test_rewrite_computes_the_graph_from_the_weights_it_asks_for(name):
    def run(gm, example_inputs):
        original = fx.GraphModule(gm, copy_graph(gm.graph))
        regions = passes.recognise(gm)
        passes.prepare(gm, regions)
        passes.verify(gm, regions, _inputs(gm, example_inputs))
        sources = passes.rewrite(gm, regions)
        weights = _stacked(sources, gm, example_inputs)
        with torch.no_grad():
            return original(*example_inputs), gm(*example_inputs, *weights), gm, regions, sources

    x = torch.randn(2, 7, 16)
    want, got, gm, regions, sources = on_graph(spellings.make(name), run, x)
    assert [r.status for r in regions] == [passes.Status.REWRITTEN] and len(sources) == 1
    torch.testing.assert_close(got, want)
    assert sum(n.target == op(GROUP_BY_EXPERT) for n in gm.graph.nodes) == 1
    dead = [n for n in gm.graph.nodes if n.meta.get(_EMITTED) and not n.users and not is_impure(n)]
    assert not dead, dead  # what prepare added and the rewrite does not read is gone
    added = [n.target for n in gm.graph.nodes if n.op == "placeholder" and n.target.startswith("moe0_")]
    assert added and "moe0_w_in_EDF" in added and "moe0_w_out_EFD" in added


def test_rewrite_of_a_skipped_region_restores_the_graph():
    def run(gm, example_inputs):
        before = gm.graph.python_code("self").src
        regions = passes.recognise(gm)
        passes.prepare(gm, regions)
        for region in regions:
            region.skip("skipped by the test")
        sources = passes.rewrite(gm, regions)
        return before, gm.graph.python_code("self").src, sources

    before, after, sources = on_graph(spellings.make("mixtral"), run, torch.randn(2, 5, 16))
    assert sources == [] and after == before
