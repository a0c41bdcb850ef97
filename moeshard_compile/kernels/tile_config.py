"""TileConfig, the block sizes and loop of one kernel launch, and the default one per dtype and
shape (measured by bench/lab/kernel_configs.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileConfig:
    """Block sizes and launch parameters of one kernel launch."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    persistent_tma: bool = False  # one program per SM, weights by TMA, where the layout allows (see launch._use_tma)
    tma_rows: bool = False  # persistent_tma: rows by TMA too (ffn_out's h; ffn_in's x after copying x[rows])
    zigzag: bool = False  # one program per tile only: tiles taken from both ends of the expert order (schedule._tile)
    stream_tile_cost: float = 0.0  # persistent_tma: > 0 splits programs between stream and MMA tiles (schedule._share)


ZIGZAG_MAX_EXPERT_BYTES = 16 * 2**20  # a weight matrix this small stays in the H100's 50 MB L2 beside another
STREAM_TILE_COST = 1.0  # 128-row tiles on an H100: a sparse expert's tile takes about an MMA-bound tile's time


def default_config(dtype: torch.dtype, gated: bool = False, expert_bytes: int = 0, tma_rows: bool = True) -> TileConfig:
    """The fastest of bench/lab/kernel_configs.py's candidates on an H100 (docs/performance.md).

    128x256 output tiles, 4 stages of 128-byte K slices (64 bf16/fp16, 32 fp32); a gated
    ffn_in holds two weight tiles per stage, so it takes 128x128 to fit shared memory. The
    persistent TMA kernel for 2-byte dtypes where the chip and layout allow it (in fp32 its
    epilogue would not fit shared memory beside 4 stages); otherwise one program per tile, in
    zigzag order where one expert's weight matrix (`expert_bytes`) is small: 4-6% faster on
    Switch-Base's 4.7 MB experts under skew, 38% slower on Mixtral's 117 MB ones. `tma_rows`: see
    launch_ffn_in, which asks for it only where the copy of x[rows] pays. The persistent programs
    are split between the sparse and the crowded experts' tiles (schedule._share) where the rows
    come by TMA: 5-8% faster under skew; with gathered rows (ffn_in at F < 2 D) it measured no
    faster.
    """
    return TileConfig(block_m=128, block_n=128 if gated else 256, block_k=128 // dtype.itemsize, num_warps=8,
                      num_stages=4, persistent_tma=dtype.itemsize == 2, tma_rows=tma_rows,
                      zigzag=0 < expert_bytes <= ZIGZAG_MAX_EXPERT_BYTES,
                      stream_tile_cost=STREAM_TILE_COST if tma_rows else 0.0)


def expert_bytes(w_EAB: torch.Tensor) -> int:
    """Bytes of one expert's matrix in a stacked [E, A, B] weight."""
    return w_EAB.shape[1] * w_EAB.shape[2] * w_EAB.element_size()
