"""Shared test setup: Hypothesis profiles, a clean Dynamo cache per test, isolated caches."""

import os
import sys
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))  # tests/moe_zoo.py and friends

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="moeshard-inductor-"))

# "ci" keeps the whole suite well inside CI's budget (2 cores); "dev" digs deeper.
settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=False, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=100, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache hits or recompile limits from earlier tests."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    yield
    torch._dynamo.reset()


# Output tolerance per dtype: max |compiled - eager| <= TOL * (1 + max |eager|).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 4e-2}


def assert_close_to_eager(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all() == torch.isfinite(ref).all()
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    limit = TOL[ref.dtype] * (1 + ref.double().abs().max().item() if ref.numel() else 1)
    assert err <= limit, f"max error {err:.3g} > {limit:.3g} ({ref.dtype})"
