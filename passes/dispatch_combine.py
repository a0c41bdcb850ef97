"""How each expert reads its tokens (dispatch) and adds its output back (combine).

    index:  x_e = x[tok];   out.index_add_(0, tok, y_e * s)      (tok from where(mask_e))
    mask:   x_e = x[m];     out[m] += y_e * s[m]
    dense:  x_e = x;        out = out + y_e * s_e                (s_e is 0 off-route)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import dropout_args, fake, spellings

_CASTS = ("to", "type_as", "float", "contiguous")
_TRANSPARENT_METHODS = (*_CASTS, "reshape", "view")  # on the dispatch side, reshapes keep the rows



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


def selection(x: fx.Node) -> Selection:
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


def row_source(x: fx.Node) -> tuple[fx.Node | None, list[fx.Node], fx.Node | None]:
    """(tokens, the nodes selecting rows of them, the selection key) for an expert's input:
    `x[key]`, `x[mask]`, `index_select(x, 0, key)`, `gather(x, 0, key)`, or x itself (key None),
    through casts and reshapes. Rows only: a selection along another dim gives (None, [], None)."""
    nodes: list[fx.Node] = []
    base = _strip(x, nodes)
    key = None
    if base.op == "call_function" and base.target is operator.getitem and isinstance(base.args[0], fx.Node):
        key = base.args[1]
        if isinstance(key, tuple) and len(key) == 2 and key[0] is None:
            key = key[1]
        if not isinstance(key, fx.Node) or fake(key) is None:
            return None, [], None
    elif base.target in (torch.index_select, "index_select") and base.args[1] == 0:
        key = base.args[2]
    elif base.target in (torch.gather, "gather") and base.args[1] == 0:
        key = base.args[2]
    else:  # no selection: every token, through casts only (a reshape would make other rows)
        nodes = []
        while x.op == "call_method" and x.target in _CASTS:
            nodes.append(x)
            x = x.args[0]
        return x, nodes, None
    nodes.append(base)
    source = base.args[0]
    while source.op == "call_method" and source.target in _CASTS:  # casts keep the tokens; reshapes make them
        nodes.append(source)
        source = source.args[0]
    return source, nodes, key


_BROADCASTS = ("expand", "unsqueeze", "repeat", "expand_as", "contiguous", "to", "type_as", "float")


def broadcast_source(x: fx.Node, nodes: list[fx.Node]) -> fx.Node:
    """The [T, D] tokens a batched expert call reads, through `x[None]`, `unsqueeze(0)`,
    `expand(E, -1, -1)`, `repeat(E, 1, 1)`, `repeat(E, 1).view(E, T, D)` and casts; the nodes
    passed are appended to `nodes`."""
    while isinstance(x, fx.Node) and (x.target in _BROADCASTS or _adds_leading_dim(x) or _tiles_tokens(x)):
        nodes.append(x)
        x = x.args[0]
    return x


def dispatched_rows(x: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """`einsum("tec,td->ecd", dispatch, tokens)`: slot c of expert e reads the tokens that
    dispatch[:, e, c] weighs (GShard's capacity slots, one token each or none): (tokens,
    dispatch), or None."""
    if x.target is not torch.einsum or len(x.args) != 3 or not isinstance(x.args[0], str):
        return None
    inputs, _, out = x.args[0].replace(" ", "").partition("->")
    first, _, second = inputs.partition(",")
    for dispatch_dims, token_dims, dispatch, tokens in ((first, second, *x.args[1:]), (second, first, *x.args[:0:-1])):
        if (len(token_dims), len(dispatch_dims), len(out)) == (2, 3, 3) and token_dims[0] == dispatch_dims[0] \
                and out == dispatch_dims[1:] + token_dims[1] and len(set(dispatch_dims + token_dims)) == 4:
            return tokens, dispatch
    return None


def scaled_rows(x: fx.Node):
    """`x[key] * w[key]` with w a [T, 1] column: (the selected rows, w, key, the nodes), or None."""
    if x.target not in (operator.mul, torch.mul, "mul") or len(x.args) != 2 or x.kwargs:
        return None
    for rows, scale in (x.args, x.args[::-1]):
        if not (isinstance(rows, fx.Node) and isinstance(scale, fx.Node) and scale.target is operator.getitem):
            continue
        column, key = scale.args
        if isinstance(column, fx.Node) and fake(column) is not None and fake(column).dim() == 2 \
                and fake(column).shape[1] == 1 and row_source(rows)[2] is key:
            return rows, column, key, [x, scale]
    return None


def scaled_tiles(x: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """`(x.repeat(E, 1) * s).view(E, T, D)` with s of shape [E * T, 1]: E copies of the tokens,
    copy e scaled per token by s[e * T + t] (Llama 4's router scales the experts' input):
    (tokens, s, the nodes from the tiling to x), or None."""
    if x.target not in ("view", "reshape") or not x.args or not isinstance(x.args[0], fx.Node):
        return None
    product = x.args[0]
    if product.target not in (operator.mul, torch.mul, "mul") or len(product.args) != 2:
        return None
    for tiled, scale in (product.args, product.args[::-1]):
        if isinstance(scale, fx.Node) and fake(scale) is not None and _tiles_into(tiled, x):
            E, T = fake(x).shape[:2]
            if tuple(fake(scale).shape) == (E * T, 1):
                return tiled.args[0], scale, [x, product, tiled]
    return None


def _tiles_tokens(node: fx.Node) -> bool:
    """`x.repeat(E, 1).view(E, T, D)`: E copies of the [T, D] tokens, one per expert."""
    return node.target in ("view", "reshape") and bool(node.args) and _tiles_into(node.args[0], node)


def _tiles_into(tiled, out: fx.Node) -> bool:
    """`tiled` is `tokens.repeat(E, 1)` of [T, D] tokens and `out` holds it as [E, T, D]."""
    if not (isinstance(tiled, fx.Node) and tiled.target == "repeat" and isinstance(tiled.args[0], fx.Node)):
        return False
    tokens, shape = fake(tiled.args[0]), fake(out)
    return (tokens is not None and shape is not None and tokens.dim() == 2 and shape.dim() == 3
            and tuple(tiled.args[1:]) == (shape.shape[0], 1) and tuple(shape.shape[1:]) == tuple(tokens.shape))


def _adds_leading_dim(node: fx.Node) -> bool:
    return node.target is operator.getitem and isinstance(node.args[1], tuple) and node.args[1][:1] == (None,)


def selection_mask(key: fx.Node) -> fx.Node:
    """The mask a selection key was computed from (`tok` of `tok, slot = where(mask)` -> mask)."""
    if key.target is operator.getitem and isinstance(key.args[0], fx.Node):
        where = key.args[0]
        if (where.target is torch.where and len(where.args) == 1) or where.target in (torch.nonzero, "nonzero"):
            return where.args[0]
    return key


_MUL = spellings("mul", inplace=True)
_ADD = spellings("add", inplace=True)


def accumulation(y: fx.Node) -> Accumulation | None:
    node, scales, constant, nodes = y, [], 1.0, []
    for _ in range(12):
        users = list(node.users)
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
        elif user.target in _CASTS or (user.target is F.dropout and not dropout_args(user)[1]):
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
