"""The operand tiles of both grouped matmuls, by pointer loads or from TMA descriptors, and their dot.

Both kernels accumulate in fp32 (tl.dot). fp32 inputs use TF32 only when
torch.backends.cuda.matmul.allow_tf32 is set, IEEE otherwise; bf16/fp16 inputs are exact
products with fp32 accumulation either way.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
