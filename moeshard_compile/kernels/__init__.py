"""Fused Triton kernels for the expert FFN on expert-grouped rows (see ops.py for the ops).

Importing this package registers torch.ops.moeshard.gather_grouped_ffn_in and
torch.ops.moeshard.grouped_ffn_out_scatter; it imports without triton (reference path only).
"""

from moeshard_compile.kernels import ops  # noqa: F401  (registers the ops)
