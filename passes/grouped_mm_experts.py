"""The expert computation through `torch._grouped_mm`, the other way the lowering can run it.

The same two steps as the fused ops (op_contract.FFN_IN, FFN_OUT), with the same contract on
rows, groups and zero routing weights, written in torch ops so that Inductor fuses the gather,
the activation and the scatter around the grouped matmuls and, under max-autotune, may tune its
own grouped-matmul template against CUTLASS's. The rewritten graph calls these functions; the
kernel choice times them eagerly.

torch._grouped_mm takes bf16 only, and on CUDA needs SM90 or newer; D and F must be multiples
of 8 (16-byte rows). Weights may be row- or column-major per expert (transformers' views are).
"""

from __future__ import annotations

import torch

from .op_contract import ACTIVATIONS

GROUPED_MM_DTYPES = (torch.bfloat16,)


def grouped_mm_ffn_in(
    x_XD: torch.Tensor, rows_R: torch.Tensor, offs_E: torch.Tensor, expert_R: torch.Tensor | None,
    w_in_EDF: torch.Tensor, w_gate_EDF: torch.Tensor | None, b_in_EF: torch.Tensor | None,
    b_gate_EF: torch.Tensor | None, activation: str,
) -> torch.Tensor:
    """h[r] = act(x[rows[r]] @ w_gate[e] + b_gate[e]) * (x[rows[r]] @ w_in[e] + b_in[e]), or
    act(x[rows[r]] @ w_in[e] + b_in[e]); expert_R (the expert of each row) only with biases."""
    x_RD = x_XD.index_select(0, rows_R)
    offs32_E = offs_E.to(torch.int32)
    h_RF = _biased(torch._grouped_mm(x_RD, w_in_EDF, offs=offs32_E), b_in_EF, expert_R)
    act = ACTIVATIONS[activation]
    if w_gate_EDF is None:
        return act(h_RF)
    return act(_biased(torch._grouped_mm(x_RD, w_gate_EDF, offs=offs32_E), b_gate_EF, expert_R)) * h_RF


def grouped_mm_ffn_out(
    h_RF: torch.Tensor, offs_E: torch.Tensor, expert_R: torch.Tensor | None, w_out_EFD: torch.Tensor,
    b_out_ED: torch.Tensor | None, dest_R: torch.Tensor, scale_R: torch.Tensor | None,
) -> torch.Tensor:
    """y[dest[r]] = where(scale_r != 0, scale_r * (h[r] @ w_out[e] + b_out[e]), 0): every row of y
    once, since dest_R is a permutation in the lowering."""
    y_RD = _biased(torch._grouped_mm(h_RF, w_out_EFD, offs=offs_E.to(torch.int32)), b_out_ED, expert_R)
    if scale_R is not None:  # a zero routing weight gives exactly 0, even where y is inf or nan
        scale_R1 = scale_R.unsqueeze(1).to(torch.float32)
        y_RD = torch.where(scale_R1 != 0, y_RD.to(torch.float32) * scale_R1, 0.0).to(h_RF.dtype)
    return y_RD.new_empty(y_RD.shape).index_copy_(0, dest_R, y_RD)


def _biased(y_RF: torch.Tensor, b_EF: torch.Tensor | None, expert_R: torch.Tensor | None) -> torch.Tensor:
    return y_RF if b_EF is None else y_RF + b_EF.index_select(0, expert_R)


def grouped_mm_unsupported(dtype: torch.dtype, d_model: int, d_ff: int) -> str | None:
    """Why torch._grouped_mm cannot run these experts, or None."""
    if dtype not in GROUPED_MM_DTYPES:
        return "grouped_mm: bf16 only"
    if d_model % 8 or d_ff % 8:
        return "grouped_mm: D and F must be multiples of 8"
    return None
