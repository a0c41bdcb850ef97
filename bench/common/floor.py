"""The compute floor a time is measured against: FLOPs over the matmul peak (what links cost: links.py)."""

from __future__ import annotations

import argparse

import torch

from bench.common.cli import DTYPES
from bench.common.timing import median_ms

DEFAULT_PEAK_TFLOPS = 750.0  # H100 bf16 dense matmul, measured
DEFAULT_PEAK_SOURCE = "default: H100 bf16, measured"
DEFAULT_PEAK_TFLOPS_FP32 = 67.0  # H100 SXM fp32 without TF32, datasheet (not measured)


def add_peak_args(parser: argparse.ArgumentParser) -> None:
    """--peak-tflops / --measure-peak: where the compute floor's peak comes from."""
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                        help="matmul peak for the compute floor (default: H100 bf16, measured)")
    parser.add_argument("--measure-peak", action="store_true",
                        help="measure the peak instead: time a large matmul in --dtype on --device")


def peak_from_args(args: argparse.Namespace, device: torch.device) -> tuple[float, str]:
    """(TFLOP/s, where it comes from) as add_peak_args' options say, measured in --dtype."""
    if args.measure_peak:
        return measure_peak_tflops(args.dtype, device, args.warmup_ms, args.rep_ms), \
            f"measured, {args.dtype} matmul on {device}"
    return args.peak_tflops, "--peak-tflops" if args.peak_tflops != DEFAULT_PEAK_TFLOPS else DEFAULT_PEAK_SOURCE


def measure_peak_tflops(dtype: str, device: torch.device, warmup_ms: float, rep_ms: float) -> float:
    """Achieved TFLOP/s of one large square matmul in `dtype` (smaller on CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    ms = median_ms(lambda: torch.matmul(a, b), device, warmup_ms, rep_ms)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def expert_flops(tokens: int, top_k: int, d_model: int, d_ff: int, matmuls: int = 2) -> int:
    """The useful expert work: `matmuls` matmuls (2, 3 when gated) of 2*T*K*D*F each."""
    return matmuls * 2 * tokens * top_k * d_model * d_ff


def floor_ms(flops: float, peak_tflops: float) -> float:
    """The time `flops` take at the peak."""
    return flops / (peak_tflops * 1e12) * 1e3

