"""Small read-only queries on Dynamo FX graphs shared by the recognisers."""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx

# The traced function's local the model came in as: L['self'], or L['args'][0] through wrappers.
_ROOT = re.compile(r"^L\['(?:args|kwargs)'\]\[[^\]]+\]|^L\['[^']+'\]")
_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.(\w+)|\[(\d+)\]")


def _qualname(source_name: str) -> str:
    """"L['self']._modules['layers']._modules['0']._parameters['w']" -> "layers.0.w"."""
    body = _ROOT.sub("", source_name)
    return ".".join(next(g for g in m.groups() if g is not None) for m in _SOURCE_PART.finditer(body))


def param_name(node: fx.Node) -> str | None:
    """Qualified name of the parameter/buffer a placeholder was lifted from, else None."""
    if node.op != "placeholder":
        return None
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None or not isinstance(getattr(grapharg, "example", None), torch.nn.Parameter):
        return None
    return _qualname(source.name)


def module_paths(node: fx.Node) -> list[str]:
    """Qualified names of the modules a node was traced inside, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [_qualname(path) for path, _cls in stack.values()]


def fake(node) -> torch.Tensor | None:
    """The fake tensor Dynamo recorded for a node's value, if it is a tensor."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value")
    return value if isinstance(value, torch.Tensor) else None


def static_int(value) -> int | None:
    """An int, or a SymInt that Dynamo has specialised to a constant."""
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt) and value.node.is_constant():
        return int(value)
    return None


def topo_index(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def spellings(name: str, inplace: bool = False) -> tuple:
    """Every target under which Dynamo may record tensor op `name` (varies with torch version):
    operator.<name>, torch.<name>, and the methods <name> / __<name>__ (plus in-place forms)."""
    base = name.rstrip("_")
    found = [getattr(operator, name, None), getattr(torch, base, None), base, f"__{base}__"]
    if inplace:
        found += [getattr(operator, f"i{base}", None), f"{base}_", f"__i{base}__"]
    return tuple(t for t in found if t is not None)


def dropout_args(node: fx.Node) -> tuple[float, bool]:
    """(p, training) of an F.dropout call, with F.dropout's defaults."""
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    return p, bool(training)


def writes_in_place(node: fx.Node) -> bool:
    """`x[i] = v`, `x.index_add_(...)`, `x.scatter_(...)`...: a node that writes into its first argument."""
    if node.target is operator.setitem:
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.startswith("_") and bool(node.args)
