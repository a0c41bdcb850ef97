"""Any linear combine of per-expert outputs, read by pushing indicators through a copy of it.

Given each expert's call (x_e -> y_e) in the graph, the combine is everything between the
y_e and the first value that depends on all of them. If that code is linear in every y_e and
scales whole rows, it computes out[t] = sum_e c_e[t] * y_e[row_e(t)], and c_e is what it
produces when y_e is replaced by rows holding a 1 in one column (column e mod D) and every
other expert's output by zeros. So the region's own dispatch and combine code, copied with
those indicators, yields combine_TE: capacity drops, renormalisation, weights applied after
the combine and every spelling of the accumulation (index_add_, out[m] += ..., out[m] = ...,
scatter_add, a stack and a weighted sum, an einsum with a dense gate) stay the model's own.

Weights gathered per routed row (`w[ids]`) give one output per (token, slot) instead of one per
expert; the same copy, with slot k's rows holding a 1 in column k, yields weights_TK.

Whether the combine really has that form is not assumed: the verifier (passes.verify) checks
the record against the original code with distinct experts before anything is rewritten.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .graph_utils import fake, spellings, writes_in_place
from .region import ExpertCall

# Ops through which the experts' outputs may flow to the combined value: linear in them.
_LINEAR = {
    *spellings("mul", inplace=True), *spellings("add", inplace=True), *spellings("sub", inplace=True),
    *spellings("truediv", inplace=True), torch.div, "div", torch.neg, "neg",
    "index_add_", torch.index_add, "index_add", "scatter_add_", torch.scatter_add, "scatter_add",
    "index_put_", torch.index_put, "index_put", operator.setitem, "index_copy_", torch.index_copy,
    torch.stack, torch.cat, torch.einsum, torch.matmul, operator.matmul, torch.bmm, "sum", torch.sum,
    "view", "reshape", torch.reshape, "permute", torch.permute, "transpose", torch.transpose, "unsqueeze",
    "squeeze", "flatten", "unflatten", "expand", "contiguous", "to", "type_as", "float", "double", "half", "bfloat16",
    operator.getitem, torch.where, "masked_fill", torch.masked_fill, "t", "mT",
}
_ZEROS = (torch.zeros_like, torch.zeros, "new_zeros")


@dataclass
class Combine:
    """The combine code of one group of expert calls, as found in the graph."""

    output: fx.Node  # the combined value: the region's output
    nodes: list[fx.Node]  # the combine code, graph order (what the indicator copy repeats)
    buffers: list[fx.Node]  # accumulators the combine writes in place (copied fresh)
    affine: bool  # a buffer starts from something else than zeros (a clone of the input, ...)


def find_combine(graph: fx.Graph, outputs: list[fx.Node], tokens: fx.Node) -> Combine | None:
    """The linear code joining `outputs` (the experts' y_e) into one value shaped like
    `tokens` (a stack of the outputs is not yet combined; its weighted sum is), or None."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    reached = [_descendants(y, order) for y in outputs]
    shape = fake(tokens).shape
    common = [n for n in set.intersection(*reached) if _shaped_like(_buffer_root(n), shape)]
    if not common:
        return None
    first = min(common, key=order.__getitem__)
    output = _buffer_root(first)
    nodes = sorted({n for r in reached for n in r if order[n] <= order[first]} | set(_later_writes(first, output, order)),
                   key=order.__getitem__)
    if any(n.target not in _LINEAR for n in nodes):
        return None
    buffers = sorted({_buffer_root(n) for n in nodes if writes_in_place(n)} - set(nodes), key=order.__getitem__)
    # reads of a buffer before any expert writes it (`out[m] = out[m] + y`) are combine code too
    reads = {u for b in buffers for u in b.users if u not in nodes and order[u] < order[first] and _feeds(u, set(nodes))}
    nodes = sorted(set(nodes) | reads, key=order.__getitem__)
    if any(n.target not in _LINEAR for n in reads):
        return None
    derived = set().union(*reached, outputs)
    affine = any(b.target not in _ZEROS and not _zeroed(b) for b in buffers) or any(
        _adds_other_terms(n, derived) for n in nodes)
    return Combine(output, nodes, buffers, affine)


_ADDS = {*spellings("add", inplace=True), *spellings("sub", inplace=True), torch.where, torch.stack, torch.cat}
_SOURCE_AT_3 = {"index_add_", torch.index_add, "index_add", "scatter_add_", torch.scatter_add, "scatter_add",
                "index_copy_", torch.index_copy}
_VALUE_AT_2 = {"index_put_", torch.index_put, "index_put", operator.setitem}


def _adds_other_terms(node: fx.Node, derived: set[fx.Node]) -> bool:
    """The node adds (or writes) a value that no expert output flows into: the combine is affine
    in the experts' outputs (LongCat-Flash's identity experts add their input), not linear."""
    if node.target in _SOURCE_AT_3:
        terms = node.args[3:4]
    elif node.target in _VALUE_AT_2:
        terms = node.args[2:3]
    elif node.target in _ADDS:
        flat = node.args[0] if node.target in (torch.stack, torch.cat) else node.args[1:] if node.target is torch.where else node.args
        terms = [t for t in flat if not (writes_in_place(node) and t is node.args[0])]
    else:
        return False
    for term in terms:
        if isinstance(term, fx.Node):
            if term not in derived and _buffer_root(term).target not in _ZEROS and not _zeroed(_buffer_root(term)):
                return True
        elif isinstance(term, (int, float)) and term != 0 and node.target not in (torch.stack, torch.cat):
            return True
    return False


def _later_writes(first: fx.Node, output: fx.Node, order: dict[fx.Node, int]) -> list[fx.Node]:
    """Writes into the combined buffer after the last expert's (an identity expert adding its
    rows), up to the first reader: the buffer's value is the region's output only after them."""
    if not writes_in_place(first):
        return []
    writes = []
    for user in sorted((u for u in _aliases_users(output) if order[u] > order[first]), key=order.__getitem__):
        if not writes_in_place(user) or _buffer_root(user) is not output:
            break
        writes.append(user)
    return writes


def _feeds(node: fx.Node, targets: set[fx.Node], depth: int = 4) -> bool:
    frontier = [node]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users]
        if targets.intersection(frontier):
            return True
    return False


def _shaped_like(node: fx.Node, shape) -> bool:
    """Holds as many rows of the last dim as `shape` (False where the sizes are data-dependent)."""
    value = fake(node)
    return (value is not None and statically_known_true(value.numel() == shape.numel())
            and statically_known_true(value.shape[-1] == shape[-1]))


def _descendants(start: fx.Node, order: dict[fx.Node, int]) -> set[fx.Node]:
    """Nodes whose value depends on `start`, through data and through in-place writes."""
    seen: set[fx.Node] = set()
    stack = [start]
    while stack:
        node = stack.pop()
        for user in node.users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
                if writes_in_place(user):  # later readers of the written buffer see the value
                    later = [u for u in _aliases_users(_buffer_root(user)) if order[u] > order[user] and u not in seen]
                    seen.update(later)
                    stack.extend(later)
    return seen


def _aliases_users(buffer: fx.Node) -> list[fx.Node]:
    users, stack = [], [buffer]
    while stack:
        node = stack.pop()
        for user in node.users:
            users.append(user)
            if writes_in_place(user) and user.args[0] is node:
                stack.append(user)
    return users


def _buffer_root(node: fx.Node) -> fx.Node:
    """The tensor an in-place chain writes into (`out` for `out.index_add_(...).index_add_(...)`)."""
    while writes_in_place(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _zeroed(buffer: fx.Node) -> bool:
    return any(u.target == "zero_" and u.args[0] is buffer for u in buffer.users)


def emit_combine_columns(graph: fx.Graph, combine: Combine, calls: list[ExpertCall], num_experts: int, d_model: int,
                         before: fx.Node, prefix: str) -> tuple[fx.Node, fx.Node | None]:
    """(combine_TE, base_TD): copies of the combine run on indicator expert outputs (D experts per
    copy), and, for an affine combine, on zeros (the part without experts, taken off the columns)."""
    with graph.inserting_before(before):
        base = _run_copy(graph, combine, _expert_indicators(graph, calls, None, num_experts, d_model)) \
            if combine.affine else None
        chunks = []
        for start in range(0, num_experts, d_model):
            out = _run_copy(graph, combine, _expert_indicators(graph, calls, start, num_experts, d_model))
            flat = graph.call_method("reshape", (out, -1, d_model))
            if base is not None:
                flat = graph.call_function(operator.sub, (flat, graph.call_method("reshape", (base, -1, d_model))))
            width = min(d_model, num_experts - start)
            chunks.append(graph.call_function(operator.getitem, (flat, (slice(None), slice(0, width)))))
        combine_TE = chunks[0] if len(chunks) == 1 else graph.call_function(torch.cat, (chunks, 1))
    combine_TE.name = f"{prefix}combine_TE"
    return combine_TE, base


def emit_slot_weights(graph: fx.Graph, combine: Combine, y: fx.Node, tokens: fx.Node, before: fx.Node,
                      prefix: str) -> tuple[fx.Node, fx.Node | None]:
    """(weights_TK, base_TD) of a combine of per-slot outputs y ([T, K, D], or [T, D] for one
    slot): the combine copied with y's slot k replaced by rows holding a 1 in column k (and, for
    an affine combine, minus its copy on zeros). Needs K <= D (a column per slot)."""
    value, d_model = fake(y), fake(tokens).shape[-1]
    K = value.shape[1] if value.dim() == 3 else 1
    with graph.inserting_before(before):
        zeros_TD = graph.call_function(torch.zeros_like, (tokens,), {"dtype": value.dtype})
        if value.dim() == 3:
            device = {"device": value.device}
            slots_K1 = graph.call_method("unsqueeze", (graph.call_function(torch.arange, (K,), device), 1))
            columns_1D = graph.call_method("unsqueeze", (graph.call_function(torch.arange, (d_model,), device), 0))
            eye_KD = graph.call_method("to", (graph.call_function(operator.eq, (slots_K1, columns_1D)), value.dtype))
            zeros = graph.call_method("expand", (graph.call_method("unsqueeze", (zeros_TD, 1)), -1, K, -1))
            indicator = graph.call_function(operator.add, (zeros, eye_KD))
        else:
            zeros = zeros_TD
            indicator = graph.call_function(torch.clone, (zeros_TD,))
            graph.call_function(operator.setitem, (indicator, (Ellipsis, 0), 1.0))
        out = graph.call_method("reshape", (_run_copy(graph, combine, {y: indicator}), -1, d_model))
        base = _run_copy(graph, combine, {y: zeros}) if combine.affine else None
        if base is not None:
            out = graph.call_function(operator.sub, (out, graph.call_method("reshape", (base, -1, d_model))))
        weights_TK = graph.call_function(operator.getitem, (out, (slice(None), slice(0, K))))
    weights_TK.name = f"{prefix}weights_TK"
    return weights_TK, base


def _expert_indicators(graph: fx.Graph, calls: list[ExpertCall], start: int | None, num_experts: int,
                       d_model: int) -> dict[fx.Node, fx.Node]:
    """Each expert output replaced by its indicator (by zeros if start is None)."""
    return {call.y: _indicator(graph, call, e, start, d_model, num_experts) for e, call in enumerate(calls)}


def _run_copy(graph: fx.Graph, combine: Combine, replaced: dict[fx.Node, fx.Node]) -> fx.Node:
    """The combine's output, copied with the values in `replaced` read in place of the graph's."""
    env = dict(replaced)
    for buffer in combine.buffers:
        env[buffer] = graph.node_copy(buffer, lambda n: env.get(n, n))
    for node in combine.nodes:
        env[node] = graph.node_copy(node, lambda n: env.get(n, n))
    return env.get(combine.output, env[combine.nodes[-1]])


def _indicator(graph: fx.Graph, call: ExpertCall, e: int, start: int | None, d_model: int, num_experts: int) -> fx.Node:
    """What the copy reads for y: rows with a 1 in column (expert - start) for the chunk's experts."""
    dtype = fake(call.y).dtype
    if start is None:
        x = call.x if not call.batched or fake(call.x).dim() == 3 else graph.call_method("unsqueeze", (call.x, 0))
        if call.batched and fake(call.x).dim() != 3:
            return graph.call_method("expand", (graph.call_function(torch.zeros_like, (x,), {"dtype": dtype}), num_experts, -1, -1))
        return graph.call_function(torch.zeros_like, (x,), {"dtype": dtype})
    if call.batched:  # y_ETD: expert e's slice holds the 1s in column e - start
        ids_E1 = graph.call_method("unsqueeze", (graph.call_function(torch.arange, (num_experts,), {"device": _device(call)}), 1))
        cols_1D = graph.call_method("unsqueeze", (graph.call_function(torch.arange, (d_model,), {"device": _device(call)}), 0))
        pick_ED = graph.call_method("to", (graph.call_function(operator.eq, (graph.call_function(operator.sub, (ids_E1, start)), cols_1D)), dtype))
        x_ETD = call.x if fake(call.x).dim() == 3 else graph.call_method("unsqueeze", (call.x, 0))
        zeros = graph.call_function(torch.zeros_like, (x_ETD,), {"dtype": dtype})
        return graph.call_function(operator.add, (zeros, graph.call_method("unsqueeze", (pick_ED, 1))))
    indicator = graph.call_function(torch.zeros_like, (call.x,), {"dtype": dtype})
    if start <= e < start + d_model:
        graph.call_function(operator.setitem, (indicator, (Ellipsis, e - start), 1.0))
    if call.scale is not None:  # the expert's own factor is the combine's
        return graph.call_function(operator.mul, (indicator, call.scale))
    return indicator


def _device(call: ExpertCall):
    return fake(call.x).device
