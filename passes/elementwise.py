"""Identify the elementwise part of an expert (activation, gating) by evaluating it.

Models spell activations many ways (F.gelu, nn.GELU, HF's NewGELUActivation written out as
tanh/pow arithmetic, x * sigmoid(x), ...). Rather than matching each spelling, we take the
graph nodes between the first matmul(s) and the second one, run them on random inputs and
compare against each known activation. The best match within tolerance wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .graph_utils import fake
from .op_contract import ACTIVATIONS

_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class Elementwise:
    activation: str
    gated: bool
    gate_layout: str = ""  # for a fused gate_up output: "concat_gate_first", "concat_up_first", "interleaved"
    gate_input: int = 0  # for two separate matmuls: which input is the gate (0 or 1)


def _is_sentinel_fill(node: fx.Node) -> bool:
    """`x.masked_fill(mask, 0)`: transformers zeroes expert-parallel sentinel rows this way; the
    mask is all False outside expert parallelism (and in the rewritten graph, where ids < E)."""
    return node.target in ("masked_fill", torch.masked_fill) and len(node.args) == 3 and node.args[2] == 0


def nodes_between(sources: list[fx.Node], sink: fx.Node) -> list[fx.Node] | None:
    """Nodes on paths from `sources` to `sink` (topological order), or None if `sink` depends on
    anything else than the sources and constants (then it is not a pure elementwise chain)."""
    order: list[fx.Node] = []  # post-order of a DFS from the sink: inputs before users
    state: dict[fx.Node, bool] = {}  # False while on the stack, True once emitted
    stack = [(sink, False)]
    while stack:
        node, inputs_done = stack.pop()
        if inputs_done:
            state[node] = True
            order.append(node)
            continue
        if node in state or node in sources:
            continue
        if node.op not in ("call_function", "call_method"):
            return None
        state[node] = False
        stack.append((node, True))
        stack.extend((n, False) for n in (node.args[:1] if _is_sentinel_fill(node) else node.all_input_nodes))
    return order


def evaluate(nodes: list[fx.Node], env: dict[fx.Node, object]) -> None:
    """Run `nodes` in order on concrete values; `env` maps their inputs and receives results."""
    for node in nodes:
        if _is_sentinel_fill(node):
            env[node] = env[node.args[0]]
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
        if node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        else:
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)


GRAPH = Elementwise("graph", gated=False)  # any other row-wise function, kept as the graph's own nodes

_SAMPLE_ROWS = 5


def _sample_shape(node: fx.Node, few_rows: bool) -> tuple[int, ...]:
    """The node's shape with symbolic sizes set to a few rows and, if `few_rows`, every leading size
    capped to as few: an elementwise chain is identified as well on 5 rows as on 30000, and the
    full shape costs seconds per expert at compile time."""
    shape = [s if isinstance(s, int) and s > 0 else _SAMPLE_ROWS for s in fake(node).shape]
    if few_rows:
        shape[:-1] = [min(s, _SAMPLE_ROWS) for s in shape[:-1]]
    return tuple(shape)


def _run_on_random(chain: list[fx.Node], inputs: list[fx.Node], output: fx.Node, few_rows: bool):
    """(input values, output value) of the chain on random float64 inputs, or None if it cannot run."""
    generator = torch.Generator().manual_seed(0)
    zs = [torch.randn(_sample_shape(n, few_rows), generator=generator, dtype=torch.float64).mul_(3) for n in inputs]
    env = dict(zip(inputs, zs))
    try:
        with torch.no_grad():
            evaluate(chain, env)
    except Exception:  # a chain we cannot run standalone is not one we can identify
        return None
    return zs, env[output]


def identify(inputs: list[fx.Node], output: fx.Node) -> Elementwise | None:
    """What elementwise function maps the matmul output(s) `inputs` to `output`, or None."""
    chain = nodes_between(inputs, output)
    if chain is None or fake(output) is None or any(fake(n) is None for n in inputs):
        return None
    # Evaluate in float64 whatever the model's dtype, so that close activations (gelu and its
    # tanh approximation) stay distinguishable; casts inside the chain lower the precision.
    # A few rows first; the full shape only for a chain that fixes its sizes (a view to T rows).
    run = _run_on_random(chain, inputs, output, few_rows=True) or _run_on_random(chain, inputs, output, few_rows=False)
    if run is None:
        return None
    zs, got = run
    if not isinstance(got, torch.Tensor):
        return None
    dtype = got.dtype
    got = got.double()
    candidates = _candidates(zs)
    errors = {key: _error(got, want) for key, want in candidates.items()}
    best = min(errors, key=errors.get, default=None)
    if best is None or errors[best] > _TOLERANCE.get(dtype, 1e-5):
        # Not a function the kernels know: the lowering runs this chain itself, between the two
        # grouped matmuls, on the rows of every expert at once (passes.verify checks it is row-wise).
        same_rows = len(zs) == 1 and got.dim() == zs[0].dim() and got.shape[:-1] == zs[0].shape[:-1]
        return GRAPH if same_rows and torch.isfinite(got).all() else None
    return best


def _candidates(zs: list[torch.Tensor]) -> dict[Elementwise, torch.Tensor]:
    zs = [_as_rows(z) for z in zs]
    out: dict[Elementwise, torch.Tensor] = {}
    for name, act in ACTIVATIONS.items():
        if len(zs) == 1:
            z = zs[0]
            out[Elementwise(name, gated=False)] = act(z)
            half = z.shape[-1] // 2
            if z.shape[-1] % 2 == 0 and half > 0:
                # gated experts whose gate and up projections are one fused matmul
                out[Elementwise(name, True, "concat_gate_first")] = act(z[..., :half]) * z[..., half:]
                out[Elementwise(name, True, "concat_up_first")] = act(z[..., half:]) * z[..., :half]
                out[Elementwise(name, True, "interleaved")] = act(z[..., ::2]) * z[..., 1::2]
        elif len(zs) == 2 and zs[0].shape == zs[1].shape:
            out[Elementwise(name, True, gate_input=0)] = act(zs[0]) * zs[1]
            out[Elementwise(name, True, gate_input=1)] = act(zs[1]) * zs[0]
    return out


def _as_rows(z: torch.Tensor) -> torch.Tensor:
    """The matmul output as rows of features: [..., F], or bmm's [S, F, 1]."""
    z = z.double()
    if z.dim() > 1 and z.shape[-1] == 1:
        z = z.squeeze(-1)
    return z.reshape(-1, z.shape[-1]) if z.dim() > 1 else z


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        try:
            got = got.reshape(want.shape)
        except RuntimeError:
            return float("inf")
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
