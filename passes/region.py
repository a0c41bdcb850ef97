"""The common record every recogniser produces and the one lowering consumes.

Tensor names end in their shapes by the project's legend (docs/design.md, "Shapes"):
T tokens, D model dim, F expert ffn dim, E experts, K routing slots per token, S = T * K rows.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx


@dataclass(frozen=True)
class ExpertWeights:
    """Expert weights stacked in the canonical layout: y = act(x @ w_in) @ w_out.

    Gated experts compute act(x @ w_gate + b_gate) * (x @ w_in + b_in) before w_out.
    Tensors may be views of the user's parameters (stacked 3-D forms) or copies made
    once at compile time (per-expert module forms).
    """

    w_in_EDF: torch.Tensor
    w_out_EFD: torch.Tensor
    w_gate_EDF: torch.Tensor | None = None
    b_in_EF: torch.Tensor | None = None
    b_gate_EF: torch.Tensor | None = None
    b_out_ED: torch.Tensor | None = None

    def present(self) -> dict[str, torch.Tensor]:
        """The tensors this expert form has, by field name (the rewritten graph's weight inputs)."""
        return {name: t for name, t in self.tensors().items() if t is not None}

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {
            "w_in_EDF": self.w_in_EDF,
            "w_gate_EDF": self.w_gate_EDF,
            "b_in_EF": self.b_in_EF,
            "b_gate_EF": self.b_gate_EF,
            "w_out_EFD": self.w_out_EFD,
            "b_out_ED": self.b_out_ED,
        }


@dataclass
class WeightSource:
    """Where the stacked weights come from, so they can be rebuilt when a parameter changes.

    `inputs` are the graph placeholders of the user's parameters; `stack` builds ExpertWeights
    from their current values (in that order). The backend stacks once at compile time and
    again only when a parameter was replaced or modified in place (e.g. `load_state_dict`).
    """

    inputs: list[fx.Node]
    stack: Callable[[list[torch.Tensor]], ExpertWeights]
    layout: tuple = ()  # what `stack` does with the inputs (hashable): equal layouts stack equally
    copies: bool = False  # `stack` copies (share one stack between graphs) rather than making views

    def stack_on_meta(self, tensors: list[torch.Tensor]) -> ExpertWeights:
        """What `stack` makes of tensors of these shapes, strides and dtypes, as meta tensors:
        which weights there are and their layouts, without copying a byte."""
        return self.stack([torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in tensors])


@dataclass(frozen=True)
class Routing:
    """Token -> expert assignment as graph nodes, built by a region's `route` (passes.prepare).

    Either top-k form (`ids_TK` int64 expert ids, `weights_TK` their combine weights) or
    dense form (`combine_TE`: weight of expert e for token t, zero where not routed, at most
    the region's `top_k` non-zeros per row). Slots whose weight is zero are computed but
    contribute nothing, exactly as a dropped token contributes nothing.
    `base_TD`: what the combine yields with every expert output 0 (None: zero);
    `input_scale_TE`: expert e reads x_t * input_scale_TE[t, e] (Llama 4's router; None: x_t).
    """

    ids_TK: fx.Node | None = None
    weights_TK: fx.Node | None = None
    combine_TE: fx.Node | None = None
    base_TD: fx.Node | None = None
    input_scale_TE: fx.Node | None = None


@dataclass(frozen=True)
class ExpertCall:
    """Where the graph runs experts: input `x` to output `y`. One expert, or, if `batched`, every
    expert at once with y of shape [E, T, D] (x [T, D], or [E, T, D] with every slice alike).
    `scale`: a per-row factor the expert applies between its projections (`down(act(up(x)) * w)`,
    no bias after it), so y = scale * f(x): a part of the combine, not of f."""

    x: fx.Node
    y: fx.Node
    batched: bool = False
    scale: fx.Node | None = None


class Status(str, enum.Enum):
    RECOGNISED = "recognised"  # found; rewritten unless a later check skips it
    REWRITTEN = "rewritten"
    SKIPPED = "skipped"  # left as the model wrote it; `reason` says why


@dataclass(eq=False)
class MoERegion:
    """One MoE layer's dispatch / experts / combine, as found in a Dynamo graph.

    Recognition leaves the graph as it is: nodes the rewrite needs and the graph lacks (combine
    weights read from the model's own routing code) are emitted by `route`, which
    passes.prepare runs. Fields a recogniser could not read before skipping are None.
    """

    module: str  # qualified name of the module holding the experts, e.g. "encoder.block.1.layer.1.mlp"
    form: str  # which recogniser matched, e.g. "module_loop/index_add", "stacked/grouped_mm"
    num_experts: int
    top_k: int | None  # experts per token, at most (proven from the routing code)
    d_model: int | None
    d_ff: int | None
    activation: str | None  # "relu", "gelu", "gelu_tanh", "silu", ..., or "graph": `expert_chain`, run as it is
    gated: bool
    has_bias: bool
    dtype: torch.dtype
    tokens_TD: fx.Node | None = None
    output_TD: fx.Node | None = None  # node whose value the rewrite replaces
    route: Callable[[], Routing] | None = None
    routing: Routing | None = None  # what `route` built
    erase: list[fx.Node] = field(default_factory=list)  # nodes that die with the rewrite (side-effecting ones too)
    weights: WeightSource | None = None
    # how the graph calls the experts: one ExpertCall per expert (per-expert loops), one batched
    # call for all (a 3-D weight over every expert at once), or none (a module's own contract)
    expert_calls: list["ExpertCall"] = field(default_factory=list)
    # activation "graph": (input, output) of the graph's own elementwise code between the two
    # projections of expert 0, which the lowering copies; chain_layout: which input columns each
    # output column reads (passes.shard.CHAIN_LAYOUTS), proven by passes.verify; None: not
    # known, and the FFN dim is not sharded
    expert_chain: tuple[fx.Node, fx.Node] | None = None
    chain_layout: str | None = None
    capacity_limits: list[fx.Node] = field(default_factory=list)  # router comparisons that drop tokens
    fixed_slots: bool = False  # the model's dispatch tensor holds a fixed number of slots per expert (GShard)
    status: Status = Status.RECOGNISED
    reason: str = ""

    def skip(self, reason: str) -> "MoERegion":
        self.status, self.reason = Status.SKIPPED, reason
        return self


def gate_up_columns(layout: str, d_ff: int) -> tuple[slice, slice]:
    """(gate, up) column slices of a fused gate_up projection of width 2 * d_ff."""
    return {
        "concat_gate_first": (slice(0, d_ff), slice(d_ff, 2 * d_ff)),
        "concat_up_first": (slice(d_ff, 2 * d_ff), slice(0, d_ff)),
        "interleaved": (slice(0, 2 * d_ff, 2), slice(1, 2 * d_ff, 2)),
    }[layout]
