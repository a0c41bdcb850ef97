"""Stacked expert weights: one copy per parameter set, shared by the model's graphs, released with it."""

import gc

import torch

from helpers import assert_close_to_eager
from moe_zoo import MoEBlock, MoEConfig
from moeshard_compile import weights


def _entries_of(param: torch.Tensor) -> list:
    return [key for key in weights._SHARED if key[0][0] == id(param)]


def test_recompiled_graphs_share_one_stacked_copy_and_release_it():
    model = MoEBlock(MoEConfig(num_experts=3)).eval()
    compiled = torch.compile(model, backend="moeshard", options={"inductor": False}, fullgraph=True)
    with torch.no_grad():
        for shape in [(2, 3), (3, 5), (4, 2)]:  # static graph, then a dynamic one
            x = torch.randn(*shape, 8)
            assert_close_to_eager(compiled(x), model(x))
    first_param = model.moe.expert_list()[0].w_in.weight
    assert len(_entries_of(first_param)) == 1
    key = _entries_of(first_param)[0]
    del compiled, model, first_param
    torch._dynamo.reset()
    gc.collect()
    assert key not in weights._SHARED


def test_an_unchanged_model_is_never_restacked():
    model = MoEBlock(MoEConfig(num_experts=3)).eval()
    compiled = torch.compile(model, backend="moeshard", options={"inductor": False}, fullgraph=True)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        compiled(x)
        (key,) = _entries_of(model.moe.expert_list()[0].w_in.weight)
        stacked = weights._SHARED[key]
        for _ in range(3):
            compiled(x)
        assert weights._SHARED[key] is stacked


def test_digest_sees_the_order_of_experts_in_a_3d_parameter():
    w_EDF = torch.randn(4, 3, 5)
    assert weights.digest([w_EDF]) == weights.digest([w_EDF.clone()])
    assert weights.digest([w_EDF]) != weights.digest([w_EDF.flip(0)])
