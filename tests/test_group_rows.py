"""moeshard::group_by_expert: the rows grouped by expert, exactly torch.sort(ids, stable=True).

The reference path runs here; the Triton counting sort runs under Triton's interpreter and is
compiled for sm_90 in tests/test_kernels.py's subprocesses, and on a GPU in test_kernels_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeshard_compile.kernels import ops  # noqa: F401  (registers the op)

group_by_expert = torch.ops.moeshard.group_by_expert.default


def expected(ids_S: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.sort(ids_S, stable=True).indices, torch.bincount(ids_S, minlength=num_experts)


def routed_ids(draw_counts: list[int], generator: torch.Generator) -> torch.Tensor:
    """Rows with these per-expert counts, in a random order."""
    ids = torch.repeat_interleave(torch.arange(len(draw_counts)), torch.tensor(draw_counts, dtype=torch.long))
    return ids[torch.randperm(ids.shape[0], generator=generator)]


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.sampled_from([0, 0, 1, 2, 7, 40]), min_size=1, max_size=20),
    seed=st.integers(0, 2**16),
)
def test_matches_stable_sort(counts, seed):
    """Random, empty and crowded experts; every row once, in row order within its expert."""
    ids_S = routed_ids(counts, torch.Generator().manual_seed(seed))
    order_S, counts_E = group_by_expert(ids_S, len(counts))
    want_order, want_counts = expected(ids_S, len(counts))
    assert torch.equal(order_S, want_order) and torch.equal(counts_E, want_counts)
    assert order_S.dtype == counts_E.dtype == torch.int64


@pytest.mark.parametrize("counts", [[0, 0, 0], [0, 9, 0, 0], [5], [3, 0, 3, 0, 3]],
                         ids=["no_rows", "one_expert_has_all", "single_expert", "every_other_empty"])
def test_degenerate_routings(counts):
    ids_S = routed_ids(counts, torch.Generator().manual_seed(0))
    order_S, counts_E = group_by_expert(ids_S, len(counts))
    assert torch.equal(order_S, expected(ids_S, len(counts))[0]) and counts_E.tolist() == counts


def test_narrow_ids_keep_their_order():
    ids_S = torch.tensor([2, 0, 2, 1, 0], dtype=torch.int32)
    order_S, counts_E = group_by_expert(ids_S, 3)
    assert order_S.tolist() == [1, 4, 3, 0, 2] and counts_E.tolist() == [2, 1, 2]


def test_rejects_bad_ids():
    with pytest.raises(Exception, match="must be 1-D"):
        group_by_expert(torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(Exception, match="must be integers"):
        group_by_expert(torch.zeros(3), 4)


def test_opcheck():
    ids_S = routed_ids([3, 0, 5, 1], torch.Generator().manual_seed(1))
    result = torch.library.opcheck(group_by_expert, (ids_S, 4))
    assert result == {name: "SUCCESS" for name in result}, result


def test_under_inductor():
    ids_S = routed_ids([4, 1, 0, 6], torch.Generator().manual_seed(2))
    compiled = torch.compile(lambda ids: group_by_expert(ids, 4), fullgraph=True)
    for got, want in zip(compiled(ids_S), expected(ids_S, 4)):
        assert torch.equal(got, want)
