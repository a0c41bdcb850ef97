"""The corpus of hand-written MoE layers (tests/spellings.py): every spelling moeshard rewrites
equals eager and its own dense reference, on one rank and sharded over two gloo ranks; the
property test draws the spelling with the shapes and the routing skew. The spellings it does not
rewrite yet are reported as skipped rows with their reason, never passed over in silence."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, note, settings
from hypothesis import strategies as st

import spellings
from helpers import assert_close_to_eager
from moeshard_compile.backend import make_backend
from moeshard_compile.options import Options
from moeshard_compile.report import Report

# Spellings not rewritten yet, with the words of their report rows (docs/usage.md, "skip reasons").
NOT_YET = {
    "deepseek_v3_moe_infer": "not recognised",  # rows sliced by running sums of counts.tolist(): a graph break
    "sorted_split": "not recognised",  # bincount(...).tolist(): a list of data-dependent length, a graph break
}
CORPUS = [name for name in spellings.SPELLINGS if name not in NOT_YET]


def _compile_and_run(module, x, **options):
    report = Report()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped rows warn; the report is asserted instead
        out = torch.compile(module, backend=make_backend(Options(inductor=False, **options), report))(x)
    return out, report


def test_the_corpus_covers_twenty_spellings():
    assert len(CORPUS) >= 20, CORPUS


@settings(max_examples=40)
@given(
    name=st.sampled_from(CORPUS),
    d_model=st.sampled_from([8, 16]),
    d_ff=st.integers(3, 24),
    num_experts=st.integers(2, 6),
    top_k=st.integers(1, 3),
    skew=st.sampled_from(["none", "hot", "empty"]),
    tokens=st.integers(1, 9),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_spelling_equals_eager_and_its_reference(name, d_model, d_ff, num_experts, top_k, skew, tokens, dtype, seed):
    module = spellings.make(name, d_model, d_ff, num_experts, min(top_k, num_experts), seed, skew).to(dtype)
    x = torch.randn(1, tokens, d_model, generator=torch.Generator().manual_seed(seed)).to(dtype)
    torch._dynamo.reset()
    out, report = _compile_and_run(module, x)
    note(str(report))
    assert [r["status"] for r in report.regions] == ["rewritten"], report.regions
    with torch.no_grad():
        ref = module(x)
    assert_close_to_eager(out, ref)
    assert_close_to_eager(spellings.reference(module, x), ref)  # the spelling computes what it says


@pytest.mark.parametrize("name", sorted(NOT_YET))
def test_spelling_not_rewritten_is_reported(name):
    module = spellings.make(name)
    x = torch.randn(2, 5, 16)
    out, report = _compile_and_run(module, x)
    with torch.no_grad():
        assert_close_to_eager(out, module(x))
    rows = [r for r in report.regions if r["status"] != "rewritten"]
    assert rows and all(NOT_YET[name] in r["reason"] for r in rows), report.regions


def test_dropless_keeps_the_slots_of_a_dispatch_tensor():
    """GShard's dispatch tensor has `capacity` slots per expert: dropless cannot give it more, so
    the limit stays (and the report says so) rather than indexing past the slots."""
    module = spellings.make("gshard_einsum_capacity", skew="hot")
    x = torch.randn(2, 5, 16)
    out, report = _compile_and_run(module, x, dropless=True)
    with torch.no_grad():
        assert_close_to_eager(out, module(x))
    (region,) = report.regions
    assert region["status"] == "rewritten" and "kept with dropless=True" in region["capacity"], region


def rank_spelling(name: str, input_mode: str, skew: str):
    """One spelling sharded over the group, checked against eager on this rank."""
    module = spellings.make(name, d_model=16, d_ff=9, num_experts=4, top_k=2, seed=0, skew=skew).double()
    seed = dist.get_rank() if input_mode == "data_parallel" else 0
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out, report = _compile_and_run(module, x, world_size=dist.get_world_size(), input_mode=input_mode)
    with torch.no_grad():
        assert_close_to_eager(out, module(x))
    (region,) = report.regions
    assert (region["status"], region["world_size"], region["input_mode"]) == ("rewritten", 2, input_mode), region
    return tuple(region["ffn_block"])


@pytest.mark.parametrize("name", CORPUS)
def test_spelling_sharded_over_two_ranks(world_2, name):
    skew = ["none", "hot", "empty"][CORPUS.index(name) % 3]
    input_mode = ["data_parallel", "replicated"][CORPUS.index(name) % 2]
    blocks = world_2.run(rank_spelling, name=name, input_mode=input_mode, skew=skew)
    assert sorted(blocks) == [(0, 5), (5, 9)]  # d_ff 9: the columns split between the ranks
