"""What looks like an MoE layer but no region covers: so that nothing is passed over in silence.

Two signs, either enough:
- an expert bank: parameters of a container whose name says experts, differing only by an
  index (`experts.3.w1.weight`, `experts.expert_3.fc.weight`), or 3-D parameters of such a
  module; shared experts (every token runs them) are a dense layer and are not one;
- a routing decision: a top-k / argmax / max over the outputs of a learned projection, whose
  indices select, compare or scatter (the per-expert work a router feeds; an argmax returned
  as a prediction, or a top-k over key positions, is not one).
A sign already inside a region, rewritten or skipped, is accounted for; each other one becomes
a report row, status "skipped", naming its module and what was not understood.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from .graph_utils import fake, module_paths, param_name, writes_in_place
from .region import MoERegion
from .verify import ancestors as _ancestors, routing_source

_INDEXED = re.compile(r"^(\D*?)(\d+)$")
_ROUTING_OPS = (torch.topk, "topk", torch.argmax, "argmax", torch.max, "max")
_SELECTING_OPS = (operator.eq, "eq", torch.eq, operator.getitem, torch.nn.functional.one_hot, torch.where, "nonzero",
                  torch.nonzero, torch.scatter, "scatter", "scatter_", "scatter_add_", torch.bincount, "bincount",
                  torch.gather, "gather", torch.take_along_dim, "take_along_dim", torch.index_select, "index_select",
                  torch.nn.functional.embedding, torch.embedding, "index_add_", torch.index_add, "index_put_",
                  "index_copy_", torch.sort, "sort", torch.argsort, "argsort")


@dataclass
class Unrecognised:
    """A report row for a structure that looks like an MoE layer and was not rewritten."""

    module: str
    form: str  # "expert_bank" | "routing"
    num_experts: int | None
    reason: str


def find_unrecognised(gm: fx.GraphModule, regions: list[MoERegion]) -> list[Unrecognised]:
    covered = _covered(regions)
    claimed = {p for r in regions if r.weights is not None for p in r.weights.inputs}
    region_modules = [r.module for r in regions]
    found: dict[str, Unrecognised] = {}
    for module, params in _expert_banks(gm).items():
        if "shared" in module.rsplit(".", 1)[-1].lower():  # always-on experts: a dense layer, nothing routed
            continue
        if claimed.intersection(params) or any(covered.intersection(p.users) for p in params):
            continue
        if any(module == m or module.startswith(m + ".") for m in region_modules):
            continue
        found[module] = Unrecognised(module, "expert_bank", _bank_size(params),
                                     "an expert bank whose dispatch and combine were not recognised")
    for node in _routing_decisions(gm):
        if node in covered:
            continue
        module = (module_paths(node) or [""])[-1]
        bank = _bank_beside(module, [m for m, u in found.items() if u.form == "expert_bank"])
        if bank is not None:
            found[bank].reason = "a routing decision and an expert bank whose dispatch and combine were not recognised"
        elif module not in found:
            found[module] = Unrecognised(module, "routing", None,
                                         f"a routing decision ({_op_name(node)}) whose per-expert work was not recognised")
    return list(found.values())


def _bank_beside(module: str, banks: list[str]) -> str | None:
    """The bank a router in `module` feeds: inside the same module, or inside its parent
    (`mlp.gate` beside `mlp.experts`)."""
    parent = module.rsplit(".", 1)[0] if "." in module else ""
    for scope in (module, parent):
        match = next((b for b in banks if not scope or b == scope or b.startswith(scope + ".")), None)
        if match is not None:
            return match
    return None


def _covered(regions: list[MoERegion]) -> set[fx.Node]:
    """Every node of a region: what it replaces and reads back to its layer's input, the tensor
    its tokens and its router both come from (so its router too, with the in-place writes into
    the router's tensors: `group_mask.scatter_(1, group_idx, 1)`), but nothing before that input:
    an unrecognised layer upstream is not the region's."""
    covered: set[fx.Node] = set()
    for region in regions:
        if region.tokens_TD is None:
            continue
        routing = [n for n in _routing_nodes(region) if n is not None]
        upstream = _ancestors([routing_source(region, routing)]) if routing else set()
        stack = [n for n in (*region.erase, region.output_TD, region.tokens_TD, *routing) if n is not None]
        seen: set[fx.Node] = set()
        while stack:
            node = stack.pop()
            if node not in seen and node not in upstream:
                seen.add(node)
                stack.extend(node.all_input_nodes)
                stack.extend(u for u in node.users if writes_in_place(u) and u.args[0] is node)
        covered |= seen
    return covered


def _routing_nodes(region: MoERegion) -> list[fx.Node]:
    routing = region.routing
    return [] if routing is None else [routing.ids_TK, routing.weights_TK, routing.combine_TE]


def _expert_banks(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Container module -> its expert parameters used by the graph."""
    banks: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        name = param_name(node)
        if not name:
            continue
        parts = name.split(".")
        for i in range(len(parts) - 2, 0, -1):  # an indexed module inside an experts container
            if _INDEXED.match(parts[i]) and "expert" in parts[i - 1].lower():
                banks.setdefault(".".join(parts[:i]), []).append(node)
                break
        else:
            if fake(node) is not None and fake(node).dim() == 3 and "expert" in name.lower():
                banks.setdefault(name.rsplit(".", 1)[0], []).append(node)
    return banks


def _bank_size(params: list[fx.Node]) -> int | None:
    indices = {m.group(2) for p in params for part in param_name(p).split(".") if (m := _INDEXED.match(part))}
    if indices:
        return len(indices)
    sizes = {fake(p).shape[0] for p in params if fake(p) is not None and fake(p).dim() == 3}
    return sizes.pop() if len(sizes) == 1 else None


def _routing_decisions(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes
            if n.target in _ROUTING_OPS and _has_dim(n) and _selects(n) and _over_learned_scores(n)]


def _over_learned_scores(node: fx.Node, depth: int = 8) -> bool:
    """The choice is among the outputs of a learned projection (a router's [E, D] weight): a
    parameter a few ops up has the chosen-over dim's size. A top-k over positions (sparse
    attention's key selection) is not a choice of experts."""
    scores = node.args[0] if node.args else node.kwargs.get("input")
    position = 2 if node.target in (torch.topk, "topk") else 1
    dim = node.args[position] if len(node.args) > position else node.kwargs.get("dim", -1)
    if not isinstance(scores, fx.Node) or fake(scores) is None or not isinstance(dim, int):
        return False
    if not -fake(scores).dim() <= dim < fake(scores).dim():
        return False
    size = fake(scores).shape[dim]
    frontier, seen = [scores], set()
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
        if any(param_name(a) and fake(a) is not None and size in fake(a).shape for a in frontier):
            return True
    return False


def _has_dim(node: fx.Node) -> bool:
    """max(x) over everything is a reduction, not a choice; max(x, dim) and topk are."""
    if node.target in (torch.max, "max"):
        return len(node.args) > 1 and isinstance(node.args[1], int) or "dim" in node.kwargs
    return True


def _selects(node: fx.Node, depth: int = 6) -> bool:
    """The decision's indices reach an op that selects, compares or scatters by them (a max
    whose values alone are used scales, it does not choose)."""
    frontier = _indices(node)
    for _ in range(depth):
        if any(u.target in _SELECTING_OPS and not _is_plain_unpack(u) for u in frontier):
            return True
        frontier = [u for n in frontier for u in n.users]
    return False


def _indices(node: fx.Node) -> list[fx.Node]:
    """The decision's indices: argmax's result, or topk / max(dim)'s second output."""
    if node.target in (torch.argmax, "argmax"):
        return [node]
    return [u for u in node.users
            if (u.target is operator.getitem and u.args[1] == 1) or (u.target is getattr and u.args[1] == "indices")]


def _is_plain_unpack(node: fx.Node) -> bool:
    """`values, indices = topk(...)` is a getitem by a constant: an unpack, not a selection."""
    return node.target is operator.getitem and isinstance(node.args[1], int)


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
