"""Helpers shared by the tests."""

import torch

# Output tolerance per dtype: max |compiled - eager| <= TOL * (1 + max |eager|).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 4e-2}


def assert_close_to_eager(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all() == torch.isfinite(ref).all()
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    limit = TOL[ref.dtype] * (1 + ref.double().abs().max().item() if ref.numel() else 1)
    assert err <= limit, f"max error {err:.3g} > {limit:.3g} ({ref.dtype})"


def grouping_by_definition(ids_S: torch.Tensor, weight_S: torch.Tensor, num_experts: int, top_k: int):
    """moeshard::group_by_expert's five outputs from their definitions: a stable sort, a floor
    division, a gather, bincount and its cumsum."""
    order_S = torch.sort(ids_S, stable=True).indices
    counts_E = torch.bincount(ids_S, minlength=num_experts)
    return order_S, order_S // top_k, weight_S[order_S], counts_E, counts_E.cumsum(0)


def assert_blocks_tile(blocks_by_rank: list[list[tuple]]) -> None:
    """For every region, the ranks hold every (expert, FFN column) exactly once, evenly: the
    groups of g consecutive ranks hold blocks of experts that tile [0, E), and within a group
    rank r's FFN block r % g tiles [0, d_ff) (g = N: one group, MoEShard)."""
    for region_blocks in zip(*blocks_by_rank):
        (d_ff, g, E), = {(d_ff, g, E) for _, d_ff, g, _, E in region_blocks}  # every rank saw the same region
        expert_edges = [0]
        for q in range(len(region_blocks) // g):
            members = region_blocks[q * g:(q + 1) * g]
            (held,) = {tuple(experts) for _, _, _, experts, _ in members}
            assert held[0] == expert_edges[-1], f"group {q} holds experts {held}, expected from {expert_edges[-1]}"
            expert_edges.append(held[1])
            _assert_even_tiling([block for block, *_ in members], d_ff, "FFN")
        assert expert_edges[-1] == E, f"expert blocks {expert_edges} do not end at E={E}"
        sizes = [b - a for a, b in zip(expert_edges, expert_edges[1:])]
        assert max(sizes) - min(sizes) <= 1, f"uneven expert blocks {sizes}"


def _assert_even_tiling(blocks: list[list[int]], size: int, what: str) -> None:
    edges = [0]
    for rank, (start, stop) in enumerate(blocks):
        assert start == edges[-1] and stop > start, f"rank {rank} holds {what} {start}:{stop}, expected from {edges[-1]}"
        edges.append(stop)
    assert edges[-1] == size, f"{what} blocks {edges} do not end at {size}"
    sizes = [stop - start for start, stop in zip(edges, edges[1:])]
    assert max(sizes) - min(sizes) <= 1, f"uneven {what} blocks {sizes} of {size}"
