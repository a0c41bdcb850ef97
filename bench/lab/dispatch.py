"""The dispatch's bookkeeping: moeshard::group_by_expert against the torch ops it replaced.

    python bench/lab/dispatch.py            # H100, seconds: CUDA-graph replays
    python bench/lab/dispatch.py --smoke    # tiny shapes on CPU (the op's torch reference), seconds

Both compute, from the S = T * K routed (token, slot) rows' expert ids and weights, the rows in
stable expert order, their tokens, their weights in that order, the rows per expert and the
experts' row offsets. `torch_ops` (moeshard_compile.kernels.ops.sort_by_expert, the op's path off
CUDA) is torch.sort of int16 keys, // K, a gather, scatter_add into E zeros, cumsum (five launches
and CUB's sort passes); `group_by_expert` is the op (two Triton launches on CUDA). Each is checked equal to the other, then
timed as CUDA graph replays (what reduce-overhead sees; launch gaps shrink to the GPU's own). A sort
has no matmul floor; the memory floor is a few hundred KB, microseconds below either.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `bench` importable when run as a script
from bench.baselines.routers import synthetic_routing  # noqa: E402
from bench.common.environment import environment, environment_line  # noqa: E402
from bench.common.timing import cuda_graph_ms, median_ms  # noqa: E402
from moeshard_compile.kernels.ops import sort_by_expert  # noqa: E402  (and registers the op)

SHAPES = [(16384, 64, 1), (16384, 64, 2), (30000, 64, 1), (16384, 128, 1), (4096, 128, 8), (16384, 8, 2)]
SMOKE_SHAPES = [(64, 8, 1), (48, 4, 2)]


def time_ms(fn, device: torch.device) -> float:
    """CUDA-graph replays on CUDA; wall clock elsewhere."""
    if device.type != "cuda":
        return median_ms(fn, device, warmup_ms=5, rep_ms=20)
    return cuda_graph_ms(fn, rep_ms=100)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    parser.add_argument("--routing", default="skew", help="bench/baselines/routers.py's synthetic routings")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    rows = []
    for T, E, K in SMOKE_SHAPES if args.smoke else SHAPES:
        ids_TK, weights_TK = synthetic_routing(args.routing, T, E, K, seed=0, device=device, dtype=torch.bfloat16)
        inputs = (ids_TK.reshape(-1), weights_TK.reshape(-1), E, K)
        group_by_expert = torch.ops.moeshard.group_by_expert
        if not all(torch.equal(a, b) for a, b in zip(sort_by_expert(*inputs), group_by_expert(*inputs))):
            raise SystemExit(f"group_by_expert differs from the torch ops at T {T} E {E} K {K}")
        base, ours = time_ms(lambda: sort_by_expert(*inputs), device), time_ms(lambda: group_by_expert(*inputs), device)
        rows.append([T, E, K, T * K, base, ours, base / ours])
    print(environment_line(environment(device)), f"| routing {args.routing}")
    print(tabulate(rows, headers=["T", "E", "K", "rows", "torch_ops ms", "group_by_expert ms", "speed-up"],
                   tablefmt="github", floatfmt=("", "", "", "", ".4f", ".4f", ".2f")))


if __name__ == "__main__":
    main(sys.argv[1:])
