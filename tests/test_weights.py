"""Stacked expert weights: one copy per region shared by the model's graphs, released with it."""

import gc

import torch

from helpers import assert_close_to_eager
from moe_zoo import MoEBlock, MoEConfig
from moeshard_compile import weights


def test_recompiled_graphs_share_one_stacked_copy_and_release_it():
    model = MoEBlock(MoEConfig(num_experts=3)).eval()
    compiled = torch.compile(model, backend="moeshard", options={"inductor": False}, fullgraph=True)
    with torch.no_grad():
        for shape in [(2, 3), (3, 5), (4, 2)]:  # static graph, then a dynamic one
            x = torch.randn(*shape, 8)
            assert_close_to_eager(compiled(x), model(x))
    first_param = model.moe.expert_list()[0].w_in.weight
    assert len(weights._SHARED[id(first_param)]) == 1
    key = id(first_param)
    del compiled, model, first_param
    torch._dynamo.reset()
    gc.collect()
    assert key not in weights._SHARED
