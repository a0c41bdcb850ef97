"""The expert computation of one MoE layer, written the ways the benchmarks compare it.

Each is fn(x_TD, ids_TK, weights_TK, w_in_EDF, w_gate_EDF, w_out_EFD, activation) -> out_TD, with
    out_TD[t] = sum_k weights_TK[t, k] * ffn_{ids_TK[t, k]}(x_TD[t]),
    ffn_e(x) = act(x @ w_in[e]) @ w_out[e]   or, gated,   (act(x @ w_gate[e]) * (x @ w_in[e])) @ w_out[e]
(no router, no biases):
    hf_eager         transformers' eager experts loop (MixtralExperts.forward)
    sort_grouped_mm  sort the rows by expert, then grouped matmuls: what passes/lower.py emits, unfused
    moeshard_fused   moeshard's ops: the counting sort and the two fused expert kernels
    moeshard_grouped_mm  the counting sort, then torch._grouped_mm with the gather and scatter around it
    reference_TD     the same in float64, one expert at a time: what the others are checked against

Names carry their shape: T tokens, K routing slots per token, S = T*K routed rows, R the rows of one
expert, D model dim, F expert FFN dim, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import bench.baselines.grouped_mm  # noqa: F401  (registers torch.ops.moeshard_bench.grouped_mm)
from moeshard_compile.kernels.ops import sort_by_expert  # (and registers torch.ops.moeshard)
from moeshard_compile.passes.grouped_mm_experts import grouped_mm_ffn_in, grouped_mm_ffn_out
from moeshard_compile.passes.op_contract import ACTIVATIONS


def hf_eager(x_TD, ids_TK, weights_TK, w_in_EDF, w_gate_EDF, w_out_EFD, activation: str) -> torch.Tensor:
    """transformers' MixtralExperts.forward (5.x) on x @ w[e] weights; gate and up as two matmuls.

    Host syncs as in transformers: nonzero() for the experts hit, the `== E` test and where() per expert.
    """
    act, E = ACTIVATIONS[activation], w_in_EDF.shape[0]
    out_TD = torch.zeros_like(x_TD)
    with torch.no_grad():
        expert_mask_EKT = F.one_hot(ids_TK, num_classes=E + 1).permute(2, 1, 0)  # E + 1: transformers' dropped slot
        expert_hit = torch.greater(expert_mask_EKT.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == E:
            continue
        slot_R, token_R = torch.where(expert_mask_EKT[expert_idx])
        x_RD = x_TD[token_R]
        h_RF = x_RD @ w_in_EDF[expert_idx]
        h_RF = act(h_RF) if w_gate_EDF is None else act(x_RD @ w_gate_EDF[expert_idx]) * h_RF
        y_RD = (h_RF @ w_out_EFD[expert_idx]) * weights_TK[token_R, slot_R, None]
        out_TD.index_add_(0, token_R, y_RD.to(out_TD.dtype))
    return out_TD


def sort_grouped_mm(x_TD, ids_TK, weights_TK, w_in_EDF, w_gate_EDF, w_out_EFD, activation: str, *,
                    native: bool) -> torch.Tensor:
    """Sort, gather, grouped matmul, activation, grouped matmul, scale, index_add (passes/lower.py's graph).

    native: torch._grouped_mm, else moeshard_bench::grouped_mm (its per-expert loop where _grouped_mm can't run).
    """
    act = ACTIVATIONS[activation]
    _, token_S, weight_sorted_S, _, offs_E = sort_by_expert(
        ids_TK.reshape(-1), weights_TK.reshape(-1), w_in_EDF.shape[0], ids_TK.shape[1])
    offs_E = offs_E.to(torch.int32)
    grouped_mm = torch._grouped_mm if native else torch.ops.moeshard_bench.grouped_mm
    x_SD = x_TD.index_select(0, token_S)
    h_SF = grouped_mm(x_SD, w_in_EDF, offs_E)
    h_SF = act(h_SF) if w_gate_EDF is None else act(grouped_mm(x_SD, w_gate_EDF, offs_E)) * h_SF
    y_SD = grouped_mm(h_SF, w_out_EFD, offs_E) * weight_sorted_S[:, None]
    return torch.zeros_like(x_TD).index_add(0, token_S, y_SD)


def moeshard_fused(x_TD, ids_TK, weights_TK, w_in_EDF, w_gate_EDF, w_out_EFD, activation: str) -> torch.Tensor:
    """What the backend emits: group_by_expert (a counting sort on CUDA), then the two fused ops
    (gather + matmul + activation, matmul + scale + scatter)."""
    T, K = ids_TK.shape
    order_S, token_S, scale_S, _, offs_E = torch.ops.moeshard.group_by_expert(
        ids_TK.reshape(-1), weights_TK.reshape(-1), w_in_EDF.shape[0], K)
    h_SF = torch.ops.moeshard.gather_grouped_ffn_in(x_TD, token_S, offs_E, w_in_EDF, w_gate_EDF, None, None, activation)
    y_SD = torch.ops.moeshard.grouped_ffn_out_scatter(h_SF, offs_E, w_out_EFD, None, order_S, scale_S)  # slot order
    return y_SD.view(T, K, -1).sum(1) if K > 1 else y_SD


def moeshard_grouped_mm(x_TD, ids_TK, weights_TK, w_in_EDF, w_gate_EDF, w_out_EFD, activation: str) -> torch.Tensor:
    """What the backend emits with expert_kernel "grouped_mm": group_by_expert, then the gather,
    torch._grouped_mm and the scatter around it (passes/grouped_mm_experts.py)."""
    T, K = ids_TK.shape
    order_S, token_S, scale_S, _, offs_E = torch.ops.moeshard.group_by_expert(
        ids_TK.reshape(-1), weights_TK.reshape(-1), w_in_EDF.shape[0], K)
    h_SF = grouped_mm_ffn_in(x_TD, token_S, offs_E, None, w_in_EDF, w_gate_EDF, None, None, activation)
    y_SD = grouped_mm_ffn_out(h_SF, offs_E, None, w_out_EFD, None, order_S, scale_S)  # slot order
    return y_SD.view(T, K, -1).sum(1) if K > 1 else y_SD


def reference_TD(x_TD, ids_TK, weights_TK, w_in_EDF, w_gate_EDF, w_out_EFD, activation: str) -> torch.Tensor:
    """The same computation in float64, one expert at a time (weights converted per expert to bound memory)."""
    act = ACTIVATIONS[activation]
    out_TD = torch.zeros(x_TD.shape, dtype=torch.float64, device=x_TD.device)
    for e in range(w_in_EDF.shape[0]):
        token_R, slot_R = (ids_TK == e).nonzero(as_tuple=True)
        x_RD = x_TD[token_R].double()
        h_RF = x_RD @ w_in_EDF[e].double()
        if w_gate_EDF is not None:
            h_RF = act(x_RD @ w_gate_EDF[e].double()) * h_RF
        else:
            h_RF = act(h_RF)
        out_TD.index_add_(0, token_R, (h_RF @ w_out_EFD[e].double()) * weights_TK[token_R, slot_R, None].double())
    return out_TD
