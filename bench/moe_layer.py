"""One Switch MoE layer measured three ways in one run: HF eager, Inductor, moeshard.

    python bench/moe_layer.py            # D=768 F=3072 E=64 T=16384 bf16 on CUDA (the issue's shape)
    python bench/moe_layer.py --smoke    # tiny shapes on CPU, to check the script in seconds

Variants, all on the same layer (same weights) and the same random input:
    hf_eager  transformers' SwitchTransformersSparseMLP, eager, under torch.no_grad()
    inductor  torch.compile(layer, backend="inductor"): graph-breaks on HF's nonzero() loop
    moeshard  torch.compile(layer, backend="moeshard"), default options (Inductor lowering)

Each variant is compiled and warmed before timing and checked against hf_eager ("graphs" counts
the graphs Dynamo compiled: more than one means graph breaks). Timings are also shown as
multiples of the compute floor (DESIGN.md section 3):
    FLOPs = 2 matmuls * 2 * T * K * D * F   (K = 1: Switch is top-1; the router's T*D*E is left out)
    floor_ms = FLOPs / peak
The floor counts every token, which is the work done when none is dropped (the default capacity).

Names carry their shape: B batch, S sequence, T = B*S tokens, D d_model, F d_ff, E experts.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from tabulate import tabulate
from torch._dynamo.utils import counters
from transformers import SwitchTransformersConfig
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersSparseMLP,
)

import moeshard_compile

VARIANTS = ("hf_eager", "inductor", "moeshard")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
TOP_K = 1  # Switch routes each token to one expert
DEFAULT_PEAK_TFLOPS = 750.0  # H100 bf16 dense matmul, measured (DESIGN.md section 3)
MIN_REPEATS = 10  # CPU timing: the median of at least this many calls
SMOKE = dict(d_model=16, d_ff=32, experts=4, batch=2, seq=8, dtype="float32", device="cpu", warmup_ms=20, rep_ms=100)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-ff", type=int, default=3072)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--capacity", type=int, default=None,
                        help="Switch expert_capacity, per sequence (default: --seq, so no token is dropped)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list out of {', '.join(VARIANTS)}")
    parser.add_argument("--warmup-ms", type=float, default=100.0)
    parser.add_argument("--rep-ms", type=float, default=500.0)
    add_peak_args(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parse_with_smoke(parser, argv, SMOKE, VARIANTS)
    args.capacity = args.seq if args.capacity is None else args.capacity
    return args


def add_peak_args(parser: argparse.ArgumentParser) -> None:
    """--peak-tflops / --measure-peak: where the compute floor's peak comes from."""
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                        help="matmul peak for the compute floor (default: H100 bf16, measured)")
    parser.add_argument("--measure-peak", action="store_true",
                        help="measure the peak instead: time a large matmul in --dtype on --device")


def parse_with_smoke(parser: argparse.ArgumentParser, argv, smoke: dict, variants: tuple) -> argparse.Namespace:
    """Add --smoke (tiny CPU defaults), parse, and split and check --variants against `variants`."""
    described = ", ".join(f"{key}={value}" for key, value in smoke.items())
    parser.add_argument("--smoke", action="store_true", help=f"tiny shapes on CPU ({described}); other flags still apply")
    # --smoke changes the defaults, so parse once to see it and once more with its defaults in place
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(**smoke)
    args = parser.parse_args(argv)
    args.variants = args.variants.split(",")
    unknown = sorted(set(args.variants) - set(variants))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(variants)}")
    return args


def build_layer(args: argparse.Namespace) -> SwitchTransformersSparseMLP:
    """A Switch MoE layer with random weights (nothing downloaded), built on the device directly."""
    config = SwitchTransformersConfig(
        d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, expert_capacity=args.capacity
    )
    with torch.device(args.device):
        layer = SwitchTransformersSparseMLP(config)
        # Spread the router's logits (std ~1): HF rounds the probabilities to the model dtype before
        # its argmax, and near-uniform bf16 probabilities tie often; eager and compiled kernels break
        # ties differently, which would show up as a routing difference, not an arithmetic one.
        torch.nn.init.normal_(layer.router.classifier.weight, std=args.d_model**-0.5)
    return layer.to(DTYPES[args.dtype]).eval()


def compile_variant(name: str, layer: torch.nn.Module, dump_dir: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The callable a variant times. moeshard's dump_dir only writes its report (read after warm-up)."""
    if name == "hf_eager":
        return layer
    if name == "inductor":
        return torch.compile(layer, backend="inductor")
    # the backend object rather than "moeshard": works from a source checkout without the entry point
    return torch.compile(layer, backend=moeshard_compile.moeshard_backend, options={"dump_dir": dump_dir})


def median_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float, rep_ms: float) -> float:
    """Median time of fn() in ms: triton's do_bench on CUDA (events, L2 flushed), wall clock on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench  # only the GPU machine has triton

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    estimate_ms = statistics.median(_time_calls(fn, 5))
    _time_calls(fn, max(1, round(warmup_ms / estimate_ms)))
    return statistics.median(_time_calls(fn, max(MIN_REPEATS, round(rep_ms / estimate_ms))))


def _time_calls(fn: Callable[[], object], calls: int) -> list[float]:
    """Wall time of each of `calls` calls, in ms; CPU ops are synchronous, so that is their work.

    Callers fix the count up front from an estimate (as do_bench does) rather than looping until
    a time budget runs out: a single stall (GC, Inductor's compile workers starting on a small
    machine) could then use up the budget and become the median.
    """
    times_ms = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times_ms.append((time.perf_counter() - start) * 1e3)
    return times_ms


def measure_peak_tflops(args: argparse.Namespace, device: torch.device) -> float:
    """Achieved TFLOP/s of one large square matmul in the benchmark's dtype (smaller on CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a_NN = torch.randn(n, n, device=device, dtype=DTYPES[args.dtype])
    b_NN = torch.randn(n, n, device=device, dtype=DTYPES[args.dtype])
    ms = median_ms(lambda: torch.matmul(a_NN, b_NN), device, args.warmup_ms, args.rep_ms)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def expert_flops(args: argparse.Namespace) -> int:
    """The useful expert work: two matmuls of 2*T*K*D*F each."""
    tokens = args.batch * args.seq
    return 2 * 2 * tokens * TOP_K * args.d_model * args.d_ff


def max_rel_error(out_BSD: torch.Tensor, ref_BSD: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64 so the metric adds no rounding of its own."""
    return ((out_BSD.double() - ref_BSD.double()).abs().max() / ref_BSD.double().abs().max()).item()


def run_variant(name: str, layer: torch.nn.Module, x_BSD: torch.Tensor, ref_BSD: torch.Tensor,
                args: argparse.Namespace, dump_dir: str) -> dict:
    """Compile (first call), check against the reference, then time one variant."""
    torch._dynamo.reset()  # each variant compiles from scratch: no cache entry leaks across variants
    counters.clear()
    fn = compile_variant(name, layer, dump_dir)  # moeshard's capture shims act for moeshard only
    try:
        out_BSD = fn(x_BSD)
    except Exception as error:  # one broken variant must not cost the others' numbers
        print(f"{name} failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}", file=sys.stderr)
        return {"variant": name, "graphs": counters["stats"]["unique_graphs"], "median_ms": float("nan"),
                "max_rel_err": float("nan")}
    ms = median_ms(lambda: fn(x_BSD), x_BSD.device, args.warmup_ms, args.rep_ms)
    return {
        "variant": name,
        "graphs": counters["stats"]["unique_graphs"],
        "median_ms": ms,
        "max_rel_err": max_rel_error(out_BSD, ref_BSD),
    }


def environment(device: torch.device) -> dict:
    """Where the numbers come from: device name and library versions."""
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "not installed"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device": f"{name} ({device})",
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "triton": triton_version,
    }


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    env = environment(device)
    print(" | ".join(f"{key} {value}" for key, value in env.items()))

    with torch.no_grad():
        layer = build_layer(args)
        x_BSD = torch.randn(args.batch, args.seq, args.d_model, device=device, dtype=DTYPES[args.dtype])
        ref_BSD = layer(x_BSD)
        if args.measure_peak:
            peak_tflops, peak_source = measure_peak_tflops(args, device), f"measured, {args.dtype} matmul on {device}"
        else:
            peak_tflops = args.peak_tflops
            peak_source = "--peak-tflops" if peak_tflops != DEFAULT_PEAK_TFLOPS else "default: H100 bf16, measured"
        flops = expert_flops(args)
        floor_ms = flops / (peak_tflops * 1e12) * 1e3
        print(f"layer: SwitchTransformersSparseMLP D={args.d_model} F={args.d_ff} E={args.experts} "
              f"capacity={args.capacity} | x_BSD {list(x_BSD.shape)} {args.dtype}, T={args.batch * args.seq}")
        print(f"floor: {flops / 1e9:.4g} GFLOP (2 matmuls x 2*T*K*D*F, K={TOP_K}) / {peak_tflops:.4g} TFLOP/s "
              f"({peak_source}) = {floor_ms:.4g} ms")

        with tempfile.TemporaryDirectory(prefix="moeshard_bench_") as dump_dir:
            rows = [run_variant(name, layer, x_BSD, ref_BSD, args, dump_dir) for name in args.variants]
            report_path = Path(dump_dir) / "report.txt"
            moeshard_report = report_path.read_text() if report_path.exists() else None

    eager_ms = next((row["median_ms"] for row in rows if row["variant"] == "hf_eager"), None)
    for row in rows:
        row["x_floor"] = row["median_ms"] / floor_ms
        row["speedup_vs_hf_eager"] = eager_ms / row["median_ms"] if eager_ms else None
    columns = ("variant", "graphs", "median_ms", "x_floor", "speedup_vs_hf_eager", "max_rel_err")
    print(tabulate([[row[c] for c in columns] for row in rows], headers=columns, tablefmt="github",
                   floatfmt=("", "", ".4g", ".4g", ".3g", ".2e"), missingval="n/a"))
    if moeshard_report is not None:
        print(f"moeshard report:\n{moeshard_report}", end="")

    if args.json:
        config = {key: value for key, value in vars(args).items() if key != "json"}
        result = {"config": config, "environment": env, "peak_tflops": peak_tflops, "peak_source": peak_source,
                  "flops": flops, "floor_ms": floor_ms, "rows": [{c: row[c] for c in columns} for row in rows],
                  "moeshard_report": moeshard_report}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
