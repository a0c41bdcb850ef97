"""Tile configurations of the two fused expert kernels, each kernel alone, against torch._grouped_mm.

    python bench/lab/kernel_configs.py --measure-peak --json kernel_configs.json   # H100, ~8 min
    python bench/lab/kernel_configs.py --repeat 3 --configs 'persistent tma rows( split 1)?$'   # a few, 3 rounds

For each shape (bench/expert_kernels.py's names) and each candidate TileConfig, times
moeshard's ffn_in kernel (gather + matmul + activation [+ gate]) and ffn_out kernel (matmul +
scale + scatter) on their own, as CUDA graph replays (no host launch cost), checked against the
same step done by torch._grouped_mm in fp32 accumulation (max_rel_err), and prints each as a
multiple of its own compute floor. The rows `_grouped_mm` time the unfused library matmul on
pre-gathered rows: what the fusions compete with. The candidates include the persistent kernels
with their programs split between sparse and crowded experts at several stream-tile costs
(`split c`). With --repeat N every candidate is timed N times round-robin and the median reported,
with the spread. Used to choose moeshard_compile/kernels/tile_config.py's default_config; the chosen
one is marked `default`.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `bench` importable when run as a script
from bench.baselines.routers import synthetic_routing  # noqa: E402
from bench.common.accuracy import max_rel_error  # noqa: E402
from bench.common.cli import DTYPES, github_table  # noqa: E402
from bench.common.environment import environment, environment_line, write_json  # noqa: E402
from bench.common.floor import add_peak_args, expert_flops, floor_ms, peak_from_args  # noqa: E402
from bench.common.timing import cuda_graph_ms  # noqa: E402
from bench.expert_kernels import MODELS, Shape, make_problem  # noqa: E402
from moeshard_compile.kernels.ops import sort_by_expert  # noqa: E402
from moeshard_compile.kernels.ffn_in import launch_ffn_in  # noqa: E402
from moeshard_compile.kernels.ffn_out import launch_ffn_out  # noqa: E402
from moeshard_compile.kernels.tile_config import TileConfig, default_config, expert_bytes  # noqa: E402
from moeshard_compile.passes.op_contract import ACTIVATIONS  # noqa: E402

SHAPES = {
    "switch-base/E64/T16384/k1/skew": Shape("switch-base", 64, 16384, 1, "skew"),
    "switch-base/E64/T16384/k1/uniform": Shape("switch-base", 64, 16384, 1, "uniform"),
    "switch-base/E64/T16384/k1/zipf": Shape("switch-base", 64, 16384, 1, "zipf"),
    "switch-base/E64/T16384/k2/skew": Shape("switch-base", 64, 16384, 2, "skew"),
    "switch-base/E128/T16384/k1/skew": Shape("switch-base", 128, 16384, 1, "skew"),
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
STREAM_TILE_COSTS = (0.8, 0.9, 1.0, 1.15, 1.3)  # the default persistent tiles, their programs split (schedule._share)
SPLIT_TILES = [(128, 256, 64, 8, 4), (128, 128, 64, 8, 4)]
CANDIDATES = (
    [TileConfig(*tile) for tile in TILES] + [TileConfig(*tile, zigzag=True) for tile in ZIGZAG_TILES]
    + [TileConfig(*tile, persistent_tma=True) for tile in PERSISTENT_TILES]
    + [TileConfig(*tile, persistent_tma=True, tma_rows=True) for tile in PERSISTENT_TILES]
    + [TileConfig(*tile, persistent_tma=True, tma_rows=rows, stream_tile_cost=cost)
       for tile in SPLIT_TILES for cost in STREAM_TILE_COSTS for rows in (False, True)]
)


def config_label(config: TileConfig) -> str:
    """128x256x64 w8 s4 [persistent tma [rows] [split c] | zigzag]"""
    flags = (["persistent tma"] + ["rows"] * config.tma_rows + [f"split {config.stream_tile_cost:g}"] * (
        config.stream_tile_cost > 0) if config.persistent_tma else ["zigzag"] if config.zigzag else [])
    return " ".join([f"{config.block_m}x{config.block_n}x{config.block_k} w{config.num_warps} s{config.num_stages}", *flags])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma list out of: " + ", ".join(SHAPES))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup-ms", type=float, default=10.0, help="for --measure-peak")
    parser.add_argument("--rep-ms", type=float, default=50.0)
    parser.add_argument("--repeat", type=int, default=1, help="time every candidate this many times, round-robin; report the median")
    parser.add_argument("--budget-s", type=float, default=400.0, help="start no new shape after this many seconds")
    parser.add_argument("--configs", default=None, help="regex: time only the candidates whose label matches (re.search)")
    parser.add_argument("--json", type=Path, default=None)
    add_peak_args(parser)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    return args


def time_entries(entries: list[tuple], repeat: int, rep_ms: float) -> list[dict]:
    """Check each (run, reference, floor_ms) entry once, then time the runnable ones `repeat` times
    round-robin; a failure (out of resources) becomes that entry's row.

    Timed as CUDA graph replays: the kernels alone, without the host's launch cost (which is
    what the compiled model sees: Inductor's wrapper, and CUDA graphs under reduce-overhead).
    Round-robin rounds spread the machine's drift (clocks, temperature) over every candidate
    instead of the last ones; `spread` is (slowest - fastest) / median over the rounds.
    """
    results, runnable = [], []
    for i, (run, reference, _) in enumerate(entries):
        try:
            results.append({"max_rel_err": max_rel_error(run(), reference), "times": []})
            runnable.append(i)
        except Exception as error:  # noqa: BLE001  (a config the chip cannot run: say so, try the next)
            results.append({"median_ms": None, "x_floor": None, "max_rel_err": None,
                            "error": f"{type(error).__name__}: {str(error)[:120]}"})
    for _ in range(repeat):
        for i in runnable:
            results[i]["times"].append(cuda_graph_ms(entries[i][0], rep_ms))
    for i in runnable:
        times = sorted(results[i].pop("times"))
        ms = times[len(times) // 2]
        results[i].update(median_ms=ms, x_floor=ms / entries[i][2], spread=(times[-1] - times[0]) / ms)
    return results


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
    in_floor = floor_ms(expert_flops(rows_S, 1, D, F_, matmuls=2 if gated else 1), peak_tflops)
    out_floor = floor_ms(expert_flops(rows_S, 1, D, F_, matmuls=1), peak_tflops)
    entries: list[tuple[str, str, tuple]] = [
        ("ffn_in", "_grouped_mm (pre-gathered x)", (grouped_in, h_SF, in_floor)),
        ("ffn_out", "_grouped_mm (no scale, no scatter)",
         (lambda: torch._grouped_mm(h_SF, w_out, offs=offs32_E), y_mm_SD, out_floor)),
    ]
    chosen = {"ffn_in": default_config(dtype, gated, expert_bytes(w_in), tma_rows=F_ >= 2 * D),
              "ffn_out": default_config(dtype, expert_bytes=expert_bytes(w_out))}
    for config in CANDIDATES:
        label = config_label(config)
        if args.configs and not re.search(args.configs, label) and config not in chosen.values():
            continue

        def labelled(kernel: str) -> str:
            return label + (" default" if config == chosen[kernel] else "")

        entries.append(("ffn_in", labelled("ffn_in"), (
            lambda config=config: launch_ffn_in(problem.x_TD, token_S, offs_E, w_in, w_gate, None, None, activation, config),
            h_SF, in_floor)))
        entries.append(("ffn_out", labelled("ffn_out"), (
            lambda config=config: launch_ffn_out(h_SF, offs_E, w_out, None, order_S, scale_S, config), y_ref_SD, out_floor)))
    results = time_entries([entry for _, _, entry in entries], args.repeat, args.rep_ms)
    rows = [{"shape": shape.name, "kernel": kernel, "config": label, "floor_ms": entry[2], **result}
            for (kernel, label, entry), result in zip(entries, results)]
    columns = ("kernel", "config", "median_ms", "x_floor", "spread", "max_rel_err", "error")
    print(f"\n## {shape.name} (D {D}, F {F_}{', gated' if gated else ''}): floors ffn_in {in_floor:.4g} ms, "
          f"ffn_out {out_floor:.4g} ms")
    ordered = sorted(rows, key=lambda r: (r["kernel"], r["median_ms"] is None, r["median_ms"] or 0))
    print(github_table(ordered, columns, floatfmt=("", "", ".4g", ".3g", ".1%", ".2e", ""), missingval=""))
    return rows


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    started, device = time.perf_counter(), torch.device(args.device)
    peak, _ = peak_from_args(args, device)
    env = environment(device)
    print(environment_line(env), f"| peak {peak:.4g} TFLOP/s")
    rows: list[dict] = []
    with torch.no_grad():
        for name in args.shapes.split(","):
            if time.perf_counter() - started > args.budget_s:
                print(f"budget spent: skipped {name}")
                continue
            rows += run_shape(SHAPES[name], args, peak, device)
            if args.json:
                write_json(args.json, {"environment": env, "peak_tflops": peak, "rows": rows})
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
