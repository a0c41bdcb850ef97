"""MoEShard's placement: rank r of N holds block r of every expert's FFN dimension F.

    tensor          rank r holds              why
    w_in_EDF        [:, :, F_r]  column block  h_r = act(x @ w_in[:, F_r]) needs no other rank
    w_gate_EDF      [:, :, F_r]  column block  the gate multiplies h elementwise, same block
    b_in_EF         [:, F_r]                   and b_gate_EF likewise
    w_out_EFD       [:, F_r, :]  row block     y = sum_r h_r @ w_out[F_r]: partial sums, reduced
    b_out_ED        whole                      added once, after the partial sums are reduced

Because the activation (and gate) act elementwise on F, the N partial products sum exactly to
the unsharded expert. Expert code the lowering copies between the projections (activation
"graph") may read its input columns in pairs (GPT-OSS's interleaved gate and up) or halves
(concatenated): w_in and b_in then keep the columns block F_r reads (CHAIN_LAYOUTS). Blocks are
as even as possible: the first F % N ranks hold one more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .region import ExpertWeights, WeightSource


@dataclass(frozen=True)
class ShardPlan:
    """How the lowering shards a region: this rank, the group, and where the tokens live.

    input_mode "data_parallel": each rank brings its own tokens (all-gather, reduce-scatter);
    "replicated": every rank brings the same tokens (one all-reduce). comm_chunks: how many
    chunks of rows data_parallel moves and computes one after another (Options.comm_chunks).
    overlap: data_parallel's schedule, "none" or "source_rank" (passes/data_parallel.py).
    """

    rank: int
    world_size: int
    group_name: str
    input_mode: str = "data_parallel"
    comm_chunks: int = 1
    overlap: str = "none"

    def ffn_block(self, d_ff: int) -> tuple[int, int]:
        """[start, stop) of this rank's block of the FFN dimension."""
        return ffn_block(d_ff, self.rank, self.world_size)


def ffn_block(d_ff: int, rank: int, world_size: int) -> tuple[int, int]:
    base, extra = divmod(d_ff, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# For expert code between the projections that the lowering copies (activation "graph"): the
# columns of its input that output columns [a, b) of F read, by how it pairs them.
CHAIN_LAYOUTS = ("columns", "pairs", "halves")  # j reads j; 2j and 2j+1 (interleaved); j and F+j


def chain_input_columns(layout: str, block: tuple[int, int], d_ff: int) -> torch.Tensor:
    a, b = block
    if layout == "columns":
        return torch.arange(a, b)
    if layout == "pairs":
        return torch.arange(2 * a, 2 * b)
    if layout == "halves":
        return torch.cat([torch.arange(a, b), torch.arange(d_ff + a, d_ff + b)])
    raise ValueError(f"unknown chain layout {layout!r}")


def shard_weights(weights: ExpertWeights, block: tuple[int, int], chain_layout: str | None = None) -> ExpertWeights:
    """This rank's copy of its block (contiguous, owning its memory: the originals can go).
    With `chain_layout`, w_in and b_in keep the input columns the copied expert code reads."""
    f = slice(*block)
    f_in = f if chain_layout is None else chain_input_columns(chain_layout, block, weights.w_out_EFD.shape[1])

    def own(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.clone(memory_format=torch.contiguous_format)

    return ExpertWeights(
        w_in_EDF=own(weights.w_in_EDF[:, :, f_in]),
        w_out_EFD=own(weights.w_out_EFD[:, f, :]),
        w_gate_EDF=None if weights.w_gate_EDF is None else own(weights.w_gate_EDF[:, :, f]),
        b_in_EF=None if weights.b_in_EF is None else own(weights.b_in_EF[:, f_in]),
        b_gate_EF=None if weights.b_gate_EF is None else own(weights.b_gate_EF[:, f]),
        b_out_ED=own(weights.b_out_ED),
    )


def sharded(weights: WeightSource, block: tuple[int, int], chain_layout: str | None = None) -> WeightSource:
    """The same weights, keeping only FFN columns [start, stop) of every expert."""
    full = weights.stack
    return WeightSource(
        weights.inputs, lambda params: shard_weights(full(params), block, chain_layout),
        (*weights.layout, ("ffn_block", *block, chain_layout)), copies=True,
    )
