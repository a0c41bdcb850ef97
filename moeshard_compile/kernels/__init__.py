"""Fused Triton kernels for the expert FFN on expert-grouped rows (see ops.py for the ops).

Importing this package registers torch.ops.moeshard.gather_grouped_ffn_in and
torch.ops.moeshard.grouped_ffn_out_scatter; it imports without triton (reference path only).

Shapes by the project's legend (docs/design.md): X the rows a gather reads from, R expert-grouped
rows, M the rows a matmul computes, D model dim, F ffn dim, E experts.

Two kernels, each one launch for all experts: ffn_in.py (the gather, the first grouped matmul
and the activation) and ffn_out.py (the second grouped matmul, the routing weight and the
scatter), each beside its launcher. What they share: tile_config.py (the block sizes and the
default per dtype and shape), schedule.py (each program's tiles, read off offs_E on the device),
operands.py (the operand loads and the dot), activations.py (the activation codes) and launch.py
(the grid and the choice of loop). group_rows.py groups the rows by expert beforehand.

The launchers call the kernels through `torch.library.wrap_triton`, so under torch.compile
Inductor sees (and schedules) the kernels themselves.
"""

from moeshard_compile.kernels import ops  # noqa: F401  (registers the ops)
