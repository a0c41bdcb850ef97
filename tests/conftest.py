"""Shared test setup: Hypothesis profiles, a clean Dynamo cache per test, isolated caches, rank pools."""

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
    "ci", max_examples=25, deadline=None, derandomize=False, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=100, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache hits or recompile limits from the tests run before it."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    yield
    torch._dynamo.reset()


def _pool(world_size: int):
    from rank_pool import RankPool

    pool = RankPool(world_size=world_size)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def world_2():
    """2 gloo ranks, one pool per test module: starting ranks costs seconds."""
    yield from _pool(2)


@pytest.fixture(scope="module")
def world_4():
    """4 gloo ranks, one pool per test module."""
    yield from _pool(4)


@pytest.fixture(scope="module")
def world_8():
    """8 gloo ranks, one pool per test module (on 2 cores: few, small examples)."""
    yield from _pool(8)
