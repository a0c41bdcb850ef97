"""How many experts can one token be routed to? A bound read off the routing computation.

The lowering computes K (token, expert) rows per token; K must bound the non-zero, non-NaN
entries of each row of the combine weights. We propagate that per-token bound backwards through
the routing code, by the op that produced each tensor:

    one_hot(ids, E), ids == e      ids.numel() / T   (each id selects one expert)
    a * b, a & b                   min(bound(a), bound(b))
    where(c, a, b), a + b          bound(a) + bound(b)
    views, casts, sums, indexing   bound(input)
    float -> bool / int casts      E                 (NaN would become a non-zero)
    anything else                  E                 (always safe)

Non-finite values cannot break the bound, only add NaNs: a product is a finite non-zero only
where both factors are, and 0 * inf or 0 * NaN is NaN. So every entry beyond the bound is NaN,
which the lowering routes first (the token's output is NaN, as in the model).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .graph_utils import fake, spellings, static_int

_EQ = spellings("eq")
_SELECTORS = (F.one_hot, *_EQ)
_PRODUCTS = (*spellings("mul", inplace=True), *spellings("and_", inplace=True), torch.logical_and, torch.bitwise_and)
_SUMS = spellings("add", inplace=True)
_SAME = (
    "view", "reshape", "permute", "transpose", "to", "float", "type_as", "contiguous", "sum", "unsqueeze",
    "squeeze", "bool", "int", "long", "any", operator.getitem, torch.sum, torch.permute, torch.reshape,
    *spellings("truediv", inplace=True), torch.div, "div",
)
_CASTS = ("to", "type_as", "bool", "int", "long", "any")


def nnz_bound(node: fx.Node, T, num_experts: int, depth: int = 24) -> int:
    memo: dict[fx.Node, int] = {}

    def bound(n, d: int) -> int:
        if not isinstance(n, fx.Node):
            return num_experts if n not in (0, 0.0, False) else 0
        if n in memo:
            return memo[n]
        result = num_experts
        if d > 0 and n.op in ("call_function", "call_method"):
            result = _bound_of_op(n, d, bound, T, num_experts)
        memo[n] = min(result, num_experts)
        return memo[n]

    return bound(node, depth)


def _bound_of_op(n: fx.Node, d: int, bound, T, num_experts: int) -> int:
    if n.target in _SELECTORS:
        if n.target in _EQ and static_int(n.args[1]) is None:
            return num_experts
        return _per_token(n.args[0], T, num_experts)
    if n.target in _PRODUCTS:
        return min(bound(n.args[0], d - 1), bound(n.args[1], d - 1))
    if n.target is torch.where and len(n.args) == 3:
        return bound(n.args[1], d - 1) + bound(n.args[2], d - 1)
    if n.target in _SUMS:
        return bound(n.args[0], d - 1) + bound(n.args[1], d - 1)
    if n.target in _SAME:
        return num_experts if _float_to_integer(n) else bound(n.args[0], d - 1)
    return num_experts


def _float_to_integer(n: fx.Node) -> bool:
    """A cast that can turn NaN into a non-zero number (or True); unknown dtypes count as such."""
    if n.target not in _CASTS:
        return False
    source, result = fake(n.args[0]) if isinstance(n.args[0], fx.Node) else None, fake(n)
    if source is None or result is None:
        return True
    return source.is_floating_point() and not result.is_floating_point()


def _per_token(ids, T, num_experts: int) -> int:
    """numel(ids) / T when provably an integer; the slot count is usually ids' static last dim,
    which also works when T is symbolic (dynamic shapes), where the quotient would not simplify."""
    value = fake(ids)
    if value is None:
        return num_experts
    numel = value.numel()
    candidates = [static_int(value.shape[-1])] if value.dim() else []
    if not statically_known_true(T == 0):  # an empty batch (T = 0) has no quotient
        candidates.append(static_int(numel // T))
    for per_token in candidates:
        if per_token is not None and statically_known_true(per_token * T == numel):
            return per_token
    return num_experts
