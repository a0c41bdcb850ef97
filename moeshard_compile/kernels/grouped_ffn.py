"""Triton kernels for the expert FFN on expert-grouped rows.

Shape legend: X tokens, R expert-grouped rows, D model dim, F ffn dim, E experts.

Rows are grouped by expert: group e is rows offs_E[e-1]:offs_E[e] (offs_E an int cumsum).
Every M tile belongs to exactly one expert, so a program multiplies by a single expert's
weights. The grid has a static size, R // BLOCK_M + E tiles (times the N blocks), which bounds
sum_e ceil(count_e / BLOCK_M) for any routing; each program finds its expert and rows from
offs_E in registers (`_tile`), so there is no host sync and no recompilation when the routing
changes. Programs past the last real tile return at once: empty experts cost nothing.

Two kernels, each one launch for all experts:
  ffn_in:  h[r] = act(x[rows[r]] @ w_gate[e] + b_gate[e]) * (x[rows[r]] @ w_in[e] + b_in[e])
           (or act(x[rows[r]] @ w_in[e] + b_in[e])): the token gather is in the x loads and
           activation and gate product are in the epilogue, so neither x[rows] nor the
           pre-activation ever reach memory.
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

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# Order defines the kernels' ACTIVATION code; names match passes.lower.ACTIVATIONS.
ACTIVATION_CODES = {name: code for code, name in enumerate(
    ("identity", "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")
)}


@dataclass(frozen=True)
class TileConfig:
    """Block sizes and launch parameters of one kernel launch."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    zigzag: bool = False  # tiles taken alternately from the first and the last expert (see _tile)


ZIGZAG_MAX_EXPERT_BYTES = 16 * 2**20  # a weight matrix this small stays in the H100's 50 MB L2 beside another


def default_config(dtype: torch.dtype, gated: bool = False, expert_bytes: int = 0) -> TileConfig:
    """The fastest of bench/kernel_configs.py's candidates on an H100 (docs/performance.md).

    128x256 output tiles, 4 stages of 128-byte K slices (64 bf16/fp16, 32 fp32); a gated
    ffn_in holds two weight tiles per stage, so it takes 128x128 to fit shared memory. Zigzag
    order where one expert's weight matrix (`expert_bytes`) is small: 4-6% faster on
    Switch-Base's 4.7 MB experts under skew, 38% slower on Mixtral's 117 MB ones.
    """
    return TileConfig(block_m=128, block_n=128 if gated else 256, block_k=128 // dtype.itemsize, num_warps=8,
                      num_stages=4, zigzag=0 < expert_bytes <= ZIGZAG_MAX_EXPERT_BYTES)


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
def _tile(offs_ptr, R, E, NUM_N: tl.constexpr, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, ZIGZAG: tl.constexpr):
    """This program's expert (E for a padding tile), its BLOCK_M rows and their mask, its N block.

    Programs are numbered tile-major (the N blocks of one M tile are neighbours, and so are the
    tiles of one expert), so a tile's rows and an expert's weights are reused from L2. ZIGZAG
    takes the tiles alternately from the front and the back of that order, so that under skewed
    routing the crowded experts' compute-bound tiles run beside the sparse experts' weight-bound
    ones instead of in separate waves. The schedule is read off offs_E in registers: no
    separate launch, no host sync.
    """
    pid = tl.program_id(0)
    tile = pid // NUM_N
    e = tl.arange(0, E_POW2)
    ends = tl.minimum(tl.load(offs_ptr + e, mask=e < E, other=0).to(tl.int32), R)
    starts = tl.minimum(tl.load(offs_ptr + e - 1, mask=(e > 0) & (e < E), other=0).to(tl.int32), ends)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tile_ends = tl.cumsum(tiles, 0)
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
    return expert, m, m_mask, pid % NUM_N


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
    ZIGZAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of h: rows of one expert, gathered from x by rows_R.

    Rows past the expert's end read token 0 (always in bounds) and are never stored, so the x
    loads need a mask only on K, and none when BLOCK_K divides D (EVEN_K; EVEN_N likewise for F).
    """
    expert, m, m_mask, n_block = _tile(offs_ptr, R, E, NUM_N, BLOCK_M, E_POW2, ZIGZAG)
    if expert >= E:
        return
    expert = expert.to(tl.int64)
    token = tl.load(rows_ptr + m, mask=m_mask, other=0).to(tl.int64)
    n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < F
    k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + token[:, None] * stride_xX + k[None, :] * stride_xD
    w_ptrs = w_in_ptr + expert * stride_wE + k[:, None] * stride_wD + n[None, :] * stride_wF
    g_ptrs = w_gate_ptr + expert * stride_gE + k[:, None] * stride_gD + n[None, :] * stride_gF
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_mask = k < D - k0
        a = _load(x_ptrs, k_mask[None, :], not EVEN_K)
        w_mask = k_mask[:, None] & n_mask[None, :]
        acc = _dot(a, _load(w_ptrs, w_mask, not (EVEN_K and EVEN_N)), acc, ALLOW_TF32)
        if GATED:
            acc_gate = _dot(a, _load(g_ptrs, w_mask, not (EVEN_K and EVEN_N)), acc_gate, ALLOW_TF32)
        x_ptrs += BLOCK_K * stride_xD
        w_ptrs += BLOCK_K * stride_wD
        g_ptrs += BLOCK_K * stride_gD

    if HAS_B_IN:
        acc += tl.load(b_in_ptr + expert * stride_bE + n * stride_bF, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_B_GATE:
        acc_gate += tl.load(b_gate_ptr + expert * stride_bgE + n * stride_bgF, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if GATED:
        h = _activation(acc_gate, ACTIVATION) * acc
    else:
        h = _activation(acc, ACTIVATION)
    h_ptrs = h_ptr + m[:, None] * stride_hR + n[None, :] * stride_hF
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y, scaled, stored at rows dest_R of the output.

    Rows past the expert's end read a row of h below R (in bounds) and are never stored, so the
    h loads need a mask only on K (none when BLOCK_K divides F; EVEN_N likewise for D).
    """
    expert, m, m_mask, n_block = _tile(offs_ptr, R, E, NUM_N, BLOCK_M, E_POW2, ZIGZAG)
    if expert >= E:
        return
    expert = expert.to(tl.int64)
    n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < D
    k = tl.arange(0, BLOCK_K)

    h_ptrs = h_ptr + tl.minimum(m, R - 1)[:, None] * stride_hR + k[None, :] * stride_hF
    w_ptrs = w_out_ptr + expert * stride_wE + k[:, None] * stride_wF + n[None, :] * stride_wD
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        k_mask = k < F - k0
        a = _load(h_ptrs, k_mask[None, :], not EVEN_K)
        w = _load(w_ptrs, k_mask[:, None] & n_mask[None, :], not (EVEN_K and EVEN_N))
        acc = _dot(a, w, acc, ALLOW_TF32)
        h_ptrs += BLOCK_K * stride_hF
        w_ptrs += BLOCK_K * stride_wF

    if HAS_BIAS:
        acc += tl.load(b_out_ptr + expert * stride_bE + n * stride_bD, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        # a zero routing weight gives exactly 0, even where y is inf or nan
        scale = tl.load(scale_ptr + m, mask=m_mask, other=0.0).to(tl.float32)[:, None]
        acc = tl.where(scale != 0.0, acc * scale, 0.0)
    dest = tl.load(dest_ptr + m, mask=m_mask, other=0).to(tl.int64)
    y_ptrs = y_ptr + dest[:, None] * stride_yY + n[None, :] * stride_yD
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _strides(t: torch.Tensor | None, rank: int) -> tuple[int, ...]:
    """Strides of an optional tensor (zeros for None: its kernel loads are compiled out)."""
    return tuple(t.stride()) if t is not None else (0,) * rank


def _or(t: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """A pointer for an absent tensor: never read, its constexpr flag compiles the loads out."""
    return t if t is not None else stand_in


def launch_ffn_in(
    x_XD: torch.Tensor, rows_R: torch.Tensor, offs_E: torch.Tensor,
    w_in_EDF: torch.Tensor, w_gate_EDF: torch.Tensor | None,
    b_in_EF: torch.Tensor | None, b_gate_EF: torch.Tensor | None,
    activation: str, config: TileConfig | None = None,
) -> torch.Tensor:
    """h_RF of moeshard::gather_grouped_ffn_in with one kernel launch (any device Triton runs on)."""
    config = config or default_config(x_XD.dtype, w_gate_EDF is not None, expert_bytes(w_in_EDF))
    R, (E, D, F) = rows_R.shape[0], w_in_EDF.shape
    h_RF = x_XD.new_empty(R, F)
    num_n = triton.cdiv(F, config.block_n)
    wrap_triton(_ffn_in_kernel)[(num_tiles(R, E, config.block_m) * num_n,)](
        x_XD, rows_R, offs_E,
        w_in_EDF, _or(w_gate_EDF, w_in_EDF), _or(b_in_EF, w_in_EDF), _or(b_gate_EF, w_in_EDF), h_RF,
        R, D, F, E,
        *x_XD.stride(), *w_in_EDF.stride(), *_strides(w_gate_EDF, 3),
        *_strides(b_in_EF, 2), *_strides(b_gate_EF, 2), *h_RF.stride(),
        GATED=w_gate_EDF is not None, HAS_B_IN=b_in_EF is not None, HAS_B_GATE=b_gate_EF is not None,
        ACTIVATION=ACTIVATION_CODES[activation], ALLOW_TF32=_input_precision_tf32(x_XD.dtype),
        NUM_N=num_n, E_POW2=triton.next_power_of_2(E), EVEN_K=D % config.block_k == 0, EVEN_N=F % config.block_n == 0,
        ZIGZAG=config.zigzag, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
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
    wrap_triton(_ffn_out_kernel)[(num_tiles(R, E, config.block_m) * num_n,)](
        h_RF, offs_E, w_out_EFD, _or(b_out_ED, w_out_EFD), dest_R, _or(scale_R, h_RF), y_RD,
        R, D, F, E,
        *h_RF.stride(), *w_out_EFD.stride(), *_strides(b_out_ED, 2), *y_RD.stride(),
        HAS_BIAS=b_out_ED is not None, HAS_SCALE=scale_R is not None, ALLOW_TF32=_input_precision_tf32(h_RF.dtype),
        NUM_N=num_n, E_POW2=triton.next_power_of_2(E), EVEN_K=F % config.block_k == 0, EVEN_N=D % config.block_n == 0,
        ZIGZAG=config.zigzag, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y_RD
