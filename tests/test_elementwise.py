"""Identification of the activation between an expert's two matmuls (passes/elementwise.py)."""

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from moeshard_compile.passes.elementwise import GRAPH, Elementwise, identify


def traced(fn, *shapes: tuple[int, ...]) -> tuple[list[fx.Node], fx.Node]:
    """(input nodes, output node) of `fn` traced by fx, with Dynamo-style example values."""
    gm = fx.symbolic_trace(fn)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, shape in zip(inputs, shapes):
        node.meta["example_value"] = torch.empty(shape, device="meta")
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    out = output.args[0]
    out.meta["example_value"] = torch.empty(shapes[0], device="meta")
    return inputs, out


@pytest.mark.parametrize(("fn", "want"), [
    (lambda h: F.gelu(h), Elementwise("gelu", gated=False)),
    (lambda h: F.gelu(h, approximate="tanh"), Elementwise("gelu_tanh", gated=False)),
    (lambda h: h * torch.sigmoid(h), Elementwise("silu", gated=False)),
    (lambda h: F.silu(h[..., :8]) * h[..., 8:], Elementwise("silu", True, "concat_gate_first")),
])
def test_identifies_activation_on_a_large_concrete_shape(fn, want):
    # 2**40 rows: identification must run on a few rows, never on the traced shape
    inputs, out = traced(fn, (2**40, 16))
    assert identify(inputs, out) == want


def test_gated_pair_names_the_gate_input():
    inputs, out = traced(lambda up, gate: up * F.relu(gate), (7, 4), (7, 4))
    assert identify(inputs, out) == Elementwise("relu", True, gate_input=1)


def test_chain_fixed_to_the_traced_rows_falls_back_to_the_full_shape():
    # view(6, 2, 4) only runs on exactly 6 rows: the few-rows attempt fails, the full shape works
    inputs, out = traced(lambda h: torch.tanh(h.view(6, 2, 4)).view(6, 8), (6, 8))
    assert identify(inputs, out) == Elementwise("tanh", gated=False)


def test_other_row_wise_function_is_kept_as_graph():
    inputs, out = traced(lambda h: torch.softmax(h, dim=-1), (9, 16))
    assert identify(inputs, out) == GRAPH


@pytest.mark.parametrize("fn", [
    lambda h: h.t(),  # rows become columns
    lambda h: h[:4],  # rows dropped
])
def test_chain_that_does_not_keep_the_rows_is_not_identified(fn):
    inputs, out = traced(fn, (9, 16))
    assert identify(inputs, out) is None


def test_unknown_function_of_two_projections_is_not_identified():
    inputs, out = traced(lambda up, gate: torch.softmax(up, -1) * gate.cos(), (7, 4), (7, 4))
    assert identify(inputs, out) is None
