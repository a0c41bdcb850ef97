"""ffn_in, one launch for all experts: the gather, the first grouped matmul and the activation.

  h[r] = act(x[rows[r]] @ w_gate[e] + b_gate[e]) * (x[rows[r]] @ w_in[e] + b_in[e])
         (or act(x[rows[r]] @ w_in[e] + b_in[e]))

The token gather is in the x loads (except where launch_ffn_in copies x[rows] first because TMA
then reads it faster) and activation and gate product are in the epilogue, so the
pre-activation never reaches memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from moeshard_compile.kernels.activations import ACTIVATION_CODES, _activation
from moeshard_compile.kernels.launch import _grid, _input_precision_tf32, _or, _strides, _use_tma
from moeshard_compile.kernels.operands import _dot, _rows_source, _rows_tile, _weight_descriptor, _weight_tile
from moeshard_compile.kernels.schedule import _schedule, _share, _tile, num_tiles
from moeshard_compile.kernels.tile_config import TileConfig, default_config, expert_bytes


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
