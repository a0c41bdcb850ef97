"""The one lowering: a MoERegion record -> a grouped expert computation in the graph.

Before (any recognised form, e.g. a per-expert loop)::

    for e in range(E): out.index_add_(0, tok_e, expert_e(x[tok_e]) * w[tok_e, slot_e, None])

After, on one rank::

    order_S, token_S, weight_sorted_S, counts_E, offs_E = group_by_expert(ids_TK.reshape(-1), weights)
                          # the (token, slot) rows stably by expert, their tokens (order_S // K),
                          # weights, counts per expert and the counts' cumsum
    h_SF = gather_grouped_ffn_in(x_TD, token_S, offs_E, ...)  # x[token_S] @ w_in[e], activation (and gate)
    y_SD = grouped_ffn_out_scatter(h_SF, offs_E, w_out, b_out, dest=order_S, scale=weight_sorted_S)
    out_TD = y_SD.unflatten(0, (T, K)).sum(1)                  # rows were stored at their (token, slot) place

The three ops (named in op_contract.py, registered by moeshard_compile/kernels) run Triton kernels on CUDA and a torch reference
elsewhere; a zero-weight slot contributes exactly 0 even where its expert output is inf/nan. With
kernel="grouped_mm" the two expert ops are grouped_mm_experts.py's torch._grouped_mm equivalents.

Sharded over N ranks (MoEShard; each rank holds FFN block F_r of every expert)::

    data_parallel: counts_NE = all_gather(counts_E);  gathered_RD = all_gather(x[token_S])   # R = N*S rows
                   perm_R = the gathered rows regrouped by expert (their experts follow from counts_NE)
                   rank_major_RD = the two ops on block F_r, reading rows perm_R, writing them back to perm_R
                   y_SD = reduce_scatter(rank_major_RD, "sum");  + b_out;  scale and index_add by token
                   (comm_chunks C: the same per chunk of the sorted rows, every all-gather issued first;
                   overlap="source_rank" and expert groups: passes/data_parallel.py, expert_groups.py)
    replicated:    out_TD = all_reduce(the one-rank computation on block F_r), b_out on rank 0

Every recogniser feeds this function, so sharding and faster kernels need no recogniser changed.
"""

from __future__ import annotations

import operator
from dataclasses import replace

import torch
import torch.fx as fx

from .graph_utils import fake
from .op_contract import FFN_IN, FFN_OUT, GROUP_BY_EXPERT, op
from .emit import Emitter, first_user
from .grouped_mm_experts import grouped_mm_ffn_in, grouped_mm_ffn_out
from .region import MoERegion, Routing, WeightSource
from .shard import ShardPlan, sharded
from .collectives import c10d, collective
from .data_parallel import data_parallel_experts


def lower_region(gm: fx.GraphModule, region: MoERegion, index: int, plan: ShardPlan | None = None,
                 kernel: str = "fused") -> WeightSource:
    """Replace `region.output_TD` by the grouped computation and erase the old region.

    kernel: how the experts run on one rank: "fused" (the moeshard:: ops) or "grouped_mm"
    (torch._grouped_mm with the gather and scatter around it, grouped_mm_experts.py).
    With a ShardPlan this rank computes its FFN block of every expert, or of its group's
    experts (passes/shard.py), and the collectives of `plan.input_mode` join the partial
    results. The stacked weights are new graph inputs, after the graph's own: returns the
    source they are stacked from.
    """
    graph = gm.graph
    routing, E = region.routing, region.num_experts
    out_dtype = region.output_TD.meta["example_value"].dtype
    emit = Emitter(graph, f"moe{index}_")
    weights = region.weights
    if plan is not None:
        held = None if plan.sharded_everywhere else plan.expert_block(E)  # expert groups: this group's experts
        weights = sharded(weights, plan.ffn_block(region.d_ff), region.chain_layout, held)
    data_parallel = plan is not None and plan.input_mode == "data_parallel"
    with graph.inserting_before(first_user(region)):
        w = _add_weight_inputs(graph, f"moe{index}_", weights)
        K = region.top_k
        if routing.ids_TK is None:
            routing = _topk_from_combine(emit, routing, E, K, region.module)

        # dispatch: group this rank's T*K (token, slot) rows by expert
        ids_S = emit.method("reshape", routing.ids_TK, -1, name="ids_S")
        weight_S = emit.method("reshape", routing.weights_TK, -1, name="weight_S")
        group = emit.fn(op(GROUP_BY_EXPERT), ids_S, weight_S, E, K, name="group")
        order_S, token_S, weight_sorted_S, counts_E, offs_E = (
            emit.fn(operator.getitem, group, i, name=name)
            for i, name in enumerate(("order_S", "token_S", "weight_sorted_S", "counts_E", "offs_E")))
        if kernel == "grouped_mm" and plan is not None:
            raise ValueError("the grouped_mm expert kernel runs on one rank only")
        expert_S = None  # the expert of each sorted row: grouped_mm adds biases by it
        if kernel == "grouped_mm" and {"b_in_EF", "b_gate_EF", "b_out_ED"} & w.keys():
            expert_S = emit.fn(operator.getitem, ids_S, order_S, name="expert_S")
        experts = _ExpertFFN(emit, w, region.activation, region.expert_chain, kernel, expert_S)
        rows_XD, row_S = region.tokens_TD, token_S  # what the first matmul gathers its rows from
        if routing.input_scale_TE is not None:  # the router scales each expert's input: one row per (token, slot)
            scale_TK = emit.fn(torch.gather, routing.input_scale_TE, 1, routing.ids_TK, name="input_scale_TK")
            repeated_SD = emit.method("repeat_interleave", region.tokens_TD, K, 0, name="tokens_SD")
            scaled_SD = emit.fn(operator.mul, repeated_SD, emit.method("reshape", scale_TK, -1, 1, name="input_scale_S1"),
                                name="scaled_tokens_SD")
            rows_XD, row_S = emit.method("to", scaled_SD, fake(region.tokens_TD).dtype, name="rows_SD"), order_S

        if data_parallel:
            x_SD = emit.fn(torch.index_select, rows_XD, 0, row_S, name="x_SD")
            acc_TD = data_parallel_experts(emit, plan, experts, region.tokens_TD, x_SD, token_S, counts_E, E, K,
                                           ids_S, order_S, weight_sorted_S)
        else:
            # one kernel gathers the tokens into the first matmul; one scales and puts every row
            # back at its (token, slot) place; summing the K slots is a reduction Inductor fuses
            h_SF = experts.ffn_in(rows_XD, row_S, offs_E)
            b_out = w.get("b_out_ED") if plan is None or plan.rank == 0 else None  # b_out is added exactly once
            y_SD = experts.ffn_out(h_SF, offs_E, b_out, order_S, weight_sorted_S, name="y_SD")
            y_TKD = emit.method("unflatten", y_SD, 0, (-1, K), name="y_TKD")
            acc_TD = emit.method("sum", y_TKD, 1, name="sum_TD")
            if plan is not None:  # replicated: every rank holds partial sums of the same tokens
                acc_TD = collective(emit, c10d.all_reduce.default, acc_TD, "sum", plan.group_name, name="all_reduce_TD")
        if routing.base_TD is not None:  # the combine's own term without experts (a clone it writes into)
            base_TD = emit.method("reshape", routing.base_TD, emit.method("size", acc_TD, name="acc_size"), name="base_TD")
            acc_TD = emit.fn(operator.add, acc_TD, base_TD, name="with_base_TD")
        out_TD = emit.method("to", acc_TD, out_dtype, name="out_TD")

    _replace_uses_after(region, out_TD)
    for node in reversed(region.erase):
        if not node.users:
            graph.erase_node(node)
    return weights


class _ExpertFFN:
    """Emits the expert computation in two steps with one region's weights: the fused ops
    (moeshard_compile/kernels) or their grouped_mm equivalents."""

    def __init__(self, emit: Emitter, w: dict[str, fx.Node], activation: str,
                 chain: tuple[fx.Node, fx.Node] | None = None, kernel: str = "fused",
                 expert_R: fx.Node | None = None):
        self.emit, self.w, self.activation, self.chain = emit, w, activation, chain
        self.grouped_mm, self.expert_R = kernel == "grouped_mm", expert_R

    def ffn_in(self, x_XD, rows_R, offs_E, *, name: str = "h_RF") -> fx.Node:
        """h_RF = act(x[rows] @ w_gate + b_gate) * (x[rows] @ w_in + b_in), or act(x[rows] @ w_in + b_in);
        for activation "graph", the model's own elementwise code on x[rows] @ w_in + b_in."""
        w = self.w
        activation = "identity" if self.chain is not None else self.activation
        weights = (w["w_in_EDF"], w.get("w_gate_EDF"), w.get("b_in_EF"), w.get("b_gate_EF"), activation)
        if self.grouped_mm:
            h_RF = self.emit.fn(grouped_mm_ffn_in, x_XD, rows_R, offs_E, self.expert_R, *weights, name=name)
        else:
            h_RF = self.emit.fn(op(FFN_IN), x_XD, rows_R, offs_E, *weights, name=name)
        return h_RF if self.chain is None else copy_chain(self.emit.graph, self.chain, h_RF)

    def ffn_out(self, h_RF, offs_E, b_out, dest_R, scale_R, *, name: str) -> fx.Node:
        """y[dest[r]] = scale[r] * (h[r] @ w_out + b_out) (exactly 0 where scale is 0)."""
        if self.grouped_mm:
            return self.emit.fn(grouped_mm_ffn_out, h_RF, offs_E, self.expert_R, self.w["w_out_EFD"], b_out,
                                dest_R, scale_R, name=name)
        return self.emit.fn(op(FFN_OUT), h_RF, offs_E, self.w["w_out_EFD"], b_out, dest_R, scale_R, name=name)


def _topk_from_combine(emit: Emitter, routing: Routing, num_experts: int, K: int, module: str) -> Routing:
    """Dense [T, E] combine weights -> the K non-zero (expert, weight) pairs of each row.

    K bounds the non-zero, non-NaN entries of a row (passes.nnz); a NaN can stand anywhere, as
    0 * NaN does in the model's own combine. A NaN weight makes the token's output NaN in every
    element, as in the model, so NaN entries are taken first: every other token stays exact."""
    combine_TE = routing.combine_TE
    routed_TE = emit.fn(operator.ne, combine_TE, 0, name="routed_TE")
    nan_TE = emit.fn(torch.isnan, combine_TE, name="nan_TE")
    if K < num_experts:
        # K was proven from the routing code; check it anyway, without a host sync.
        counted_TE = emit.fn(operator.and_, routed_TE, emit.fn(operator.invert, nan_TE, name="not_nan_TE"),
                             name="counted_TE")
        count_T = emit.method("sum", counted_TE, -1, name="experts_per_token")
        within = emit.method("all", emit.fn(operator.le, count_T, K, name="within_k"), name="all_within_k")
        message = (
            f"moeshard: in {module}, a token has more than top_k={K} non-zero, non-NaN routing weights: the "
            "bound proven from the routing code is wrong (a moeshard bug: please report it with the model; "
            "NaN weights from non-finite inputs are allowed and give NaN outputs, as in eager)"
        )
        emit.fn(torch._assert_async, within, message, name="check_k")
    priority_TE = emit.fn(operator.add, emit.method("to", routed_TE, torch.float32, name="routed_f"),
                          emit.method("to", nan_TE, torch.float32, name="nan_f"), name="priority_TE")
    topk = emit.fn(torch.topk, priority_TE, K, dim=-1, name="topk")
    ids_TK = emit.fn(operator.getitem, topk, 1, name="ids_TK")
    weights_TK = emit.fn(torch.gather, combine_TE, 1, ids_TK, name="weights_TK")
    return replace(routing, ids_TK=ids_TK, weights_TK=weights_TK, combine_TE=None)


def copy_chain(graph: fx.Graph, chain: tuple[fx.Node, fx.Node], h: fx.Node) -> fx.Node:
    """The model's elementwise code from `chain[0]` to `chain[1]`, copied to read `h` instead."""
    source, sink = chain
    between, stack = set(), [sink]
    while stack:  # the ancestors of the sink down to the source
        node = stack.pop()
        if node is not source and node not in between:
            between.add(node)
            stack.extend(node.all_input_nodes)
    env = {source: h}
    for node in [n for n in graph.nodes if n in between]:  # graph order
        env[node] = graph.node_copy(node, lambda n: env.get(n, n))
    return env[sink]


def _add_weight_inputs(graph: fx.Graph, prefix: str, source: WeightSource) -> dict[str, fx.Node]:
    """One graph input per tensor `source` stacks, after the graph's last input, by ExpertWeights
    field name; which tensors it stacks is read off stacking meta stand-ins of its inputs."""
    names = list(source.stack_on_meta([fake(n) for n in source.inputs]).present())
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    nodes = {}
    with graph.inserting_after(last_input):
        for name in reversed(names):
            nodes[name] = graph.placeholder(f"{prefix}{name}")
    return nodes


def _replace_uses_after(region: MoERegion, new: fx.Node) -> None:
    erase = set(region.erase)
    region.output_TD.replace_all_uses_with(new, delete_user_cb=lambda user: user not in erase and user is not new)
