"""Recognise per-expert loops that Dynamo unrolled over a ModuleList / ModuleDict of FFNs
(or over slices `w[e]` of a stacked 3-D weight, as in transformers' eager experts).

Three dispatch / combine spellings are understood, each per expert e::

    index:  tok, slot = where(mask_e);  out.index_add_(0, tok, ffn_e(x[tok]) * w[tok, slot, None])
    mask:   m = mask_e;                 out[m] += ffn_e(x[m]) * s[m, None]
    dense:                              out = out + ffn_e(x) * s_e          # s_e is 0 off-route

Each expert's contribution is the column c_e[t] = weight of expert e for token t (0 when not
routed), rebuilt densely from the loop's own masks and weights, so the model's routing
semantics (top-k, renormalisation, capacity masks) are kept exactly, whatever computed them.
The columns stack into combine_TE, which the lowering turns into a grouped computation.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from passes.elementwise import Elementwise, identify
from passes.nnz import nnz_bound
from passes.graph_utils import fake, param_name, spellings, static_int, topo_index
from passes.region import ExpertWeights, MoERegion, Routing, WeightSource, gate_up_columns

_LINEAR = (torch._C._nn.linear, F.linear)
_MATMUL = (operator.matmul, torch.matmul)
_TRANSPARENT_METHODS = ("to", "type_as", "float", "contiguous", "reshape", "view")
_ZEROS = (torch.zeros_like, torch.zeros, "new_zeros", "zero_")
_EXPERT_INDEX = re.compile(r"^(\D*?)(\d+)$")


@dataclass(frozen=True)
class WeightRef:
    """A parameter, or slice `param[index]` of a stacked one, used as a linear weight."""

    param: fx.Node
    index: int | None
    out_in: bool  # True: [out, in] as F.linear takes it; False: [in, out] as x @ w takes it

    @property
    def out_features(self) -> int:
        shape = fake(self.param).shape[-2:]
        return shape[0] if self.out_in else shape[1]


@dataclass
class Linear:
    node: fx.Node
    x: fx.Node
    weight: WeightRef
    bias: fx.Node | None


@dataclass
class FFN:
    """One expert applied in the graph: y = second(act(first(x)) [* up(x)])."""

    x: fx.Node
    first: list[Linear]  # one (plain or fused gate_up) or two (separate gate and up)
    second: Linear
    elementwise: Elementwise
    nodes: list[fx.Node] = field(default_factory=list)

    @property
    def y(self) -> fx.Node:
        return self.second.node


def recognise_loops(gm: fx.GraphModule, claimed: set[fx.Node]) -> list[MoERegion]:
    ffns = [f for f in _find_ffns(gm) if not claimed.intersection(f.nodes)]
    groups: dict[tuple, dict[int, FFN]] = {}
    for ffn in ffns:
        key = _expert_key(ffn)
        if key is not None:
            groups.setdefault(key[0], {})[key[1]] = ffn
    regions = []
    for (template, *_), members in groups.items():
        region = _recognise_group(gm, template, [members[i] for i in sorted(members)])
        if region is not None:
            regions.append(region)
    return regions


# --- finding expert FFNs -------------------------------------------------------------------------


def _linear(node: fx.Node) -> Linear | None:
    if node.op != "call_function":
        return None
    if node.target in _LINEAR:
        x, w = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        ref = _weight_ref(w, out_in=True)
    elif node.target in _MATMUL:
        x, w, b = node.args[0], node.args[1], None
        ref = _weight_ref(w, out_in=False)
        if ref is None and isinstance(w, fx.Node) and _is_transpose(w):
            ref = _weight_ref(w.args[0], out_in=True)
    else:
        return None
    if ref is None or not isinstance(x, fx.Node) or (b is not None and not param_name(b)):
        return None
    return Linear(node, x, ref, b)


def _is_transpose(node: fx.Node) -> bool:
    if node.target in ("t", torch.t) or (node.target is getattr and node.args[1] == "T"):
        return True
    return node.target in ("transpose", torch.transpose) and sorted(a % 2 for a in node.args[1:3]) == [0, 1]


def _weight_ref(w, out_in: bool) -> WeightRef | None:
    if not isinstance(w, fx.Node):
        return None
    if param_name(w) and fake(w).dim() == 2:
        return WeightRef(w, None, out_in)
    if w.target is operator.getitem and isinstance(w.args[0], fx.Node) and param_name(w.args[0]):
        index = static_int(w.args[1])
        if index is not None and fake(w.args[0]).dim() == 3:
            return WeightRef(w.args[0], index, out_in)
    return None


def _find_ffns(gm: fx.GraphModule) -> list[FFN]:
    linears = {n: lin for n in gm.graph.nodes if (lin := _linear(n)) is not None}
    ffns = []
    for second in linears.values():
        firsts = _producing_linears(second.x, linears)
        if not firsts or len(firsts) > 2 or len({f.x for f in firsts}) != 1:
            continue
        elementwise = identify([f.node for f in firsts], second.x)
        if elementwise is None or (len(firsts) == 2 and not elementwise.gated):
            continue
        if len(firsts) == 2 and elementwise.gate_input == 0:
            firsts = firsts[::-1]  # canonical order: [up, gate]
        nodes = _between(firsts[0].x, second.node)
        ffns.append(FFN(firsts[0].x, firsts, second, elementwise, nodes))
    return ffns


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
            order = topo_index(start.graph)
            return sorted(found.values(), key=lambda lin: order[lin.node])
    return None


def _between(source: fx.Node, sink: fx.Node) -> list[fx.Node]:
    """Nodes that depend on `source` and feed `sink` (inclusive of sink)."""
    ancestors, stack = set(), [sink]
    while stack:
        node = stack.pop()
        if node not in ancestors and node is not source:
            ancestors.add(node)
            stack.extend(node.all_input_nodes)
    descendants, stack = set(), [source]
    while stack:
        node = stack.pop()
        for user in node.users:
            if user not in descendants and user in ancestors:
                descendants.add(user)
                stack.append(user)
    return list(descendants)


def _expert_key(ffn: FFN) -> tuple[tuple, int] | None:
    """(template shared by all experts of one MoE, this expert's index), from the weight's name."""
    ref = ffn.first[0].weight
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


# --- dispatch and combine of each expert ---------------------------------------------------------


@dataclass
class Selection:
    kind: str  # "index" | "mask" | "dense"
    tokens: fx.Node  # the [T, D] tensor all experts read
    key: fx.Node | None  # token indices or token mask, None for dense
    nodes: list[fx.Node] = field(default_factory=list)


@dataclass
class Accumulation:
    kind: str
    key: fx.Node | None
    acc_in: fx.Node
    acc_out: fx.Node  # == acc_in for in-place accumulation
    scales: list[fx.Node]
    constant: float
    nodes: list[fx.Node] = field(default_factory=list)


def _strip(node, nodes: list[fx.Node]):
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _TRANSPARENT_METHODS:
        nodes.append(node)
        node = node.args[0]
    return node


def _selection(x: fx.Node) -> Selection:
    nodes: list[fx.Node] = []
    base = _strip(x, nodes)
    if base.op == "call_function" and base.target is operator.getitem and isinstance(base.args[0], fx.Node):
        key = base.args[1]
        if isinstance(key, tuple) and len(key) == 2 and key[0] is None:
            key = key[1]
        if isinstance(key, fx.Node) and fake(key) is not None:
            kind = "mask" if fake(key).dtype == torch.bool else "index"
            return Selection(kind, base.args[0], key, nodes + [base])
    if base.op == "call_function" and base.target is torch.index_select and base.args[1] == 0:
        return Selection("index", base.args[0], base.args[2], nodes + [base])
    return Selection("dense", x, None, [])


_MUL = spellings("mul", inplace=True)
_ADD = spellings("add", inplace=True)


def _accumulation(y: fx.Node) -> Accumulation | None:
    node, scales, constant, nodes = y, [], 1.0, []
    for _ in range(12):
        users = [u for u in node.users]
        if len(users) != 1:
            return None
        user = users[0]
        nodes.append(user)
        other = [a for a in (*user.args, *user.kwargs.values()) if a is not node]
        if user.target in _MUL and len(user.args) == 2:
            if isinstance(other[0], fx.Node):
                scales.append(other[0])
            elif isinstance(other[0], (int, float)):
                constant *= other[0]
            else:
                return None
        elif _zero_where_unrouted(user, node, scales):
            pass  # where(w != 0, y * w, 0): the lowering also adds exact zeros for unrouted tokens
        elif user.target in _TRANSPARENT_METHODS[:4] or (
            user.target is F.dropout and not user.kwargs.get("training", user.args[2] if len(user.args) > 2 else True)
        ):
            pass
        elif user.target == "index_add_" and user.args[1] == 0 and user.args[3] is node:
            return Accumulation("index", user.args[2], user.args[0], user.args[0], scales, constant, nodes)
        elif user.target is torch.index_add and user.args[1] == 0 and user.args[3] is node:
            return Accumulation("index", user.args[2], user.args[0], user, scales, constant, nodes)
        elif user.target in _ADD and len(user.args) == 2 and isinstance(other[0], fx.Node):
            acc = other[0]
            indexed = acc.target is operator.getitem and len(user.users) == 1
            setitem = next(iter(user.users)) if indexed else None
            if indexed and setitem.target is operator.setitem and setitem.args[2] is user and setitem.args[0] is acc.args[0]:
                key = acc.args[1]
                kind = "mask" if fake(key) is not None and fake(key).dtype == torch.bool else "index"
                return Accumulation(kind, key, acc.args[0], acc.args[0], scales, constant, nodes + [acc, setitem])
            return Accumulation("dense", None, acc, user, scales, constant, nodes)
        else:
            return None
        node = user
    return None


def _zero_where_unrouted(user: fx.Node, node: fx.Node, scales: list[fx.Node]) -> bool:
    if user.target is not torch.where or len(user.args) != 3 or user.args[1] is not node or user.args[2] != 0:
        return False
    cond = user.args[0]
    return cond.target in spellings("ne") and cond.args[0] in scales and cond.args[1] == 0


def _recognise_group(gm: fx.GraphModule, template: str, members: list[FFN]) -> MoERegion | None:
    selections = [_selection(f.x) for f in members]
    accumulations = [_accumulation(f.y) for f in members]
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
    first = members[0]
    width = first.first[0].weight.out_features
    gated = first.elementwise.gated
    d_ff = width // 2 if gated and len(first.first) == 1 else width
    module = template[: template.index("*")].rsplit(".", 1)[0]  # the experts container
    region = MoERegion(
        module=module,
        form=f"module_loop/{pairs[0][1].kind}",
        num_experts=len(members),
        top_k=0,
        d_model=fake(tokens).shape[-1],
        d_ff=d_ff,
        activation=first.elementwise.activation,
        gated=gated,
        has_bias=first.second.bias is not None or first.first[0].bias is not None,
        dtype=fake(first.first[0].weight.param).dtype,
        capacity=None,
        tokens_TD=tokens,
        output_TD=final,
    )
    if template.endswith("[*]"):
        region.form = "stacked_loop/" + pairs[0][1].kind
        region.module = template[: -len("[*]")].rsplit(".", 1)[0]
    region.erase = [n for m, s, a in pairs for n in (*s.nodes, *m.nodes, *a.nodes)] + [zeros]
    region.erase = sorted(set(region.erase), key=order.__getitem__)
    columns = []
    for _, s, a in pairs:
        column = _combine_column(s, a)
        if column is None:
            return region.skip(f"could not read the routing weights of expert {len(columns)} ({a.kind} form)")
        columns.append(column)
    region.routing = _routing(gm, region, columns, pairs)
    region.top_k = region.routing.top_k
    region.weights = _stacked_weights([m for m, _, _ in pairs])
    return region


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


# --- rebuilding the dense combine weights --------------------------------------------------------


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


def _combine_column(sel: Selection, acc: Accumulation) -> Column | None:
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


def _routing(gm: fx.GraphModule, region: MoERegion, columns: list[Column], pairs) -> Routing:
    """Emit combine_TE = stack(c_e) before the region's output is first used."""
    from passes.lower import Emitter, first_user

    emit = Emitter(gm.graph, f"{region.module.replace('.', '_')}_")
    T = fake(region.tokens_TD).shape[0]
    with gm.graph.inserting_before(first_user(region)):
        cols = [_emit_column(emit, c, e, T) for e, c in enumerate(columns)]
        combine_TE = emit.fn(torch.stack, cols, 1, name="combine_TE")
    return Routing(combine_TE=combine_TE, top_k=_top_k_bound(columns, T, region.num_experts))


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
            weighted = emit.fn(operator.mul, mask, weight, name=f"{name}_mw")
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


def _top_k_bound(columns: list[Column], T, num_experts: int) -> int:
    """An upper bound on the experts per token, proven from how the routing was computed.

    See passes.nnz: one_hot / ids == e give numel(ids) / T per token, products keep the
    smaller bound, sums add them; anything unknown gives the safe bound E. The lowering
    checks the bound again at run time, so a wrong bound fails loudly, never silently.
    """
    sources = [c.mask if c.mask is not None else c.weight for c in columns]
    bound = max((nnz_bound(s, T, num_experts) for s in sources if s is not None), default=num_experts)
    return max(1, min(bound, num_experts))


# --- weights -------------------------------------------------------------------------------------


def _stacked_weights(members: list[FFN]) -> WeightSource:
    """Stack each expert's weights into [E, ...] tensors (a copy, made once per change)."""
    first = members[0]
    gated, fused = first.elementwise.gated, len(first.first) == 1 and first.elementwise.gated
    inputs: list[fx.Node] = []

    def slot(node: fx.Node) -> int:
        if node not in inputs:
            inputs.append(node)
        return inputs.index(node)

    # per linear position (first..., second): per expert (input slot of weight, index, out_in, bias slot)
    layout = [
        [(slot(lin.weight.param), lin.weight.index, lin.weight.out_in, None if lin.bias is None else slot(lin.bias))
         for lin in (*m.first, m.second)]
        for m in members
    ]
    num_first = len(first.first)

    def stack(tensors: list[torch.Tensor]) -> ExpertWeights:
        def weight_EDO(position: int) -> torch.Tensor:
            per_expert = []
            for expert in layout:
                w_slot, index, out_in, _ = expert[position]
                w = tensors[w_slot] if index is None else tensors[w_slot][index]
                per_expert.append(w.t() if out_in else w)
            return torch.stack(per_expert)

        def bias_EO(position: int) -> torch.Tensor | None:
            if layout[0][position][3] is None:
                return None
            return torch.stack([tensors[expert[position][3]] for expert in layout])

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

    return WeightSource(inputs=inputs, stack=stack)
