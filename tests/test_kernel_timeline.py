"""bench/common/kernel_timeline.py: communication hidden under computation, from kernel intervals."""

import random

from bench.common.kernel_timeline import intersection, merged, overlap_summary, total


def test_overlap_of_a_known_timeline():
    # two calls; NCCL 0-10 and 30-40 us, compute 5-20 (two overlapping kernels) and 35-36
    kernels = [("ncclDevKernel_AllGather", 0, 10), ("gemm", 5, 15), ("triton_ffn", 12, 20),
               ("ncclKernel_ReduceScatter", 30, 40), ("triton_sum", 35, 36)]
    summary = overlap_summary(kernels, calls=2)
    assert summary == {"comm_ms": 20e-3 / 2, "compute_ms": 16e-3 / 2, "overlapped_ms": 6e-3 / 2}


def test_intersection_matches_a_sampled_count():
    rng = random.Random(0)
    for _ in range(50):
        a = merged([(s, s + rng.randint(1, 9)) for s in rng.sample(range(100), 12)])
        b = merged([(s, s + rng.randint(1, 9)) for s in rng.sample(range(100), 12)])
        inside = lambda t, spans: any(s <= t < e for s, e in spans)  # noqa: E731
        assert total(intersection(a, b)) == sum(inside(t, a) and inside(t, b) for t in range(120))
        assert total(a) == sum(inside(t, a) for t in range(120))
