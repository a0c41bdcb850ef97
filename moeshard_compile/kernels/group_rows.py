"""The dispatch's bookkeeping in two Triton launches: the (token, slot) rows grouped by expert.

    order_S, token_S, weight_sorted_S, counts_E, offs_E = launch_group_by_expert(ids_S, weight_S, E, K)

order_S is exactly torch.sort(ids_S, stable=True).indices (the rows of expert 0 in row order, then
expert 1's, ...); token_S = order_S // K, weight_sorted_S = weight_S[order_S], counts_E the rows
per expert, offs_E their cumsum. A counting sort, since E is known:
  _block_counts_kernel  each block counts its rows per expert -> counts_GE;
  _place_rows_kernel    each block sums counts_GE to the experts' starts and its own offsets in
                        them, then places each of its rows at that offset + its rank among the
                        block's preceding rows of the same expert (a cumsum over one-hot ids: stable).
On an H100 this took 0.011 ms for 16384 rows and 64 experts, where torch.sort, the scatter_add of
the counts, their cumsum, the // K and the weight gather took 0.051 ms (bench/lab/dispatch.py).
Rows whose id lies outside [0, E) are left out of every group (their outputs are not written).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

ONE_HOT_ELEMENTS = 8192  # a chunk's [CHUNK, E_POW2] one-hot ids: 64 int32 per thread at 4 warps
MAX_BLOCKS = 128  # past this, blocks take several chunks: the prefix over blocks stays small
MAX_EXPERTS = ONE_HOT_ELEMENTS // 16  # chunks of 16 rows at least; more experts take torch.sort


@triton.jit
def _one_hot(ids_ptr, rows, S, E, E_POW2: tl.constexpr):
    """[CHUNK, E_POW2] 0/1: row r of the chunk has expert e (all 0 past S and for ids outside [0, E))."""
    ids = tl.load(ids_ptr + rows, mask=rows < S, other=-1)
    e = tl.arange(0, E_POW2)
    return ((ids[:, None] == e[None, :]) & (e < E)[None, :]).to(tl.int32)


@triton.jit
def _block_counts_kernel(ids_ptr, block_counts_ptr, S, E, ROWS_PER_BLOCK, CHUNK: tl.constexpr, E_POW2: tl.constexpr):
    """counts_GE[block, e] = the block's rows routed to expert e."""
    block = tl.program_id(0)
    counts_E = tl.zeros([E_POW2], dtype=tl.int32)
    for r0 in range(0, ROWS_PER_BLOCK, CHUNK):
        rows = block * ROWS_PER_BLOCK + r0 + tl.arange(0, CHUNK)
        counts_E += tl.sum(_one_hot(ids_ptr, rows, S, E, E_POW2), 0)
    e = tl.arange(0, E_POW2)
    tl.store(block_counts_ptr + block * E + e, counts_E, mask=e < E)


@triton.jit
def _place_rows_kernel(
    ids_ptr, weight_ptr, block_counts_ptr, order_ptr, token_ptr, weight_sorted_ptr, counts_ptr, offs_ptr,
    S, E, BLOCKS, K, ROWS_PER_BLOCK,
    CHUNK: tl.constexpr, E_POW2: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):
    """Every row of this block at its place in expert order; block 0 also writes counts_E and offs_E."""
    block = tl.program_id(0)
    e = tl.arange(0, E_POW2)
    total_E = tl.zeros([E_POW2], dtype=tl.int32)
    before_E = tl.zeros([E_POW2], dtype=tl.int32)  # rows of each expert in the blocks before this one
    for b0 in range(0, BLOCKS, BLOCK_ROWS):
        b = b0 + tl.arange(0, BLOCK_ROWS)
        counts_bE = tl.load(block_counts_ptr + b[:, None] * E + e[None, :], mask=(b < BLOCKS)[:, None] & (e < E)[None, :],
                            other=0)
        total_E += tl.sum(counts_bE, 0)
        before_E += tl.sum(tl.where((b < block)[:, None], counts_bE, 0), 0)
    ends_E = tl.cumsum(total_E, 0)
    if block == 0:
        tl.store(counts_ptr + e, total_E.to(tl.int64), mask=e < E)
        tl.store(offs_ptr + e, ends_E.to(tl.int64), mask=e < E)
    next_E = ends_E - total_E + before_E  # where this block's next row of each expert goes
    for r0 in range(0, ROWS_PER_BLOCK, CHUNK):
        rows = block * ROWS_PER_BLOCK + r0 + tl.arange(0, CHUNK)
        one_hot = _one_hot(ids_ptr, rows, S, E, E_POW2)
        rank = tl.sum(tl.cumsum(one_hot, 0) * one_hot, 1) - 1
        dest = tl.sum(one_hot * next_E[None, :], 1) + rank
        routed = tl.sum(one_hot, 1) > 0
        tl.store(order_ptr + dest, rows.to(tl.int64), mask=routed)
        tl.store(token_ptr + dest, (rows // K).to(tl.int64), mask=routed)
        tl.store(weight_sorted_ptr + dest, tl.load(weight_ptr + rows, mask=routed), mask=routed)
        next_E += tl.sum(one_hot, 0)


def launch_group_by_expert(
    ids_S: torch.Tensor, weight_S: torch.Tensor, num_experts: int, top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """moeshard::group_by_expert in two launches, for 1..MAX_EXPERTS experts; ids in [0, num_experts)."""
    S, E = ids_S.shape[0], num_experts
    e_pow2 = triton.next_power_of_2(E)
    chunk = max(16, min(1024, ONE_HOT_ELEMENTS // e_pow2))
    blocks = min(triton.cdiv(S, chunk), MAX_BLOCKS)
    rows_per_block = triton.cdiv(triton.cdiv(S, chunk), max(blocks, 1)) * chunk
    # An int32 copy of the ids: half the bytes to read, and the copy, not the caller's ids, is what
    # torch's mutation analysis marks as written (it follows loaded values into store addresses; a
    # graph input marked written stops CUDA graphs under mode="reduce-overhead").
    ids_S, weight_S = ids_S.to(torch.int32, copy=True), weight_S.contiguous()
    order_S = torch.empty(S, dtype=torch.int64, device=ids_S.device)
    token_S = torch.empty_like(order_S)
    weight_sorted_S = torch.empty_like(weight_S)
    if blocks == 0:
        return order_S, token_S, weight_sorted_S, order_S.new_zeros(E), order_S.new_zeros(E)
    counts_E, offs_E = order_S.new_empty(E), order_S.new_empty(E)  # block 0 writes both
    block_counts_GE = torch.empty(blocks, E, dtype=torch.int32, device=ids_S.device)
    wrap_triton(_block_counts_kernel)[(blocks,)](ids_S, block_counts_GE, S, E, rows_per_block, CHUNK=chunk,
                                                 E_POW2=e_pow2, num_warps=4)
    wrap_triton(_place_rows_kernel)[(blocks,)](
        ids_S, weight_S, block_counts_GE, order_S, token_S, weight_sorted_S, counts_E, offs_E,
        S, E, blocks, top_k, rows_per_block,
        CHUNK=chunk, E_POW2=e_pow2, BLOCK_ROWS=max(1, ONE_HOT_ELEMENTS // e_pow2), num_warps=4,
    )
    return order_S, token_S, weight_sorted_S, counts_E, offs_E
