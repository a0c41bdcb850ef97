"""How a benchmark times a call: the median of many, by the device's own clock where it has one."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

MIN_REPEATS = 10  # wall-clock timing: the median of at least this many calls


def median_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float, rep_ms: float) -> float:
    """Median time of fn() in ms: triton's do_bench on CUDA (events, L2 flushed), wall clock elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench  # only the GPU machine has triton

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    estimate_ms = statistics.median(wall_times_ms(fn, 5, device))
    wall_times_ms(fn, max(1, round(warmup_ms / estimate_ms)), device)
    return statistics.median(wall_times_ms(fn, max(MIN_REPEATS, round(rep_ms / estimate_ms)), device))


def wall_times_ms(fn: Callable[[], object], calls: int, device: torch.device) -> list[float]:
    """Wall time of each of `calls` calls in ms, the device synchronised around each (CPU ops are
    synchronous, so there that is their work).

    Callers fix the count up front from an estimate (as do_bench does) rather than looping until
    a time budget runs out: a single stall (GC, Inductor's compile workers starting on a small
    machine) could then use up the budget and become the median.
    """
    times_ms = []
    for _ in range(calls):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times_ms.append((time.perf_counter() - start) * 1e3)
    return times_ms


def cuda_graph_ms(fn: Callable[[], object], rep_ms: float) -> float:
    """Median ms of fn's kernels replayed as a CUDA graph (triton's do_bench_cudagraph: many calls in
    one graph): the GPU's own time, no host launch cost."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def graph_replay_ms(fn: Callable[[], object], rep_ms: float = 60) -> float:
    """Median ms of replays of one CUDA graph of fn's launches (streams fn forks are captured too),
    timed by do_bench (L2 flushed between replays)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, rep=rep_ms, return_mode="median")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
