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
