"""Loops over the experts a batch hits, rewritten as loops over every expert, for Dynamo.

MoE code often runs only the experts some token chose::

    expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:             # or expert_hit.squeeze(-1).tolist()
        tokens, slots = torch.where(expert_mask[expert_idx[0]])
        ...

Dynamo cannot unroll a loop over a tensor of data-dependent length (a graph break). Here the
function's source is rewritten so that the loop runs over every candidate position of the
tensor `nonzero` was taken of (a static length) and the loop variable is a constant: `[e]`
where it was a row of `nonzero()`'s output, `e` where it was flattened. `v.item()` and
`int(v)` become the constant; a candidate past the end of what the loop indexes by it is
skipped (the original loop, which never reaches it, would raise there). The hit list goes when
the loop was its only reader.

In any loop over experts (one that selects tokens with `where` / `nonzero` or adds rows back
with `index_add_` and the like, hit list or `range(E)`), guards on an empty selection go:
`if x.numel() == 0: continue` is dropped and `if x.numel() > 0: <work>` becomes <work> (work on
no rows is no work; such a guard is a data-dependent branch Dynamo cannot trace). Nothing else
changes. A function with such a loop is traced keeping the loop's data-dependent selections in
the graph, with or without fullgraph=True (moeshard_compile.capture.keep_data_dependent_shapes).

The result equals the original wherever an expert no token chose contributes nothing, which
is what such loops are written for (each selects its tokens by the same mask the hit list
comes from). For the regions it rewrites, moeshard's verifier confirms each expert's
contribution is its routing coefficient times its output, zero where the routing is zero.
"""

from __future__ import annotations

import ast
import dis
import inspect
import logging
import textwrap
from typing import Callable

import torch

log = logging.getLogger(__name__)

_FLATTENING = {"view", "reshape", "flatten", "squeeze"}  # a row of nonzero's output becomes a scalar


def candidates(hit_input: torch.Tensor, scalar: bool):
    """Every position of a 1-D `hit_input`, as the loop would see the rows of its nonzero():
    `[e]` (or `e` for a flattened result). Other shapes keep nonzero's own result."""
    if hit_input.dim() != 1:
        hits = hit_input.nonzero()
        return hits.view(-1) if scalar else hits
    n = hit_input.shape[0]
    return list(range(n)) if scalar else [[e] for e in range(n)]


def static_version(fn: Callable) -> Callable | None:
    """`fn` with its loops over `nonzero()` rewritten, or None if it has none we can rewrite."""
    code = getattr(fn, "__code__", None)
    if code is None or code.co_freevars or not _may_loop_over_experts(code):
        return None
    try:
        lines, first_line = inspect.getsourcelines(fn)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return None
    ast.increment_lineno(tree, first_line - 1)  # tracebacks point into the original file
    function = tree.body[0]
    if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    function.decorator_list = []
    if not _rewrite(function):
        return None
    function.body.insert(0, ast.ImportFrom("moeshard_compile.static_loops", [ast.alias("candidates", "_moeshard_candidates"),
                                                                           ast.alias("past_end", "_moeshard_past_end")], 0))
    namespace: dict = {}
    module = ast.fix_missing_locations(ast.Module(body=[function], type_ignores=[]))
    exec(compile(module, inspect.getsourcefile(fn) or "<moeshard>", "exec"), fn.__globals__, namespace)
    static = namespace[function.name]
    static.__defaults__, static.__kwdefaults__ = fn.__defaults__, fn.__kwdefaults__
    static._moeshard_lists_counts = _lists_expert_counts(function)  # traced keeping `.tolist()` ints
    log.debug("moeshard: %s.%s loops over every expert when traced", fn.__module__, fn.__qualname__)
    return static


_OPCODES = {dis.opmap["FOR_ITER"], dis.opmap["STORE_SUBSCR"]}


def _may_loop_over_experts(code) -> bool:
    """A cheap look at the bytecode before parsing the source (every nn.Module class passes here):
    a name of a selection or write-back, or a loop that stores into a subscript."""
    return bool({"nonzero", "numel", "tolist", *_DISPATCH_CALLS} & set(code.co_names)) or _OPCODES <= set(code.co_code[::2])


def _rewrite(function: ast.FunctionDef) -> bool:
    """Rewrite every `for v in hits` whose `hits = <x>.nonzero()...` in `function` and the empty
    guards of loops over experts; True if `function` has either kind of loop."""
    hits = {found[0]: found[1:] for block in _blocks(function) for s in block if (found := _hit_assignment(s))}
    changed = False
    for block in _blocks(function):
        for statement in block:
            if isinstance(statement, ast.For) and (found := _hit_iteration(statement.iter)) and found[0] in hits:
                hit_input, scalar = hits[found[0]]
                scalar = scalar or found[1]
                statement.iter = ast.Call(ast.Name("_moeshard_candidates", ast.Load()),
                                          [hit_input, ast.Constant(scalar)], [])
                if isinstance(statement.target, ast.Name):
                    _ConstantIndex(statement.target.id, scalar).visit(statement)
                    statement.body = _guarded_past_end(statement.body, statement.target.id)
                changed = True
    _drop_unused_hits(function, set(hits))
    for loop in [n for n in ast.walk(function) if isinstance(n, ast.For) and _dispatches(n)]:
        loop.body = _without_empty_guards(loop.body)
        changed = True  # even unchanged, a loop over experts is traced keeping its data-dependent selections
    return changed or _lists_expert_counts(function)


def _lists_expert_counts(function: ast.FunctionDef) -> bool:
    """A router that hands its per-expert counts on as a list (`expert_size.tolist()`, JetMoE):
    traced keeping the list's ints in the graph, unchanged, so the experts that split their rows
    by it (`x.split(counts)`, which checks they cover the rows) stay in the same graph. Only code
    that names experts, and not a loop over the list: slicing rows by running sums of counts
    (DeepSeek's moe_infer) leaves Inductor unable to prove the slices cover the rows."""
    names = {n.id for n in ast.walk(function) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(function) if isinstance(n, ast.Attribute)}
    lists = [n.func.value for n in ast.walk(function)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "tolist"]
    looped = any(isinstance(n, ast.For) and any(isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
                                                and c.func.attr == "tolist" for c in ast.walk(n.iter))
                 for n in ast.walk(function))
    return (bool(lists) and not looped and all(_known_length(x, function) for x in lists)
            and any("expert" in n.lower() for n in names))


_UNKNOWN_LENGTH = {"bincount", "unique", "unique_consecutive", "nonzero", "masked_select"}


def _known_length(tensor: ast.expr, function: ast.FunctionDef) -> bool:
    """Whether the listed tensor's length is known when traced: not made by an op of data-dependent
    size (`bincount(...).tolist()` cannot be traced into a list, so it stays a graph break), in
    the expression or in what the function assigns to its name."""
    sources = [tensor]
    if isinstance(tensor, ast.Name):
        sources += [a.value for a in ast.walk(function) if isinstance(a, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == tensor.id for t in a.targets)]
    calls = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
             for source in sources for n in ast.walk(source) if isinstance(n, ast.Call)}
    return not calls & _UNKNOWN_LENGTH


def past_end(indexed, index) -> bool:
    """`indexed[index]` would raise IndexError: a position the original loop never reaches."""
    if isinstance(index, list) and len(index) == 1:  # a row of nonzero()'s output, `[e]`
        index = index[0]
    return (isinstance(index, int) and isinstance(indexed, (torch.Tensor, torch.nn.ModuleList, list, tuple))
            and index >= len(indexed))


_COMPOUND = (ast.If, ast.For, ast.While, ast.With, ast.Try)


def _guarded_past_end(body: list[ast.stmt], name: str) -> list[ast.stmt]:
    """Before each simple statement of the loop body that indexes something by the loop variable,
    skip the candidate if the index is past the end (a padding class, say `one_hot(ids,
    num_experts + 1)`: no token picks it, so the original loop never indexes the weights with
    it). Where the guard skips, the original would raise at that very statement; a statement
    under a condition (`if e < E: w[e]`) is left alone, since the original may not run it."""
    out: list[ast.stmt] = []
    for statement in body:
        for node in ([] if isinstance(statement, _COMPOUND) else ast.walk(statement)):
            if (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Name) and node.slice.id == name
                    and isinstance(node.ctx, ast.Load)):
                test = ast.Call(ast.Name("_moeshard_past_end", ast.Load()), [node.value, ast.Name(name, ast.Load())], [])
                out.append(ast.If(test, [ast.Continue()], []))
        out.append(statement)
    return out


def _drop_unused_hits(function: ast.FunctionDef, names: set[str]) -> None:
    """Remove `hits = x.nonzero()` where the rewritten loops were its only readers: a dead
    nonzero would still stop Dynamo's graph (and synchronise a GPU)."""
    read = {n.id for n in ast.walk(function) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    for block in _blocks(function):
        block[:] = [s for s in block if not ((found := _hit_assignment(s)) and found[0] in names - read)] or [ast.Pass()]


_SELECT_CALLS = {"where", "nonzero"}
_WRITE_CALLS = {"index_add_", "index_add", "index_put_", "scatter_add_", "scatter_add", "index_copy_"}
_DISPATCH_CALLS = _SELECT_CALLS | _WRITE_CALLS


def _dispatches(loop: ast.For) -> bool:
    """A loop over experts: its body selects tokens (`where`, `nonzero`, `x[m]`) and writes rows
    back (`index_add_` and the like, `out[m] = ...`, `out[m] += ...`)."""
    calls = {n.func.attr for n in ast.walk(loop) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    subscripts = [n for n in ast.walk(loop) if isinstance(n, ast.Subscript)]
    selects = bool(calls & _SELECT_CALLS) or any(isinstance(n.ctx, ast.Load) for n in subscripts)
    writes = bool(calls & _WRITE_CALLS) or any(isinstance(n.ctx, ast.Store) for n in subscripts)
    return selects and writes


def _without_empty_guards(body: list[ast.stmt]) -> list[ast.stmt]:
    """A loop body without its guards against an empty selection: `if x.numel() == 0: continue`
    goes, `if x.numel() > 0: <work>` becomes <work> (work on no rows is no work)."""
    out: list[ast.stmt] = []
    for statement in body:
        if _skips_empty(statement):
            continue
        if _runs_if_nonempty(statement):
            out.extend(statement.body)
            continue
        out.append(statement)
    return out or [ast.Pass()]


def _blocks(node: ast.AST):
    for child in ast.walk(node):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(child, field, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                yield block


def _hit_assignment(statement: ast.stmt) -> tuple[str, ast.expr, bool] | None:
    """`name = <x>.nonzero(...)[.view(-1)]` or `torch.nonzero(<x>)`: (name, x, flattened)."""
    if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)):
        return None
    value, scalar = statement.value, False
    while isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr in _FLATTENING:
        value, scalar = value.func.value, True
    if not isinstance(value, ast.Call) or not isinstance(value.func, ast.Attribute) or value.func.attr != "nonzero":
        return None
    if any(k.arg == "as_tuple" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
           for k in value.keywords):
        return None
    receiver = value.func.value
    if isinstance(receiver, ast.Name) and receiver.id == "torch":  # torch.nonzero(x)
        if len(value.args) != 1:
            return None
        receiver = value.args[0]
    elif value.args:
        return None
    return statement.targets[0].id, receiver, scalar


def _hit_iteration(iterated: ast.expr) -> tuple[str, bool] | None:
    """`hits`, `hits.tolist()` or `hits.squeeze(-1).tolist()` (any flattening): (name, flattened)."""
    if isinstance(iterated, ast.Call) and isinstance(iterated.func, ast.Attribute) and iterated.func.attr == "tolist":
        iterated = iterated.func.value
    scalar = False
    while (isinstance(iterated, ast.Call) and isinstance(iterated.func, ast.Attribute)
           and iterated.func.attr in _FLATTENING):
        iterated, scalar = iterated.func.value, True
    return (iterated.id, scalar) if isinstance(iterated, ast.Name) else None


class _ConstantIndex(ast.NodeTransformer):
    """Inside the loop: `v.item()` and `int(v)` are the constant expert index."""

    def __init__(self, name: str, scalar: bool):
        self.name, self.scalar = name, scalar

    def _index(self) -> ast.expr:
        var = ast.Name(self.name, ast.Load())
        return var if self.scalar else ast.Subscript(var, ast.Constant(0), ast.Load())

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        func = node.func
        if (isinstance(func, ast.Attribute) and func.attr == "item" and not node.args
                and isinstance(func.value, ast.Name) and func.value.id == self.name):
            return self._index()
        if (isinstance(func, ast.Name) and func.id == "int" and len(node.args) == 1
                and isinstance(node.args[0], ast.Name) and node.args[0].id == self.name):
            return self._index()
        return node


def _skips_empty(statement: ast.stmt) -> bool:
    """`if <x>.numel() == 0: continue` (or `.shape[0] == 0`, `len(x) == 0`)."""
    return (isinstance(statement, ast.If) and not statement.orelse and len(statement.body) == 1
            and isinstance(statement.body[0], ast.Continue) and _compares_size(statement.test, (ast.Eq,)))


def _runs_if_nonempty(statement: ast.stmt) -> bool:
    """`if <x>.numel() > 0:` (or `!= 0`) without an else."""
    return isinstance(statement, ast.If) and not statement.orelse and _compares_size(statement.test, (ast.Gt, ast.NotEq))


def _compares_size(test: ast.expr, ops: tuple) -> bool:
    """`<size of x> <op> 0` for a size that is `x.numel()`, `x.shape[0]` or `x.size(0)`."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ops)
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == 0):
        return False
    left = test.left
    method = left.func.attr if isinstance(left, ast.Call) and isinstance(left.func, ast.Attribute) else None
    rows = isinstance(left, ast.Subscript) and isinstance(left.value, ast.Attribute) and left.value.attr == "shape"
    return method == "numel" or (method == "size" and len(left.args) == 1) or rows
