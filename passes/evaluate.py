"""Run part of a Dynamo graph on concrete values, in float64, with chosen nodes overridden.

The verifier (passes.verify) evaluates a region as the model wrote it and as the record
describes it. Only the nodes an answer needs are run, in graph order, so in-place updates
(`out.index_add_`, `out[m] += ...`) happen as in the model; every floating tensor and every
floating dtype argument becomes float64, so a disagreement is never rounding.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

from .graph_utils import fake

# A node's value computed from other nodes' values (the verifier swaps experts for cheap stand-ins).
Substitute = tuple[list[fx.Node], Callable[..., torch.Tensor]]

_TO_DOUBLE_METHODS = {"float": "double", "half": "double", "bfloat16": "double"}


class Evaluator:
    """Evaluates nodes of one graph; `inputs` maps placeholders to their concrete values."""

    def __init__(self, graph: fx.Graph, inputs: dict[fx.Node, object]):
        self.graph, self.inputs = graph, inputs
        self.order = {n: i for i, n in enumerate(graph.nodes)}

    def run(self, targets: list[fx.Node], overrides: dict[fx.Node, object] | None = None,
            substitutes: dict[fx.Node, Substitute] | None = None) -> list:
        overrides, substitutes = overrides or {}, substitutes or {}
        env: dict[fx.Node, object] = {n: _double(v) for n, v in overrides.items()}
        for node in sorted(self._needed(targets, overrides, substitutes), key=self.order.__getitem__):
            if node in env:
                continue
            if node in substitutes:
                deps, fn = substitutes[node]
                env[node] = fn(*(env[d] for d in deps))
            elif node.op == "placeholder":
                env[node] = _double(self.inputs[node])
            else:
                env[node] = _call(node, env)
        return [env[t] for t in targets]

    def _needed(self, targets, overrides, substitutes) -> set[fx.Node]:
        """Ancestors of the targets, stopping at overrides, plus the in-place updates of them."""
        needed: set[fx.Node] = set()
        stack = list(targets)
        while stack:
            node = stack.pop()
            if node in needed:
                continue
            needed.add(node)
            if node in overrides:
                continue
            stack.extend(substitutes[node][0] if node in substitutes else node.all_input_nodes)
            stack.extend(_writes_into(node))
        return needed


# Ops whose result shares its input's memory: a write into it writes into the input.
_VIEWS = {operator.getitem, "view", "view_as", "transpose", "permute", "unsqueeze", "squeeze", "narrow", "select",
          "expand", "t", "unflatten", "diagonal", "unfold", torch.narrow, torch.select, torch.transpose}


def _writes_into(node: fx.Node) -> list[fx.Node]:
    """The in-place writes into the node's value, directly or through a view of it (a fresh
    `new_empty` filled by `key[..., :n].copy_(k)`), each with the views it writes through."""
    found = []
    for user in node.users:
        if _mutates(user, node):
            found.append(user)
        elif user.target in _VIEWS and user.args and user.args[0] is node:
            writes = _writes_into(user)
            found += [user, *writes] if writes else []
    return found


def _mutates(user: fx.Node, node: fx.Node) -> bool:
    """`user` writes into `node`'s value in place: `node.index_add_(...)`, `node[m] = v`."""
    if not user.args or user.args[0] is not node:
        return False
    if user.target is operator.setitem:
        return True
    name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.startswith("_")


def _double(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(torch.float64, copy=True)
    return value


def _as_double(arg):
    if isinstance(arg, torch.dtype) and arg.is_floating_point:
        return torch.float64
    return arg


def _call(node: fx.Node, env: dict) -> object:
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
    args, kwargs = fx.node.map_aggregate((args, kwargs), _as_double)
    if node.op == "call_method":
        method = _TO_DOUBLE_METHODS.get(node.target, node.target)
        return getattr(args[0], method)(*args[1:], **kwargs)
    if node.target in _GROUPED_MM:
        return _grouped_mm(*args, **kwargs)
    return node.target(*args, **kwargs)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None = None, **_) -> torch.Tensor:
    """torch._grouped_mm for 2-D x 3-D by definition (it has no float64 kernel): rows
    [offs[e-1], offs[e]) of `a` times b[e]."""
    out = a.new_zeros(a.shape[0], b.shape[-1])
    start = 0
    for e, stop in enumerate(offs.tolist()):
        out[start:stop] = a[start:stop] @ b[e]
        start = stop
    return out


_GROUPED_MM = (torch._grouped_mm, torch.ops.aten._grouped_mm, torch.ops.aten._grouped_mm.default)


def concrete_shape(node: fx.Node) -> tuple[int, ...]:
    """The node's shape with symbolic sizes at the values Dynamo traced them with."""
    return tuple(int(s) if isinstance(s, int) else int(s.node.hint) for s in fake(node).shape)
