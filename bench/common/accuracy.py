"""How far a benchmarked output is from its reference, one number per check."""

from __future__ import annotations

import torch


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64 so the metric adds no rounding of its own."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
