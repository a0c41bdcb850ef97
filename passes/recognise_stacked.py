"""Recognise experts stored as stacked 3-D weights (transformers' Mixtral, Qwen2/3-MoE, OLMoE, ...).

transformers' experts modules share one contract whatever `experts_implementation` runs them
(grouped_mm, batched_mm, or eager, which moeshard's capture shim turns into a static loop):

    experts(hidden_states_TD, top_k_index_TK, top_k_weights_TK) -> out_TD
    params: gate_up_proj [E, 2F, D] (or up_proj [E, F, D]), down_proj [E, D, F],
            optional *_bias, or the transposed layouts [E, D, 2F] / [E, F, D].

So the region is every node traced inside that module; its three tensor inputs are told apart
by dtype and shape, and the activation / gating is identified by evaluating the nodes between
the first and the second projection (passes.elementwise).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .elementwise import GRAPH, Elementwise, identify
from .graph_utils import fake, module_paths, param_name
from .region import ExpertWeights, MoERegion, Routing, WeightSource, gate_up_columns

_UP_NAMES = ("gate_up_proj", "up_proj")


def recognise_stacked(gm: fx.GraphModule) -> list[MoERegion]:
    params = {param_name(n): n for n in gm.graph.nodes if param_name(n)}
    regions = []
    for name, down in params.items():
        if not name.endswith(".down_proj") or fake(down) is None or fake(down).dim() != 3:
            continue
        module = name.rsplit(".", 1)[0]
        up_name = next((f"{module}.{u}" for u in _UP_NAMES if f"{module}.{u}" in params), None)
        if up_name is None or fake(params[up_name]).shape[0] != fake(down).shape[0]:
            continue  # not the contract (LongCat-Flash's routes past the bank): the loop is read by meaning
        if _routed(gm, module):
            regions.append(_recognise_module(gm, module, params, up_name))
    return regions


def _routed(gm: fx.GraphModule, module: str) -> bool:
    """The module reads expert ids (2-D integers) from outside: always-on experts stacked the
    same way (shared experts that run every token) are dense layers, not MoE layers."""
    body = {n for n in gm.graph.nodes if n.op != "placeholder" and module in module_paths(n)}
    return any(fake(a) is not None and not fake(a).is_floating_point() and fake(a).dim() == 2
               for n in body for a in n.all_input_nodes if a not in body and not param_name(a))


def _recognise_module(gm: fx.GraphModule, module: str, params: dict, up_name: str) -> MoERegion:
    up, down = params[up_name], params[f"{module}.down_proj"]
    E = fake(down).shape[0]
    body = [n for n in gm.graph.nodes if n.op != "placeholder" and module in module_paths(n)]
    body_set = set(body)
    inputs = {a for n in body for a in n.all_input_nodes if a not in body_set and fake(a) is not None}
    inputs = [a for a in inputs if not param_name(a)]
    outputs = [n for n in body if any(u not in body_set for u in n.users)]
    region = MoERegion(
        module=module, form=f"stacked/{_implementation(body)}", num_experts=E, top_k=None, d_model=None, d_ff=None,
        activation=None, gated=up_name.endswith("gate_up_proj"), has_bias=f"{module}.down_proj_bias" in params,
        dtype=fake(down).dtype,
    )
    tokens = [a for a in inputs if fake(a).is_floating_point() and fake(a).dim() == 2 and fake(a).shape[-1] in fake(down).shape[1:]]
    ids = [a for a in inputs if not fake(a).is_floating_point() and fake(a).dim() == 2]
    weights = [a for a in inputs if fake(a).is_floating_point() and fake(a).dim() == 2 and a not in tokens]
    if len(tokens) != 1 or len(ids) != 1 or len(weights) != 1 or len(inputs) != 3:
        return region.skip(f"expected inputs (hidden_states, top_k_index, top_k_weights), found {len(inputs)} tensors")
    if len(outputs) != 1:
        return region.skip(f"expected one output tensor, found {len(outputs)}")
    routing = Routing(ids_TK=ids[0], weights_TK=weights[0])  # the module's own inputs: nothing to emit
    region.tokens_TD, region.output_TD, region.route = tokens[0], outputs[0], lambda: routing
    region.top_k = int(fake(ids[0]).shape[1])
    D = region.d_model = fake(tokens[0]).shape[-1]
    region.erase = body

    transposed = _is_transposed(up, D)
    up_EOD = fake(up).transpose(1, 2) if transposed else fake(up)  # [E, out, D]
    region.d_ff = up_EOD.shape[1] // (2 if region.gated else 1)
    extra = sorted(p for p in {module_paths(n)[-1] for n in body if module_paths(n)}
                   if p != module and not (p == f"{module}.act_fn" or p.startswith(f"{module}.act_fn.")))
    if extra:
        return region.skip(f"unsupported submodules inside the experts: {extra}")
    elementwise, chain = _identify_between_projections(body, up, down)
    if elementwise is None:
        return region.skip("could not identify the activation between the two expert projections")
    if elementwise == GRAPH:  # the model's own row-wise code between the projections, copied by the lowering
        region.gated, region.expert_chain = False, chain
        region.d_ff = fake(down).shape[1 if transposed else 2]
    if elementwise.gated != region.gated:
        return region.skip(f"gating in the graph ({elementwise.gated}) disagrees with the weights ({up_name})")
    region.activation = elementwise.activation
    bias = {k: params.get(f"{module}.{k}") for k in (f"{up_name.rsplit('.', 1)[1]}_bias", "down_proj_bias")}
    region.weights = _weight_source(up, down, list(bias.values()), transposed, elementwise, region.d_ff)
    return region


def _implementation(body: list[fx.Node]) -> str:
    targets = {str(n.target) for n in body}
    if any("grouped_mm" in t for t in targets):
        return "grouped_mm"
    if any("bmm" in t for t in targets):
        return "batched_mm"
    return "eager"


def _is_transposed(up: fx.Node, D: int) -> bool:
    """[E, out, D] is transformers' default; [E, D, out] is `is_transposed=True`."""
    _, a, b = fake(up).shape
    if a != b:
        return a == D
    # Square: the default layout is transposed in the graph before use (linear/bmm take [out, in]).
    users = list(up.users)
    while users:
        user = users.pop()
        if user.target in ("transpose", torch.transpose, "t", torch.nn.functional.linear, torch._C._nn.linear):
            return False
        if user.target == torch.bmm and user.args[0] is not up:
            return False
        if user.target == "__getitem__" or getattr(user.target, "__name__", "") == "getitem":
            users.extend(user.users)
    return True


def _identify_between_projections(body: list[fx.Node], up: fx.Node, down: fx.Node):
    """Evaluate the chain from the first projection's output to the second projection's input:
    (what it computes or None, (first projection, second projection's input))."""
    first = _first_consumer_matmul(body, up)
    second = _first_consumer_matmul(body, down)
    if first is None or second is None:
        return None, None
    act_input = next((a for a in second.all_input_nodes if not _derives_from(a, down)), None)
    if act_input is None:
        return None, None
    return identify([first], act_input), (first, act_input)


def _first_consumer_matmul(body: list[fx.Node], weight: fx.Node) -> fx.Node | None:
    for node in body:
        if _is_matmul(node) and any(_derives_from(a, weight) for a in node.all_input_nodes):
            return node
    return None


def _is_matmul(node: fx.Node) -> bool:
    name = str(node.target)
    return any(k in name for k in ("grouped_mm", "bmm", "linear", "matmul")) or node.target == "__matmul__"


def _derives_from(node: fx.Node, source: fx.Node, depth: int = 4) -> bool:
    """True if `node` is `source` seen through a few views / indexing / casts."""
    for _ in range(depth):
        if node is source:
            return True
        if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]
    return node is source


def _weight_source(up, down, biases, transposed: bool, elementwise: Elementwise, F: int) -> WeightSource:
    inputs = [up, down] + [b for b in biases if b is not None]
    has_up_bias, has_down_bias = biases[0] is not None, biases[1] is not None

    def stack(tensors: list[torch.Tensor]) -> ExpertWeights:
        up_p, down_p, *rest = tensors
        up_bias = rest.pop(0) if has_up_bias else None
        down_bias = rest.pop(0) if has_down_bias else None
        up_EDO = up_p if transposed else up_p.transpose(1, 2)  # views: no copy of the user's weights
        down_EFD = down_p if transposed else down_p.transpose(1, 2)
        if not elementwise.gated:
            return ExpertWeights(w_in_EDF=up_EDO, w_out_EFD=down_EFD, b_in_EF=up_bias, b_out_ED=down_bias)
        gate_cols, up_cols = gate_up_columns(elementwise.gate_layout, F)
        return ExpertWeights(
            w_in_EDF=up_EDO[..., up_cols],
            w_gate_EDF=up_EDO[..., gate_cols],
            w_out_EFD=down_EFD,
            b_in_EF=None if up_bias is None else up_bias[..., up_cols],
            b_gate_EF=None if up_bias is None else up_bias[..., gate_cols],
            b_out_ED=down_bias,
        )

    layout = ("stacked", transposed, elementwise, F, has_up_bias, has_down_bias)
    return WeightSource(inputs=inputs, stack=stack, layout=layout)
