"""moeshard::group_by_expert: the rows grouped by expert, exactly torch.sort(ids, stable=True), and
what the lowering derives from it (tokens, sorted weights, counts, offsets).

The reference path runs here; the Triton counting sort runs under Triton's interpreter and is
compiled for sm_90 in tests/test_kernels.py's subprocesses, and on a GPU in test_kernels_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import grouping_by_definition
from moeshard_compile.kernels import ops  # noqa: F401  (registers the op)

group_by_expert = torch.ops.moeshard.group_by_expert.default


def routed_ids(counts: list[int], generator: torch.Generator) -> torch.Tensor:
    """Rows with these per-expert counts, in a random order."""
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))
    return ids[torch.randperm(ids.shape[0], generator=generator)]


def check(ids_S: torch.Tensor, num_experts: int, top_k: int, generator: torch.Generator) -> None:
    weight_S = torch.rand(ids_S.shape[0], generator=generator)
    got = group_by_expert(ids_S, weight_S, num_experts, top_k)
    want_all = grouping_by_definition(ids_S, weight_S, num_experts, top_k)
    for name, g, want in zip(("order", "token", "weight", "counts", "offs"), got, want_all):
        assert torch.equal(g, want), (name, g, want)
    assert all(t.dtype == torch.int64 for t in (got[0], got[1], got[3], got[4]))


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.sampled_from([0, 0, 1, 2, 7, 40]), min_size=1, max_size=20),
    top_k=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_matches_stable_sort(counts, top_k, seed):
    """Random, empty and crowded experts; every row once, in row order within its expert."""
    generator = torch.Generator().manual_seed(seed)
    check(routed_ids(counts, generator), len(counts), top_k, generator)


@pytest.mark.parametrize("counts", [[0, 0, 0], [0, 9, 0, 0], [5], [3, 0, 3, 0, 3]],
                         ids=["no_rows", "one_expert_has_all", "single_expert", "every_other_empty"])
def test_degenerate_routings(counts):
    generator = torch.Generator().manual_seed(0)
    check(routed_ids(counts, generator), len(counts), 1, generator)


def test_narrow_ids_keep_their_order():
    ids_S = torch.tensor([2, 0, 2, 1, 0], dtype=torch.int32)
    order_S, token_S, weight_S, counts_E, offs_E = group_by_expert(ids_S, torch.arange(5.0), 3, 2)
    assert order_S.tolist() == [1, 4, 3, 0, 2] and token_S.tolist() == [0, 2, 1, 0, 1]
    assert weight_S.tolist() == [1.0, 4.0, 3.0, 0.0, 2.0]
    assert counts_E.tolist() == [2, 1, 2] and offs_E.tolist() == [2, 3, 5]


def test_rejects_bad_input():
    with pytest.raises(Exception, match="1-D of one length"):
        group_by_expert(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), 4, 1)
    with pytest.raises(Exception, match="1-D of one length"):
        group_by_expert(torch.zeros(3, dtype=torch.long), torch.zeros(4), 4, 1)
    with pytest.raises(Exception, match="must be integers"):
        group_by_expert(torch.zeros(3), torch.zeros(3), 4, 1)
    with pytest.raises(Exception, match="must be positive"):
        group_by_expert(torch.zeros(3, dtype=torch.long), torch.zeros(3), 4, 0)
    with pytest.raises(RuntimeError, match="out of bounds"):  # an id past the experts: never silently grouped
        group_by_expert(torch.tensor([0, 4, 1]), torch.zeros(3), 4, 1)


def test_opcheck():
    ids_S = routed_ids([3, 0, 5, 1], torch.Generator().manual_seed(1))
    result = torch.library.opcheck(group_by_expert, (ids_S, torch.rand(9), 4, 3))
    assert result == {name: "SUCCESS" for name in result}, result


def test_under_inductor():
    generator = torch.Generator().manual_seed(2)
    ids_S, weight_S = routed_ids([4, 1, 0, 6], generator), torch.rand(11, generator=generator)
    compiled = torch.compile(lambda ids, w: group_by_expert(ids, w, 4, 1), fullgraph=True)
    for got, want in zip(compiled(ids_S, weight_S), grouping_by_definition(ids_S, weight_S, 4, 1)):
        assert torch.equal(got, want)
