"""Linears whose weight belongs to experts, as Dynamo records them.

A linear is `F.linear`, `x @ w`, `x.matmul(w)`, `bmm` or an einsum of the tokens with a weight,
plus an optional bias given or added after it. Its weight is a parameter, a slice `p[e]` of a
3-D one (or of `p.view(E, ...)`), a 3-D one used whole (every expert at once), one gathered by
routing ids (`w[ids]`, a matrix per routed row), or a split of the rows by per-expert counts
whose chunks meet one matrix each (JetMoE), read directly or through casts.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import fake, param_name, static_int

_LINEAR = (torch._C._nn.linear, F.linear)
_MATMUL = (operator.matmul, torch.matmul)


ALL = "all"  # WeightRef.index of a 3-D parameter used for every expert at once (bmm, einsum, x @ w)
GATHERED = "gathered"  # WeightRef.index of a 3-D parameter gathered per routed row, `w[ids]`
GROUPED = "grouped"  # WeightRef.index of a 3-D parameter applied to consecutive row chunks, one per expert


@dataclass(frozen=True)
class WeightRef:
    """A parameter, a slice `param[index]` of a stacked one, a stacked one whole (index ALL), or
    one expert's matrix per routed row (index GATHERED, `param[ids]`), used as a linear weight."""

    param: fx.Node
    index: int | str | None
    out_in: bool  # True: [out, in] as F.linear takes it; False: [in, out] as x @ w takes it
    view: tuple[int, ...] | None = None  # the stack the parameter is viewed as first (DBRX: [E*F, D] as [E, F, D])
    ids: fx.Node | None = None  # GATHERED: the expert ids the matrices are gathered by; GROUPED: the split

    @property
    def batched(self) -> bool:
        return self.index == ALL

    @property
    def gathered(self) -> bool:
        return self.index == GATHERED

    @property
    def grouped(self) -> bool:
        return self.index == GROUPED

    @property
    def rows(self):
        """What decides which expert each row meets: the ids, or a split's sizes (one split of
        the rows by the same counts is as good as another)."""
        return tuple(self.ids.args[1]) if self.grouped else self.ids

    @property
    def shape(self) -> tuple[int, ...]:
        """The parameter's shape as indexed: its view's, where it is viewed first."""
        return self.view if self.view is not None else tuple(fake(self.param).shape)

    @property
    def out_features(self) -> int:
        shape = self.shape[-2:]
        return shape[0] if self.out_in else shape[1]


@dataclass
class Linear:
    node: fx.Node
    x: fx.Node
    weight: WeightRef
    bias: fx.Node | None  # a parameter, or with bias_index, a slice bias[bias_index] of a 2-D one
    bias_index: int | str | None = None  # ALL: every expert's row, for a linear over every expert


def read_linear(node: fx.Node) -> Linear | None:
    if node.target is torch.cat:
        return _grouped_linear(node)
    method_matmul = node.op == "call_method" and node.target in ("matmul", "mm")  # x.matmul(w)
    if node.op != "call_function" and not method_matmul:
        return None
    if node.target in _LINEAR:
        x, w = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        ref = _weight_ref(w, out_in=True)
    elif node.target in _MATMUL or node.target is torch.bmm or method_matmul:
        x, w, b = node.args[0], node.args[1], None
        ref = _weight_ref(w, out_in=False, batched=True)
        if ref is None and isinstance(w, fx.Node) and _is_transpose(w):
            ref = _weight_ref(w.args[0], out_in=True, batched=True)
        if node.target is torch.bmm and ref is not None and not ref.batched:
            return None
    elif node.target is torch.einsum and len(node.args) == 3 and isinstance(node.args[0], str):
        x, w, b = node.args[1], node.args[2], None
        layout = _einsum_weight_layout(node.args[0])
        ref = None if layout is None else _weight_ref(w, out_in=layout[0], batched=layout[1])
        if ref is not None and ref.batched != layout[1]:
            return None
        ref = ref or _gathered_ref(node.args[0], w)  # "td,tfd->tf" reads as either: the weight tells
    else:
        return None
    if ref is None or not isinstance(x, fx.Node) or (b is not None and not param_name(b)):
        return None
    return Linear(node, x, ref, b)


def _grouped_linear(node: fx.Node) -> Linear | None:
    """`cat([F.linear(x.split(counts)[e], w[e]) for e in range(E)])` (JetMoE's ParallelExperts):
    chunk e of the rows times expert e's matrix, back in row order, as one linear over the rows."""
    parts = node.args[0] if node.args else None
    if (node.args[1:] or [node.kwargs.get("dim", 0)])[0] != 0 or not isinstance(parts, (list, tuple)) or len(parts) < 2:
        return None
    linears = [read_linear(p) if isinstance(p, fx.Node) else None for p in parts]
    if any(lin is None or lin.weight.index != e for e, lin in enumerate(linears)):
        return None
    chunks = [lin.x for lin in linears]
    split = chunks[0].args[0] if chunks[0].target is operator.getitem else None
    if split is None or split.target not in ("split", torch.split) or (split.args[2:] or [split.kwargs.get("dim", 0)])[0] != 0:
        return None
    if not isinstance(split.args[1], (list, tuple)):
        return None  # equal chunks of a fixed size: not per-expert counts
    if any(c.target is not operator.getitem or c.args != (split, e) for e, c in enumerate(chunks)):
        return None
    first = linears[0]
    if len({(lin.weight.param, lin.weight.out_in, lin.weight.view, lin.bias, lin.bias_index) for lin in linears}) != 1:
        return None
    weight = WeightRef(first.weight.param, GROUPED, first.weight.out_in, first.weight.view, ids=split)
    return Linear(node, split.args[0], weight, first.bias, first.bias_index)


def _einsum_weight_layout(equation: str) -> tuple[bool, bool] | None:
    """(w is [out, in], w is a stack over experts) for a matmul of x's last dim with a weight:
    `"...d,df->...f"` (2-D), or `"td,edf->etf"` / `"etd,edf->etf"` (every expert at once, the
    expert dim first in the output); None for any other equation."""
    inputs, _, out = equation.replace(" ", "").partition("->")
    x, _, w = inputs.partition(",")
    if not x or not out or "." in w or len(w) not in (2, 3):
        return None
    contracted, produced = x[-1], out[-1]
    pair = w[-2:]
    out_in = {contracted + produced: False, produced + contracted: True}.get(pair)
    if out_in is None:
        return None
    if len(w) == 2:
        return (out_in, False) if x[:-1] == out[:-1] else None
    expert = w[0]
    leading = x[:-1] if x.startswith(expert) else expert + x[:-1]
    return (out_in, True) if out[:-1] == leading and len(set(out)) == len(out) else None


def _gathered_ref(equation: str, w) -> WeightRef | None:
    """`einsum("td,tkdf->tkf", x, w[ids])` (or `"tkf,tkfd->tkd"`): each routed row (t, k) times
    its own expert's matrix, w gathered by the ids; the rows of x a prefix of the ids' dims."""
    w = _uncast(w)
    if not isinstance(w, fx.Node) or w.target is not operator.getitem or not isinstance(w.args[0], fx.Node):
        return None
    stacked, ids = w.args
    if not param_name(stacked) or fake(stacked).dim() != 3 or fake(ids) is None or fake(ids).is_floating_point():
        return None
    inputs, _, out = equation.replace(" ", "").partition("->")
    x, _, w_dims = inputs.partition(",")
    rows, pair = w_dims[:-2], w_dims[-2:]
    if "." in equation or not x or len(rows) != fake(ids).dim() or not rows.startswith(x[:-1]):
        return None
    contracted, produced = x[-1], out[-1:]
    out_in = {contracted + produced: False, produced + contracted: True}.get(pair)
    if out_in is None or out != rows + produced or len(set(w_dims)) != len(w_dims):
        return None
    return WeightRef(stacked, GATHERED, out_in, ids=ids)


def _is_transpose(node: fx.Node) -> bool:
    if node.target in ("t", torch.t) or (node.target is getattr and node.args[1] == "T"):
        return True
    return node.target in ("transpose", torch.transpose) and sorted(a % 2 for a in node.args[1:3]) == [0, 1]


_CASTS = ("float", "to", "contiguous")


def _uncast(node):
    """A parameter (or its slice) read through `.float()` / `.to(dtype)`: the value is the same
    function of the weights; the lowering computes in the region's dtype."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _CASTS and node.args:
        node = node.args[0]
    return node


def _weight_ref(w, out_in: bool, batched: bool = False) -> WeightRef | None:
    w = _uncast(w)
    if not isinstance(w, fx.Node):
        return None
    if param_name(w) and fake(w).dim() == 2:
        return WeightRef(w, None, out_in)
    if batched and param_name(w) and fake(w).dim() == 3:
        return WeightRef(w, ALL, out_in)
    if w.target is operator.getitem and isinstance(w.args[0], fx.Node):
        index, stacked = static_int(w.args[1]), w.args[0]
        if index is None or fake(stacked) is None or fake(stacked).dim() != 3:
            return None
        if param_name(stacked):
            return WeightRef(stacked, index, out_in)
        viewed = stacked.args[0] if stacked.target in ("view", "reshape") and stacked.args else None
        if isinstance(viewed, fx.Node) and param_name(viewed):  # param.view(E, F, D)[e]
            return WeightRef(viewed, index, out_in, tuple(fake(stacked).shape))
    return None


def with_bias_add(lin: Linear) -> Linear:
    """`x @ w + b` (or `+ b[e]`) as one biased linear, when the product is used by that add only."""
    if lin.bias is not None or len(lin.node.users) != 1:
        return lin
    (add,) = lin.node.users
    if add.target not in (operator.add, torch.add, "add") or len(add.args) != 2 or add.kwargs:
        return lin
    b = _uncast(add.args[1] if add.args[0] is lin.node else add.args[0])
    if not isinstance(b, fx.Node):
        return lin
    if param_name(b) and fake(b).dim() == 1:
        return Linear(add, lin.x, lin.weight, b)
    if (b.target is operator.getitem and isinstance(b.args[0], fx.Node) and param_name(b.args[0])
            and fake(b.args[0]).dim() == 2 and static_int(b.args[1]) is not None):
        return Linear(add, lin.x, lin.weight, b.args[0], static_int(b.args[1]))
    if lin.weight.gathered and b.target is operator.getitem and b.args[1] is lin.weight.ids \
            and isinstance(b.args[0], fx.Node) and param_name(b.args[0]) and fake(b.args[0]).dim() == 2:
        return Linear(add, lin.x, lin.weight, b.args[0], ALL)  # x @ w[ids] + b[ids]
    stacked_bias = _broadcast_over_tokens(b)
    if lin.weight.batched and stacked_bias is not None and fake(stacked_bias).shape[0] == lin.weight.shape[0]:
        return Linear(add, lin.x, lin.weight, stacked_bias, ALL)  # [E, T, O] + b[:, None, :]
    return lin


def _broadcast_over_tokens(b: fx.Node) -> fx.Node | None:
    """A 2-D [E, O] parameter given a token dim: `b.unsqueeze(1)`, `b[:, None]`, `b[..., None, :]`."""
    source = b.args[0] if b.args and isinstance(b.args[0], fx.Node) else None
    if source is None or not param_name(source) or fake(source).dim() != 2:
        return None
    if b.target in ("unsqueeze", torch.unsqueeze) and b.args[1:] in ((1,), (-2,)):
        return source
    if b.target is operator.getitem and b.args[1] in ((slice(None), None), (Ellipsis, None, slice(None))):
        return source
    return None
