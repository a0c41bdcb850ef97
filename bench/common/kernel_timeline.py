"""How much of a rank's communication ran under its computation, read off the GPU's kernel timeline.

A torch.profiler trace of some calls gives every kernel's [start, end) on this GPU. NCCL's kernels
are the communication, every other kernel the computation. Per call:
    comm_ms        time during which some NCCL kernel ran (the union of their intervals)
    compute_ms     the same for the other kernels
    overlapped_ms  time during which both ran: communication hidden behind computation
An NCCL kernel also runs while it waits for a slower rank, so comm_ms is an upper bound on the
transfer time; overlapped_ms / comm_ms is then a lower bound on the fraction hidden.
"""

from __future__ import annotations

import json
import os
import tempfile

Interval = tuple[float, float]


def merged(intervals: list[Interval]) -> list[Interval]:
    """The union of intervals as sorted, disjoint intervals."""
    out: list[Interval] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def total(intervals: list[Interval]) -> float:
    return sum(end - start for start, end in intervals)


def intersection(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """The intersection of two unions given as sorted, disjoint intervals."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def overlap_summary(kernels: list[tuple[str, float, float]], calls: int) -> dict[str, float]:
    """comm_ms, compute_ms, overlapped_ms per call from (name, start_us, end_us) kernels."""
    comm = merged([(s, e) for name, s, e in kernels if "nccl" in name.lower()])
    compute = merged([(s, e) for name, s, e in kernels if "nccl" not in name.lower()])
    per_call_ms = 1e-3 / calls
    return {"comm_ms": total(comm) * per_call_ms, "compute_ms": total(compute) * per_call_ms,
            "overlapped_ms": total(intersection(comm, compute)) * per_call_ms}


def profiled_kernels(fn, calls: int) -> list[tuple[str, float, float]]:
    """(name, start_us, end_us) of every GPU kernel that `calls` calls of fn() ran."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as trace:
            events = json.load(trace)["traceEvents"]
    finally:
        os.remove(path)
    return [(e["name"], e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "kernel" and "dur" in e]
