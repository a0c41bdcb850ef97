"""MoEShard on several GPUs with NCCL: every rank's compiled output equals its own eager output.

One process per visible GPU (tests/rank_pool.py), NCCL, the Triton kernels and Inductor; every
rank brings its own batch. Skipped below two GPUs; on a multi-GPU machine:

    python -m pytest -q tests/test_distributed_gpu.py

The `rank_*` functions run in the ranks, the `test_*` functions in pytest's process.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from transformers import MixtralModel, SwitchTransformersEncoderModel

from bench.common.accuracy import no_worse_than_eager
from helpers import assert_blocks_tile
from moe_zoo import MoEBlock, MoEConfig
from moeshard_compile import Options, Report
from moeshard_compile.backend import make_backend
from moeshard_compile.demo import model_config
from rank_pool import RankPool

GPUS = torch.cuda.device_count()
pytestmark = pytest.mark.skipif(GPUS < 2, reason="MoEShard across GPUs needs at least 2 CUDA devices")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def gpus():
    pool = RankPool(GPUS, device="cuda", pg_timeout_s=300.0, startup_timeout_s=300.0)
    yield pool
    pool.close()


# ---------------------------------------------------------------------- rank side


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _compare(model: torch.nn.Module, inputs: dict, dtype: str, **options) -> dict:
    """Compile `model` with moeshard over the whole group and check this rank's output; its regions.

    fp32: against eager. bf16: against the same weights in fp32, no further off than bf16 eager
    is, per token (median and 99th percentile): bf16 rounding flips near-tied routing choices,
    differently in any two compilations (Inductor alone as much as moeshard), so a direct
    comparison with bf16 eager would measure those flips, not moeshard.
    """
    reference = copy.deepcopy(model).float() if dtype == "bfloat16" else None
    report = Report()
    backend = make_backend(Options(world_size=dist.get_world_size(), **options), report)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        eager = model(**inputs)[0]
        out = compiled(**inputs)[0]
        truth = None if reference is None else reference(**{k: _fp32(v) for k, v in inputs.items()})[0]
    where = f"rank {dist.get_rank()} ({dtype})"
    if truth is None:
        err = ((out.double() - eager.double()).abs().max() / eager.double().abs().max()).item()
        assert err < 1e-4, f"{where}: max relative error {err:.3g} against eager\n{report}"
        errors = {"max_rel_err": err}
    else:
        ok, errors = no_worse_than_eager(out, eager, truth)
        assert ok, f"{where}: per-token errors (ours, eager's) {errors}\n{report}"
    assert all(r["status"] == "rewritten" and r["world_size"] == dist.get_world_size() for r in report.regions), report
    blocks = [(r["ffn_block"], r["d_ff"], r["expert_group_size"], r["experts_held"], r["num_experts"])
              for r in report.regions]
    return {"errors": errors, "blocks": blocks}


def _fp32(value):
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _token_ids(vocab: int, batch: int, seq: int) -> dict:
    generator = torch.Generator().manual_seed(1000 + dist.get_rank())  # every rank its own batch
    ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(_device())
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def rank_switch_encoder(dtype: str, comm_chunks: int) -> dict:
    """The paper's Switch-Base encoder with 64 experts (4 layers, 2 of them MoE), random weights."""
    config = model_config("switch-base-64")
    config.num_layers, config.num_sparse_encoder_layers = 4, 2
    torch.manual_seed(0)
    model = SwitchTransformersEncoderModel(config).eval().to(_device(), DTYPES[dtype])
    return _compare(model, _token_ids(config.vocab_size, 8, 120), dtype, comm_chunks=comm_chunks)


def rank_mixtral(dtype: str, schedule: dict) -> dict:
    """A Mixtral decoder (transformers' stacked 3-D experts, top-2) on a prompt."""
    config = model_config("mixtral-small")
    torch.manual_seed(0)
    model = MixtralModel(config).eval().to(_device(), DTYPES[dtype])
    return _compare(model, _token_ids(config.vocab_size, 4, 128), dtype, **schedule)


class _Wrapped(torch.nn.Module):
    """A moe_zoo block called with a keyword, returning a tuple, like the HF models above."""

    def __init__(self, block: MoEBlock):
        super().__init__()
        self.block = block

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.block(x_BSD),)


def rank_skewed_moe(skew: str, dtype: str, schedule: dict) -> dict:
    """Every token on one expert ("hot") or most experts empty ("empty"), gated, biased."""
    cfg = MoEConfig(num_experts=8, top_k=2, d_model=256, d_ff=1024, gated=True, bias=True, activation="silu", skew=skew)
    torch.manual_seed(0)
    model = _Wrapped(MoEBlock(cfg)).eval().to(_device(), DTYPES[dtype])
    generator = torch.Generator().manual_seed(dist.get_rank())
    x_BSD = torch.randn(4, 64, cfg.d_model, generator=generator).to(_device(), DTYPES[dtype])
    return _compare(model, {"x_BSD": x_BSD}, dtype, **schedule)


# ---------------------------------------------------------------------- parent side


def check(results: list[dict], layers: int) -> None:
    """Every rank rewrote every MoE layer (checked on the rank), and the ranks hold every
    (expert, FFN column) once."""
    assert all(len(r["blocks"]) == layers for r in results), results
    assert_blocks_tile([r["blocks"] for r in results])


@pytest.mark.parametrize(("dtype", "comm_chunks"), [("float32", 1), ("float32", 4), ("bfloat16", 1)])
def test_switch_encoder(gpus, dtype, comm_chunks):
    check(gpus.run(rank_switch_encoder, timeout_s=600, dtype=dtype, comm_chunks=comm_chunks), 2)


# The schedules and placements across ranks (docs/distributed.md): MoEShard in chunks and by
# source rank, dropless expert parallelism (groups of 1), the cost model's choice.
SCHEDULES = {"chunks": {"comm_chunks": 4}, "source_rank": {"overlap": "source_rank"},
             "groups_of_1": {"expert_group_size": 1}, "auto": {"expert_group_size": "auto"}}


@pytest.mark.parametrize(("dtype", "schedule"), [("float32", "default"), ("bfloat16", "chunks"),
                                                 ("float32", "source_rank"), ("bfloat16", "source_rank"),
                                                 ("float32", "groups_of_1"), ("bfloat16", "auto")])
def test_mixtral_decoder(gpus, dtype, schedule):
    check(gpus.run(rank_mixtral, timeout_s=600, dtype=dtype, schedule=SCHEDULES.get(schedule, {})), 4)


@pytest.mark.parametrize(("skew", "dtype", "schedule"), [("hot", "float32", "chunks"), ("empty", "bfloat16", "chunks"),
                                                         ("hot", "bfloat16", "source_rank"),
                                                         ("hot", "float32", "groups_of_1"),
                                                         ("empty", "bfloat16", "groups_of_1")])
def test_skewed_routing(gpus, skew, dtype, schedule):
    check(gpus.run(rank_skewed_moe, timeout_s=600, skew=skew, dtype=dtype, schedule=SCHEDULES[schedule]), 1)
