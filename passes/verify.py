"""Check every recognised region against the graph it came from, before anything is rewritten.

A record claims that the region computes, from the tokens x_TD and the routing the graph
itself derives from them,

    out_t = sum_e c_e[t] * f_e(x_t)

with c from the record's routing nodes (combine_TE, or ids_TK and weights_TK) and f_e the
canonical FFN over the stacked weights: exactly what the lowering computes. Both sides are
evaluated in float64 (passes.evaluate) on random tokens and on three routings the graph's own
router produces from them: random tokens; every token the same, so one set of experts takes
every token and the others none (capacity limits then drop tokens); two kinds of tokens.

- Where the record knows each expert's call in the graph (per-expert loops), the experts are
  swapped on both sides for cheap distinct stand-ins f_e(x) = x * r_e + (x * q_e)^2 (not
  homogeneous: a weight on the expert's input is not one on its output), which checks dispatch,
  combine and routing at the cost of elementwise work; each expert's own function is then
  checked against its stacked weights on a few random rows.
- Otherwise (a module computing all experts at once) the region runs as it is.

A region passes only if every check agrees; otherwise it is skipped with the reason.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .evaluate import Evaluator, concrete_shape
from .graph_utils import fake
from .op_contract import ACTIVATIONS
from .region import ExpertWeights, MoERegion, Status
from .shard import CHAIN_LAYOUTS, chain_input_columns

TOLERANCE = 1e-6  # relative to the output's size; float64 rounding is ~1e-15
_ROWS = 8  # rows per expert for the expert-function check
_CASES = ("random", "one expert set", "two token kinds")


def verify(gm: fx.GraphModule, regions: list[MoERegion], inputs: dict[fx.Node, object]) -> None:
    """Skip (with the reason) every recognised region whose record the graph does not confirm."""
    evaluator = Evaluator(gm.graph, inputs)
    for region in regions:
        if region.status is not Status.RECOGNISED:
            continue
        try:
            reason = _check(evaluator, region)
        except Exception as error:  # a region we cannot evaluate is a region we cannot trust
            reason = f"could not evaluate the region: {type(error).__name__}: {error}".splitlines()[0]
        if reason:
            region.skip(f"verification failed: {reason}")


def _check(evaluator: Evaluator, region: MoERegion) -> str | None:
    with torch.no_grad():  # in the model's dtype: each expert goes to float64 when checked (a full copy is GBs)
        weights = region.weights.stack([evaluator.inputs[p] for p in region.weights.inputs])
    ffn = _CanonicalFFN(weights, region.activation, evaluator, region.expert_chain)
    if region.expert_chain is not None:
        reason = _check_chain(ffn, region)
        if reason:
            return reason
    if region.expert_calls:
        reason = _check_expert_functions(evaluator, region, ffn)
        if reason:
            return reason
    routing = region.routing
    routing_nodes = [routing.combine_TE] if routing.combine_TE is not None else [routing.ids_TK, routing.weights_TK]
    source = routing_source(region, routing_nodes)
    generator = torch.Generator().manual_seed(0)
    scales = torch.randn(2, region.num_experts, region.d_model, generator=generator, dtype=torch.float64)
    for case in _CASES:
        h = _tokens(concrete_shape(source), case, generator)
        device = _device(evaluator, region)
        h = h.to(device)
        base = [routing.base_TD] if routing.base_TD is not None else []
        scale = [routing.input_scale_TE] if routing.input_scale_TE is not None else []
        x_TD, *route = evaluator.run([region.tokens_TD, *routing_nodes, *base, *scale], overrides={source: h})
        scale_TE = route.pop().double() if scale else None
        base_TD = route.pop() if base else None
        if region.expert_calls:
            r_ED, q_ED = scales.to(device)
            substitutes = {call.y: _substitute(call, _stand_in(call, e, r_ED, q_ED)) for e, call in enumerate(region.expert_calls)}
            (got,) = evaluator.run([region.output_TD], overrides={source: h}, substitutes=substitutes)
            expert = lambda e, x: x * r_ED[e] + (x * q_ED[e]) ** 2  # noqa: E731
        else:
            (got,) = evaluator.run([region.output_TD], overrides={source: h})
            expert = ffn
        want = _combine(x_TD, route, expert, region, scale_TE)
        if isinstance(want, str):
            return f"{want} ({case} routing)"
        if base_TD is not None:
            want = want + base_TD.reshape(want.shape)
        error = _mismatch(got, want)
        if error:
            return f"the record disagrees with the graph on {case} routing: {error}"
    return None


def _substitute(call, stand_in):
    """What replaces the call: the stand-in, times the expert's own factor where it has one."""
    if call.scale is None:
        return [call.x], stand_in
    return [call.x, call.scale], lambda x, scale: stand_in(x) * scale


def _stand_in(call, e: int, r_ED: torch.Tensor, q_ED: torch.Tensor):
    """Expert e (or, batched, every expert) as x * r_e + (x * q_e)^2: cheap, distinct per expert,
    and not homogeneous, so a weight that scales the expert's input (f(w x)) is told apart from
    one that scales its output (w f(x))."""
    if call.batched:
        return lambda x: (lambda x_ETD: x_ETD * r_ED[:, None, :] + (x_ETD * q_ED[:, None, :]) ** 2)(
            x if x.dim() == 3 else x.unsqueeze(0))
    return lambda x: x * r_ED[e] + (x * q_ED[e]) ** 2


def routing_source(region: MoERegion, routing_nodes: list[fx.Node]) -> fx.Node:
    """The latest tensor of tokens that both the experts' input and the router are computed from.

    Giving it random values runs the model's own router: the routings tested are ones the model
    can produce. When the router reads nothing the tokens come from, the tokens themselves."""
    D = region.d_model
    token_ancestors = ancestors([region.tokens_TD])
    routing_ancestors = ancestors(routing_nodes)
    order = {n: i for i, n in enumerate(region.tokens_TD.graph.nodes)}
    common = [n for n in token_ancestors & routing_ancestors
              if fake(n) is not None and fake(n).is_floating_point() and fake(n).dim() >= 2 and fake(n).shape[-1] == D]
    return max(common, key=order.__getitem__) if common else region.tokens_TD


def ancestors(nodes: list[fx.Node]) -> set[fx.Node]:
    """The nodes and every node they are computed from."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def _tokens(shape: tuple[int, ...], case: str, generator: torch.Generator) -> torch.Tensor:
    if case == "random":
        return torch.randn(shape, generator=generator, dtype=torch.float64)
    rows = torch.randn(2, shape[-1], generator=generator, dtype=torch.float64)
    if case == "one expert set":
        return rows[0].expand(shape).clone()
    kind = torch.arange(torch.Size(shape[:-1]).numel()) % 2
    return rows[kind].reshape(shape)


def _device(evaluator: Evaluator, region: MoERegion) -> torch.device:
    value = evaluator.inputs[region.weights.inputs[0]]
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")


def _combine(x_TD: torch.Tensor, route: list[torch.Tensor], expert, region: MoERegion,
             scale_TE: torch.Tensor | None = None) -> torch.Tensor | str:
    """sum_e c_e[t] * expert(e, s_e[t] * x_t) from the record's routing (s: the input scale, 1
    without one), or why the routing is invalid."""
    x_TD = x_TD.reshape(-1, x_TD.shape[-1])
    out_TD = torch.zeros_like(x_TD)

    def inputs(e: int, tokens: torch.Tensor) -> torch.Tensor:
        return x_TD[tokens] if scale_TE is None else x_TD[tokens] * scale_TE[tokens, e, None]

    if len(route) == 1:
        combine_TE = route[0].reshape(x_TD.shape[0], region.num_experts).double()
        per_token = ((combine_TE != 0) & ~combine_TE.isnan()).sum(-1)
        if per_token.numel() and per_token.max().item() > region.top_k:
            return f"a token has {per_token.max().item()} experts, more than the proven bound top_k={region.top_k}"
        for e in range(region.num_experts):
            (tokens,) = torch.nonzero(combine_TE[:, e], as_tuple=True)
            out_TD.index_add_(0, tokens, combine_TE[tokens, e, None] * expert(e, inputs(e, tokens)))
        return out_TD
    ids_TK, weights_TK = (t.reshape(x_TD.shape[0], region.top_k) for t in route)
    if ids_TK.numel() and (ids_TK.min() < 0 or ids_TK.max() >= region.num_experts):
        return f"expert ids outside [0, {region.num_experts})"
    for e in range(region.num_experts):
        tokens, slots = torch.nonzero(ids_TK == e, as_tuple=True)
        out_TD.index_add_(0, tokens, weights_TK[tokens, slots, None].double() * expert(e, inputs(e, tokens)))
    return out_TD


def _check_expert_functions(evaluator: Evaluator, region: MoERegion, ffn: "_CanonicalFFN") -> str | None:
    generator = torch.Generator().manual_seed(1)
    device = _device(evaluator, region)
    for index, call in enumerate(region.expert_calls):
        leading = (region.num_experts,) if fake(call.x).dim() == 3 else ()  # a batched call's [E, T, D]
        rows = torch.randn(*leading, _ROWS, region.d_model, generator=generator, dtype=torch.float64).to(device)
        try:
            (got,) = evaluator.run([call.y], overrides=_unscaled(call, rows))
        except Exception:  # the expert's code fixes its row count (a view to T rows): use its own shape
            rows = torch.randn(concrete_shape(call.x), generator=generator, dtype=torch.float64).to(device)
            (got,) = evaluator.run([call.y], overrides=_unscaled(call, rows))
        experts = range(region.num_experts) if call.batched else [index]
        for e in experts:
            x_e = rows[e] if call.batched and rows.dim() == 3 else rows
            got_e = got[e] if call.batched else got
            error = _mismatch(got_e, ffn(e, x_e.reshape(-1, region.d_model)))
            if error:
                return f"expert {e} of {region.num_experts} does not compute {ffn.describe()} with its stacked weights: {error}"
    return None


def _unscaled(call, rows: torch.Tensor) -> dict:
    """The call on `rows`, its own factor (a part of the combine) set to 1."""
    if call.scale is None:
        return {call.x: rows}
    return {call.x: rows, call.scale: torch.ones(*rows.shape[:-1], 1, dtype=rows.dtype, device=rows.device)}


class _CanonicalFFN:
    """f_e(x) as the lowering computes it from the stacked weights (activation "graph": the
    model's own chain, run on the rows of every expert)."""

    def __init__(self, weights: ExpertWeights, activation: str, evaluator: Evaluator,
                 chain: tuple[fx.Node, fx.Node] | None = None):
        self.w, self.activation = weights, activation
        self.act = (lambda h: evaluator.run([chain[1]], overrides={chain[0]: h})[0]) if chain else ACTIVATIONS[activation]
        self._experts: dict[int, dict[str, torch.Tensor | None]] = {}

    def describe(self) -> str:
        return f"{self.activation}{' (gated)' if self.w.w_gate_EDF is not None else ''}"

    def expert(self, e: int) -> dict[str, torch.Tensor | None]:
        """Expert e's weights in float64, by ExpertWeights field name."""
        if e not in self._experts:
            self._experts[e] = {name: None if t is None else _double(t[e]) for name, t in self.w.tensors().items()}
        return self._experts[e]

    def __call__(self, e: int, x_XD: torch.Tensor) -> torch.Tensor:
        w = self.expert(e)
        h_XF = x_XD @ w["w_in_EDF"] + (0 if w["b_in_EF"] is None else w["b_in_EF"])
        if w["w_gate_EDF"] is None:
            h_XF = self.act(h_XF)
        else:
            h_XF = self.act(x_XD @ w["w_gate_EDF"] + (0 if w["b_gate_EF"] is None else w["b_gate_EF"])) * h_XF
        return h_XF @ w["w_out_EFD"] + (0 if w["b_out_ED"] is None else w["b_out_ED"])


def _check_chain(ffn: _CanonicalFFN, region: MoERegion) -> str | None:
    """The lowering runs the model's chain on rows of all experts together: each output row must
    depend on its own input row only. Sharding the FFN dim also needs to know which input
    columns each output column reads (region.chain_layout)."""
    generator = torch.Generator().manual_seed(2)
    width = ffn.w.w_in_EDF.shape[-1]
    device = ffn.w.w_in_EDF.device
    h = torch.randn(_ROWS, width, generator=generator, dtype=torch.float64).to(device)
    base = ffn.act(h)
    if not isinstance(base, torch.Tensor) or base.dim() != 2 or base.shape[0] != _ROWS:
        return "the expert's elementwise code does not keep one output row per input row"
    moved = h.clone()
    moved[0] += torch.randn(width, generator=generator, dtype=torch.float64).to(device)
    if not torch.equal(ffn.act(moved)[1:], base[1:]):
        return "the expert's code between its projections mixes rows (tokens): not an elementwise function"
    region.chain_layout = next((layout for layout in CHAIN_LAYOUTS if _reads_columns_as(ffn.act, h, base, layout)), None)
    return None


def _reads_columns_as(chain, h: torch.Tensor, base: torch.Tensor, layout: str) -> bool:
    """Output column j reads only the input columns `layout` gives it, and a block of columns
    computes on its own. Exact: for every bit of j, the outputs whose bit differs stay unchanged
    when the inputs of the others move (two distinct columns differ in some bit)."""
    d_ff, width = base.shape[1], h.shape[1]
    if width != d_ff * (1 if layout == "columns" else 2):
        return False
    generator = torch.Generator().manual_seed(3)
    columns = torch.arange(d_ff, device=h.device)
    for bit in range(max(1, (d_ff - 1).bit_length())):
        for side in (0, 1):
            moving = columns[(columns >> bit) & 1 == side]
            inputs = {"columns": moving, "pairs": torch.cat([2 * moving, 2 * moving + 1]),
                      "halves": torch.cat([moving, d_ff + moving])}[layout]
            noise = torch.randn(_ROWS, width, generator=generator, dtype=torch.float64).to(h.device)
            shifted = h.clone()
            shifted[:, inputs] += noise[:, inputs]
            still = columns[(columns >> bit) & 1 != side]
            if not torch.equal(chain(shifted)[:, still], base[:, still]):
                return False
    half = (0, max(1, d_ff // 2))  # a block computes alone: what one rank runs
    try:
        alone = chain(h[:, chain_input_columns(layout, half, d_ff).to(h.device)])
    except Exception:  # noqa: BLE001 - code fixed to the full width (a view with sizes, say)
        return False
    return isinstance(alone, torch.Tensor) and torch.allclose(alone, base[:, slice(*half)], rtol=1e-12, atol=0)


def _mismatch(got, want: torch.Tensor) -> str | None:
    if not isinstance(got, torch.Tensor) or got.numel() != want.numel():
        return f"output of shape {getattr(got, 'shape', type(got).__name__)}, expected {tuple(want.shape)}"
    got = got.reshape(want.shape).double()
    scale = want.abs().max().item() if want.numel() else 0.0
    error = (got - want).abs().max().item() if want.numel() else 0.0
    if not error <= TOLERANCE * (1 + scale):  # also catches NaN
        return f"max error {error:.3g} at output scale {scale:.3g}"
    return None


def _double(value):
    return value.detach().to(torch.float64) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
