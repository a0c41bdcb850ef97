"""Where the fused expert kernels' time goes: the device's ceilings, the same matmuls dense in
cuBLAS, and the kernels on parts of one skewed routing.

    python bench/lab/expert_ceilings.py            # H100, about a minute
    python bench/lab/expert_ceilings.py --split    # and the crowded and sparse experts as two kernels on disjoint SMs
    python bench/lab/expert_ceilings.py --coresident   # ... as two kernels sharing every SM
    ncu --clock-control none -k regex:_ffn_ --section SpeedOfLight python bench/lab/expert_ceilings.py --profile

Switch-Base's experts (D 768, F 3072, relu), 16384 rows, bf16, every time a CUDA-graph replay:
  ceilings   a 1 GiB read (sum) and copy (bytes read + written), an 8192^3 matmul;
  dense      cuBLAS x @ w_in and h @ w_out with every row one expert's: what one big GEMM of the
             kernels' shapes reaches;
  parts      launch_ffn_in / launch_ffn_out (default tiles) on the E 64 skew routing's rows: its
             crowded experts alone (more rows than the mean: compute-bound), its sparse experts
             alone (weight-bound), all of them, and for comparison uniform routing and one expert.
             If the crowded and the sparse parts overlapped, the whole would take about the larger
             of the two; if not, their sum.
  --split    both parts at once, the crowded experts' kernel on some SMs and the sparse ones' on the
             rest (two streams in one CUDA graph, each kernel's persistent grid cut to its share),
             with 128- and 64-row tiles for the sparse part: what a kernel that splits its SMs
             between the two kinds of tile could gain at best.
  --coresident  both parts at once on every SM: with 128x128 tiles (106 KB of shared memory) two
             programs fit one SM, so each SM can multiply for a crowded expert while it streams a
             sparse expert's weights; also the whole routing with two programs per SM.
  --profile  nothing timed: each kernel launched on each part of the routing, after a warm-up
             launch, for a profiler to measure (the ncu line above).
Names: R rows a kernel computes, D model dim, F expert FFN dim, E experts.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `bench` importable when run as a script
from bench.baselines.routers import synthetic_routing  # noqa: E402
from bench.common.environment import environment, environment_line  # noqa: E402
from bench.common.floor import floor_ms  # noqa: E402
from bench.common.timing import graph_replay_ms  # noqa: E402
from moeshard_compile.kernels import launch  # noqa: E402
from moeshard_compile.kernels.ffn_in import launch_ffn_in  # noqa: E402
from moeshard_compile.kernels.ffn_out import launch_ffn_out  # noqa: E402
from moeshard_compile.kernels.tile_config import TileConfig  # noqa: E402

D, F, E, ROWS = 768, 3072, 64, 16384
DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
SPARSE_TILES = {"128x256 (default)": TileConfig(128, 256, 64, 8, 4, persistent_tma=True, tma_rows=True),
                "64x256 w4 s5": TileConfig(64, 256, 64, 4, 5, persistent_tma=True, tma_rows=True)}
SPLITS = (22, 33, 44, 66)  # SMs given to the sparse experts' kernel
CORESIDENT_TILES = TileConfig(128, 128, 64, 4, 3, persistent_tma=True, tma_rows=True)  # 106 KB of shared memory: 2 programs per SM


def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * std).to(DTYPE)


class Experts:
    """The kernels' operands for rows grouped by counts_E: x_RD already in expert order (rows_R = arange)."""

    def __init__(self, counts_E: torch.Tensor, d_ff: int = F):
        self.R = int(counts_E.sum())
        self.x_RD, self.rows_R, self.offs_E = randn(self.R, D), torch.arange(self.R, device=DEVICE), counts_E.cumsum(0)
        self.w_in_EDF = randn(counts_E.numel(), D, d_ff, std=D**-0.5)
        self.w_out_EFD = randn(counts_E.numel(), d_ff, D, std=d_ff**-0.5)
        self.scale_R = torch.rand(self.R, device=DEVICE).to(DTYPE)
        self.h_RF = self.ffn_in()
        self.experts_used = int((counts_E > 0).sum())

    def ffn_in(self, config: TileConfig | None = None) -> torch.Tensor:
        return launch_ffn_in(self.x_RD, self.rows_R, self.offs_E, self.w_in_EDF, None, None, None, "relu", config)

    def ffn_out(self, config: TileConfig | None = None) -> torch.Tensor:
        return launch_ffn_out(self.h_RF, self.offs_E, self.w_out_EFD, None, self.rows_R, self.scale_R, config)


def ceilings() -> tuple[list[list], float]:
    data = torch.randn(2**29, device=DEVICE).to(DTYPE)
    copy = torch.empty_like(data)
    gib = data.numel() * data.element_size()
    read_ms = graph_replay_ms(lambda: data.sum(dtype=torch.float32))
    copy_ms = graph_replay_ms(lambda: copy.copy_(data))
    del data, copy
    a, b = randn(8192, 8192), randn(8192, 8192)
    peak = 2 * 8192**3 / graph_replay_ms(lambda: a @ b) / 1e9
    return [["read 1 GiB (sum)", f"{gib / read_ms / 1e9:.2f} TB/s"],
            ["copy 1 GiB (read + write)", f"{2 * gib / copy_ms / 1e9:.2f} TB/s"],
            ["bf16 matmul 8192^3", f"{peak:.0f} TFLOP/s"]], peak


def dense(peak: float) -> list[list]:
    """Each matmul of the kernels' shapes (rows x inner dim x output dim) as one cuBLAS GEMM."""
    rows = []
    shapes = {"x @ w_in": (ROWS, D, F), "h @ w_out": (ROWS, F, D), "x @ w_in, f/4 shard": (ROWS, D, F // 4),
              "h @ w_out, f/4 shard": (ROWS, F // 4, D)}
    for name, (R, inner, out) in shapes.items():
        a, b = randn(R, inner), randn(inner, out)
        ms = graph_replay_ms(lambda: a @ b)
        flops = 2 * R * inner * out
        rows.append([f"cuBLAS {name} ({R}x{inner}x{out})", ms, flops / ms / 1e9, ms / floor_ms(flops, peak)])
    return rows


def routing_parts() -> dict[str, torch.Tensor]:
    ids_TK, _ = synthetic_routing("skew", ROWS, E, 1, seed=0, device=DEVICE)
    counts_E = torch.bincount(ids_TK.reshape(-1), minlength=E)
    crowded = counts_E > ROWS // E
    return {"skew: crowded experts alone": torch.where(crowded, counts_E, 0),
            "skew: sparse experts alone": torch.where(crowded, 0, counts_E),
            "skew: all (the target shape)": counts_E,
            "uniform": torch.full((E,), ROWS // E, device=DEVICE),
            "one expert, 16384 rows": torch.tensor([ROWS], device=DEVICE)}


def parts(peak: float) -> list[list]:
    rows = []
    for name, counts_E in routing_parts().items():
        experts = Experts(counts_E)
        flops = 2 * experts.R * D * F
        weight_bytes = experts.experts_used * D * F * DTYPE.itemsize
        for kernel, run in (("ffn_in", experts.ffn_in), ("ffn_out", experts.ffn_out)):
            ms = graph_replay_ms(run)
            rows.append([name, kernel, experts.R, experts.experts_used, ms, flops / ms / 1e9, weight_bytes / ms / 1e9,
                         ms / floor_ms(flops, peak)])
    return rows


@contextlib.contextmanager
def programs(count: int):
    """Persistent launches inside get `count` programs (SMs) instead of one per SM."""
    sm_count = launch._sm_count
    launch._sm_count = lambda device_index: count
    try:
        yield
    finally:
        launch._sm_count = sm_count


def concurrently(kernel: str, crowded: Experts, crowded_tiles: TileConfig | None, crowded_sms: int,
                 sparse: Experts, sparse_tiles: TileConfig | None, sparse_sms: int) -> float:
    """ms of the crowded and the sparse experts' kernels at once (two streams in one CUDA graph), each
    persistent grid cut to its number of programs."""
    side = torch.cuda.Stream()

    def both():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), programs(sparse_sms):
            getattr(sparse, kernel)(sparse_tiles)
        with programs(crowded_sms):
            getattr(crowded, kernel)(crowded_tiles)
        torch.cuda.current_stream().wait_stream(side)
    return graph_replay_ms(both)


def split() -> list[list]:
    named = routing_parts()
    crowded, sparse = Experts(named["skew: crowded experts alone"]), Experts(named["skew: sparse experts alone"])
    sms = launch._sm_count(DEVICE.index or 0)
    rows = []
    for tile_name, tiles in SPARSE_TILES.items():
        for kernel in ("ffn_in", "ffn_out"):
            alone = graph_replay_ms(lambda: getattr(sparse, kernel)(tiles))
            rows.append([tile_name, kernel, alone, *(concurrently(kernel, crowded, None, sms - sparse_sms, sparse,
                                                                  tiles, sparse_sms) for sparse_sms in SPLITS)])
    return rows


def coresident() -> list[list]:
    """Both parts at once on every SM, in tiles small enough for two programs to share one SM."""
    named = routing_parts()
    full, crowded, sparse = (Experts(named[name]) for name in (
        "skew: all (the target shape)", "skew: crowded experts alone", "skew: sparse experts alone"))
    sms = launch._sm_count(DEVICE.index or 0)
    rows = []
    for kernel in ("ffn_in", "ffn_out"):
        for tile_name, tiles in (("128x256 w8 s4 (default)", None), ("128x128 w4 s3", CORESIDENT_TILES)):
            with programs(2 * sms):
                two_per_sm = graph_replay_ms(lambda: getattr(full, kernel)(tiles))
            alone_ms = [graph_replay_ms(lambda: getattr(part, kernel)(tiles)) for part in (full, crowded, sparse)]
            rows.append([kernel, tile_name, alone_ms[0], two_per_sm, *alone_ms[1:],
                         concurrently(kernel, crowded, tiles, sms, sparse, tiles, sms)])
    return rows


def profile() -> None:
    """Each kernel on each part, twice after the launch that makes h, with nothing else around them."""
    for name, counts_E in routing_parts().items():
        experts = Experts(counts_E)
        for _ in range(2):
            experts.ffn_in()
            experts.ffn_out()
        torch.cuda.synchronize()
        print("launched ffn_in and ffn_out twice (warm-up, profiled):", name, flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", action="store_true", help="also the two parts concurrently on disjoint SMs")
    parser.add_argument("--coresident", action="store_true",
                        help="also the two parts concurrently on every SM, two programs per SM")
    parser.add_argument("--profile", action="store_true", help="only launch the kernels, for a profiler (ncu)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.profile:
        return profile()
    print(environment_line(environment(DEVICE)))
    table, peak = ceilings()
    print(tabulate(table, headers=["ceiling", "measured"], tablefmt="github"))
    print(tabulate(dense(peak), headers=["dense", "ms", "TFLOP/s", "x floor"], tablefmt="github", floatfmt=".4g"))
    print(tabulate(parts(peak), headers=["rows", "kernel", "R", "experts", "ms", "TFLOP/s", "weights TB/s", "x floor"],
                   tablefmt="github", floatfmt=".4g"))
    if args.split:
        sms = launch._sm_count(DEVICE.index or 0)
        print(tabulate(split(), tablefmt="github", floatfmt=".4g", headers=[
            "sparse experts' tiles", "kernel", "sparse alone ms",
            *(f"both, {sms - s} + {s} SMs" for s in SPLITS)]))
    if args.coresident:
        print(tabulate(coresident(), tablefmt="github", floatfmt=".4g", headers=[
            "kernel", "tiles", "all, 1 program per SM", "all, 2 per SM", "crowded alone", "sparse alone",
            "crowded + sparse at once, each on every SM"]))


if __name__ == "__main__":
    main(sys.argv[1:])
