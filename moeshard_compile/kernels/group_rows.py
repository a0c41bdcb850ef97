"""Group the (token, slot) rows by expert: a stable counting sort in two Triton launches.

    order_S, counts_E = launch_group_by_expert(ids_S, E)

order_S lists the rows of expert 0, then of expert 1, ..., each group in row order: exactly
torch.sort(ids_S, stable=True).indices. torch.sort is a radix sort of several passes (0.030 ms
for 16384 int16 keys on an H100); with E known, two passes over the ids do:
  _block_counts_kernel  each block of BLOCK rows counts its rows per expert -> counts_BE;
  (a few small torch ops) where each block's rows of each expert start in order_S -> starts_BE;
  _place_rows_kernel    each row goes to starts_BE[block, id] + its rank among the block's rows
                        of that expert (a cumsum over the block's one-hot ids, so stable).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

ONE_HOT_ELEMENTS = 16384  # a block's [BLOCK, E_POW2] one-hot: 128 int32 per thread at 4 warps


@triton.jit
def _one_hot(ids_ptr, block, S, BLOCK: tl.constexpr, E_POW2: tl.constexpr):
    """The block's rows, and their ids as a [BLOCK, E_POW2] 0/1 matrix (rows past S: all 0)."""
    rows = block * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + rows, mask=rows < S, other=-1)
    return rows, (ids[:, None] == tl.arange(0, E_POW2)[None, :]).to(tl.int32)


@triton.jit
def _block_counts_kernel(ids_ptr, counts_ptr, S, E, BLOCK: tl.constexpr, E_POW2: tl.constexpr):
    """counts_BE[block, e] = rows of this block routed to expert e."""
    block = tl.program_id(0)
    _, one_hot = _one_hot(ids_ptr, block, S, BLOCK, E_POW2)
    e = tl.arange(0, E_POW2)
    tl.store(counts_ptr + block * E + e, tl.sum(one_hot, 0), mask=e < E)


@triton.jit
def _place_rows_kernel(ids_ptr, starts_ptr, order_ptr, S, E, BLOCK: tl.constexpr, E_POW2: tl.constexpr):
    """order_S[starts_BE[block, id] + rank] = row, rank counting the block's earlier rows of that expert."""
    block = tl.program_id(0)
    rows, one_hot = _one_hot(ids_ptr, block, S, BLOCK, E_POW2)
    rank = tl.sum(tl.cumsum(one_hot, 0) * one_hot, 1) - 1
    e = tl.arange(0, E_POW2)
    starts_E = tl.load(starts_ptr + block * E + e, mask=e < E, other=0)
    start = tl.sum(starts_E[None, :] * one_hot, 1)
    tl.store(order_ptr + start + rank, rows.to(tl.int64), mask=rows < S)


def launch_group_by_expert(ids_S: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order_S, counts_E) of moeshard::group_by_expert; ids must lie in [0, num_experts)."""
    S, e_pow2 = ids_S.shape[0], triton.next_power_of_2(num_experts)
    block = max(16, min(1024, ONE_HOT_ELEMENTS // e_pow2))
    blocks = triton.cdiv(S, block)
    order_S = torch.empty(S, dtype=torch.int64, device=ids_S.device)
    if blocks == 0:
        return order_S, ids_S.new_zeros(num_experts, dtype=torch.int64)
    counts_BE = torch.empty(blocks, num_experts, dtype=torch.int32, device=ids_S.device)
    wrap_triton(_block_counts_kernel)[(blocks,)](ids_S, counts_BE, S, num_experts, BLOCK=block, E_POW2=e_pow2)
    counts_E = counts_BE.sum(0, dtype=torch.int64)
    # rows of expert e start after every row of experts < e, and after this expert's rows in earlier blocks
    starts_BE = (counts_E.cumsum(0) - counts_E)[None, :] + (counts_BE.cumsum(0, dtype=torch.int64) - counts_BE)
    wrap_triton(_place_rows_kernel)[(blocks,)](ids_S, starts_BE, order_S, S, num_experts, BLOCK=block, E_POW2=e_pow2)
    return order_S, counts_E
