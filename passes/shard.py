"""Expert placement across N ranks: MoEShard (rank r holds block r of every expert's FFN
dimension F) and its hybrids with expert parallelism.

With group size g (ShardPlan.group_size, g divides N), the ranks form N / g groups of g
consecutive ranks; group q = r // g holds a contiguous block of the experts, and rank r holds
block r % g of g of each of those experts' FFN dimension. g = N is MoEShard (the default: one
group, every expert); g = 1 is expert parallelism (whole experts, E / N a rank).

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
    group_size: g, the ranks that share an expert (None: world_size, MoEShard).
    """

    rank: int
    world_size: int
    group_name: str
    input_mode: str = "data_parallel"
    comm_chunks: int = 1
    overlap: str = "none"
    group_size: int | None = None

    @property
    def g(self) -> int:
        return self.world_size if self.group_size is None else self.group_size

    @property
    def sharded_everywhere(self) -> bool:
        """Every rank holds a block of every expert (MoEShard): no expert groups."""
        return self.g == self.world_size

    def ffn_block(self, d_ff: int) -> tuple[int, int]:
        """[start, stop) of this rank's block of the FFN dimension."""
        return ffn_block(d_ff, self.rank % self.g, self.g)

    def expert_block(self, num_experts: int, group: int | None = None) -> tuple[int, int]:
        """[start, stop) of the experts a group holds (default: this rank's group)."""
        group = self.rank // self.g if group is None else group
        return ffn_block(num_experts, group, self.world_size // self.g)


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


def shard_weights(weights: ExpertWeights, block: tuple[int, int], chain_layout: str | None = None,
                  experts: tuple[int, int] | None = None) -> ExpertWeights:
    """This rank's copy of its block (contiguous, owning its memory: the originals can go) of
    `experts` [start, stop) (default: all). With `chain_layout`, w_in and b_in keep the input
    columns the copied expert code reads. b_out stays whole: it is added after the sum, by expert."""
    f = slice(*block)
    f_in = f if chain_layout is None else chain_input_columns(chain_layout, block, weights.w_out_EFD.shape[1])
    e = slice(*experts) if experts is not None else slice(None)

    def own(t: torch.Tensor | None, *index) -> torch.Tensor | None:
        return None if t is None else t[index].clone(memory_format=torch.contiguous_format)

    return ExpertWeights(
        w_in_EDF=own(weights.w_in_EDF, e, slice(None), f_in),
        w_out_EFD=own(weights.w_out_EFD, e, f, slice(None)),
        w_gate_EDF=own(weights.w_gate_EDF, e, slice(None), f),
        b_in_EF=own(weights.b_in_EF, e, f_in),
        b_gate_EF=own(weights.b_gate_EF, e, f),
        b_out_ED=own(weights.b_out_ED),
    )


def sharded(weights: WeightSource, block: tuple[int, int], chain_layout: str | None = None,
            experts: tuple[int, int] | None = None) -> WeightSource:
    """The same weights, keeping only FFN columns [start, stop) of every expert (of `experts`)."""
    full = weights.stack
    layout = ("ffn_block", *block, chain_layout) + (() if experts is None else ("experts", *experts))
    return WeightSource(
        weights.inputs, lambda params: shard_weights(full(params), block, chain_layout, experts),
        (*weights.layout, layout), copies=True,
    )
