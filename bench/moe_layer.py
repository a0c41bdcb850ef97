"""One Switch MoE layer measured three ways in one run: HF eager, Inductor, moeshard.

    python bench/moe_layer.py            # D=768 F=3072 E=64 T=16384 bf16 on CUDA (the issue's shape)
    python bench/moe_layer.py --smoke    # tiny shapes on CPU, to check the script in seconds

Variants, all on the same layer (same weights) and the same random input:
    hf_eager  transformers' SwitchTransformersSparseMLP, eager, under torch.no_grad()
    inductor  torch.compile(layer, backend="inductor"): graph-breaks on HF's nonzero() loop
    moeshard  torch.compile(layer, backend="moeshard"), default options (Inductor lowering)

Each variant is compiled and warmed before timing and checked against hf_eager ("graphs" counts
the graphs Dynamo compiled: more than one means graph breaks). Timings are also shown as
multiples of the compute floor (docs/performance.md, how the figures are measured):
    FLOPs = 2 matmuls * 2 * T * K * D * F   (K = 1: Switch is top-1; the router's T*D*E is left out)
    floor_ms = FLOPs / peak
The floor counts every token, which is the work done when none is dropped (the default capacity).

Names carry their shape: B sequences, L tokens per sequence, T = B*L tokens, D model dim, F expert FFN dim,
E experts, K routing slots per token.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch._dynamo.utils import counters
from transformers import SwitchTransformersConfig
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersSparseMLP,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` importable when run as a script
import moeshard_compile  # noqa: E402
from bench.common.accuracy import max_rel_error  # noqa: E402
from bench.common.cli import DTYPES, add_run_args, comma_list, github_table, parse_with_smoke  # noqa: E402
from bench.common.environment import environment, environment_line, recorded_config, write_json  # noqa: E402
from bench.common.floor import add_peak_args, expert_flops, floor_ms, peak_from_args  # noqa: E402
from bench.common.timing import median_ms  # noqa: E402

VARIANTS = ("hf_eager", "inductor", "moeshard")
TOP_K = 1  # Switch routes each token to one expert
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
    add_run_args(parser)
    add_peak_args(parser)
    args = parse_with_smoke(parser, argv, SMOKE)
    args.variants = comma_list(parser, "--variants", args.variants, VARIANTS)
    args.capacity = args.seq if args.capacity is None else args.capacity
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


def run_variant(name: str, layer: torch.nn.Module, x_BLD: torch.Tensor, ref_BLD: torch.Tensor,
                args: argparse.Namespace, dump_dir: str) -> dict:
    """Compile (first call), check against the reference, then time one variant."""
    torch._dynamo.reset()  # each variant compiles from scratch: no cache entry leaks across variants
    counters.clear()
    fn = compile_variant(name, layer, dump_dir)  # moeshard's capture shims act for moeshard only
    try:
        out_BLD = fn(x_BLD)
    except Exception as error:  # one broken variant must not cost the others' numbers
        print(f"{name} failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}", file=sys.stderr)
        return {"variant": name, "graphs": counters["stats"]["unique_graphs"], "median_ms": float("nan"),
                "max_rel_err": float("nan")}
    ms = median_ms(lambda: fn(x_BLD), x_BLD.device, args.warmup_ms, args.rep_ms)
    return {
        "variant": name,
        "graphs": counters["stats"]["unique_graphs"],
        "median_ms": ms,
        "max_rel_err": max_rel_error(out_BLD, ref_BLD),
    }


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    env = environment(device)
    print(environment_line(env))

    with torch.no_grad():
        layer = build_layer(args)
        x_BLD = torch.randn(args.batch, args.seq, args.d_model, device=device, dtype=DTYPES[args.dtype])
        ref_BLD = layer(x_BLD)
        peak_tflops, peak_source = peak_from_args(args, device)
        flops = expert_flops(args.batch * args.seq, TOP_K, args.d_model, args.d_ff)
        layer_floor_ms = floor_ms(flops, peak_tflops)
        print(f"layer: SwitchTransformersSparseMLP D={args.d_model} F={args.d_ff} E={args.experts} "
              f"capacity={args.capacity} | x_BLD {list(x_BLD.shape)} {args.dtype}, T={args.batch * args.seq}")
        print(f"floor: {flops / 1e9:.4g} GFLOP (2 matmuls x 2*T*K*D*F, K={TOP_K}) / {peak_tflops:.4g} TFLOP/s "
              f"({peak_source}) = {layer_floor_ms:.4g} ms")

        with tempfile.TemporaryDirectory(prefix="moeshard_bench_") as dump_dir:
            rows = [run_variant(name, layer, x_BLD, ref_BLD, args, dump_dir) for name in args.variants]
            report_path = Path(dump_dir) / "report.txt"
            moeshard_report = report_path.read_text() if report_path.exists() else None

    eager_ms = next((row["median_ms"] for row in rows if row["variant"] == "hf_eager"), None)
    for row in rows:
        row["x_floor"] = row["median_ms"] / layer_floor_ms
        row["speedup_vs_hf_eager"] = eager_ms / row["median_ms"] if eager_ms else None
    columns = ("variant", "graphs", "median_ms", "x_floor", "speedup_vs_hf_eager", "max_rel_err")
    print(github_table(rows, columns, floatfmt=("", "", ".4g", ".4g", ".3g", ".2e"), missingval="n/a"))
    if moeshard_report is not None:
        print(f"moeshard report:\n{moeshard_report}", end="")

    if args.json:
        write_json(args.json, {"config": recorded_config(args), "environment": env, "peak_tflops": peak_tflops,
                               "peak_source": peak_source, "flops": flops, "floor_ms": layer_floor_ms,
                               "rows": [{c: row[c] for c in columns} for row in rows],
                               "moeshard_report": moeshard_report})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
