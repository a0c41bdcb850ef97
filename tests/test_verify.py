"""The verifier confirms true records and rejects subtly wrong ones (passes.verify)."""

import dataclasses
import operator

import pytest
import torch

import hf_tiny
from moeshard_compile import passes
import spellings
from graph_capture import capture
from moe_zoo import MoEBlock, MoEConfig
from moeshard_compile.passes.evaluate import Evaluator


def recognised(model, *args, **kwargs):
    captured = capture(model, *args, **kwargs)
    regions = captured.regions
    assert regions and all(r.status == "recognised" for r in regions)
    return captured, regions


def verified(captured, regions) -> list[str]:
    passes.verify(captured.gm, regions, captured.inputs())
    return [r.reason for r in regions]


def loop_model(**cfg):
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, **cfg})
    return MoEBlock(cfg).eval(), torch.randn(2, 5, cfg.d_model)


@pytest.mark.parametrize("style", ["index", "mask", "dense"])
@pytest.mark.parametrize("router", ["softmax_topk", "switch"])
def test_true_records_pass(style, router):
    model, x = loop_model(style=style, router=router, top_k=1 if router == "switch" else 2, capacity=3)
    captured, regions = recognised(model, x)
    assert verified(captured, regions) == [""]


@pytest.mark.parametrize("build", [hf_tiny.switch, hf_tiny.qwen2_moe, hf_tiny.mixtral])
def test_true_records_of_hf_models_pass(build):
    model = build().eval()
    captured, regions = recognised(model, **hf_tiny.inputs(model))
    assert set(verified(captured, regions)) == {""}


def _scale_node(graph, node, factor):
    with graph.inserting_after(node):
        scaled = graph.call_function(operator.mul, (node, factor))
    scaled.meta = dict(node.meta)
    return scaled


@pytest.mark.parametrize("style", ["index", "mask", "dense"])
def test_perturbed_coefficient_is_rejected(style):
    model, x = loop_model(style=style)
    captured, (region,) = recognised(model, x)
    region.routing = dataclasses.replace(region.routing, combine_TE=_scale_node(captured.gm.graph, region.routing.combine_TE, 1.001))
    (reason,) = verified(captured, [region])
    assert reason.startswith("verification failed: the record disagrees with the graph on random routing")


def test_swapped_expert_is_rejected():
    model, x = loop_model(style="index")
    captured, (region,) = recognised(model, x)
    calls = region.expert_calls
    region.expert_calls = [calls[1], calls[0], *calls[2:]]  # expert 1's code checked as expert 0
    (reason,) = verified(captured, [region])
    assert "expert 0 of 4 does not compute relu with its stacked weights" in reason


def test_a_weight_on_the_input_read_as_one_on_the_output_is_rejected():
    """Llama 4's router scales every expert's input; a record without that scale, the routing
    weight left to the combine alone, computes w f(x) for f(w x)."""
    import spellings

    model = spellings.make("llama4")
    captured, (region,) = recognised(model, torch.randn(2, 5, 16))
    assert region.routing.input_scale_TE is not None and verified(captured, [region]) == [""]
    captured, (region,) = recognised(model, torch.randn(2, 5, 16))
    region.routing = dataclasses.replace(region.routing, input_scale_TE=None)
    (reason,) = verified(captured, [region])
    assert reason.startswith("verification failed: the record disagrees with the graph")


def test_a_weight_inside_the_expert_left_out_of_the_check_is_rejected():
    """`down(act(up(x)) * w)`: w is the combine's, read from inside the expert. A record whose
    expert calls forget that factor disagrees with the graph."""
    import spellings

    model = spellings.make("weight_inside_expert")
    captured, (region,) = recognised(model, torch.randn(2, 5, 16))
    assert all(call.scale is not None for call in region.expert_calls) and verified(captured, [region]) == [""]
    captured, (region,) = recognised(model, torch.randn(2, 5, 16))
    region.expert_calls = [dataclasses.replace(call, scale=None) for call in region.expert_calls]
    (reason,) = verified(captured, [region])
    assert reason.startswith("verification failed: ")


def test_swapped_stacked_weights_are_rejected():
    model, x = loop_model(style="mask")
    captured, (region,) = recognised(model, x)
    stack = region.weights.stack

    def swapped(tensors):
        w = stack(tensors)
        order = torch.tensor([1, 0, 2, 3])
        return dataclasses.replace(w, w_out_EFD=w.w_out_EFD[order])

    region.weights = dataclasses.replace(region.weights, stack=swapped)
    (reason,) = verified(captured, [region])
    assert "expert 0 of 4 does not compute" in reason


def test_wrong_activation_is_rejected():
    model, x = loop_model(activation="gelu")
    captured, (region,) = recognised(model, x)
    region.activation = "gelu_tanh"  # 1e-3 away from the model's erf GELU
    (reason,) = verified(captured, [region])
    assert "does not compute gelu_tanh" in reason


def test_perturbed_slot_weight_of_gathered_weights_is_rejected():
    captured, (region,) = recognised(spellings.make("gathered_weights_einsum"), torch.randn(2, 5, 16))
    assert verified(captured, [region]) == [""]
    captured, (region,) = recognised(spellings.make("gathered_weights_einsum"), torch.randn(2, 5, 16))
    region.routing = dataclasses.replace(region.routing, weights_TK=_scale_node(captured.gm.graph, region.routing.weights_TK, 1.001))
    (reason,) = verified(captured, [region])
    assert reason.startswith("verification failed: the record disagrees with the graph on random routing"), reason


def test_identity_experts_left_out_of_the_combine_are_rejected():
    captured, (region,) = recognised(spellings.make("longcat_zero_experts"), torch.randn(2, 5, 16))
    assert region.routing.base_TD is not None  # the identity experts' rows: what the combine adds without experts
    region.routing = dataclasses.replace(region.routing, base_TD=None)
    (reason,) = verified(captured, [region])
    assert reason.startswith("verification failed: the record disagrees with the graph"), reason


def test_the_evaluator_runs_writes_made_through_views():
    class FilledBySlices(torch.nn.Module):
        def forward(self, x):
            out = x.new_empty(x.shape[0], 2 * x.shape[1])
            out[:, : x.shape[1]].copy_(x)
            out[:, x.shape[1] :].copy_(3 * x)
            return out

    gm = torch.fx.symbolic_trace(FilledBySlices())
    (x_node,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out_node = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    x = torch.randn(3, 4)
    (got,) = Evaluator(gm.graph, {x_node: x}).run([out_node])
    torch.testing.assert_close(got, FilledBySlices()(x).double())


def test_too_small_top_k_bound_is_rejected():
    model, x = loop_model(top_k=3)
    captured, (region,) = recognised(model, x)
    region.top_k = 2
    (reason,) = verified(captured, [region])
    assert "a token has 3 experts, more than the proven bound top_k=2" in reason


def test_shifted_expert_ids_of_stacked_experts_are_rejected():
    model = hf_tiny.qwen3_moe().eval()
    captured, regions = recognised(model, **hf_tiny.inputs(model))
    region = regions[0]
    graph = captured.gm.graph
    ids = region.routing.ids_TK
    with graph.inserting_after(ids):
        plus_one = graph.call_function(operator.add, (ids, 1))
    with graph.inserting_after(plus_one):
        shifted = graph.call_function(operator.mod, (plus_one, region.num_experts))
    region.routing = dataclasses.replace(region.routing, ids_TK=shifted)
    reasons = verified(captured, regions)
    assert reasons[0].startswith("verification failed: the record disagrees") and reasons[1] == ""



@pytest.mark.parametrize(("chain", "width", "layout"), [
    (torch.tanh, 6, "columns"),
    (lambda h: h[..., ::2].clamp(max=7) * torch.sigmoid(h[..., 1::2]), 12, "pairs"),  # GPT-OSS's interleaving
    (lambda h: torch.nn.functional.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1], 12, "halves"),
    (lambda h: h * h.mean(-1, keepdim=True), 6, None),  # every column reads every column
    (lambda h: torch.nn.functional.silu(h[..., :6]) * h[..., 6:], 12, None),  # halves fixed to the full width
    (lambda h: h.view(h.shape[0], 2, 6).prod(1), 12, None),
])
def test_the_columns_expert_code_reads_are_proven_before_sharding(chain, width, layout):
    """Which input columns each output column of copied expert code reads decides how the FFN dim
    shards (passes.shard.CHAIN_LAYOUTS); a pattern not proven leaves the region unsharded."""
    from moeshard_compile.passes.shard import CHAIN_LAYOUTS
    from moeshard_compile.passes.verify import _reads_columns_as

    h = torch.randn(8, width, dtype=torch.float64)
    base = chain(h)
    found = [candidate for candidate in CHAIN_LAYOUTS if _reads_columns_as(chain, h, base, candidate)]
    assert found == ([] if layout is None else [layout])


@pytest.mark.parametrize("batched", [False, True])
def test_stand_ins_tell_a_weight_on_the_input_from_one_on_the_output(batched):
    """The combine check swaps experts for stand-ins: a linear stand-in would take f(w x) (the
    weight scaling the expert's input, as Llama 4 does) for w f(x), and pass a record that
    computes the other."""
    from moeshard_compile.passes.region import ExpertCall
    from moeshard_compile.passes.verify import _stand_in

    r_ED, q_ED = torch.randn(2, 3, 4, dtype=torch.float64)
    call = ExpertCall(x=None, y=None, batched=batched)
    expert = _stand_in(call, 1, r_ED, q_ED)
    x, w = torch.randn(5, 4, dtype=torch.float64), torch.rand(5, 1, dtype=torch.float64) * 0.8 + 0.1
    assert not torch.allclose(expert(w * x), w * expert(x))
