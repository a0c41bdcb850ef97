"""Helpers shared by the tests."""

import torch

# Output tolerance per dtype: max |compiled - eager| <= TOL * (1 + max |eager|).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 4e-2}


def assert_close_to_eager(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all() == torch.isfinite(ref).all()
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    limit = TOL[ref.dtype] * (1 + ref.double().abs().max().item() if ref.numel() else 1)
    assert err <= limit, f"max error {err:.3g} > {limit:.3g} ({ref.dtype})"


def grouping_by_definition(ids_S: torch.Tensor, weight_S: torch.Tensor, num_experts: int, top_k: int):
    """moeshard::group_by_expert's five outputs from their definitions: a stable sort, a floor
    division, a gather, bincount and its cumsum."""
    order_S = torch.sort(ids_S, stable=True).indices
    counts_E = torch.bincount(ids_S, minlength=num_experts)
    return order_S, order_S // top_k, weight_S[order_S], counts_E, counts_E.cumsum(0)
