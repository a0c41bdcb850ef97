"""Expert parallelism, the baselines MoEShard is measured against: whole experts per rank, tokens
moved to their expert's rank by all-to-all and back.

    CapacityExpertParallelMoE   DeepSpeed-MoE's top-1 layer: a fixed capacity P per expert, a dense
                                [E, P, D] buffer (padding, dropped tokens), equal-split all-to-alls
    DroplessExpertParallelMoE   no capacity: counts exchanged first, then variable-split all-to-alls
                                of exactly the routed rows (top-k allowed), one grouped matmul

Both are built from the stacked weights of a single-device MoE (w_in_EDF, w_out_EFD) and keep
only their own experts, so a test or benchmark compares them with that MoE directly. The expert is
Switch's FFN: y = relu(x @ W_in) @ W_out, no biases. Inputs are data parallel: every rank brings
its own tokens x_TD and their routing (ids_TK, weight_TK, e.g. from bench/baselines/routers.py)
and gets its own tokens' MoE output back: sum_k weight_TK * expert(x_TD).

Placement over the N ranks of `group` (any process group: gloo, NCCL; none at all for one rank):

    | tensor                   | rank r holds                                       |
    | w_in_EDF, w_out_EFD      | experts r*El .. (r+1)*El - 1, whole                |
    | x_TD, ids_TK, weight_TK  | its own batch                                      |

After each forward, `module.stats` (a LayerStats) says what this rank did; `load_summary(stats,
group)` gathers the ranks' stats into the load numbers a benchmark reports.

Names carry their shape: T tokens, D model dim, F expert FFN dim, E experts, El = E / N experts per
rank, K routing slots per token, P capacity (DeepSpeed's C: rows per expert), S = T*K routed rows,
R rows a rank computes, N ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import bench.baselines.grouped_mm  # noqa: F401  (registers torch.ops.moeshard_bench.grouped_mm)

COUNT_BYTES = 8  # the per-expert counts travel as int64


@dataclass
class LayerStats:
    """One forward on one rank. The tensors stay on the device, so forward never syncs for them."""

    rows_computed: int  # rows this rank's experts multiplied, padding included
    offrank_bytes: int  # bytes this rank sent to other ranks (it receives as many: the combine reverses the dispatch)
    kept_S: torch.Tensor  # per local token slot (T*K, token-major): did an expert compute it
    kept_per_expert_E: torch.Tensor  # local token slots each expert computed
    capacity: int | None = None  # P, for the capacity layer

    @property
    def dropped(self) -> int:
        """Local token slots no expert computed: their MoE output is zero (the residual carries them)."""
        return int((~self.kept_S).sum())


def load_summary(stats: LayerStats, group: dist.ProcessGroup | None = None) -> dict:
    """Every rank's stats gathered (a collective: call it on every rank): the load a benchmark reports.

    rows_computed: what each rank's experts multiplied (padding included); useful_rows: the real
    token rows among them; both as max and mean over ranks, the max being the critical path.
    """
    world, _ = group_info(group)
    local = torch.cat([
        torch.tensor([stats.rows_computed, stats.offrank_bytes, stats.dropped], dtype=torch.int64),
        stats.kept_per_expert_E.to("cpu", torch.int64),
    ])
    gathered_NX = _all_gather(local.to(stats.kept_per_expert_E.device), group, world).cpu()
    rows_N, bytes_N, dropped_N = gathered_NX[:, 0], gathered_NX[:, 1], gathered_NX[:, 2]
    kept_NE = gathered_NX[:, 3:]
    useful_N = kept_NE.sum(0).view(world, -1).sum(1)  # rank r's experts are a contiguous block
    return {
        "max_rows_computed": int(rows_N.max()), "mean_rows_computed": rows_N.double().mean().item(),
        "max_useful_rows": int(useful_N.max()), "mean_useful_rows": useful_N.double().mean().item(),
        "dropped": int(dropped_N.sum()), "max_offrank_bytes": int(bytes_N.max()),
    }


def deepspeed_capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """DeepSpeed's `_capacity`: ceil((num_tokens / num_experts) * capacity_factor), at least min_capacity.

    Computed as DeepSpeed does, with capacity_factor a float32 tensor, so float rounding agrees too.
    """
    capacity = int(torch.ceil((num_tokens / num_experts) * torch.tensor(capacity_factor)))
    return max(capacity, min_capacity)


def group_info(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(world size, rank) of `group`; (1, 0) without torch.distributed, so one process needs no setup."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    if group is not None:
        raise ValueError("a process group was given but torch.distributed is not initialised")
    return 1, 0


class _ExpertParallelMoE(nn.Module):
    """Whole experts per rank: the local slice of the stacked weights, and the collectives' group."""

    def __init__(self, w_in_EDF: torch.Tensor, w_out_EFD: torch.Tensor, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = w_in_EDF.shape
        if w_out_EFD.shape != (self.num_experts, self.d_ff, self.d_model):
            raise ValueError(f"w_out_EFD {tuple(w_out_EFD.shape)} does not match w_in_EDF {tuple(w_in_EDF.shape)}")
        self.group = group
        self.world, self.rank = group_info(group)
        if self.num_experts % self.world:
            raise ValueError(f"{self.num_experts} experts cannot be split evenly over {self.world} ranks")
        self.local_experts = self.num_experts // self.world
        first = self.rank * self.local_experts
        local = slice(first, first + self.local_experts)
        self.register_buffer("w_in_EDF", w_in_EDF[local].clone())  # clone: keep only this rank's experts
        self.register_buffer("w_out_EFD", w_out_EFD[local].clone())
        self.stats: LayerStats | None = None

    def _all_to_all(self, x: torch.Tensor, out_splits: list[int] | None = None, in_splits: list[int] | None = None):
        """all_to_all_single along dim 0: equal chunks when no splits are given; identity on one rank."""
        if self.world == 1:
            return x
        rows = x.shape[0] if out_splits is None else sum(out_splits)
        out = x.new_empty(rows, *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=self.group)
        return out


class CapacityExpertParallelMoE(_ExpertParallelMoE):
    """DeepSpeed-MoE's top-1 expert-parallel layer (deepspeed/moe/sharded_moe.py: top1gating, MOELayer).

    Semantics, as in DeepSpeed (checked against deepspeedai/DeepSpeed master, sharded_moe.py):
    - capacity P = ceil((T / E) * capacity_factor), at least min_capacity (`_capacity`), where T is
      the number of tokens of this rank's *local* batch (MOELayer flattens its input to [T, D] and
      top1gating takes T = logits.shape[0]); DeepSpeed also requires T >= min_capacity. Every rank
      must bring the same T, so all ranks agree on P (DeepSpeed assumes it too).
    - each expert keeps at most P of this rank's tokens. drop_policy "position" keeps the first P
      in token order (DeepSpeed's use_rts=False intent, and topkgating's drop_policy="position");
      "random" is DeepSpeed's default Random Token Selection (use_rts=True): P tokens chosen at
      random from the global RNG. Kept tokens take buffer slots in token order (cumsum - 1).
    - dispatch: a dense [E, P, D] buffer, zero padded; all_to_all_single sends expert block g to
      rank g, so rank g receives [N, El, P, D] and runs each local expert on N*P rows.
    - combine: the expert output times the gate weight (Switch/DeepSpeed: the softmax probability
      of the chosen expert); a dropped token's MoE output is zero, the residual carries it.
    DeepSpeed's defaults: capacity_factor = eval_capacity_factor = 1.0, min_capacity = 4 (MoE in
    deepspeed/moe/layer.py). DeepSpeed dispatches with one-hot einsums (O(T*E*P)); indexing here
    fills the same buffer.
    """

    def __init__(self, w_in_EDF: torch.Tensor, w_out_EFD: torch.Tensor, group: dist.ProcessGroup | None = None,
                 capacity_factor: float = 1.0, min_capacity: int = 4, drop_policy: str = "position"):
        super().__init__(w_in_EDF, w_out_EFD, group)
        if drop_policy not in ("position", "random"):
            raise ValueError(f"drop_policy {drop_policy!r}: choose 'position' or 'random'")
        self.capacity_factor, self.min_capacity, self.drop_policy = capacity_factor, min_capacity, drop_policy

    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
        if ids_TK.shape[1] != 1:
            raise ValueError(f"DeepSpeed's capacity layer here is top-1; got K={ids_TK.shape[1]}")
        T, D = x_TD.shape
        if T < self.min_capacity:
            raise ValueError(f"{T} tokens < min_capacity={self.min_capacity} (DeepSpeed's top1gating asserts this)")
        ids_T, weight_T = ids_TK[:, 0], weight_TK[:, 0]
        E, P = self.num_experts, deepspeed_capacity(T, self.num_experts, self.capacity_factor, self.min_capacity)
        slot_T, kept_T = self._slots(ids_T, P)
        # No boolean indexing, so no device sync: a dropped token writes a spare row past the buffer
        # and reads a zero weight.
        row_T = torch.where(kept_T, ids_T * P + slot_T, E * P)
        buffer_XD = x_TD.new_zeros(E * P + 1, D)
        buffer_XD[row_T] = x_TD
        y_EPD = self._all_to_all(self._experts(self._all_to_all(buffer_XD[: E * P].view(E, P, D))))
        gate_T = torch.where(kept_T, weight_T.to(x_TD.dtype), 0)
        out_TD = y_EPD.reshape(E * P, D)[row_T.clamp(max=E * P - 1)] * gate_T[:, None]
        self.stats = LayerStats(
            rows_computed=self.world * self.local_experts * P,
            offrank_bytes=2 * (self.world - 1) * self.local_experts * P * D * x_TD.element_size(),
            kept_S=kept_T,
            kept_per_expert_E=expert_counts(ids_T, E, kept_T),
            capacity=P,
        )
        return out_TD

    def _slots(self, ids_T: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's row in its expert's buffer, and whether it fits (DeepSpeed's locations1_s, mask1)."""
        if self.drop_policy == "position":
            slot_T = rank_within_expert(ids_T, self.num_experts)
            return slot_T, slot_T < capacity
        priority_T = torch.argsort(torch.rand(ids_T.shape, device=ids_T.device))
        kept_T = torch.empty_like(ids_T, dtype=torch.bool)
        kept_T[priority_T] = rank_within_expert(ids_T[priority_T], self.num_experts) < capacity
        dropped_to_spare_T = torch.where(kept_T, ids_T, self.num_experts)  # dropped tokens take no slot
        return rank_within_expert(dropped_to_spare_T, self.num_experts + 1), kept_T

    def _experts(self, recv_EPD: torch.Tensor) -> torch.Tensor:
        """[N * El, P, D] from N ranks -> each local expert on its N*P rows -> the same layout."""
        N, El, P, D = self.world, self.local_experts, recv_EPD.shape[1], self.d_model
        x_ERD = recv_EPD.view(N, El, P, D).transpose(0, 1).reshape(El, N * P, D)  # R = N*P rows per local expert
        y_ERD = torch.bmm(torch.relu(torch.bmm(x_ERD, self.w_in_EDF)), self.w_out_EFD)
        return y_ERD.view(El, N, P, D).transpose(0, 1).reshape(N * El, P, D)


class DroplessExpertParallelMoE(_ExpertParallelMoE):
    """Expert parallelism without capacity: exactly the routed rows move, none is dropped or padded.

    Per forward: sort the local token slots by expert; all_to_all_single of the per-expert counts;
    all_to_all_single with variable splits of the sorted rows; regroup the received rows (ordered
    by source rank) by local expert; one grouped matmul, relu, grouped matmul
    (torch.ops.moeshard_bench.grouped_mm); the reverse all-to-all; un-permute and scale. The counts'
    device-to-host copy (the split sizes) is the one sync, as in any dropless all-to-all.
    """

    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
        N, El, D = self.world, self.local_experts, self.d_model
        ids_S = ids_TK.reshape(-1)
        order_S = torch.argsort(ids_S, stable=True)
        token_S = order_S // ids_TK.shape[1]
        counts_E = expert_counts(ids_S, self.num_experts)
        recv_counts_NE = self._all_to_all(counts_E).view(N, El)  # rows from rank n for my local expert e
        send_splits = counts_E.view(N, El).sum(1).tolist()
        recv_splits = recv_counts_NE.sum(1).tolist()
        recv_RD = self._all_to_all(x_TD[token_S], recv_splits, send_splits)
        y_RD = self._grouped_experts(recv_RD, recv_counts_NE)
        back_SD = self._all_to_all(y_RD, send_splits, recv_splits)
        weight_S = weight_TK.reshape(-1)[order_S, None].to(x_TD.dtype)
        out_TD = torch.zeros_like(x_TD).index_add_(0, token_S, back_SD * weight_S)
        offrank_rows = sum(send_splits) + sum(recv_splits) - send_splits[self.rank] - recv_splits[self.rank]
        self.stats = LayerStats(
            rows_computed=sum(recv_splits),
            offrank_bytes=offrank_rows * D * x_TD.element_size() + (N - 1) * El * COUNT_BYTES,
            kept_S=torch.ones_like(ids_S, dtype=torch.bool),
            kept_per_expert_E=counts_E,
        )
        return out_TD

    def _grouped_experts(self, recv_RD: torch.Tensor, recv_counts_NE: torch.Tensor) -> torch.Tensor:
        """The local experts on rows ordered (source rank, expert): regrouped by expert, computed, put back."""
        local_expert_R = torch.repeat_interleave(
            torch.arange(self.local_experts, device=recv_RD.device).repeat(self.world), recv_counts_NE.reshape(-1))
        regroup_R = torch.argsort(local_expert_R, stable=True)
        offs_E = torch.cumsum(recv_counts_NE.sum(0), 0)
        h_RF = torch.relu(torch.ops.moeshard_bench.grouped_mm(recv_RD[regroup_R], self.w_in_EDF, offs_E))
        y_RD = torch.empty_like(recv_RD)
        y_RD[regroup_R] = torch.ops.moeshard_bench.grouped_mm(h_RF, self.w_out_EFD, offs_E)
        return y_RD


def rank_within_expert(ids_T: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Each token's index among the tokens routed to the same expert, in token order (cumsum - 1)."""
    order_T = torch.argsort(ids_T, stable=True)
    counts_E = expert_counts(ids_T, num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    slot_T = torch.empty_like(ids_T)
    slot_T[order_T] = torch.arange(ids_T.numel(), device=ids_T.device) - starts_E[ids_T[order_T]]
    return slot_T


def expert_counts(ids_T: torch.Tensor, num_experts: int, kept_T: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens per expert (only the kept ones if kept_T is given); index_add, unlike bincount, never syncs."""
    ones_T = torch.ones_like(ids_T) if kept_T is None else kept_T.to(ids_T.dtype)
    return torch.zeros(num_experts, dtype=ids_T.dtype, device=ids_T.device).index_add_(0, ids_T, ones_T)


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup | None, world: int) -> torch.Tensor:
    """[N, *x.shape]: every rank's x; x itself on one rank."""
    if world == 1:
        return x[None]
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.stack(parts)
