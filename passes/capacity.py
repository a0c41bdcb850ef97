"""Find, and on request remove, the capacity limit a router applies before dispatch.

Switch-style routers drop tokens past an expert's capacity with
`cumsum(one_hot, dim) <= capacity` (or `<`). We look for that comparison between the
router's classifier and the region's routing tensors. Removing it (option `dropless`)
replaces the comparison by all-True: every token reaches its chosen expert.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import spellings, static_int
from .region import MoERegion, Status

_COMPARE = spellings("le") + spellings("lt")
_STOP = (torch._C._nn.linear, F.linear, operator.matmul, torch.matmul)


def find_capacity_limits(region: MoERegion) -> list[fx.Node]:
    routing = region.routing
    starts = [n for n in (routing.ids_TK, routing.weights_TK, routing.combine_TE) if n is not None]
    found, seen, stack = [], set(), list(starts)
    while stack:
        node = stack.pop()
        if node in seen or node.op not in ("call_function", "call_method") or node.target in _STOP:
            continue
        seen.add(node)
        if node.target in _COMPARE and _is_cumsum(node.args[0]) and len(node.args) > 1:
            found.append(node)
            continue
        stack.extend(node.all_input_nodes)
    return found


def describe(region: MoERegion, dropless: bool) -> str | None:
    """The region's capacity limit as the compiled graph applies it, for the report."""
    limits = region.capacity_limits
    if not limits:
        return None
    if dropless and region.status is Status.REWRITTEN and not region.fixed_slots:
        return "removed (dropless=True)"
    # a limit read off a graph that a failed rewrite left behind may have lost its operands
    values = sorted({str(static_int(n.args[1]) if static_int(n.args[1]) is not None else n.args[1])
                     for n in limits if len(n.args) > 1 and n.args[1] is not None})
    kept = f"expert_capacity={'/'.join(values) or '?'} (tokens past it are dropped, as in the model)"
    if dropless and region.status is Status.REWRITTEN:
        return kept + "; kept with dropless=True: the model's dispatch tensor has that many slots per expert"
    return kept


def remove_capacity_limits(graph: fx.Graph, limits: list[fx.Node]) -> None:
    for compare in limits:
        with graph.inserting_after(compare):
            unlimited = graph.call_function(torch.ones_like, (compare.args[0],), {"dtype": torch.bool})
        compare.replace_all_uses_with(unlimited)


def _is_cumsum(node) -> bool:
    for _ in range(4):
        if not isinstance(node, fx.Node):
            return False
        if node.target in (torch.cumsum, "cumsum"):
            return True
        node = node.args[0] if node.args else None
    return False
