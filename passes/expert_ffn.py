"""Find the experts' FFNs in a Dynamo graph: y = second(act(first(x)) [* up(x)]).

An FFN is a linear (passes.linears) whose input comes, through elementwise nodes only, from one
or two linears reading the same tensor; the elementwise part is identified numerically
(passes.elementwise). FFNs of one MoE share a weight-name template with the expert index
replaced by "*".
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .elementwise import Elementwise, identify, nodes_between
from .graph_utils import fake, param_name, topo_index
from .linears import ALL, Linear, WeightRef, read_linear, with_bias_add
from .region import ExpertWeights, WeightSource, gate_up_columns

_EXPERT_INDEX = re.compile(r"^(\D*?)(\d+)$")


@dataclass
class FFN:
    """One expert applied in the graph: y = second(act(first(x)) [* up(x)])."""

    x: fx.Node
    first: list[Linear]  # one (plain or fused gate_up) or two (separate gate and up)
    second: Linear
    elementwise: Elementwise
    nodes: list[fx.Node] = field(default_factory=list)
    inner_scale: fx.Node | None = None  # a [rows, 1] factor before a bias-free second projection

    @property
    def y(self) -> fx.Node:
        return self.second.node


def find_ffns(gm: fx.GraphModule) -> list[FFN]:
    found = [with_bias_add(lin) for n in gm.graph.nodes if (lin := read_linear(n)) is not None]
    linears = {lin.node: lin for lin in found}
    ffns = []
    order = topo_index(gm.graph)
    for second in linears.values():
        end, inner_scale = _inner_scale(second)
        firsts = _producing_linears(end, linears)
        firsts = sorted(firsts, key=lambda lin: order[lin.node]) if firsts else firsts
        if not firsts or len(firsts) > 2 or len({f.x for f in firsts}) != 1:
            continue
        linears_used = (*firsts, second)
        if len({(lin.weight.index if isinstance(lin.weight.index, str) else None, lin.weight.rows)
                for lin in linears_used}) != 1:
            continue
        if isinstance(second.weight.index, str) and len({lin.weight.shape[0] for lin in linears_used}) != 1:
            continue
        elementwise = identify([f.node for f in firsts], end)
        if elementwise is None or (len(firsts) == 2 and not elementwise.gated):
            continue
        if len(firsts) == 2 and elementwise.gate_input == 0:
            firsts = firsts[::-1]  # canonical order: [up, gate]
        between = nodes_between([f.node for f in firsts], end) + ([second.x] if inner_scale is not None else [])
        nodes = [*(f.node for f in firsts), *between, second.node]
        ffns.append(FFN(firsts[0].x, firsts, second, elementwise, nodes, inner_scale))
    return ffns


def _inner_scale(second: Linear) -> tuple[fx.Node, fx.Node | None]:
    """(end of the code between the projections, a per-row factor applied after it): for
    `down(h * w)` with w of shape [rows, 1] and no bias after, (h, w); else (second.x, None)."""
    x = second.x
    if second.bias is not None or x.target not in (operator.mul, torch.mul, "mul") or len(x.args) != 2:
        return x, None
    for h, w in (x.args, x.args[::-1]):
        if isinstance(h, fx.Node) and isinstance(w, fx.Node) and fake(h) is not None and fake(w) is not None \
                and fake(h).dim() == 2 and tuple(fake(w).shape) == (fake(h).shape[0], 1) and fake(h).shape[1] != 1:
            return h, w
    return x, None


def _producing_linears(start: fx.Node, linears: dict[fx.Node, Linear], depth: int = 24) -> list[Linear] | None:
    """Linears feeding `start` through non-linear call nodes only; None if a graph input intrudes."""
    found, frontier, seen = {}, [start], set()
    for _ in range(depth):
        next_frontier = []
        for node in frontier:
            if node in seen:
                continue
            seen.add(node)
            if node in linears:
                found[node] = linears[node]
            elif node.op in ("call_function", "call_method"):
                next_frontier.extend(node.all_input_nodes)
            else:
                return None
        frontier = next_frontier
        if not frontier:
            return list(found.values())
    return None


def expert_key(ffn: FFN) -> tuple[tuple, int] | None:
    """(template shared by all experts of one MoE, this expert's index), from the weight's name."""
    ref = ffn.first[0].weight
    if isinstance(ref.index, str):  # every expert in one call
        return None
    name = param_name(ref.param)
    if ref.index is not None:
        return (name + "[*]", ffn.elementwise, len(ffn.first)), ref.index
    parts = name.split(".")
    # The expert index sits in the module path above the linear that owns the weight
    # ("experts.3.wi.weight", "experts.expert_3.fc1.weight"): skip "<linear>.<param>".
    for i in range(len(parts) - 3, -1, -1):
        match = _EXPERT_INDEX.match(parts[i])
        if match:
            template = ".".join(parts[:i] + [match.group(1) + "*"] + parts[i + 1 :])
            return (template, ffn.elementwise, len(ffn.first)), int(match.group(2))
    return None


def expert_slices(ffn: FFN) -> list[FFN]:
    """A batched, gathered or grouped FFN (3-D weights over every expert) as one FFN per expert, reading `w[e]`."""
    E = ffn.second.weight.shape[0]

    def sliced(lin: Linear, e: int) -> Linear:
        weight = WeightRef(lin.weight.param, e, lin.weight.out_in, lin.weight.view)
        return Linear(lin.node, lin.x, weight, lin.bias, e if lin.bias_index == ALL else lin.bias_index)

    return [FFN(ffn.x, [sliced(f, e) for f in ffn.first], sliced(ffn.second, e), ffn.elementwise, ffn.nodes)
            for e in range(E)]


def stack_expert_weights(members: list[FFN]) -> WeightSource:
    """Stack each expert's weights into [E, ...] tensors (a copy, made once per change)."""
    first = members[0]
    gated, fused = first.elementwise.gated, len(first.first) == 1 and first.elementwise.gated
    inputs: list[fx.Node] = []

    def slot(node: fx.Node) -> int:
        if node not in inputs:
            inputs.append(node)
        return inputs.index(node)

    # per linear position (first..., second): per expert (input slot of weight, index, out_in, view,
    # bias slot, bias index)
    layout = [
        [(slot(lin.weight.param), lin.weight.index, lin.weight.out_in, lin.weight.view,
          None if lin.bias is None else slot(lin.bias), lin.bias_index) for lin in (*m.first, m.second)]
        for m in members
    ]
    num_first = len(first.first)

    def stack(tensors: list[torch.Tensor]) -> ExpertWeights:
        def weight_EDO(position: int) -> torch.Tensor:
            per_expert = []
            for expert in layout:
                w_slot, index, out_in, view, _, _ = expert[position]
                w = tensors[w_slot] if view is None else tensors[w_slot].view(view)
                w = w if index is None else w[index]
                per_expert.append(w.t() if out_in else w)
            return torch.stack(per_expert)

        def bias_EO(position: int) -> torch.Tensor | None:
            if layout[0][position][4] is None:
                return None
            slices = [tensors[b_slot] if b_index is None else tensors[b_slot][b_index]
                      for *_, b_slot, b_index in (expert[position] for expert in layout)]
            return torch.stack(slices)

        w_first = [weight_EDO(i) for i in range(num_first)]
        b_first = [bias_EO(i) for i in range(num_first)]
        w_out_EFD, b_out_ED = weight_EDO(num_first), bias_EO(num_first)
        if not gated:
            return ExpertWeights(w_in_EDF=w_first[0], w_out_EFD=w_out_EFD, b_in_EF=b_first[0], b_out_ED=b_out_ED)
        if not fused:
            return ExpertWeights(w_first[0], w_out_EFD, w_first[1], b_first[0], b_first[1], b_out_ED)
        gate, up = gate_up_columns(first.elementwise.gate_layout, w_first[0].shape[-1] // 2)
        b = b_first[0]
        return ExpertWeights(
            w_in_EDF=w_first[0][..., up].contiguous(),
            w_out_EFD=w_out_EFD,
            w_gate_EDF=w_first[0][..., gate].contiguous(),
            b_in_EF=None if b is None else b[..., up].contiguous(),
            b_gate_EF=None if b is None else b[..., gate].contiguous(),
            b_out_ED=b_out_ED,
        )

    layout_key = ("loop", tuple(map(tuple, layout)), first.elementwise)
    return WeightSource(inputs=inputs, stack=stack, layout=layout_key, copies=True)
