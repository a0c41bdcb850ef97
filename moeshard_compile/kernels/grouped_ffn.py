"""Triton kernels for the expert FFN on expert-grouped rows, and their tile schedule.

Shape legend: X tokens, R expert-grouped rows, Y output rows, D model dim, F ffn dim,
E experts, T tiles (a static bound, R // BLOCK_M + E).

Rows are grouped by expert: group e is rows offs_E[e-1]:offs_E[e] (offs_E an int cumsum).
Every M-tile belongs to exactly one expert, so a program multiplies by a single expert's
weights. The schedule is computed on the device from offs_E with torch ops of static shape
(no host sync, no recompilation when the routing changes): tiles past the last real one carry
expert == E and their programs return at once, so empty experts cost nothing.

Two kernels, each one launch for all experts:
  ffn_in:  h[r] = act(x[rows[r]] @ w_gate[e] + b_gate[e]) * (x[rows[r]] @ w_in[e] + b_in[e])
           (or act(x[rows[r]] @ w_in[e] + b_in[e])): the token gather is in the x loads and
           activation and gate product are in the epilogue, so neither x[rows] nor the
           pre-activation ever reach memory.
  ffn_out: y[r] = h[r] @ w_out[e] + b_out[e], scaled by the routing weight (exactly 0 where it
           is 0), then added (atomically) or stored into out[dest[r]]: the combine back to
           token order is in the epilogue.

Both accumulate in fp32 (tl.dot). fp32 inputs use TF32 only when
torch.backends.cuda.matmul.allow_tf32 is set, IEEE otherwise; bf16/fp16 inputs are exact
products with fp32 accumulation either way.

The launchers call the kernels through `torch.library.wrap_triton`, so under torch.compile
Inductor sees (and schedules) the kernels themselves. BLOCK_M is fixed per launch because the
schedule depends on it: a later autotuning pass may vary BLOCK_N, BLOCK_K, warps and stages.
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
    """Block sizes and launch parameters of one kernel launch (not yet tuned on a GPU)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 3


DEFAULT_CONFIG = TileConfig()


def tile_schedule(offs_E: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_T, start_T: each tile's expert (E past the last real tile) and first row.

    T = num_rows // block_m + E bounds sum_e ceil(count_e / block_m) for any routing, so the
    grid size is known without reading offs_E on the host.
    """
    E = offs_E.shape[0]
    ends_E = offs_E.to(torch.int64)
    starts_E = ends_E - torch.diff(ends_E, prepend=ends_E.new_zeros(1))
    tiles_E = (ends_E - starts_E + block_m - 1) // block_m
    tile_ends_E = torch.cumsum(tiles_E, 0)
    tile_T = torch.arange(num_rows // block_m + E, device=offs_E.device)
    expert_T = torch.searchsorted(tile_ends_E, tile_T, right=True)
    safe_T = expert_T.clamp(max=E - 1)  # indexable for the padding tiles too
    start_T = starts_E[safe_T] + (tile_T - (tile_ends_E - tiles_E)[safe_T]) * block_m
    return expert_T, start_T


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
def _ffn_in_kernel(
    x_ptr, rows_ptr, offs_ptr, expert_ptr, start_ptr,
    w_in_ptr, w_gate_ptr, b_in_ptr, b_gate_ptr, h_ptr,
    D, F, E,
    stride_xX, stride_xD,
    stride_wE, stride_wD, stride_wF,
    stride_gE, stride_gD, stride_gF,
    stride_bE, stride_bF, stride_bgE, stride_bgF,
    stride_hR, stride_hF,
    GATED: tl.constexpr, HAS_B_IN: tl.constexpr, HAS_B_GATE: tl.constexpr, ACTIVATION: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of h: rows of one expert, gathered from x by rows_R."""
    tile = tl.program_id(0)
    expert = tl.load(expert_ptr + tile).to(tl.int64)
    if expert >= E:
        return
    row_end = tl.load(offs_ptr + expert).to(tl.int64)
    m = tl.load(start_ptr + tile).to(tl.int64) + tl.arange(0, BLOCK_M)
    m_mask = m < row_end
    token = tl.load(rows_ptr + m, mask=m_mask, other=0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < F
    k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + token[:, None] * stride_xX + k[None, :] * stride_xD
    w_ptrs = w_in_ptr + expert * stride_wE + k[:, None] * stride_wD + n[None, :] * stride_wF
    g_ptrs = w_gate_ptr + expert * stride_gE + k[:, None] * stride_gD + n[None, :] * stride_gF
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_mask = k < D - k0
        a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        acc = _dot(a, tl.load(w_ptrs, mask=w_mask, other=0.0), acc, ALLOW_TF32)
        if GATED:
            acc_gate = _dot(a, tl.load(g_ptrs, mask=w_mask, other=0.0), acc_gate, ALLOW_TF32)
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
    h_ptr, offs_ptr, expert_ptr, start_ptr, w_out_ptr, b_out_ptr, dest_ptr, scale_ptr, out_ptr,
    D, F, E,
    stride_hR, stride_hF,
    stride_wE, stride_wF, stride_wD,
    stride_bE, stride_bD,
    stride_oY, stride_oD,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y, scaled and added (or stored) into out at rows dest_R."""
    tile = tl.program_id(0)
    expert = tl.load(expert_ptr + tile).to(tl.int64)
    if expert >= E:
        return
    row_end = tl.load(offs_ptr + expert).to(tl.int64)
    m = tl.load(start_ptr + tile).to(tl.int64) + tl.arange(0, BLOCK_M)
    m_mask = m < row_end
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < D
    k = tl.arange(0, BLOCK_K)

    h_ptrs = h_ptr + m[:, None] * stride_hR + k[None, :] * stride_hF
    w_ptrs = w_out_ptr + expert * stride_wE + k[:, None] * stride_wF + n[None, :] * stride_wD
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        k_mask = k < F - k0
        a = tl.load(h_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _dot(a, tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0), acc, ALLOW_TF32)
        h_ptrs += BLOCK_K * stride_hF
        w_ptrs += BLOCK_K * stride_wF

    if HAS_BIAS:
        acc += tl.load(b_out_ptr + expert * stride_bE + n * stride_bD, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        # a zero routing weight adds exactly 0, even where y is inf or nan
        scale = tl.load(scale_ptr + m, mask=m_mask, other=0.0).to(tl.float32)[:, None]
        acc = tl.where(scale != 0.0, acc * scale, 0.0)
    dest = tl.load(dest_ptr + m, mask=m_mask, other=0).to(tl.int64)
    out_ptrs = out_ptr + dest[:, None] * stride_oY + n[None, :] * stride_oD
    mask = m_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


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
    activation: str, config: TileConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """h_RF of moeshard::gather_grouped_ffn_in with one kernel launch (any device Triton runs on)."""
    R, (E, D, F) = rows_R.shape[0], w_in_EDF.shape
    h_RF = x_XD.new_empty(R, F)
    expert_T, start_T = tile_schedule(offs_E, R, config.block_m)
    grid = (expert_T.shape[0], triton.cdiv(F, config.block_n))
    wrap_triton(_ffn_in_kernel)[grid](
        x_XD, rows_R, offs_E, expert_T, start_T,
        w_in_EDF, _or(w_gate_EDF, w_in_EDF), _or(b_in_EF, w_in_EDF), _or(b_gate_EF, w_in_EDF), h_RF,
        D, F, E,
        *x_XD.stride(), *w_in_EDF.stride(), *_strides(w_gate_EDF, 3),
        *_strides(b_in_EF, 2), *_strides(b_gate_EF, 2), *h_RF.stride(),
        GATED=w_gate_EDF is not None, HAS_B_IN=b_in_EF is not None, HAS_B_GATE=b_gate_EF is not None,
        ACTIVATION=ACTIVATION_CODES[activation],
        ALLOW_TF32=_input_precision_tf32(x_XD.dtype),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return h_RF


def launch_ffn_out(
    h_RF: torch.Tensor, offs_E: torch.Tensor, w_out_EFD: torch.Tensor, b_out_ED: torch.Tensor | None,
    dest_R: torch.Tensor, scale_R: torch.Tensor | None, out_YD: torch.Tensor, accumulate: bool,
    config: TileConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """out_YD' of moeshard::grouped_ffn_out_scatter with one kernel launch; out_YD is not modified.

    Accumulation adds fp32 values atomically into an fp32 copy of out, rounded once to out's
    dtype at the end: bf16/fp16 outputs get one rounding however many rows land on a token.
    """
    R, (E, F, D) = h_RF.shape[0], w_out_EFD.shape
    work_YD = out_YD.to(torch.float32, copy=True) if accumulate else out_YD.clone()
    expert_T, start_T = tile_schedule(offs_E, R, config.block_m)
    grid = (expert_T.shape[0], triton.cdiv(D, config.block_n))
    wrap_triton(_ffn_out_kernel)[grid](
        h_RF, offs_E, expert_T, start_T, w_out_EFD, _or(b_out_ED, w_out_EFD), dest_R, _or(scale_R, h_RF), work_YD,
        D, F, E,
        *h_RF.stride(), *w_out_EFD.stride(), *_strides(b_out_ED, 2), *work_YD.stride(),
        HAS_BIAS=b_out_ED is not None, HAS_SCALE=scale_R is not None, ACCUMULATE=accumulate,
        ALLOW_TF32=_input_precision_tf32(h_RF.dtype),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return work_YD.to(out_YD.dtype) if accumulate else work_YD
