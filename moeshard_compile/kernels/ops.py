"""The expert computation as three torch ops: the rows grouped by expert, then the expert FFN on
them in two ops fused with the dispatch and the combine.

    order_S, token_S, weight_sorted_S, counts_E, offs_E = moeshard::group_by_expert(ids_S, weight_S, E, K)
    h_RF = moeshard::gather_grouped_ffn_in(x_XD, rows_R, offs_E, w_in_EDF, w_gate_EDF?, b_in_EF?, b_gate_EF?, activation)
    y_RD = moeshard::grouped_ffn_out_scatter(h_RF, offs_E, w_out_EFD, b_out_ED?, dest_R, scale_R?)

group_by_expert is torch.sort(ids_S, stable=True).indices and what the lowering derives from it:
on CUDA a counting sort in two Triton launches (group_rows.py), elsewhere torch.sort and friends.

Row r belongs to expert e when offs_E[e-1] <= r < offs_E[e] (offs_E an int cumsum, offs_E[-1] == R
in the lowering). Rows past offs_E[-1] are not computed: their h, and the rows of y that no
computed row is stored to, are zero in the reference and unspecified in the kernel. The
lowering passes a permutation of range(R) as dest_R, so every row of y is written exactly once
(no atomics; the K slots of a token are summed afterwards by a reduction Inductor fuses).

Path selection, inside each op (so torch.compile traces the choice away):
  CUDA tensors in fp32/bf16/fp16 and triton importable -> the Triton kernels (ffn_in.py, ffn_out.py),
    called through wrap_triton so that Inductor sees and schedules them;
  anything else (CPU, float64, no triton)             -> the `*_reference` op: plain torch,
    one matmul per non-empty expert, opaque to the compiler (it reads offs_E on the host).
The ops are `triton_op`s when triton is importable and plain `custom_op`s otherwise (triton is
not a runtime dependency); either way the op body doubles as its fake implementation.

Dtypes: h and y have x's dtype; matmuls accumulate in fp32 (the reference rounds y to h's
dtype before scaling, the kernel does not). dest_R must be free of repeats among computed rows.
"""

from __future__ import annotations

import importlib.util

import torch

from moeshard_compile.passes.op_contract import ACTIVATIONS, FFN_IN, FFN_OUT, GROUP_BY_EXPERT, sort_key_dtype

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    from moeshard_compile.kernels.group_rows import MAX_EXPERTS, launch_group_by_expert
    from moeshard_compile.kernels.ffn_in import launch_ffn_in
    from moeshard_compile.kernels.ffn_out import launch_ffn_out

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_triton(*tensors: torch.Tensor) -> bool:
    """The Triton path runs on CUDA tensors of a dtype tl.dot takes, when triton is importable."""
    return HAS_TRITON and all(t.is_cuda and t.dtype in TRITON_DTYPES for t in tensors)


def _op(name: str):
    """triton_op where triton imports (Inductor sees the kernels), else custom_op; body = fake."""

    def define(fn):
        if HAS_TRITON:
            return torch.library.triton_op(name, mutates_args=())(fn)
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fn)
        return op

    return define


def _experts(offs_E: torch.Tensor):
    """(expert, start, end) of every non-empty group; reads offs_E on the host."""
    start = 0
    for expert, end in enumerate(offs_E.tolist()):
        if end > start:
            yield expert, start, end
        start = end


def _linear(x_MD: torch.Tensor, w_DF: torch.Tensor, b_EF: torch.Tensor | None, e: int) -> torch.Tensor:
    return x_MD @ w_DF if b_EF is None else torch.addmm(b_EF[e], x_MD, w_DF)


def _check_ffn_in(x_XD, rows_R, offs_E, w_in_EDF, w_gate_EDF, b_in_EF, b_gate_EF, activation) -> None:
    torch._check(activation in ACTIVATIONS, lambda: f"gather_grouped_ffn_in: unknown activation {activation!r}")
    torch._check(x_XD.shape[1] == w_in_EDF.shape[1], lambda: "gather_grouped_ffn_in: x and w_in disagree on D")
    torch._check(offs_E.shape[0] == w_in_EDF.shape[0], lambda: "gather_grouped_ffn_in: offs_E and w_in disagree on E")
    torch._check(
        b_gate_EF is None or w_gate_EDF is not None, lambda: "gather_grouped_ffn_in: b_gate without w_gate"
    )
    for w in (w_in_EDF, w_gate_EDF, b_in_EF, b_gate_EF):
        torch._check(w is None or w.dtype == x_XD.dtype, lambda: "gather_grouped_ffn_in: weights and x differ in dtype")


@torch.library.custom_op("moeshard::gather_grouped_ffn_in_reference", mutates_args=())
def gather_grouped_ffn_in_reference(
    x_XD: torch.Tensor, rows_R: torch.Tensor, offs_E: torch.Tensor, w_in_EDF: torch.Tensor,
    w_gate_EDF: torch.Tensor | None, b_in_EF: torch.Tensor | None, b_gate_EF: torch.Tensor | None, activation: str,
) -> torch.Tensor:
    """Plain torch: one gather and one (or two) matmuls per non-empty expert."""
    act = ACTIVATIONS[activation]
    h_RF = x_XD.new_zeros(rows_R.shape[0], w_in_EDF.shape[2])
    for e, start, end in _experts(offs_E):
        x_MD = x_XD[rows_R[start:end]]
        h_MF = _linear(x_MD, w_in_EDF[e], b_in_EF, e)
        if w_gate_EDF is None:
            h_RF[start:end] = act(h_MF)
        else:
            h_RF[start:end] = act(_linear(x_MD, w_gate_EDF[e], b_gate_EF, e)) * h_MF
    return h_RF


@gather_grouped_ffn_in_reference.register_fake
def _(x_XD, rows_R, offs_E, w_in_EDF, w_gate_EDF, b_in_EF, b_gate_EF, activation):
    _check_ffn_in(x_XD, rows_R, offs_E, w_in_EDF, w_gate_EDF, b_in_EF, b_gate_EF, activation)
    return x_XD.new_empty(rows_R.shape[0], w_in_EDF.shape[2])


@_op(FFN_IN)
def gather_grouped_ffn_in(
    x_XD: torch.Tensor, rows_R: torch.Tensor, offs_E: torch.Tensor, w_in_EDF: torch.Tensor,
    w_gate_EDF: torch.Tensor | None, b_in_EF: torch.Tensor | None, b_gate_EF: torch.Tensor | None, activation: str,
) -> torch.Tensor:
    """h[r] = act(x[rows[r]] @ w_gate[e] + b_gate[e]) * (x[rows[r]] @ w_in[e] + b_in[e]), or act(x[rows[r]] @ w_in[e] + b_in[e])."""
    args = (x_XD, rows_R, offs_E, w_in_EDF, w_gate_EDF, b_in_EF, b_gate_EF, activation)
    _check_ffn_in(*args)
    if use_triton(x_XD, w_in_EDF):
        return launch_ffn_in(*args)
    return torch.ops.moeshard.gather_grouped_ffn_in_reference(*args)


def _check_ffn_out(h_RF, offs_E, w_out_EFD, b_out_ED, dest_R, scale_R) -> None:
    torch._check(h_RF.shape[1] == w_out_EFD.shape[1], lambda: "grouped_ffn_out_scatter: h and w_out disagree on F")
    torch._check(offs_E.shape[0] == w_out_EFD.shape[0], lambda: "grouped_ffn_out_scatter: offs_E and w_out disagree on E")
    torch._check(dest_R.shape[0] == h_RF.shape[0], lambda: "grouped_ffn_out_scatter: dest_R and h disagree on R")
    for w in (w_out_EFD, b_out_ED):
        torch._check(w is None or w.dtype == h_RF.dtype, lambda: "grouped_ffn_out_scatter: weights and h differ in dtype")
    torch._check(scale_R is None or scale_R.shape[0] == h_RF.shape[0], lambda: "grouped_ffn_out_scatter: scale_R and h disagree on R")


@torch.library.custom_op("moeshard::grouped_ffn_out_scatter_reference", mutates_args=())
def grouped_ffn_out_scatter_reference(
    h_RF: torch.Tensor, offs_E: torch.Tensor, w_out_EFD: torch.Tensor, b_out_ED: torch.Tensor | None,
    dest_R: torch.Tensor, scale_R: torch.Tensor | None,
) -> torch.Tensor:
    """Plain torch: one matmul per non-empty expert, scaled in fp32, then one index_copy."""
    y_RD = h_RF.new_zeros(h_RF.shape[0], w_out_EFD.shape[2])
    groups = list(_experts(offs_E))
    if not groups:
        return y_RD
    y_MD = torch.cat([_linear(h_RF[start:end], w_out_EFD[e], b_out_ED, e) for e, start, end in groups])
    rows_M = torch.cat([torch.arange(start, end, device=h_RF.device) for _, start, end in groups])
    if scale_R is not None:  # a zero routing weight gives exactly 0, even where y is inf or nan
        acc_dtype = torch.promote_types(y_MD.dtype, torch.float32)
        scale_M1 = scale_R[rows_M].to(acc_dtype).unsqueeze(1)
        y_MD = torch.where(scale_M1 != 0, y_MD.to(acc_dtype) * scale_M1, 0.0).to(h_RF.dtype)
    return y_RD.index_copy(0, dest_R[rows_M], y_MD)


@grouped_ffn_out_scatter_reference.register_fake
def _(h_RF, offs_E, w_out_EFD, b_out_ED, dest_R, scale_R):
    _check_ffn_out(h_RF, offs_E, w_out_EFD, b_out_ED, dest_R, scale_R)
    return h_RF.new_empty(h_RF.shape[0], w_out_EFD.shape[2])


@_op(FFN_OUT)
def grouped_ffn_out_scatter(
    h_RF: torch.Tensor, offs_E: torch.Tensor, w_out_EFD: torch.Tensor, b_out_ED: torch.Tensor | None,
    dest_R: torch.Tensor, scale_R: torch.Tensor | None,
) -> torch.Tensor:
    """y[dest[r]] = where(scale_r != 0, scale_r * (h[r] @ w_out[e] + b_out[e]), 0) for every computed row r."""
    args = (h_RF, offs_E, w_out_EFD, b_out_ED, dest_R, scale_R)
    _check_ffn_out(*args)
    if use_triton(h_RF, w_out_EFD):
        return launch_ffn_out(*args)
    return torch.ops.moeshard.grouped_ffn_out_scatter_reference(*args)


@_op(GROUP_BY_EXPERT)
def group_by_expert(
    ids_S: torch.Tensor, weight_S: torch.Tensor, num_experts: int, top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order_S, token_S, weight_sorted_S, counts_E, offs_E) of the S = T * K (token, slot) rows:
    order_S = torch.sort(ids_S, stable=True).indices, token_S = order_S // top_k,
    weight_sorted_S = weight_S[order_S], counts_E the rows per expert, offs_E = counts_E.cumsum(0).
    ids must lie in [0, num_experts), as a router's top-k ids do (others: the reference raises in
    scatter_add, the CUDA kernels leave those rows out of every group)."""
    torch._check(ids_S.dim() == 1 and weight_S.shape == ids_S.shape,
                 lambda: f"group_by_expert: ids_S and weight_S must be 1-D of one length, got "
                         f"{tuple(ids_S.shape)} and {tuple(weight_S.shape)}")
    torch._check(not ids_S.is_floating_point(), lambda: f"group_by_expert: ids_S must be integers, got {ids_S.dtype}")
    torch._check(num_experts >= 1 and top_k >= 1, lambda: "group_by_expert: num_experts and top_k must be positive")
    if HAS_TRITON and ids_S.is_cuda and num_experts <= MAX_EXPERTS:
        return launch_group_by_expert(ids_S, weight_S, num_experts, top_k)
    return sort_by_expert(ids_S, weight_S, num_experts, top_k)


def sort_by_expert(
    ids_S: torch.Tensor, weight_S: torch.Tensor, num_experts: int, top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """group_by_expert's five outputs from torch ops (a stable torch.sort of narrow keys, scatter_add,
    cumsum): its path off CUDA, and the dispatch of the benchmarks' torch baselines."""
    order_S = torch.sort(ids_S.to(sort_key_dtype(num_experts)), stable=True).indices
    ids64_S = ids_S.long()
    counts_E = ids64_S.new_zeros(num_experts).scatter_add_(0, ids64_S, torch.ones_like(ids64_S))
    return order_S, order_S // top_k, weight_S[order_S], counts_E, counts_E.cumsum(0)
