"""Which way each region's experts run on this GPU: the fused Triton kernels or torch._grouped_mm.

Neither wins everywhere (docs/performance.md, "Which expert kernel runs"): CUTLASS's grouped GEMM
is faster on large experts, the fused kernels where the gather and scatter they fold in weigh
more. So for every shape class (GPU, torch version, dtype, E, D, F, rows rounded up to a power
of two, gating, biases, activation, weights row- or column-major) both run once on random
tokens of the region's shapes, each as a CUDA-graph replay (the device's time, not the host's
launches), and the faster is kept in a JSON file, as Inductor keeps its autotuning:
$MOESHARD_CACHE_DIR/expert_kernels.json, by default under Inductor's cache directory. The key
is read off meta stand-ins of the weights, so a cached class copies no weights. Regions the
grouped_mm path cannot take (not bf16, several ranks, before SM90, off CUDA) run fused, and the
report says why.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx

from moeshard_compile.passes.graph_utils import fake
from moeshard_compile.passes.grouped_mm_experts import (
    grouped_mm_ffn_in, grouped_mm_ffn_out, grouped_mm_unsupported,
)
from moeshard_compile.passes.region import ExpertWeights, MoERegion, Status

log = logging.getLogger(__name__)

_FILE = "expert_kernels.json"
_WARMUP, _REPEATS = 3, 10
_LOCK = threading.Lock()


@dataclass(frozen=True)
class KernelChoice:
    """The kernel a region runs, how it was chosen (measured, cached, forced or the only one
    possible) and the alternatives' times in ms, or why the other cannot run."""

    kernel: str
    how: str
    times_ms: dict[str, float] = field(default_factory=dict)
    why_not: str = ""

    def text(self) -> str:
        if self.times_ms:
            times = ", ".join(f"{name} {ms:.3g} ms" for name, ms in sorted(self.times_ms.items(), key=lambda kv: kv[1]))
            return f"{self.kernel} ({self.how}: {times})"
        return f"{self.kernel} ({self.why_not or self.how})"

    def to_dict(self) -> dict:
        return {"kernel": self.kernel, "how": self.how, "times_ms": self.times_ms, "why_not": self.why_not}


def choose_kernels(regions: list[MoERegion], values: dict[fx.Node, torch.Tensor], one_rank: bool,
                   option: str) -> dict[MoERegion, KernelChoice]:
    """The kernel of every recognised region, as `option` ("auto", "fused", "grouped_mm") asks."""
    return {region: _choose(region, values, one_rank, option)
            for region in regions if region.status is Status.RECOGNISED}


def _choose(region: MoERegion, values: dict[fx.Node, torch.Tensor], one_rank: bool, option: str) -> KernelChoice:
    if option == "fused":
        return KernelChoice("fused", "forced")
    inputs = [values[n] for n in region.weights.inputs]
    layout = region.weights.stack_on_meta(inputs)
    if option == "grouped_mm":
        why_not = _grouped_mm_impossible(layout, inputs[0].device, one_rank, measuring=False)
        return KernelChoice("fused", "only possible", why_not=why_not) if why_not else KernelChoice("grouped_mm", "forced")
    activation = "identity" if region.activation == "graph" else region.activation
    return auto_choice(layout, lambda: region.weights.stack(inputs), inputs[0].device, region.num_experts,
                       region.top_k, _rows(region), activation, one_rank)


def auto_choice(layout: ExpertWeights, stack: Callable[[], ExpertWeights], device: torch.device, num_experts: int,
                top_k: int, rows: int, activation: str, one_rank: bool = True) -> KernelChoice:
    """What expert_kernel="auto" runs for experts of this layout (`stack` gives the real weights,
    called only to time them): the cached or measured faster path, or fused where grouped_mm
    cannot be timed."""
    why_not = _grouped_mm_impossible(layout, device, one_rank, measuring=True)
    if why_not:
        return KernelChoice("fused", "only possible", why_not=why_not)
    key = _shape_class(layout, device, num_experts, rows, activation)
    cached = _read_cache().get(key)
    if cached is not None:
        return KernelChoice(cached["kernel"], "cached", cached["times_ms"])
    log.info("moeshard: timing the expert kernels of E %d, D %d, F %d (%d rows)", num_experts,
             layout.w_in_EDF.shape[1], layout.w_in_EDF.shape[2], rows)
    try:
        times_ms, failed = time_kernels(stack(), num_experts, top_k, rows, activation)
    except Exception as error:  # e.g. out of memory: timing must not cost the compile
        times_ms, failed = {}, f"timing failed: {type(error).__name__}: {str(error).splitlines()[0]}"
    if failed:
        return KernelChoice("fused", "only possible", why_not=failed)
    kernel = min(times_ms, key=times_ms.get)
    _write_cache(key, {"kernel": kernel, "times_ms": times_ms})
    return KernelChoice(kernel, "measured", times_ms)


def _grouped_mm_impossible(layout: ExpertWeights, device: torch.device, one_rank: bool, measuring: bool) -> str:
    """Why the grouped_mm path cannot run (or, for "auto", be timed on) these experts; "" if it can."""
    if not one_rank:
        return "grouped_mm: one rank only"
    reason = grouped_mm_unsupported(layout.w_in_EDF.dtype, layout.w_in_EDF.shape[1], layout.w_in_EDF.shape[2])
    if reason:
        return reason
    if measuring and device.type != "cuda":
        return "grouped_mm: timed on CUDA only"
    if measuring and torch.cuda.get_device_capability(device) < (9, 0):
        return "grouped_mm: needs SM90"
    return ""


def _rows(region: MoERegion) -> int:
    """T * K rows of the region (the size hint where T is symbolic)."""
    tokens = fake(region.tokens_TD).shape[0]
    if isinstance(tokens, torch.SymInt):
        tokens = tokens.node.hint or 1
    return max(1, int(tokens)) * region.top_k


def _shape_class(layout: ExpertWeights, device: torch.device, num_experts: int, rows: int, activation: str) -> str:
    biases = [name for name in ("b_in_EF", "b_gate_EF", "b_out_ED") if getattr(layout, name) is not None]
    _, D, F = layout.w_in_EDF.shape
    return json.dumps({
        "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "dtype": str(layout.w_in_EDF.dtype),
        "E": num_experts, "D": D, "F": F, "rows": 1 << max(0, rows - 1).bit_length(),
        "gated": layout.w_gate_EDF is not None, "biases": biases, "activation": activation,
        "layouts": ["row" if t.stride(-1) == 1 else "column" for t in (layout.w_in_EDF, layout.w_out_EFD)],
        "timed": "graph replay",
    }, sort_keys=True)


def time_kernels(weights: ExpertWeights, num_experts: int, top_k: int, rows: int,
                 activation: str) -> tuple[dict[str, float], str]:
    """Median ms of both paths on `rows` random (token, slot) rows routed uniformly, through
    these weights; or why grouped_mm failed to run."""
    device, dtype = weights.w_in_EDF.device, weights.w_in_EDF.dtype
    E, K = num_experts, top_k
    T = max(1, rows // K)
    x_TD = torch.randn(T, weights.w_in_EDF.shape[1], device=device, dtype=dtype)
    ids_S = torch.randint(E, (T * K,), device=device)
    weight_S = torch.rand(T * K, device=device, dtype=dtype)
    order_S, token_S, weight_sorted_S, _, offs_E = torch.ops.moeshard.group_by_expert(ids_S, weight_S, E, K)
    expert_S = ids_S[order_S]
    w = weights
    ffn_in = (w.w_in_EDF, w.w_gate_EDF, w.b_in_EF, w.b_gate_EF, activation)

    def fused():
        h_SF = torch.ops.moeshard.gather_grouped_ffn_in(x_TD, token_S, offs_E, *ffn_in)
        return torch.ops.moeshard.grouped_ffn_out_scatter(h_SF, offs_E, w.w_out_EFD, w.b_out_ED, order_S, weight_sorted_S)

    def grouped_mm():
        h_SF = grouped_mm_ffn_in(x_TD, token_S, offs_E, expert_S, *ffn_in)
        return grouped_mm_ffn_out(h_SF, offs_E, expert_S, w.w_out_EFD, w.b_out_ED, order_S, weight_sorted_S)

    try:
        grouped_mm()
    except RuntimeError as error:
        return {}, f"grouped_mm failed: {str(error).splitlines()[0]}"
    return {"fused": _median_ms(fused, device), "grouped_mm": _median_ms(grouped_mm, device)}, ""


def _median_ms(fn, device: torch.device) -> float:
    """Median of a few warm calls: on a GPU, of CUDA-graph replays of one call, timed by CUDA
    events (the device's time: launched one by one, a few rows' kernels would time the host's
    launches instead, which the compiled graph's fused launches or CUDA graphs do not pay);
    the host clock elsewhere."""
    if device.type == "cuda":
        return round(statistics.median(_graph_replay_ms(fn)), 4)
    for _ in range(_WARMUP):
        fn()
    times = []
    for _ in range(_REPEATS):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return round(statistics.median(times), 4)


def _graph_replay_ms(fn) -> list[float]:
    """ms of each of _REPEATS replays of a CUDA graph of one call of `fn` (warmed on a side
    stream first, as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(_WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(_REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def cache_path() -> Path:
    """$MOESHARD_CACHE_DIR/expert_kernels.json, else under Inductor's cache directory."""
    directory = os.environ.get("MOESHARD_CACHE_DIR")
    if not directory:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        directory = os.path.join(cache_dir(), "moeshard")
    return Path(directory) / _FILE


def _read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, entry: dict) -> None:
    """Merge one entry into the file, replaced atomically (other processes may read it)."""
    path = cache_path()
    with _LOCK:
        entries = _read_cache()
        entries[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
            os.replace(partial, path)
        except OSError as error:  # an unwritable cache only costs the next compile a measurement
            log.warning("moeshard: cannot write the expert kernel cache %s: %s", path, error)
