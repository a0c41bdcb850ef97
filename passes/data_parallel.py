"""The data-parallel exchange: every rank's routed rows through this rank's FFN block of every
expert, the partial outputs summed over ranks, each rank's own rows back to it.

Two schedules (ShardPlan.overlap), the same sums::

    "none":        counts_NE = all_gather(counts_E);  gathered_RD = all_gather(x_SD)     # R = N*S rows
                   rank_major_RD = the FFN block over the R rows, regrouped by expert
                   y_SD = reduce_scatter(rank_major_RD, "sum")
                   (comm_chunks C: the same per chunk of the sorted rows, every all-gather issued first)

    "source_rank": step j = 1 .. N-1 sends x_SD to rank r+j and receives rank r-j's rows, all
                   issued first; this rank's own rows compute while they travel
                   y_SD = block(x_SD)
                   for j: part_SD = block(rows of rank r-j);  send part_SD back to rank r-j
                   y_SD += the partial sums of this rank's rows that rank r+j sends back

Every rank's rows arrive sorted by expert, so their experts follow from the gathered counts.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .collectives import c10d, start, wait
from .emit import Emitter
from .expert_groups import expert_group_exchange
from .graph_utils import fake, static_int
from .op_contract import sort_key_dtype
from .shard import ShardPlan


def data_parallel_experts(emit: Emitter, plan: ShardPlan, experts, tokens_TD, x_SD, token_S, counts_E,
                          num_experts: int, top_k: int, ids_S, order_S, weight_sorted_S) -> fx.Node:
    """This rank's T x D output: its S sorted rows x_SD through every rank's FFN block, then
    b_out, the routing weights and the sum of the K slots. `experts` emits the FFN block
    (passes/lower.py's _ExpertFFN)."""
    rows = _static_rows(tokens_TD, top_k)
    in_chunks = plan.overlap == "none" and plan.sharded_everywhere
    sizes = _chunk_sizes(rows, plan.comm_chunks if in_chunks else 1)
    has_b_out = "b_out_ED" in experts.w
    needs_ids = len(sizes) > 1 or has_b_out
    ids_sorted_S = emit.fn(operator.getitem, ids_S, order_S, name="ids_sorted_S") if needs_ids else None
    if not plan.sharded_everywhere:
        y_SD = expert_group_exchange(emit, plan, experts, x_SD, counts_E, num_experts, rows)
    elif plan.overlap == "source_rank":
        y_SD = _by_source_rank(emit, plan, experts, x_SD, counts_E, num_experts, rows)
    else:
        y_SD = _gathered(emit, plan, experts, x_SD, counts_E, num_experts, sizes, ids_S, ids_sorted_S)
    if has_b_out:  # once, after the sum
        b_out_SD = emit.fn(torch.index_select, experts.w["b_out_ED"], 0, ids_sorted_S, name="b_out_SD")
        y_SD = emit.fn(operator.add, y_SD, b_out_SD, name="y_SD_biased")

    # combine: scale by routing weight, back to token order, sum the K slots
    weight_S1 = emit.method("unsqueeze", weight_sorted_S, -1, name="weight_S1")
    scaled_SD = emit.fn(operator.mul, y_SD, weight_S1, name="scaled_SD")
    # A dropped slot (weight 0) must add exactly 0 even where its expert output is inf/nan.
    scaled_SD = emit.fn(torch.where, emit.fn(operator.ne, weight_S1, 0, name="routed_S1"), scaled_SD, 0.0, name="kept_SD")
    zeros_TD = emit.method("new_zeros", scaled_SD, emit.method("size", tokens_TD, name="size"), name="acc_TD")
    return emit.fn(torch.index_add, zeros_TD, 0, token_S, scaled_SD, name="sum_TD")


def _gathered(emit: Emitter, plan: ShardPlan, experts, x_SD, counts_E, E: int, sizes: list[int | None], ids_S,
              ids_sorted_S) -> fx.Node:
    """All-gather the rows, compute them all, reduce-scatter the partial sums: per chunk of the
    sorted rows, every chunk's all-gather issued first, so chunk c + 1 travels while chunk c
    computes and its reduce-scatter while c + 1 does."""
    N = plan.world_size
    if len(sizes) == 1:
        x_chunks, counts_CE = [x_SD], emit.method("view", counts_E, 1, E, name="counts_CE")
    else:
        x_chunks = _split(emit, x_SD, sizes, "x_SD")
        counts = [emit.fn(torch.scatter_add, emit.method("new_zeros", ids_S, E, name=f"zeros_E{c}"), 0, ids_c,
                          emit.fn(torch.ones_like, ids_c, name=f"ones_S{c}"), name=f"counts_E{c}")
                  for c, ids_c in enumerate(_split(emit, ids_sorted_S, sizes, "ids_sorted_S"))]
        counts_CE = emit.fn(torch.stack, counts, name="counts_CE")
    # every collective that needs no computation first: one for all counts, one per chunk of rows
    counts_start = start(emit, c10d.all_gather_into_tensor.default, counts_CE, N, plan.group_name, name="counts_NxCE")
    tags = [str(c) for c in range(len(sizes))] if len(sizes) > 1 else [""]  # node names: plain without chunks
    gathers = [start(emit, c10d.all_gather_into_tensor.default, x_c, N, plan.group_name, name=f"gathered_RD{tag}")
               for x_c, tag in zip(x_chunks, tags)]
    counts_NCE = emit.method("view", wait(emit, counts_start, name="counts_NxCE"), N, len(sizes), E, name="counts_NCE")
    scatters = []
    for c, (x_c, gather, tag) in enumerate(zip(x_chunks, gathers, tags)):
        counts_NE = emit.fn(operator.getitem, counts_NCE, (slice(None), c), name=f"counts_NE{tag}")
        rank_major_RD = _chunk_experts(emit, experts, x_c, wait(emit, gather, name=f"gathered_RD{tag}"), counts_NE,
                                       N, E, suffix=tag)
        scatters.append(start(emit, c10d.reduce_scatter_tensor.default, rank_major_RD, "sum", N, plan.group_name,
                              name=f"y_SD{tag}"))
    y_chunks = [wait(emit, scatter, name=f"y_SD{tag}") for scatter, tag in zip(scatters, tags)]
    return y_chunks[0] if len(y_chunks) == 1 else emit.fn(torch.cat, y_chunks, name="y_SD")


def _chunk_experts(emit: Emitter, experts, x_SD, gathered_RD, counts_NE, N: int, E: int, suffix: str) -> fx.Node:
    """One chunk's gathered rows (rank-major, each rank's rows sorted by expert) through this
    rank's FFN block: regrouped by expert for the kernels, written back in rank-major order."""
    ends_NE = emit.method("cumsum", counts_NE, 1, name=f"ends_NE{suffix}")
    row_S = _arange_rows(emit, x_SD, suffix)
    row_NS = emit.method("repeat", row_S, N, 1, name=f"row_NS{suffix}")
    ids_NS = emit.fn(torch.searchsorted, ends_NE, row_NS, right=True, name=f"ids_NS{suffix}")
    ids_rank_major_R = emit.method("reshape", ids_NS, -1, name=f"ids_rank_major_R{suffix}")
    keys_R = emit.method("to", ids_rank_major_R, sort_key_dtype(E), name=f"keys_R{suffix}")
    sort = emit.fn(torch.sort, keys_R, stable=True, name=f"sort_R{suffix}")
    perm_R = emit.fn(operator.getitem, sort, 1, name=f"perm_R{suffix}")
    offs_E = emit.method("cumsum", emit.method("sum", counts_NE, 0, name=f"counts_E_all{suffix}"), 0,
                         name=f"offs_E{suffix}")
    h_RF = experts.ffn_in(gathered_RD, perm_R, offs_E, name=f"h_RF{suffix}")
    return experts.ffn_out(h_RF, offs_E, None, perm_R, None, name=f"rank_major_RD{suffix}")


def _by_source_rank(emit: Emitter, plan: ShardPlan, experts, x_SD, counts_E, E: int, rows: int | None) -> fx.Node:
    """The pairwise schedule: each other rank's rows computed as they arrive, their partial sums
    sent back while the next rank's rows compute; this rank's own rows first, under the traffic.

    Step j = 1 .. N-1 is one all_to_all_single with a single peer each way (rank r sends to
    r + j and receives from r - j), so every rank issues the same collectives in the same order.
    Each step's rows are already sorted by expert: no regrouping, only their own offsets."""
    N, r, group = plan.world_size, plan.rank, plan.group_name
    rows = rows if rows is not None else emit.method("size", x_SD, 0, name="split_rows")
    counts_start = start(emit, c10d.all_gather_into_tensor.default, emit.method("view", counts_E, 1, E, name="counts_1E"),
                         N, group, name="counts_NxE")
    steps = [((r + j) % N, (r - j) % N) for j in range(1, N)]  # (to, from)
    arrivals = [start(emit, c10d.all_to_all_single.default, x_SD, _one_peer(N, src, rows), _one_peer(N, dst, rows),
                      group, name=f"rows_from{src}_SD") for dst, src in steps]
    row_S = _arange_rows(emit, x_SD, "")

    def block(x_from_SD, counts_from_E, tag: str) -> fx.Node:
        offs_E = emit.method("cumsum", counts_from_E, 0, name=f"offs_E{tag}")
        h_SF = experts.ffn_in(x_from_SD, row_S, offs_E, name=f"h_SF{tag}")
        return experts.ffn_out(h_SF, offs_E, None, row_S, None, name=f"part_SD{tag}")

    y_SD = block(x_SD, counts_E, "")
    counts_NE = emit.method("view", wait(emit, counts_start, name="counts_NxE"), N, E, name="counts_NE")
    returns = []
    for (dst, src), arrival in zip(steps, arrivals):
        counts_src_E = emit.fn(operator.getitem, counts_NE, src, name=f"counts_E_from{src}")
        part_SD = block(wait(emit, arrival, name=f"rows_from{src}_SD"), counts_src_E, f"_for{src}")
        returns.append(start(emit, c10d.all_to_all_single.default, part_SD, _one_peer(N, dst, rows),
                             _one_peer(N, src, rows), group, name=f"part_from{dst}_SD"))
    for (dst, _), back in zip(steps, returns):
        y_SD = emit.fn(operator.add, y_SD, wait(emit, back, name=f"part_from{dst}_SD"), name=f"y_SD_with{dst}")
    return y_SD


def _one_peer(world_size: int, peer: int, rows) -> list:
    """all_to_all_single's split sizes for rows that go to (or come from) one rank only."""
    return [rows if p == peer else 0 for p in range(world_size)]


def _arange_rows(emit: Emitter, x_SD, suffix: str) -> fx.Node:
    rows = emit.method("size", x_SD, 0, name=f"rows{suffix}")
    return emit.fn(torch.arange, rows, device=emit.fn(getattr, x_SD, "device", name=f"device{suffix}"),
                   name=f"row_S{suffix}")


def _static_rows(tokens_TD: fx.Node, top_k: int) -> int | None:
    """S = T * K when T is static, else None."""
    tokens = fake(tokens_TD)
    length = None if tokens is None else static_int(tokens.shape[0])
    return None if length is None else length * top_k


def _chunk_sizes(rows: int | None, chunks: int) -> list[int | None]:
    """Row counts of the chunks of the S rows (as even as possible, none empty unless S is 0);
    one chunk when S is symbolic."""
    if chunks == 1 or rows is None:
        return [rows]
    base, extra = divmod(rows, chunks)
    return [base + (c < extra) for c in range(min(chunks, rows) or 1)]


def _split(emit: Emitter, t, sizes: list[int], name: str) -> list[fx.Node]:
    pieces = emit.fn(torch.split, t, sizes, name=f"{name}_split")
    return [emit.fn(operator.getitem, pieces, c, name=f"{name}{c}") for c in range(len(sizes))]
