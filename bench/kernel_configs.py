"""Tile configurations of the two fused expert kernels, each kernel alone, against torch._grouped_mm.

    python bench/kernel_configs.py --measure-peak --json kernel_configs.json   # H100, ~5 min

For each shape (bench/expert_kernels.py's names) and each candidate TileConfig, times
moeshard's ffn_in kernel (gather + matmul + activation [+ gate]) and ffn_out kernel (matmul +
scale + scatter) on their own, as CUDA graph replays (no host launch cost), checked against the same step done by torch._grouped_mm in fp32
accumulation (max_rel_err), and prints each as a multiple of its own compute floor. The rows
`_grouped_mm` time the unfused library matmul on pre-gathered rows: what the fusions compete with.
Used to choose grouped_ffn.default_config; the chosen one is marked `default`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
import triton.testing
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.baselines.routers import synthetic_routing  # noqa: E402
from bench.expert_kernels import MODELS, Shape, make_problem  # noqa: E402
from bench.moe_layer import DTYPES, add_peak_args, environment, max_rel_error, measure_peak_tflops  # noqa: E402
from moeshard_compile.kernels.ops import sort_by_expert  # noqa: E402
from moeshard_compile.kernels.grouped_ffn import (  # noqa: E402
    TileConfig, default_config, expert_bytes, launch_ffn_in, launch_ffn_out,
)
from passes.lower import ACTIVATIONS  # noqa: E402

SHAPES = {
    "switch-base/E64/T16384/k1/skew": Shape("switch-base", 64, 16384, 1, "skew"),
    "switch-base/E64/T16384/k1/uniform": Shape("switch-base", 64, 16384, 1, "uniform"),
    "switch-base/E8/T16384/k1/skew": Shape("switch-base", 8, 16384, 1, "skew"),
    "switch-base-f4/E64/T16384/k1/skew": Shape("switch-base-f4", 64, 16384, 1, "skew"),
    "switch-base-f8/E64/T16384/k1/skew": Shape("switch-base-f8", 64, 16384, 1, "skew"),
    "qwen3-30b-a3b/E128/T4096/k8/skew": Shape("qwen3-30b-a3b", 128, 4096, 8, "skew"),
    "mixtral/E8/T4096/k2/skew": Shape("mixtral", 8, 4096, 2, "skew"),
}
# (block_m, block_n, block_k, num_warps, num_stages); K slices of 64 (bf16) = 128 bytes
TILES = [
    (128, 256, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4), (64, 256, 64, 8, 3), (64, 128, 64, 4, 3), (256, 128, 64, 8, 4), (256, 64, 64, 8, 4),
    (32, 128, 64, 4, 4), (64, 64, 128, 4, 3),
]
ZIGZAG_TILES = [(128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (256, 64, 64, 8, 4)]  # the fastest, in zigzag order too
PERSISTENT_TILES = [(128, 256, 64, 8, 4), (128, 256, 64, 8, 3), (128, 256, 128, 8, 2), (256, 128, 64, 8, 4),
                    (128, 128, 64, 8, 4), (128, 128, 64, 4, 4)]
CANDIDATES = (
    [TileConfig(*tile) for tile in TILES] + [TileConfig(*tile, zigzag=True) for tile in ZIGZAG_TILES]
    + [TileConfig(*tile, persistent_tma=True) for tile in PERSISTENT_TILES]
    + [TileConfig(*tile, persistent_tma=True, tma_rows=True) for tile in PERSISTENT_TILES]
)


def config_label(config: TileConfig) -> str:
    """128x256x64 w8 s4 [persistent tma [rows] | zigzag]"""
    flags = (["persistent tma"] + ["rows"] * config.tma_rows if config.persistent_tma
             else ["zigzag"] if config.zigzag else [])
    return " ".join([f"{config.block_m}x{config.block_n}x{config.block_k} w{config.num_warps} s{config.num_stages}", *flags])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma list out of: " + ", ".join(SHAPES))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup-ms", type=float, default=10.0, help="for --measure-peak")
    parser.add_argument("--rep-ms", type=float, default=50.0)
    parser.add_argument("--budget-s", type=float, default=400.0, help="start no new shape after this many seconds")
    parser.add_argument("--configs", default=None, help="regex: time only the candidates whose label matches (re.search)")
    parser.add_argument("--json", type=Path, default=None)
    add_peak_args(parser)
    return parser.parse_args(argv)


def time_config(run, reference, floor_ms: float, args) -> dict:
    """Check run() against reference (a tensor), then time it; failures (out of resources) become the row.

    Timed as CUDA graph replays: the kernels alone, without the host's launch cost (which is
    what the compiled model sees: Inductor's wrapper, and CUDA graphs under reduce-overhead).
    """
    try:
        err = max_rel_error(run(), reference)
        ms = triton.testing.do_bench_cudagraph(run, rep=args.rep_ms, return_mode="median")
        return {"median_ms": ms, "x_floor": ms / floor_ms, "max_rel_err": err}
    except Exception as error:  # noqa: BLE001  (a config the chip cannot run: say so, try the next)
        return {"median_ms": None, "x_floor": None, "max_rel_err": None, "error": f"{type(error).__name__}: {str(error)[:120]}"}


def run_shape(shape: Shape, args, peak_tflops: float, device: torch.device) -> list[dict]:
    dtype = DTYPES[args.dtype]
    problem = make_problem(shape, dtype, device, seed=0)
    D, F_, gated, activation = MODELS[shape.model]
    ids_TK, weights_TK = synthetic_routing(shape.routing, shape.T, shape.E, shape.K, seed=0, device=device, dtype=dtype)
    order_S, token_S, scale_S, _, offs_E = sort_by_expert(ids_TK.reshape(-1), weights_TK.reshape(-1), shape.E, shape.K)
    offs32_E = offs_E.to(torch.int32)
    x_SD = problem.x_TD.index_select(0, token_S)
    w_in, w_gate, w_out = problem.w_in_EDF, problem.w_gate_EDF, problem.w_out_EFD
    act = ACTIVATIONS[activation]

    def grouped_in():
        h = torch._grouped_mm(x_SD, w_in, offs=offs32_E)
        return act(h) if w_gate is None else act(torch._grouped_mm(x_SD, w_gate, offs=offs32_E)) * h

    h_SF = grouped_in()
    y_mm_SD = torch._grouped_mm(h_SF, w_out, offs=offs32_E)
    y_ref_SD = torch.empty_like(x_SD).index_copy_(0, order_S, (y_mm_SD.float() * scale_S[:, None].float()).to(dtype))
    rows_S = token_S.shape[0]
    in_floor = (2 if gated else 1) * 2 * rows_S * D * F_ / (peak_tflops * 1e12) * 1e3
    out_floor = 2 * rows_S * D * F_ / (peak_tflops * 1e12) * 1e3
    rows = []

    def record(kernel: str, config: str, result: dict, floor_ms: float) -> None:
        rows.append({"shape": shape.name, "kernel": kernel, "config": config, "floor_ms": floor_ms, **result})

    record("ffn_in", "_grouped_mm (pre-gathered x)", time_config(grouped_in, h_SF, in_floor, args), in_floor)
    record("ffn_out", "_grouped_mm (no scale, no scatter)",
           time_config(lambda: torch._grouped_mm(h_SF, w_out, offs=offs32_E), y_mm_SD, out_floor, args), out_floor)
    chosen = {"ffn_in": default_config(dtype, gated, expert_bytes(w_in), tma_rows=F_ >= 2 * D),
              "ffn_out": default_config(dtype, expert_bytes=expert_bytes(w_out))}
    for config in CANDIDATES:
        label = config_label(config)
        if args.configs and not re.search(args.configs, label) and config not in chosen.values():
            continue

        def labelled(kernel: str) -> str:
            return label + (" default" if config == chosen[kernel] else "")

        record("ffn_in", labelled("ffn_in"), time_config(
            lambda: launch_ffn_in(problem.x_TD, token_S, offs_E, w_in, w_gate, None, None, activation, config),
            h_SF, in_floor, args), in_floor)
        record("ffn_out", labelled("ffn_out"), time_config(
            lambda: launch_ffn_out(h_SF, offs_E, w_out, None, order_S, scale_S, config), y_ref_SD, out_floor, args),
            out_floor)
    columns = ("kernel", "config", "median_ms", "x_floor", "max_rel_err", "error")
    print(f"\n## {shape.name} (D {D}, F {F_}{', gated' if gated else ''}): floors ffn_in {in_floor:.4g} ms, "
          f"ffn_out {out_floor:.4g} ms")
    ordered = sorted(rows, key=lambda r: (r["kernel"], r["median_ms"] is None, r["median_ms"] or 0))
    print(tabulate([[r.get(c) for c in columns] for r in ordered], headers=columns, tablefmt="github",
                   floatfmt=("", "", ".4g", ".3g", ".2e", ""), missingval=""))
    return rows


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    started, device = time.perf_counter(), torch.device(args.device)
    peak = measure_peak_tflops(args, device) if args.measure_peak else args.peak_tflops
    env = environment(device)
    print(" | ".join(f"{k} {v}" for k, v in env.items()), f"| peak {peak:.4g} TFLOP/s")
    rows: list[dict] = []
    with torch.no_grad():
        for name in args.shapes.split(","):
            if time.perf_counter() - started > args.budget_s:
                print(f"budget spent: skipped {name}")
                continue
            rows += run_shape(SHAPES[name], args, peak, device)
            if args.json:
                args.json.write_text(json.dumps({"environment": env, "peak_tflops": peak, "rows": rows}, indent=1) + "\n")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
