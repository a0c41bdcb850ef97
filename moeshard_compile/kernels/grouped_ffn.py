"""Triton kernels for the expert FFN on expert-grouped rows.

Shape legend: X tokens, R expert-grouped rows, D model dim, F ffn dim, E experts.

Rows are grouped by expert: group e is rows offs_E[e-1]:offs_E[e] (offs_E an int cumsum).
Every M tile belongs to exactly one expert, so a program multiplies by a single expert's
weights. The grid has a static size, R // BLOCK_M + E tiles (times the N blocks), which bounds
sum_e ceil(count_e / BLOCK_M) for any routing; each program finds its expert and rows from
offs_E in registers (`_tile`), so there is no host sync and no recompilation when the routing
changes. Programs past the last real tile return at once: empty experts cost nothing.
With TileConfig.persistent_tma (the default for bf16/fp16 on sm_90+) the grid is one program per
SM instead, each looping over every num_programs-th real tile and reading the weights through
device-made TMA descriptors; with tma_rows the rows come by TMA too (ffn_out's h, ffn_in's x once
copied to x[rows]), else by pointer loads (Hopper's TMA cannot gather rows). With
TileConfig.stream_tile_cost the persistent programs split into two groups that run at once: one
streams the weights of the experts with a single M tile, the other multiplies for the rest (_share).

Two kernels, each one launch for all experts:
  ffn_in:  h[r] = act(x[rows[r]] @ w_gate[e] + b_gate[e]) * (x[rows[r]] @ w_in[e] + b_in[e])
           (or act(x[rows[r]] @ w_in[e] + b_in[e])): the token gather is in the x loads (except
           where launch_ffn_in copies x[rows] first because TMA then reads it faster) and
           activation and gate product are in the epilogue, so the pre-activation never
           reaches memory.
  ffn_out: y[dest[r]] = (h[r] @ w_out[e] + b_out[e]) * scale[r] (exactly 0 where scale is 0):
           the routing weight and the return to token (or rank) order are in the epilogue.

Both accumulate in fp32 (tl.dot). fp32 inputs use TF32 only when
torch.backends.cuda.matmul.allow_tf32 is set, IEEE otherwise; bf16/fp16 inputs are exact
products with fp32 accumulation either way.

The launchers call the kernels through `torch.library.wrap_triton`, so under torch.compile
Inductor sees (and schedules) the kernels themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from moeshard_compile.passes.op_contract import ACTIVATIONS

# The kernels' ACTIVATION code of each activation of the op contract.
ACTIVATION_CODES = {name: code for code, name in enumerate(
    ("identity", "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")
)}
assert ACTIVATION_CODES.keys() == ACTIVATIONS.keys(), "every activation of the contract needs a kernel code"


@dataclass(frozen=True)
class TileConfig:
    """Block sizes and launch parameters of one kernel launch."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    persistent_tma: bool = False  # one program per SM, weights by TMA, where the layout allows (see _use_tma)
    tma_rows: bool = False  # persistent_tma: rows by TMA too (ffn_out's h; ffn_in's x after copying x[rows])
    zigzag: bool = False  # one program per tile only: tiles taken from both ends of the expert order (see _tile)
    stream_tile_cost: float = 0.0  # persistent_tma: > 0 splits the programs between stream and MMA tiles (_share)


ZIGZAG_MAX_EXPERT_BYTES = 16 * 2**20  # a weight matrix this small stays in the H100's 50 MB L2 beside another
STREAM_TILE_COST = 1.0  # 128-row tiles on an H100: a sparse expert's tile takes about an MMA-bound tile's time
MAX_PERSISTENT_PROGRAMS = tl.constexpr(256)  # the persistent grid's cap (H100: 132 SMs); _share weighs each split


def default_config(dtype: torch.dtype, gated: bool = False, expert_bytes: int = 0, tma_rows: bool = True) -> TileConfig:
    """The fastest of bench/kernel_configs.py's candidates on an H100 (docs/performance.md).

    128x256 output tiles, 4 stages of 128-byte K slices (64 bf16/fp16, 32 fp32); a gated
    ffn_in holds two weight tiles per stage, so it takes 128x128 to fit shared memory. The
    persistent TMA kernel for 2-byte dtypes where the chip and layout allow it (in fp32 its
    epilogue would not fit shared memory beside 4 stages); otherwise one program per tile, in
    zigzag order where one expert's weight matrix (`expert_bytes`) is small: 4-6% faster on
    Switch-Base's 4.7 MB experts under skew, 38% slower on Mixtral's 117 MB ones. `tma_rows`: see
    launch_ffn_in, which asks for it only where the copy of x[rows] pays. The persistent programs
    are split between the sparse and the crowded experts' tiles (_share) where the rows come by
    TMA: 5-8% faster under skew; with gathered rows (ffn_in at F < 2 D) it measured no faster.
    """
    return TileConfig(block_m=128, block_n=128 if gated else 256, block_k=128 // dtype.itemsize, num_warps=8,
                      num_stages=4, persistent_tma=dtype.itemsize == 2, tma_rows=tma_rows,
                      zigzag=0 < expert_bytes <= ZIGZAG_MAX_EXPERT_BYTES,
                      stream_tile_cost=STREAM_TILE_COST if tma_rows else 0.0)


def expert_bytes(w_EAB: torch.Tensor) -> int:
    """Bytes of one expert's matrix in a stacked [E, A, B] weight."""
    return w_EAB.shape[1] * w_EAB.shape[2] * w_EAB.element_size()


def num_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """A static bound on sum_e ceil(count_e / block_m) for any routing: the grid needs no host sync."""
    return num_rows // block_m + num_experts


def _input_precision_tf32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


@triton.jit
def _dot(a, b, acc, ALLOW_TF32: tl.constexpr):
    if ALLOW_TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _load(ptrs, mask, MASKED: tl.constexpr):
    """tl.load, unmasked where the shapes allow it: unmasked loads vectorize and pipeline best."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _tanh(x):
    """tanh from exp (tl has no tanh in every Triton version); exact at 0, saturates to +-1."""
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x >= 0, y, -y)


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    """The codes of ACTIVATION_CODES, in fp32."""
    y = x
    if ACTIVATION == 1:
        y = tl.maximum(x, 0.0)
    elif ACTIVATION == 2:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACTIVATION == 3:
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACTIVATION == 4:
        y = x * tl.sigmoid(x)
    elif ACTIVATION == 5:
        y = tl.sigmoid(x)
    elif ACTIVATION == 6:
        y = _tanh(x)
    return y


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


@triton.jit
def _weight_descriptor(w_ptr, E, K, N, stride_e, stride_k, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """A TMA descriptor of [E, K, N] weights with unit N stride, read in [1, BLOCK_K, BLOCK_N] tiles.

    Made on the device (from Triton's allocator's scratch), because torch.compile cannot yet trace
    host-side descriptors through a triton_op."""
    return tl.make_tensor_descriptor(w_ptr, shape=[E, K, N], strides=[stride_e, stride_k, 1],
                                     block_shape=[1, BLOCK_K, BLOCK_N])


@triton.jit
def _rows_source(rows_ptr, R, K, stride_r, TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """What _rows_tile reads: with TMA a descriptor of the [R, K] rows (unit K stride) in
    [BLOCK_M, BLOCK_K] tiles, else the pointer itself."""
    if TMA:
        source = tl.make_tensor_descriptor(rows_ptr, shape=[R, K], strides=[stride_r, 1], block_shape=[BLOCK_M, BLOCK_K])
    else:
        source = rows_ptr
    return source


@triton.jit
def _rows_tile(src, row_start, rows, k0, K, stride_r, stride_k, MASKED: tl.constexpr, TMA: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns k0.. of BLOCK_M rows: rows row_start.. by TMA from descriptor src (zeros past its
    end), or the rows `rows` (any order) by pointer loads from src (masked on K where MASKED)."""
    if TMA:
        tile = src.load([row_start, k0])
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        tile = _load(src + rows[:, None] * stride_r + k[None, :] * stride_k, (k < K)[None, :], MASKED)
    return tile


@triton.jit
def _weight_tile(w, expert, k0, n0, K, N, stride_e, stride_k, stride_n, MASKED: tl.constexpr, TMA: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows k0.. and columns n0.. of expert's [K, N] weight: by TMA from descriptor w (it reads
    zeros out of bounds) or by pointer loads from w (masked where MASKED)."""
    if TMA:
        tile = w.load([expert, k0, n0]).reshape(BLOCK_K, BLOCK_N)
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        n = n0 + tl.arange(0, BLOCK_N)
        ptrs = w + expert.to(tl.int64) * stride_e + k[:, None] * stride_k + n[None, :] * stride_n
        tile = _load(ptrs, (k < K)[:, None] & (n < N)[None, :], MASKED)
    return tile


@triton.jit
def _ffn_in_tile(
    tile_id, starts, ends, tiles, tile_ends,
    x_ptr, rows_ptr, w_in_ptr, w_gate_ptr, b_in_ptr, b_gate_ptr, h_ptr,
    D, F,
    stride_xX, stride_xD, stride_wE, stride_wD, stride_wF, stride_gE, stride_gD, stride_gF,
    stride_bE, stride_bF, stride_bgE, stride_bgF, stride_hR, stride_hF,
    GATED: tl.constexpr, HAS_B_IN: tl.constexpr, HAS_B_GATE: tl.constexpr, ACTIVATION: tl.constexpr,
    ALLOW_TF32: tl.constexpr, NUM_N: tl.constexpr, E_POW2: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    ZIGZAG: tl.constexpr, TMA: tl.constexpr, TMA_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of h: rows of one expert, gathered from x by rows_R (or with
    TMA_ROWS, rows row_start.. of x = x[rows_R] gathered beforehand).

    Rows past the expert's end read token 0 (always in bounds) and are never stored, so the x
    loads need a mask only on K, and none when BLOCK_K divides D (EVEN_K; EVEN_N likewise for F).
    """
    expert, row_start, m, m_mask, n_block = _tile(tile_id, starts, ends, tiles, tile_ends, NUM_N, BLOCK_M, E_POW2,
                                                  ZIGZAG)
    token = tl.load(rows_ptr + m, mask=m_mask, other=0).to(tl.int64)
    n0 = n_block * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    n_mask = n < F
    expert64 = expert.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        a = _rows_tile(x_ptr, row_start, token, k0, D, stride_xX, stride_xD, not EVEN_K, TMA_ROWS, BLOCK_M, BLOCK_K)
        w = _weight_tile(w_in_ptr, expert, k0, n0, D, F, stride_wE, stride_wD, stride_wF,
                         not (EVEN_K and EVEN_N), TMA, BLOCK_K, BLOCK_N)
        acc = _dot(a, w, acc, ALLOW_TF32)
        if GATED:
            g = _weight_tile(w_gate_ptr, expert, k0, n0, D, F, stride_gE, stride_gD, stride_gF,
                             not (EVEN_K and EVEN_N), TMA, BLOCK_K, BLOCK_N)
            acc_gate = _dot(a, g, acc_gate, ALLOW_TF32)

    if HAS_B_IN:
        acc += tl.load(b_in_ptr + expert64 * stride_bE + n * stride_bF, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_B_GATE:
        acc_gate += tl.load(b_gate_ptr + expert64 * stride_bgE + n * stride_bgF, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if GATED:
        h = _activation(acc_gate, ACTIVATION) * acc
    else:
        h = _activation(acc, ACTIVATION)
    h_ptrs = h_ptr + m[:, None] * stride_hR + n[None, :] * stride_hF
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _ffn_in_kernel(
    x_ptr, rows_ptr, offs_ptr,
    w_in_ptr, w_gate_ptr, b_in_ptr, b_gate_ptr, h_ptr,
    R, D, F, E,
    stride_xX, stride_xD,
    stride_wE, stride_wD, stride_wF,
    stride_gE, stride_gD, stride_gF,
    stride_bE, stride_bF, stride_bgE, stride_bgF,
    stride_hR, stride_hF,
    GATED: tl.constexpr, HAS_B_IN: tl.constexpr, HAS_B_GATE: tl.constexpr, ACTIVATION: tl.constexpr,
    ALLOW_TF32: tl.constexpr, NUM_N: tl.constexpr, E_POW2: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    ZIGZAG: tl.constexpr, PERSISTENT_TMA: tl.constexpr, TMA_ROWS: tl.constexpr, STREAM_TILE_COST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h tiles: one per program with pointer loads, or (PERSISTENT_TMA) every step-th tile of the
    program's share (_share) with TMA weight loads, in one flattened loop that Triton pipelines
    across tiles so that the next tile's loads overlap this one's epilogue (ffn_in 6-11% faster on
    Switch-Base and Mixtral shapes; persistent with pointer loads was 1.7x slower: its flattened
    loop kept 2 stages)."""
    starts, ends, tiles, tile_ends = _schedule(offs_ptr, R, E, BLOCK_M, E_POW2)
    if PERSISTENT_TMA:
        first, total, step, tiles = _share(starts, ends, tiles, NUM_N, BLOCK_M, STREAM_TILE_COST)
        tile_ends = tl.cumsum(tiles, 0)
        w_in = _weight_descriptor(w_in_ptr, E, D, F, stride_wE, stride_wD, BLOCK_K, BLOCK_N)
        if GATED:
            w_gate = _weight_descriptor(w_gate_ptr, E, D, F, stride_gE, stride_gD, BLOCK_K, BLOCK_N)
        else:
            w_gate = w_in
        x = _rows_source(x_ptr, R, D, stride_xX, TMA_ROWS, BLOCK_M, BLOCK_K)
        for tile_id in tl.range(first, total, step, flatten=True):
            _ffn_in_tile(
                tile_id, starts, ends, tiles, tile_ends, x, rows_ptr, w_in, w_gate, b_in_ptr, b_gate_ptr,
                h_ptr, D, F, stride_xX, stride_xD, stride_wE, stride_wD, stride_wF, stride_gE, stride_gD, stride_gF,
                stride_bE, stride_bF, stride_bgE, stride_bgF, stride_hR, stride_hF, GATED, HAS_B_IN, HAS_B_GATE,
                ACTIVATION, ALLOW_TF32, NUM_N, E_POW2, EVEN_K, EVEN_N, ZIGZAG, PERSISTENT_TMA, TMA_ROWS,
                BLOCK_M, BLOCK_N, BLOCK_K,
            )
    elif tl.program_id(0) < tl.sum(tiles, 0) * NUM_N:  # programs past the last real tile return at once
        _ffn_in_tile(
            tl.program_id(0), starts, ends, tiles, tile_ends, x_ptr, rows_ptr, w_in_ptr, w_gate_ptr, b_in_ptr,
            b_gate_ptr, h_ptr, D, F, stride_xX, stride_xD, stride_wE, stride_wD, stride_wF, stride_gE, stride_gD,
            stride_gF, stride_bE, stride_bF, stride_bgE, stride_bgF, stride_hR, stride_hF, GATED, HAS_B_IN, HAS_B_GATE,
            ACTIVATION, ALLOW_TF32, NUM_N, E_POW2, EVEN_K, EVEN_N, ZIGZAG, False, False, BLOCK_M, BLOCK_N, BLOCK_K,
        )


@triton.jit
def _ffn_out_tile(
    tile_id, starts, ends, tiles, tile_ends,
    h_ptr, w_out_ptr, b_out_ptr, dest_ptr, scale_ptr, y_ptr,
    R, D, F,
    stride_hR, stride_hF, stride_wE, stride_wF, stride_wD, stride_bE, stride_bD, stride_yY, stride_yD,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, ALLOW_TF32: tl.constexpr, NUM_N: tl.constexpr,
    E_POW2: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, ZIGZAG: tl.constexpr, TMA: tl.constexpr,
    TMA_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y, scaled, stored at rows dest_R of the output.

    Rows past the expert's end read a row of h below R (in bounds) and are never stored, so the
    h loads need a mask only on K (none when BLOCK_K divides F; EVEN_N likewise for D).
    """
    expert, row_start, m, m_mask, n_block = _tile(tile_id, starts, ends, tiles, tile_ends, NUM_N, BLOCK_M, E_POW2,
                                                  ZIGZAG)
    n0 = n_block * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    n_mask = n < D
    expert64 = expert.to(tl.int64)

    rows = tl.minimum(m, R - 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        a = _rows_tile(h_ptr, row_start, rows, k0, F, stride_hR, stride_hF, not EVEN_K, TMA_ROWS, BLOCK_M, BLOCK_K)
        w = _weight_tile(w_out_ptr, expert, k0, n0, F, D, stride_wE, stride_wF, stride_wD,
                         not (EVEN_K and EVEN_N), TMA, BLOCK_K, BLOCK_N)
        acc = _dot(a, w, acc, ALLOW_TF32)

    if HAS_BIAS:
        acc += tl.load(b_out_ptr + expert64 * stride_bE + n * stride_bD, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        # a zero routing weight gives exactly 0, even where y is inf or nan
        scale = tl.load(scale_ptr + m, mask=m_mask, other=0.0).to(tl.float32)[:, None]
        acc = tl.where(scale != 0.0, acc * scale, 0.0)
    dest = tl.load(dest_ptr + m, mask=m_mask, other=0).to(tl.int64)
    y_ptrs = y_ptr + dest[:, None] * stride_yY + n[None, :] * stride_yD
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _ffn_out_kernel(
    h_ptr, offs_ptr, w_out_ptr, b_out_ptr, dest_ptr, scale_ptr, y_ptr,
    R, D, F, E,
    stride_hR, stride_hF,
    stride_wE, stride_wF, stride_wD,
    stride_bE, stride_bD,
    stride_yY, stride_yD,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, ALLOW_TF32: tl.constexpr, NUM_N: tl.constexpr,
    E_POW2: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, ZIGZAG: tl.constexpr,
    PERSISTENT_TMA: tl.constexpr, TMA_ROWS: tl.constexpr, STREAM_TILE_COST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y tiles, one per program or (PERSISTENT_TMA) in a flattened loop, as _ffn_in_kernel."""
    starts, ends, tiles, tile_ends = _schedule(offs_ptr, R, E, BLOCK_M, E_POW2)
    if PERSISTENT_TMA:
        first, total, step, tiles = _share(starts, ends, tiles, NUM_N, BLOCK_M, STREAM_TILE_COST)
        tile_ends = tl.cumsum(tiles, 0)
        w_out = _weight_descriptor(w_out_ptr, E, F, D, stride_wE, stride_wF, BLOCK_K, BLOCK_N)
        h = _rows_source(h_ptr, R, F, stride_hR, TMA_ROWS, BLOCK_M, BLOCK_K)
        for tile_id in tl.range(first, total, step, flatten=True):
            _ffn_out_tile(
                tile_id, starts, ends, tiles, tile_ends, h, w_out, b_out_ptr, dest_ptr, scale_ptr, y_ptr,
                R, D, F, stride_hR, stride_hF, stride_wE, stride_wF, stride_wD, stride_bE, stride_bD, stride_yY,
                stride_yD, HAS_BIAS, HAS_SCALE, ALLOW_TF32, NUM_N, E_POW2, EVEN_K, EVEN_N, ZIGZAG, PERSISTENT_TMA,
                TMA_ROWS, BLOCK_M, BLOCK_N, BLOCK_K,
            )
    elif tl.program_id(0) < tl.sum(tiles, 0) * NUM_N:
        _ffn_out_tile(
            tl.program_id(0), starts, ends, tiles, tile_ends, h_ptr, w_out_ptr, b_out_ptr, dest_ptr, scale_ptr, y_ptr,
            R, D, F, stride_hR, stride_hF, stride_wE, stride_wF, stride_wD, stride_bE, stride_bD, stride_yY,
            stride_yD, HAS_BIAS, HAS_SCALE, ALLOW_TF32, NUM_N, E_POW2, EVEN_K, EVEN_N, ZIGZAG, False, False,
            BLOCK_M, BLOCK_N, BLOCK_K,
        )


def _strides(t: torch.Tensor | None, rank: int) -> tuple[int, ...]:
    """Strides of an optional tensor (zeros for None: its kernel loads are compiled out)."""
    return tuple(t.stride()) if t is not None else (0,) * rank


def _or(t: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """A pointer for an absent tensor: never read, its constexpr flag compiles the loads out."""
    return t if t is not None else stand_in


def _use_tma(config: TileConfig, device: torch.device, *weights: torch.Tensor | None) -> bool:
    """The persistent TMA kernel, where asked, on a chip with TMA (sm_90+, or Triton's interpreter),
    and where every weight's layout allows it (Mixtral's transposed views keep pointer loads)."""
    has_tma = device.type != "cuda" or _has_tma(_index(device))
    return config.persistent_tma and has_tma and all(_tma_layout(w) for w in weights if w is not None)


def _tma_layout(t: torch.Tensor) -> bool:
    """What a TMA descriptor needs: a unit stride on the last dim, 16-byte aligned offset and strides."""
    return t.stride(-1) == 1 and all(s * t.element_size() % 16 == 0 for s in (t.storage_offset(), *t.stride()[:-1]))


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _has_tma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Triton's global scratch (the device-side TMA descriptors), as Inductor allocates it."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


@functools.cache
def _install_scratch_allocator() -> None:
    """At the first TMA launch of the process, for eager launches (Inductor installs its own before
    each of its launches); an allocator the user sets after that stays."""
    triton.set_allocator(_scratch)


def _grid(tma: bool, tiles: int, device: torch.device) -> tuple[int]:
    """One program per tile, or with tma one per SM (a few on Triton's CPU interpreter)."""
    if not tma:
        return (tiles,)
    if device.type != "cuda":
        return (min(tiles, 3),)
    _install_scratch_allocator()
    return (max(1, min(tiles, _sm_count(_index(device)), MAX_PERSISTENT_PROGRAMS.value)),)


def launch_ffn_in(
    x_XD: torch.Tensor, rows_R: torch.Tensor, offs_E: torch.Tensor,
    w_in_EDF: torch.Tensor, w_gate_EDF: torch.Tensor | None,
    b_in_EF: torch.Tensor | None, b_gate_EF: torch.Tensor | None,
    activation: str, config: TileConfig | None = None,
) -> torch.Tensor:
    """h_RF of moeshard::gather_grouped_ffn_in with one kernel launch (any device Triton runs on).

    By default the persistent TMA kernel copies x[rows] first and reads it by TMA where F >= 2 D:
    that unfused gather made ffn_in 6-10% faster on Switch-Base (F = 4 D) and 4% on Mixtral, and
    17% slower on the f/4 shard (F = D), where the copy weighs as much as a quarter of the matmul.
    """
    R, (E, D, F) = rows_R.shape[0], w_in_EDF.shape
    config = config or default_config(x_XD.dtype, w_gate_EDF is not None, expert_bytes(w_in_EDF), tma_rows=F >= 2 * D)
    h_RF = x_XD.new_empty(R, F)
    num_n = triton.cdiv(F, config.block_n)
    tma = _use_tma(config, x_XD.device, w_in_EDF, w_gate_EDF)
    tma_rows = tma and config.tma_rows and R > 0 and D * x_XD.element_size() % 16 == 0
    x_src = x_XD.index_select(0, rows_R) if tma_rows else x_XD  # the gather unfused: its rows then come by TMA
    grid = _grid(tma, num_tiles(R, E, config.block_m) * num_n, x_XD.device)
    wrap_triton(_ffn_in_kernel)[grid](
        x_src, rows_R, offs_E,
        w_in_EDF, _or(w_gate_EDF, w_in_EDF), _or(b_in_EF, w_in_EDF), _or(b_gate_EF, w_in_EDF), h_RF,
        R, D, F, E,
        *x_src.stride(), *w_in_EDF.stride(), *_strides(w_gate_EDF, 3),
        *_strides(b_in_EF, 2), *_strides(b_gate_EF, 2), *h_RF.stride(),
        GATED=w_gate_EDF is not None, HAS_B_IN=b_in_EF is not None, HAS_B_GATE=b_gate_EF is not None,
        ACTIVATION=ACTIVATION_CODES[activation], ALLOW_TF32=_input_precision_tf32(x_XD.dtype),
        NUM_N=num_n, E_POW2=triton.next_power_of_2(E), EVEN_K=D % config.block_k == 0, EVEN_N=F % config.block_n == 0,
        ZIGZAG=config.zigzag and not tma, PERSISTENT_TMA=tma,
        TMA_ROWS=tma_rows, STREAM_TILE_COST=config.stream_tile_cost,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return h_RF


def launch_ffn_out(
    h_RF: torch.Tensor, offs_E: torch.Tensor, w_out_EFD: torch.Tensor, b_out_ED: torch.Tensor | None,
    dest_R: torch.Tensor, scale_R: torch.Tensor | None, config: TileConfig | None = None,
) -> torch.Tensor:
    """y_RD of moeshard::grouped_ffn_out_scatter with one kernel launch."""
    config = config or default_config(h_RF.dtype, expert_bytes=expert_bytes(w_out_EFD))
    R, (E, F, D) = h_RF.shape[0], w_out_EFD.shape
    y_RD = h_RF.new_empty(R, D)
    num_n = triton.cdiv(D, config.block_n)
    tma = _use_tma(config, h_RF.device, w_out_EFD)
    tma_rows = tma and config.tma_rows and R > 0 and _tma_layout(h_RF)
    grid = _grid(tma, num_tiles(R, E, config.block_m) * num_n, h_RF.device)
    wrap_triton(_ffn_out_kernel)[grid](
        h_RF, offs_E, w_out_EFD, _or(b_out_ED, w_out_EFD), dest_R, _or(scale_R, h_RF), y_RD,
        R, D, F, E,
        *h_RF.stride(), *w_out_EFD.stride(), *_strides(b_out_ED, 2), *y_RD.stride(),
        HAS_BIAS=b_out_ED is not None, HAS_SCALE=scale_R is not None, ALLOW_TF32=_input_precision_tf32(h_RF.dtype),
        NUM_N=num_n, E_POW2=triton.next_power_of_2(E), EVEN_K=F % config.block_k == 0, EVEN_N=D % config.block_n == 0,
        ZIGZAG=config.zigzag and not tma, PERSISTENT_TMA=tma, TMA_ROWS=tma_rows,
        STREAM_TILE_COST=config.stream_tile_cost, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y_RD
