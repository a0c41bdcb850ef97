"""Recognise per-expert loops that Dynamo unrolled over a ModuleList / ModuleDict of FFNs
(or over slices `w[e]` of a stacked 3-D weight, as in transformers' eager experts), and every
expert at once through 3-D weights.

Three dispatch / combine spellings are read directly, each per expert e::

    index:  tok, slot = where(mask_e);  out.index_add_(0, tok, ffn_e(x[tok]) * w[tok, slot, None])
    mask:   m = mask_e;                 out[m] += ffn_e(x[m]) * s[m, None]
    dense:                              out = out + ffn_e(x) * s_e          # s_e is 0 off-route

Each expert's contribution is the column c_e[t] = weight of expert e for token t (0 when not
routed), rebuilt densely from the loop's own masks and weights, so the model's routing
semantics (top-k, renormalisation, capacity masks) are kept exactly, whatever computed them.
The columns stack into combine_TE, which the lowering turns into a grouped computation. Any
other row-selecting dispatch and any linear combine is read as `linear` (passes.linear_combine:
the combine run on indicator expert outputs); a routing weight on the experts' input is kept
as `input_scale_TE`.

The parts: passes.expert_ffn (find the FFNs), passes.dispatch_combine (how each reads and adds
back), passes.combine_columns (the dense routing columns), passes.linear_combine (any linear
combine); this file ties them together.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

from .combine_columns import combine_column, emit_routing, top_k_bound
from .dispatch_combine import (accumulation, broadcast_source, dispatched_rows, row_source, scaled_rows,
                                     scaled_tiles, selection, selection_mask as _selection_mask)
from .expert_ffn import FFN, expert_key, expert_slices, find_ffns, stack_expert_weights
from .graph_utils import fake, param_name, topo_index, writes_in_place
from .linear_combine import emit_combine_columns, emit_slot_weights, find_combine
from .emit import first_user
from .nnz import nnz_bound
from .region import ExpertCall, MoERegion, Routing, Status

_ZEROS = (torch.zeros_like, torch.zeros, "new_zeros", "zero_")


def recognise_loops(gm: fx.GraphModule, claimed: set[fx.Node]) -> list[MoERegion]:
    ffns = [f for f in find_ffns(gm) if not claimed.intersection(f.nodes)]
    groups: dict[tuple, dict[int, FFN]] = {}
    regions = [r for f in ffns if f.second.weight.batched and (r := _recognise_batched(gm, f)) is not None]
    regions += [r for f in ffns if f.second.weight.gathered and (r := _recognise_gathered(gm, f)) is not None]
    regions += [r for f in ffns if f.second.weight.grouped and (r := _recognise_grouped(gm, f)) is not None]
    for ffn in ffns:
        key = expert_key(ffn)
        if key is not None:
            groups.setdefault(key[0], {})[key[1]] = ffn
    for (template, *_), members in groups.items():
        ordered = [members[i] for i in sorted(members)]
        region = _recognise_group(gm, template, ordered)
        if region is None or region.status is not Status.RECOGNISED:
            region = _recognise_linear(gm, template, ordered) or region
        if region is not None:
            regions.append(region)
    return regions


def _recognise_group(gm: fx.GraphModule, template: str, members: list[FFN]) -> MoERegion | None:
    if any(f.inner_scale is not None for f in members):
        return None  # a weight inside the experts: read by the linear combine
    selections = [selection(f.x) for f in members]
    accumulations = [accumulation(f.y) for f in members]
    if any(a is None for a in accumulations) or len({s.tokens for s in selections}) != 1:
        return None  # not parallel experts over one token tensor: e.g. a stack of dense FFN blocks
    tokens = selections[0].tokens
    for s, a in zip(selections, accumulations):
        if s.kind != a.kind or s.key is not a.key:
            return None
    order = topo_index(gm.graph)
    pairs = sorted(zip(members, selections, accumulations), key=lambda p: order[p[2].nodes[-1]])
    zeros, final = _accumulator(pairs)
    if zeros is None or fake(zeros) is None or fake(zeros).shape != fake(tokens).shape:
        return None
    written = {n for _, _, a in pairs for n in a.nodes}
    if any(writes_in_place(u) and u.args[0] is zeros and u not in written for u in zeros.users):
        return None  # something else adds into the sum (an identity expert): the linear combine reads it
    region = _region(template, [m for m, _, _ in pairs], pairs[0][1].kind, tokens, final)
    region.erase = [n for m, s, a in pairs for n in (*s.nodes, *m.nodes, *a.nodes)] + [zeros]
    region.erase = sorted(set(region.erase), key=order.__getitem__)
    columns = []
    for _, s, a in pairs:
        column = combine_column(s, a)
        if column is None:
            return region.skip(f"could not read the routing weights of expert {len(columns)} ({a.kind} form)")
        columns.append(column)
    region.top_k = top_k_bound(columns, fake(tokens).shape[0], region.num_experts)
    region.route = lambda: emit_routing(gm, region, columns)
    return region


def _region(template: str, members: list[FFN], kind: str, tokens: fx.Node, output: fx.Node) -> MoERegion:
    """The record of one group of expert calls; routing and erase are the caller's."""
    first = members[0]
    width = first.first[0].weight.out_features
    gated = first.elementwise.gated
    stacked = template.endswith("[*]")
    region = MoERegion(
        module=_owner(template[: -len("[*]")] if stacked else template[: template.index("*")]),
        form=f"{'stacked_loop' if stacked else 'module_loop'}/{kind}",
        num_experts=len(members),
        top_k=None,  # the caller's: proven from the routing code
        d_model=fake(tokens).shape[-1],
        d_ff=width // 2 if gated and len(first.first) == 1 else _in_features(first.second),
        activation=first.elementwise.activation,
        gated=gated,
        has_bias=first.second.bias is not None or first.first[0].bias is not None,
        dtype=fake(first.first[0].weight.param).dtype,
        tokens_TD=tokens,
        output_TD=output,
    )
    region.weights = stack_expert_weights(members)
    region.expert_calls = [ExpertCall(m.x, m.y, scale=m.inner_scale) for m in members]
    if first.elementwise.activation == "graph":
        region.expert_chain = (first.first[0].node, first.second.x)
    return region


def _in_features(linear) -> int:
    shape = linear.weight.shape[-2:]
    return shape[1] if linear.weight.out_in else shape[0]


def _owner(path: str) -> str:
    """The module holding a parameter or container: "moe.experts.*" -> "moe.experts", "w1" -> ""."""
    return path.rsplit(".", 1)[0] if "." in path else ""


def _recognise_linear(gm: fx.GraphModule, template: str, members: list[FFN]) -> MoERegion | None:
    """Any row-selecting dispatch and any linear combine (passes.linear_combine): the combine
    weights come from the region's own code run on indicator expert outputs."""
    scaled = [scaled_rows(m.x) for m in members]
    if any(scaled) and not all(scaled):
        return None
    sources = [row_source(s[0] if s else m.x) for m, s in zip(members, scaled)]
    tokens = {t for t, _, _ in sources}
    if len(tokens) != 1 or None in tokens:
        return None
    (tokens,) = tokens
    if fake(tokens) is None or fake(tokens).dim() != 2:
        return None
    if any(s and s[2] is not key for s, (_, _, key) in zip(scaled, sources)):
        return None  # the scale must be selected as the tokens are
    combine = find_combine(gm.graph, [m.y for m in members], tokens)
    if combine is None:
        return None
    region = _region(template, members, "linear", tokens, combine.output)
    dispatch = {n for _, ns, _ in sources for n in ns} | {n for s in scaled if s for n in s[3]}
    region.erase = _erased(gm, combine, {n for m in members for n in m.nodes} | dispatch)
    scales = [s[1] for s in scaled] if all(scaled) else None  # the routing weight scales each expert's input
    input_scale = None if scales is None else lambda graph: graph.call_function(torch.cat, (scales, 1))
    E, T = len(members), fake(tokens).shape[0]
    keys = [key for _, _, key in sources]
    # each token is routed to at most as many experts as select it; dense dispatch proves nothing
    bound = E if None in keys else max(nnz_bound(_selection_mask(k), T, E) for k in keys)
    region.route, region.top_k = lambda: _linear_routing(gm, region, combine, input_scale), max(1, min(bound, E))
    return region


def _recognise_batched(gm: fx.GraphModule, ffn: FFN) -> MoERegion | None:
    """Every expert at once through 3-D weights (`einsum("td,edf->etf", x, w1)`, `bmm`, `x @ w1`),
    every token through every expert or, from a dispatch tensor, each through its capacity
    slots ([E, C, D]); combined by any linear code (passes.linear_combine)."""
    if ffn.inner_scale is not None:
        return None
    nodes: list[fx.Node] = []
    scaled, dispatched = scaled_tiles(ffn.x), dispatched_rows(ffn.x)
    if scaled is not None:
        tokens, scale_S1, nodes = scaled
    elif dispatched is not None:
        (tokens, dispatch), nodes = dispatched, [ffn.x]
    else:
        tokens = broadcast_source(ffn.x, nodes)
    y = fake(ffn.y)
    if fake(tokens) is None or fake(tokens).dim() != 2 or y is None or y.dim() != 3:
        return None
    E = ffn.second.weight.shape[0]
    rows = y.shape[1] if dispatched is not None else fake(tokens).shape[0]  # capacity slots, or every token
    if tuple(y.shape) != (E, rows, fake(tokens).shape[1]):
        return None
    combine = find_combine(gm.graph, [ffn.y], tokens)
    if combine is None:
        return None
    template = param_name(ffn.first[0].weight.param) + "[*]"
    members = expert_slices(ffn)
    region = _region(template, members, "batched", tokens, combine.output)
    region.form = "stacked/batched"
    region.expert_calls = [ExpertCall(ffn.x, ffn.y, batched=True)]
    region.erase = _erased(gm, combine, set(ffn.nodes) | set(nodes))
    # every token through every expert, unless a dispatch tensor bounds the experts per token
    region.top_k = E if dispatched is None else max(1, nnz_bound(dispatch, fake(tokens).shape[0], E))
    region.fixed_slots = dispatched is not None

    input_scale = None if scaled is None else lambda graph: graph.call_method(
        "t", (graph.call_method("reshape", (scale_S1, E, -1)),))
    region.route = lambda: _linear_routing(gm, region, combine, input_scale)
    return region


def _recognise_gathered(gm: fx.GraphModule, ffn: FFN) -> MoERegion | None:
    """Weights gathered per routed row (`einsum("td,tkdf->tkf", x, w1[ids])`): row (t, k) runs
    expert ids[t, k] on x_t; combined by any linear code, read per slot (passes.linear_combine)."""
    tokens, ids = ffn.x, ffn.second.weight.ids
    x, y, ids_value = fake(tokens), fake(ffn.y), fake(ids)
    if ffn.inner_scale is not None or x is None or x.dim() != 2 or y is None or ids_value.dim() not in (1, 2):
        return None
    if tuple(y.shape) != (*ids_value.shape, x.shape[-1]) or ids_value.shape[0] != x.shape[0]:
        return None
    combine = find_combine(gm.graph, [ffn.y], tokens)
    if combine is None:
        return None
    template = param_name(ffn.first[0].weight.param) + "[*]"
    region = _region(template, expert_slices(ffn), "gathered", tokens, combine.output)
    region.form, region.expert_calls = "stacked/gathered", []  # verified as a whole, with its own weights
    K = 1 if ids_value.dim() == 1 else ids_value.shape[1]
    if not isinstance(K, int) or K > x.shape[-1]:
        return region.skip("more routing slots per token than model columns: the per-slot weights cannot be read")
    region.erase, region.top_k = _erased(gm, combine, set(ffn.nodes)), K

    def route() -> Routing:
        prefix = f"{region.module.replace('.', '_')}_"
        weights_TK, base_TD = emit_slot_weights(gm.graph, combine, ffn.y, tokens, first_user(region), prefix)
        with gm.graph.inserting_before(first_user(region)):
            ids_TK = gm.graph.call_method("reshape", (ids, -1, K))
        return Routing(ids_TK=ids_TK, weights_TK=weights_TK, base_TD=base_TD)

    region.route = route
    return region


def _recognise_grouped(gm: fx.GraphModule, ffn: FFN) -> MoERegion | None:
    """Rows split into consecutive chunks by per-expert counts, chunk e through expert e and
    back in row order (JetMoE): the rows are the region's tokens, row s routed to the expert
    whose chunk holds it with weight 1; the model's own code weighs and adds the rows back."""
    split = ffn.second.weight.ids
    counts = _counts_tensor(split.args[1])
    E = ffn.second.weight.shape[0]
    rows = fake(ffn.x)
    if ffn.inner_scale is not None or counts is None or len(split.args[1]) != E or rows is None or rows.dim() != 2:
        return None
    template = param_name(ffn.first[0].weight.param) + "[*]"
    region = _region(template, expert_slices(ffn), "grouped", ffn.x, ffn.y)
    region.form, region.expert_calls = "stacked/grouped", []  # verified as a whole, with its own weights

    def route() -> Routing:
        graph = gm.graph
        with graph.inserting_before(first_user(region)):
            experts_E = graph.call_function(torch.arange, (E,), {"device": rows.device})
            ids_S = graph.call_function(torch.repeat_interleave, (experts_E, counts), {"output_size": rows.shape[0]})
            ids_S1 = graph.call_method("unsqueeze", (ids_S, 1))
            ones_S1 = graph.call_function(torch.ones_like, (ids_S1,), {"dtype": rows.dtype})
        return Routing(ids_TK=ids_S1, weights_TK=ones_S1)

    order = topo_index(gm.graph)
    region.route, region.top_k = route, 1
    region.erase = sorted(set(ffn.nodes), key=order.__getitem__)
    return region


def _counts_tensor(sizes) -> fx.Node | None:
    """The tensor a split's sizes were read from, `[c[0].item(), c[1].item(), ...]` (a
    `c.tolist()`), or None."""
    sources = []
    for e, size in enumerate(sizes):
        element = size.args[0] if isinstance(size, fx.Node) and size.target == "item" else None
        if element is None or element.target is not operator.getitem or element.args[1] != e:
            return None
        sources.append(element.args[0])
    return sources[0] if sources and all(s is sources[0] for s in sources) and fake(sources[0]).dim() == 1 else None


def _erased(gm: fx.GraphModule, combine, nodes: set[fx.Node]) -> list[fx.Node]:
    """`nodes` and the combine's, in graph order: what dies with the rewrite."""
    order = topo_index(gm.graph)
    return sorted(nodes | set(combine.nodes) | set(combine.buffers), key=order.__getitem__)


def _linear_routing(gm: fx.GraphModule, region: MoERegion, combine,
                    input_scale: Callable[[fx.Graph], fx.Node] | None = None) -> Routing:
    """combine_TE (and base_TD) read off the model's combine run on indicator expert outputs;
    `input_scale` emits the router's scale of each expert's input, where it has one."""
    prefix = f"{region.module.replace('.', '_')}_"
    combine_TE, base_TD = emit_combine_columns(gm.graph, combine, region.expert_calls, region.num_experts,
                                               region.d_model, first_user(region), prefix)
    if input_scale is None:
        return Routing(combine_TE=combine_TE, base_TD=base_TD)
    with gm.graph.inserting_before(first_user(region)):
        return Routing(combine_TE=combine_TE, base_TD=base_TD, input_scale_TE=input_scale(gm.graph))


def _accumulator(pairs) -> tuple[fx.Node | None, fx.Node | None]:
    """The zeros tensor the experts accumulate into, and the node holding the final sum."""
    accs = [a for _, _, a in pairs]
    inplace = all(a.acc_in is a.acc_out for a in accs)
    if inplace:
        zeros = accs[0].acc_in
        if any(a.acc_in is not zeros for a in accs):
            return None, None
        final = zeros
    else:
        zeros = accs[0].acc_in
        for prev, nxt in zip(accs, accs[1:]):
            if nxt.acc_in is not prev.acc_out:
                return None, None
        final = accs[-1].acc_out
    if zeros.target not in _ZEROS:
        return None, None
    return zeros, final
