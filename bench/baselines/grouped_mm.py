"""The library grouped matmul the baselines use (dropless expert parallelism, the sorted path).

`moeshard_bench::grouped_mm` multiplies consecutive row groups of x by their expert's matrix:
`torch._grouped_mm` where its constraints hold, a per-group loop elsewhere. A custom op, so
torch.compile keeps the loop's host sync out of the traced graph.
"""

from __future__ import annotations

import torch


def can_use_native_grouped_mm(x_SD: torch.Tensor, w_EDF: torch.Tensor) -> bool:
    """torch._grouped_mm needs CUDA, bf16 and 16-byte aligned strides."""
    if not (x_SD.is_cuda and x_SD.dtype == torch.bfloat16 and w_EDF.dtype == torch.bfloat16):
        return False
    if not hasattr(torch, "_grouped_mm") or torch.cuda.get_device_capability(x_SD.device)[0] < 9:
        return False
    return x_SD.shape[1] % 8 == 0 and w_EDF.shape[2] % 8 == 0


@torch.library.custom_op("moeshard_bench::grouped_mm", mutates_args=())
def grouped_mm(x_SD: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """y[rows of group e] = x[rows of group e] @ w[e]; group e is rows offs[e-1]:offs[e]."""
    if can_use_native_grouped_mm(x_SD, w_EDF):
        return torch._grouped_mm(x_SD, w_EDF, offs=offs_E.to(torch.int32))
    y_SF = x_SD.new_zeros(x_SD.shape[0], w_EDF.shape[2])
    start = 0
    for expert, end in enumerate(offs_E.tolist()):
        if end > start:
            torch.mm(x_SD[start:end], w_EDF[expert], out=y_SF[start:end])
        start = end
    return y_SF


@grouped_mm.register_fake
def _(x_SD: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    torch._check(x_SD.shape[1] == w_EDF.shape[1], lambda: "grouped_mm: x and w disagree on D")
    return x_SD.new_empty(x_SD.shape[0], w_EDF.shape[2])
