"""The tile schedule both kernels read off offs_E in registers: each program's expert, rows and
N block.

Rows are grouped by expert: group e is rows offs_E[e-1]:offs_E[e] (offs_E an int cumsum).
Every M tile belongs to exactly one expert, so a program multiplies by a single expert's
weights. The grid has a static size, R // BLOCK_M + E tiles (times the N blocks), which bounds
sum_e ceil(count_e / BLOCK_M) for any routing; each program finds its expert and rows from
offs_E in registers (`_tile`), so there is no host sync and no recompilation when the routing
changes. Programs past the last real tile return at once: empty experts cost nothing.
With TileConfig.persistent_tma (the default for bf16/fp16 on sm_90+) the grid is one program per
SM instead, each looping over every num_programs-th real tile and reading the weights through
device-made TMA descriptors (operands.py); with tma_rows the rows come by TMA too (ffn_out's h,
ffn_in's x once copied to x[rows]), else by pointer loads (Hopper's TMA cannot gather rows).
With TileConfig.stream_tile_cost the persistent programs split into two groups that run at once:
one streams the weights of the experts with a single M tile, the other multiplies for the rest
(_share).
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_PERSISTENT_PROGRAMS = tl.constexpr(256)  # the persistent grid's cap (H100: 132 SMs); _share weighs each split


def num_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """A static bound on sum_e ceil(count_e / block_m) for any routing: the grid needs no host sync."""
    return num_rows // block_m + num_experts


@triton.jit
def _schedule(offs_ptr, R, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """Per expert (E_POW2 lanes): first row, end row, M tiles and the running sum of M tiles."""
    e = tl.arange(0, E_POW2)
    ends = tl.minimum(tl.load(offs_ptr + e, mask=e < E, other=0).to(tl.int32), R)
    starts = tl.minimum(tl.load(offs_ptr + e - 1, mask=(e > 0) & (e < E), other=0).to(tl.int32), ends)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    return starts, ends, tiles, tl.cumsum(tiles, 0)


@triton.jit
def _share(starts, ends, tiles, NUM_N: tl.constexpr, BLOCK_M: tl.constexpr, STREAM_TILE_COST: tl.constexpr):
    """A persistent program's tiles: every step-th from first up to total, of the experts whose
    M tiles are tiles_E (tile ids as _tile numbers them over those experts alone).

    With STREAM_TILE_COST = 0 every program takes every num_programs-th tile of every expert. Under
    skew that runs the crowded experts' tiles (bound by the MMAs) and the sparse experts' (one M
    tile each, bound by streaming the expert's weights from DRAM) in separate waves, and a kernel
    costs about the sum of the two. With STREAM_TILE_COST > 0 the sparse experts' tiles go to the
    first p_s programs and the others' to the rest, so that the two run at once. One stream tile
    is taken to cost STREAM_TILE_COST MMA tiles (a ratio that holds for any K and N: both costs
    scale with K * BLOCK_N), and p_s minimises the later of the two groups' ends, counted in
    whole waves (cdiv(tiles, programs)): a split that leaves one group a fraction of a wave more
    costs the whole wave. Ties go to the split nearest the two groups' fractional balance; p_s
    never exceeds the stream tiles. A single program, or routing with one kind of tile, is not split.
    """
    pid, programs = tl.program_id(0), tl.num_programs(0)
    first, total, step, tiles_E = pid, tl.sum(tiles, 0) * NUM_N, programs, tiles
    if STREAM_TILE_COST > 0:
        stream_tiles_E = tl.where(ends - starts <= BLOCK_M, tiles, 0)
        mma_tiles_E = tiles - stream_tiles_E
        stream_total = tl.sum(stream_tiles_E, 0) * NUM_N
        mma_total = tl.sum(mma_tiles_E, 0) * NUM_N
        p_P = tl.arange(0, MAX_PERSISTENT_PROGRAMS)  # every candidate p_s at once
        stream_P, mma_P = tl.maximum(p_P, 1), tl.maximum(programs - p_P, 1)
        waves_P = tl.maximum(((stream_total + stream_P - 1) // stream_P).to(tl.float32) * STREAM_TILE_COST,
                             ((mma_total + mma_P - 1) // mma_P).to(tl.float32))
        valid_P = (p_P >= 1) & (p_P < programs) & (p_P <= stream_total)  # no stream program without a tile
        waves_P = tl.where(valid_P, waves_P, float("inf"))
        balance_P = tl.maximum(stream_total.to(tl.float32) * STREAM_TILE_COST / stream_P.to(tl.float32),
                               mma_total.to(tl.float32) / mma_P.to(tl.float32))
        p_s = tl.argmin(tl.where(waves_P == tl.min(waves_P, 0), balance_P, float("inf")), 0).to(tl.int32)
        split = (stream_total > 0) & (mma_total > 0) & (programs > 1)
        streams = pid < p_s
        first = tl.where(split, tl.where(streams, pid, pid - p_s), first)
        total = tl.where(split, tl.where(streams, stream_total, mma_total), total)
        step = tl.where(split, tl.where(streams, p_s, programs - p_s), step)
        tiles_E = tl.where(split, tl.where(streams, stream_tiles_E, mma_tiles_E), tiles_E)
    return first, total, step, tiles_E


@triton.jit
def _tile(tile_id, starts, ends, tiles, tile_ends, NUM_N: tl.constexpr, BLOCK_M: tl.constexpr,
          E_POW2: tl.constexpr, ZIGZAG: tl.constexpr):
    """Tile tile_id's expert (E for a padding tile), its first row, its BLOCK_M rows and their mask,
    its N block.

    Tiles are numbered tile-major (the N blocks of one M tile are neighbours, and so are the
    tiles of one expert), so a tile's rows and an expert's weights are reused from L2. ZIGZAG
    takes the tiles alternately from the front and the back of that order, so that under skewed
    routing the crowded experts' compute-bound tiles run beside the sparse experts' weight-bound
    ones instead of in separate waves. The schedule is read off offs_E in registers: no
    separate launch, no host sync.
    """
    tile = tile_id // NUM_N
    e = tl.arange(0, E_POW2)
    if ZIGZAG:
        total = tl.sum(tiles, 0)
        half = tile // 2
        tile = tl.where(tile < total, tl.where(tile % 2 == 0, half, total - 1 - half), tile)
    expert = tl.sum((tile_ends <= tile).to(tl.int32), 0)
    mine = e == expert
    first_tile = tl.sum(tl.where(mine, tile_ends - tiles, 0), 0)
    row_start = tl.sum(tl.where(mine, starts, 0), 0) + (tile - first_tile) * BLOCK_M
    m = row_start.to(tl.int64) + tl.arange(0, BLOCK_M)
    m_mask = m < tl.sum(tl.where(mine, ends, 0), 0)
    return expert, row_start, m, m_mask, tile_id % NUM_N
