"""ffn_out, one launch for all experts: the second grouped matmul, the routing weight and the
scatter back to token (or rank) order.

  y[dest[r]] = (h[r] @ w_out[e] + b_out[e]) * scale[r]   (exactly 0 where scale is 0)

The routing weight and the return to token order are in the epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from moeshard_compile.kernels.launch import _grid, _input_precision_tf32, _or, _strides, _tma_layout, _use_tma
from moeshard_compile.kernels.operands import _dot, _rows_source, _rows_tile, _weight_descriptor, _weight_tile
from moeshard_compile.kernels.schedule import _schedule, _share, _tile, num_tiles
from moeshard_compile.kernels.tile_config import TileConfig, default_config, expert_bytes


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
