"""How far a benchmarked output is from its reference, one number per check."""

from __future__ import annotations

import torch


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64 so the metric adds no rounding of its own."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def token_errors(out: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Every token's relative error against `truth`: |out_t - truth_t| / |truth_t| over its last dim."""
    diff = (out.double() - truth.double()).flatten(0, -2).norm(dim=-1)
    return diff / truth.double().flatten(0, -2).norm(dim=-1).clamp_min(1e-30)


def no_worse_than_eager(out: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor,
                        quantiles: tuple[float, ...] = (0.5, 0.99)) -> tuple[bool, dict[str, tuple[float, float]]]:
    """Whether `out` is, per token, no further from `truth` (the same weights in fp32) than eager
    in the low precision is: at each quantile at most 1.5x eager's error + 1e-3. bf16 rounding
    flips near-tied routing choices differently in any two compilations, so a direct comparison
    with bf16 eager measures those flips, not the compiler. Returns (ok, {q: (out's, eager's)})."""
    ours, eagers = token_errors(out, truth), token_errors(eager, truth)
    errors = {f"q{q}": (torch.quantile(ours, q).item(), torch.quantile(eagers, q).item()) for q in quantiles}
    return all(mine <= 1.5 * theirs + 1e-3 for mine, theirs in errors.values()), errors
