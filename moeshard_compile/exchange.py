"""moeshard::all_to_all_rows: the variable all-to-all of rows that expert groups need.

    y_YD = moeshard::all_to_all_rows(x_XD, send_counts_N, recv_counts_N, rows_out, group_name)

Rank r sends x's rows in rank order, send_counts_N[p] of them to rank p, and receives
recv_counts_N[p] rows from each rank p, stacked in rank order at the top of a [rows_out, D]
output (rows_out bounds their sum; the rows below are zero). The counts are tensors on the
device; the split sizes of torch.distributed's all_to_all_single must be host integers, so the
op reads them there: one host sync per call, which is why expert groups are a placement for
layers where fewer bytes pay for it (passes/expert_groups.py), and why graphs holding this op
are not captured as CUDA graphs. Opaque to the compiler (a custom_op with a fake of the
output's static shape), so every rank's compiled graph calls it at the same point.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moeshard_compile.passes.op_contract import ALL_TO_ALL_ROWS


@torch.library.custom_op(ALL_TO_ALL_ROWS, mutates_args=())
def all_to_all_rows(x_XD: torch.Tensor, send_counts_N: torch.Tensor, recv_counts_N: torch.Tensor, rows_out: int,
                    group_name: str) -> torch.Tensor:
    send_N, recv_N = torch.stack([send_counts_N.long(), recv_counts_N.long()]).tolist()  # one sync
    if sum(send_N) > x_XD.shape[0] or sum(recv_N) > rows_out:
        raise RuntimeError(f"moeshard::all_to_all_rows: {sum(send_N)} rows to send of {x_XD.shape[0]}, "
                           f"{sum(recv_N)} to receive into {rows_out}: a moeshard bug, please report it")
    y_YD = x_XD.new_zeros(rows_out, *x_XD.shape[1:])
    group = dist.distributed_c10d._resolve_process_group(group_name)
    dist.all_to_all_single(y_YD[:sum(recv_N)], x_XD[:sum(send_N)].contiguous(), recv_N, send_N, group=group)
    return y_YD


@all_to_all_rows.register_fake
def _(x_XD, send_counts_N, recv_counts_N, rows_out, group_name):
    return x_XD.new_empty(rows_out, *x_XD.shape[1:])
