"""On a CUDA GPU: the rewritten decoder under CUDA graphs, and both expert kernels, against eager.

Runs where CUDA is (`python -m pytest -q tests/test_modes_gpu.py` on the device machine); CI has
no GPU, and tests/test_modes.py and tests/test_kernel_choice.py check there what Inductor is
handed and the choice logic."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import hf_tiny
from moeshard_compile.backend import make_backend
from moeshard_compile.options import Options
from moeshard_compile.report import Report

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device machine)")


@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MOESHARD_CACHE_DIR", str(tmp_path / "cache"))


def _qwen3_cuda() -> torch.nn.Module:
    """hf_tiny's Qwen3-MoE with D and F multiples of 8 (torch._grouped_mm's rows), in bf16."""
    from transformers import Qwen3MoeConfig, Qwen3MoeModel

    config = Qwen3MoeConfig(**{**hf_tiny.DECODER_MOE, "hidden_size": 64}, intermediate_size=64,
                            moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3, head_dim=32)
    torch.manual_seed(0)
    return Qwen3MoeModel(config).to("cuda", torch.bfloat16).eval()


def _compiled(options: Options):
    torch._dynamo.reset()
    model, report = _qwen3_cuda(), Report()
    return model, torch.compile(model, backend=make_backend(options, report)), report


@pytest.mark.parametrize("kernel", ["auto", "fused", "grouped_mm"])
def test_reduce_overhead_replays_the_rewritten_graph_and_equals_eager(kernel):
    model, compiled, report = _compiled(Options(mode="reduce-overhead", expert_kernel=kernel))
    counters["inductor"].clear()
    with torch.no_grad():
        for seed in range(4):  # cudagraph trees record on a later call than the first
            inputs = {k: v.cuda() for k, v in hf_tiny.inputs(model, batch=2, seq=32, seed=seed).items()}
            got = compiled(**inputs).last_hidden_state.clone()
            torch.testing.assert_close(got, model(**inputs).last_hidden_state, rtol=3e-2, atol=3e-2)
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert [row["status"] for row in report.regions] == ["rewritten"] * 2
    texts = {row["kernel"] for row in report.regions}
    if kernel == "auto":  # the first region times both, the second has its shape class and reads the file
        assert [row["kernel_choice"]["how"] for row in report.regions] == ["measured", "cached"], texts
        assert set(report.regions[0]["kernel_choice"]["times_ms"]) == {"fused", "grouped_mm"}
    else:
        assert texts == {f"{kernel} (forced)"}
