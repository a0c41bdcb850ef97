"""Rebuild each expert's routing weight as a dense column c_e[T] (0 where not routed).

From the loop's own masks and weights, e.g. for `tok, slot = where(M_e)` and `w[tok, slot]`,
c_e = sum over slots of M_e * w: the model's routing exactly, with no data-dependent `nonzero`
left (each was a device sync). The columns stack into combine_TE for the lowering.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .dispatch_combine import Accumulation, Selection
from .graph_utils import fake, static_int
from .emit import Emitter, first_user
from .nnz import nnz_bound
from .region import MoERegion, Routing



@dataclass
class Column:
    """How to compute c_e[T] from existing graph nodes (emitted later, at the rewrite)."""

    kind: str
    mask: fx.Node | None  # index: the tensor `where` was taken of; mask: the bool token mask
    token_dim: int  # index: which dim of `mask` is the token dim
    weight: fx.Node | None  # a tensor holding the routing weight of this expert
    weight_dims: tuple  # index: for each dim of `weight` after int selections, the mask dim it follows
    weight_select: tuple  # index: (dim, int) selections applied to `weight` first
    constant: float


def combine_column(sel: Selection, acc: Accumulation) -> Column | None:
    scale = acc.scales[0] if len(acc.scales) == 1 else None
    if len(acc.scales) > 1:
        return None
    if sel.kind == "dense":
        return Column("dense", None, 0, scale, (), (), acc.constant)
    if sel.kind == "mask":
        weight = None
        if scale is not None:
            weight = _unindex(scale, sel.key)
            if weight is None:
                return None
        return Column("mask", sel.key, 0, weight, (), (), acc.constant)
    where, token_dim = _where_output(sel.key)
    if where is None:
        return None
    mask = where.args[0]
    if scale is None:
        return Column("index", mask, token_dim, None, (), (), acc.constant)
    base, indices = _indexing(scale)
    if base is None:
        return None
    weight_dims, weight_select = [], []
    dim = 0
    for index in indices:
        if index is None:
            continue
        position = _where_position(index, where)
        if position is not None:
            weight_dims.append(position)
        elif static_int(index) is not None:
            weight_select.append((dim, static_int(index)))
            continue
        else:
            return None
        dim += 1
    return Column("index", mask, token_dim, base, tuple(weight_dims), tuple(weight_select), acc.constant)


def _where_output(key: fx.Node) -> tuple[fx.Node | None, int]:
    if key.target is operator.getitem and isinstance(key.args[0], fx.Node):
        where = key.args[0]
        one_arg_where = where.target is torch.where and len(where.args) == 1
        as_tuple = where.target in (torch.nonzero, "nonzero") and where.kwargs.get("as_tuple")
        if one_arg_where or as_tuple:
            return where, key.args[1]
    return None, 0


def _where_position(index, where: fx.Node) -> int | None:
    if isinstance(index, fx.Node) and index.target is operator.getitem and index.args[0] is where:
        return index.args[1]
    return None


def _indexing(scale: fx.Node) -> tuple[fx.Node | None, tuple]:
    """`w[i, j, None]` or `w[i, j].unsqueeze(-1)` -> (w, (i, j))."""
    node = scale
    if node.target == "unsqueeze" and node.args[1] in (-1, 1):
        node = node.args[0]
    if node.target is not operator.getitem or not isinstance(node.args[0], fx.Node):
        return None, ()
    indices = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    while indices and indices[-1] is None:
        indices = indices[:-1]
    return node.args[0], indices


def _unindex(scale: fx.Node, mask: fx.Node) -> fx.Node | None:
    """`s[m]` or `s[m].unsqueeze(-1)` -> s."""
    base, indices = _indexing(scale)
    return base if base is not None and indices == (mask,) else None


def emit_routing(gm: fx.GraphModule, region: MoERegion, columns: list[Column]) -> Routing:
    """Emit combine_TE = stack(c_e) before the region's output is first used."""
    emit = Emitter(gm.graph, f"{region.module.replace('.', '_')}_")
    T = fake(region.tokens_TD).shape[0]
    with gm.graph.inserting_before(first_user(region)):
        combine_TE = _emit_alike(emit, columns)
        if combine_TE is None:
            cols = [_emit_column(emit, c, e, T) for e, c in enumerate(columns)]
            combine_TE = emit.fn(torch.stack, cols, 1, name="combine_TE")
    return Routing(combine_TE=combine_TE)


def _emit_alike(emit, columns: list[Column]) -> fx.Node | None:
    """combine_TE in one computation over the stacked masks, where every expert's column is the
    same function of its own mask (the common case: a loop over `expert_mask[e]`), so the graph
    holds a few nodes, not a few per expert (compile time grows with the graph); else None."""
    first = columns[0]
    shape = fake(first.mask).shape if first.mask is not None else None
    if first.kind not in ("index", "mask") or len(columns) < 2 or any(
            (c.kind, c.token_dim, c.weight, c.weight_dims, c.weight_select, c.constant) !=
            (first.kind, first.token_dim, first.weight, first.weight_dims, first.weight_select, first.constant)
            or fake(c.mask).shape != shape or fake(c.mask).dtype != fake(first.mask).dtype for c in columns):
        return None
    masks = emit.fn(torch.stack, [c.mask for c in columns], name="combine_masks")  # [E, *mask]
    if first.kind == "mask":
        if first.weight is None:
            col_ET = emit.method("to", masks, torch.float32, name="combine_ET")
        else:
            flat = emit.method("reshape", first.weight, 1, -1, name="combine_w")
            col_ET = emit.fn(torch.where, masks, flat, 0.0, name="combine_ET")
    else:
        ndim = len(shape)
        other = tuple(d + 1 for d in range(ndim) if d != first.token_dim)
        if first.weight is None:
            weighted = emit.method("to", masks, torch.float32, name="combine_m")
        else:
            weight = first.weight
            for dim, i in first.weight_select:
                weight = emit.fn(operator.getitem, weight, (slice(None),) * dim + (i,), name="combine_sel")
            weight = emit.method("unsqueeze", _align(emit, weight, first.weight_dims, ndim, "combine"), 0, name="combine_w")
            routed = masks if fake(first.mask).dtype == torch.bool else emit.fn(operator.ne, masks, 0, name="combine_routed")
            weighted = emit.fn(torch.where, routed, weight, 0.0, name="combine_mw")
        col_ET = emit.method("sum", weighted, other, name="combine_ET") if other else weighted
    combine_TE = emit.method("contiguous", emit.method("t", col_ET, name="combine_TE_t"), name="combine_TE")  # row-major, as stacked
    return emit.fn(operator.mul, combine_TE, first.constant, name="combine_TE_c") if first.constant != 1.0 else combine_TE


def _emit_column(emit, column: Column, e: int, T) -> fx.Node:
    name = f"combine_e{e}"
    if column.kind == "dense":
        col = emit.method("reshape", column.weight, -1, name=name)
    elif column.kind == "mask":
        if column.weight is None:
            col = emit.method("to", column.mask, torch.float32, name=name)
        else:
            flat = emit.method("reshape", column.weight, -1, name=f"{name}_w")
            col = emit.fn(torch.where, column.mask, flat, 0.0, name=name)
    else:
        mask = column.mask
        ndim = fake(mask).dim()
        other = tuple(d for d in range(ndim) if d != column.token_dim)
        if column.weight is None:
            weighted = emit.method("to", mask, torch.float32, name=f"{name}_m")
        else:
            weight = column.weight
            for dim, i in column.weight_select:
                weight = emit.fn(operator.getitem, weight, (slice(None),) * dim + (i,), name=f"{name}_sel")
            weight = _align(emit, weight, column.weight_dims, ndim, name)
            # where, not mask * weight: a slot routed elsewhere adds an exact 0 even where its weight is NaN
            routed = mask if fake(mask).dtype == torch.bool else emit.fn(operator.ne, mask, 0, name=f"{name}_routed")
            weighted = emit.fn(torch.where, routed, weight, 0.0, name=f"{name}_mw")
        col = emit.method("sum", weighted, other, name=name) if other else weighted
    return emit.fn(operator.mul, col, column.constant, name=f"{name}_c") if column.constant != 1.0 else col


def _align(emit, weight: fx.Node, dims: tuple, ndim: int, name: str) -> fx.Node:
    """Permute/unsqueeze `weight` so its dim i lines up with mask dim dims[i]."""
    order = sorted(range(len(dims)), key=lambda i: dims[i])
    if order != list(range(len(dims))):
        weight = emit.method("permute", weight, *order, name=f"{name}_wp")
    present = sorted(dims)
    for d in range(ndim):
        if d not in present:
            weight = emit.method("unsqueeze", weight, d, name=f"{name}_wu")
    return weight


def top_k_bound(columns: list[Column], T, num_experts: int) -> int:
    """An upper bound on the experts per token, proven from how the routing was computed.

    See passes.nnz: one_hot / ids == e give numel(ids) / T per token, products keep the
    smaller bound, sums add them; anything unknown gives the safe bound E. The lowering
    checks the bound again at run time, so a wrong bound fails loudly, never silently.
    """
    sources = [c.mask if c.mask is not None else c.weight for c in columns]
    bound = max((nnz_bound(s, T, num_experts) for s in sources if s is not None), default=num_experts)
    return max(1, min(bound, num_experts))
