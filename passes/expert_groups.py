"""The exchange of an expert-group placement (g < N ranks share an expert; passes/shard.py).

Rank r's S rows are sorted by expert, and every group holds a contiguous block of experts, so
the rows for group q are one contiguous segment of length len_q. Each segment goes to every
one of group q's g ranks, and the partial sums come back the same way::

    counts_NE = all_gather(counts_E)
    send_GD   = x_SD[src_row_G]          # G = g*S rows: segment q once for each rank of group q
    recv_RD   = all_to_all_rows(send_GD, send_N = len_q(p), recv_N = rows of rank p for my experts)
    part_RD   = this rank's FFN block over recv_RD, regrouped by expert (R = N*S bounds the rows)
    back_GD   = all_to_all_rows(part_RD, recv_N, send_N)   # each partial sum back to its source
    y_SD      = index_add(0, src_row_G, back_GD)           # the g partial sums of every row

g = 1 is dropless expert parallelism (one rank a group, whole experts). Unlike MoEShard's
collectives, the split sizes depend on the routing: moeshard::all_to_all_rows reads them on
the host (moeshard_compile/exchange.py).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .collectives import c10d, start, wait
from .emit import Emitter
from .op_contract import ALL_TO_ALL_ROWS, op, sort_key_dtype
from .shard import ShardPlan


def expert_group_exchange(emit: Emitter, plan: ShardPlan, experts, x_SD, counts_E, E: int,
                          rows: int | None) -> fx.Node:
    """y_SD: the sum over the g ranks of this rank's rows' group of their FFN blocks."""
    N, g = plan.world_size, plan.g
    first, last = plan.expert_block(E)
    S = rows if rows is not None else emit.method("size", x_SD, 0, name="exchange_rows")
    G, R = _times(emit, g, S, "G"), _times(emit, N, S, "R")
    device = emit.fn(getattr, x_SD, "device", name="exchange_device")
    gathered = start(emit, c10d.all_gather_into_tensor.default, emit.method("view", counts_E, 1, E, name="counts_1E"),
                     N, plan.group_name, name="counts_NxE")

    # what this rank sends: the segment of each destination's group, in rank order
    len_Q = emit.fn(torch.stack, [emit.method("sum", emit.fn(operator.getitem, counts_E, slice(*plan.expert_block(E, q)),
                                                             name=f"counts_of_group{q}"), name=f"len_of_group{q}")
                                  for q in range(N // g)], name="len_Q")
    start_Q = emit.fn(operator.sub, emit.method("cumsum", len_Q, 0, name="end_Q"), len_Q, name="start_Q")
    send_N = emit.method("repeat_interleave", len_Q, g, name="send_N")
    send_end_N = emit.method("cumsum", send_N, 0, name="send_end_N")
    i_G = emit.fn(torch.arange, G, device=device, name="i_G")
    to_G = emit.fn(torch.searchsorted, send_end_N, i_G, right=True, name="to_G")
    first_G = emit.fn(operator.getitem, emit.fn(operator.sub, send_end_N, send_N, name="send_start_N"), to_G,
                      name="first_G")
    src_row_G = emit.fn(operator.add, emit.fn(operator.getitem, start_Q, emit.fn(operator.floordiv, to_G, g,
                                                                                    name="group_G"), name="seg_G"),
                        emit.fn(operator.sub, i_G, first_G, name="within_G"), name="src_row_G")
    send_GD = emit.fn(operator.getitem, x_SD, src_row_G, name="send_GD")

    # what it receives: every rank's rows for this group's experts, rank-major, each rank's sorted
    counts_NE = emit.method("view", wait(emit, gathered, name="counts_NxE"), N, E, name="counts_NE")
    mine_NE = emit.fn(operator.getitem, counts_NE, (slice(None), slice(first, last)), name="mine_NE")
    recv_N = emit.method("sum", mine_NE, 1, name="recv_N")
    recv_RD = emit.fn(op(ALL_TO_ALL_ROWS), send_GD, send_N, recv_N, R, plan.group_name, name="recv_RD")
    perm_R, offs_E = _regroup(emit, mine_NE, recv_N, R, last - first, N, device)
    h_RF = experts.ffn_in(recv_RD, perm_R, offs_E, name="h_RF")
    part_RD = experts.ffn_out(h_RF, offs_E, None, perm_R, None, name="part_RD")

    back_GD = emit.fn(op(ALL_TO_ALL_ROWS), part_RD, recv_N, send_N, G, plan.group_name, name="back_GD")
    zeros_SD = emit.fn(torch.zeros_like, x_SD, name="zeros_SD")
    return emit.method("index_add", zeros_SD, 0, src_row_G, back_GD, name="y_SD")


def _regroup(emit: Emitter, mine_NE, recv_N, R, El: int, N: int, device) -> tuple[fx.Node, fx.Node]:
    """The received rows (rank-major, each rank's sorted by expert, then padding) stably by local
    expert, padding last: their permutation and the local experts' row offsets."""
    recv_end_N = emit.method("cumsum", recv_N, 0, name="recv_end_N")
    i_R = emit.fn(torch.arange, R, device=device, name="i_R")
    from_R = emit.fn(torch.searchsorted, recv_end_N, i_R, right=True, name="from_R")  # N for padding
    source_R = emit.method("clamp", from_R, max=N - 1, name="source_R")
    recv_start_N = emit.fn(operator.sub, recv_end_N, recv_N, name="recv_start_N")
    within_R = emit.fn(operator.sub, i_R, emit.fn(operator.getitem, recv_start_N, source_R, name="first_R"),
                       name="within_R")
    ends_NE = emit.method("cumsum", mine_NE, 1, name="ends_NE")
    passed_RE = emit.fn(operator.le, emit.fn(operator.getitem, ends_NE, source_R, name="ends_RE"),
                        emit.method("unsqueeze", within_R, 1, name="within_R1"), name="passed_RE")
    expert_R = emit.method("sum", passed_RE, 1, name="expert_R")
    expert_R = emit.fn(torch.where, emit.fn(operator.lt, from_R, N, name="received_R"), expert_R, El,
                       name="expert_or_pad_R")
    sort = emit.fn(torch.sort, emit.method("to", expert_R, sort_key_dtype(El + 1), name="keys_R"), stable=True,
                   name="sort_R")
    perm_R = emit.fn(operator.getitem, sort, 1, name="perm_R")
    offs_E = emit.method("cumsum", emit.method("sum", mine_NE, 0, name="counts_mine_E"), 0, name="offs_mine_E")
    return perm_R, offs_E


def _times(emit: Emitter, factor: int, rows, name: str):
    return factor * rows if isinstance(rows, int) else emit.fn(operator.mul, rows, factor, name=name)
