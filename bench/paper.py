"""The MoEShard paper's per-MoE-layer comparison (arXiv 2503.08467, Switch-Base) on one GPU: MoEShard
against DeepSpeed-style capacity expert parallelism and dropless expert parallelism, N ranks simulated.

    python bench/paper.py --measure-peak --sweep headline,experts --budget-s 500 \\
        --json paper_h100_fitted.json --csv paper_h100_fitted.csv   # one H100; the sweeps with 4-GPU counterparts
    python bench/paper.py --measure-peak --sweep skew,batch --budget-s 500 \\
        --json paper_h100_fitted_skew_batch.json                    # the other two sweeps, a second call
    python bench/paper.py --smoke                       # tiny shapes on CPU, N = 4, seconds

The layer: Switch-Base's expert FFN, y = relu(x @ W_in) @ W_out (d_model 768, d_ff 3072, top-1, no
biases), E experts, each of N ranks (default 4) bringing its own batch of B sequences x 120 tokens
(T = 120 B tokens per rank), routing drawn by bench/baselines/routers.py (uniform; skew, the paper's
router with alpha 0.6 on the first 10% of experts; zipf). The router's own matmul is left out.

Systems (all N ranks' N*T tokens and their routing are drawn on the one device; each rank's work
is derived from them and run for real; "simulated" marks every figure that models N ranks):
    moeshard_1rank      measured: one rank does every expert on its own T tokens (sort + the fused expert
                        ops, bench/baselines/expert_computations.py's moeshard_fused: what passes/lower.py emits;
                        --kernel grouped_mm: sort + library grouped matmuls instead, for all systems)
    moeshard_N          simulated, the backend's default schedule (overlap "none"): every rank runs the
                        grouped computation over all N*T gathered rows on its ceil(F/N) block of every expert
                        (every rank has that shape: run once); collectives: the rank check before the call
                        (check_inputs), all-gathers of the counts and of the rows, reduce-scatter of the
                        partial outputs: (N-1)*(E*8 + 512) + 2*(N-1)*T*K*D*bytes per rank (docs/distributed.md)
    moeshard_N_overlap  simulated, overlap "source_rank" (passes/data_parallel.py): each rank's T*K rows
                        sorted by expert through one ceil(F/N) block, timed per source rank (routing differs
                        per rank; every rank computes every rank's rows once), plus one rank's sort
                        (before the exchange) and combine (after it); bench/common/schedule.py puts them and
                        the 2(N-1) pairwise exchanges (all-to-alls of T*K*D*bytes each way) on two streams per
                        rank; the same bytes as moeshard_N, the expert weights read N times
    ep_capacity_cf50    simulated DeepSpeed top-1 (bench/baselines CapacityExpertParallelMoE): capacity
    ep_capacity_cf1.25  P = deepspeed_capacity(T, E, CF, 4) per expert per source rank, CF = min(E, 50)
                        as in the paper, or 1.25; each rank fills its [E, P, D] dispatch buffer, runs its
                        E/N experts over their N*P padded rows (torch.bmm) and gathers its combine;
                        run for every rank, the max taken; two equal-split all-to-alls of
                        (N-1)/N of the [E, P, D] buffer each; tokens past capacity are dropped
    ep_dropless         simulated dropless EP (DroplessExpertParallelMoE): each rank runs the grouped
                        computation over exactly the rows routed to its E/N experts from all ranks
                        (max over ranks); variable all-to-alls of the counts, the rows and back, and the
                        host sync their split sizes need; the placement of moeshard_g{g} at g = 1
    moeshard_g{g}       simulated hybrid placement, for each g dividing N with 1 < g < N (none for N = 2 or
                        a prime N; g = N is moeshard_N's placement): N/g groups of g consecutive ranks, group
                        q holding a contiguous block of experts (as even as possible), each of its ranks an
                        F/g block of each. Every rank sends its rows of group q's experts to each of q's g
                        ranks but itself; they compute them on their block and send the partial sums back.
                        Compute: each group's rows through its experts' ceil(F/g) block, run for real, the
                        slowest group (under skew the one holding the hot experts). Traffic as the backend's
                        option expert_group_size = g exchanges it (passes/expert_groups.py): the rank check,
                        the counts all-gathered, rows and partial sums by variable all-to-alls (the busiest
                        rank's max(sent, received)), each with the host sync of its split sizes (2 a layer)

Latency: the busiest rank's measured compute + its modelled collectives one after another + host
syncs, except moeshard_N_overlap's, which is its schedule's (the slowest rank's finish, after the
rank check). The link model (bench/common/links.py): a collective costs a fixed latency plus the
busiest rank's max(bytes sent, bytes received) over a bandwidth per kind (all-gather/reduce-scatter,
all-to-all); a mid-layer host sync a fixed time; all four fitted to the 4-H100 runs
(bench/calibrate_links.py; docs/results.md). --bandwidth-gbs (both kinds), --collective-latency-ms and
--host-sync-ms override them (450, 0, 0: NVLink 4 nominal, no fixed costs, an optimistic floor).
--measured (default: docs/results/paper_4gpu_h100*.json) names bench/paper_ranks.py runs; every
simulated row whose system was measured there (moeshard_N as moeshard, ep_capacity_*, ep_dropless)
with the same shapes, N and seed gets the mean measured latency and simulated / measured, printed
at the end as the "how far off" table.

Metrics per row: latency_ms (compute timed as the median of calls: triton's do_bench on CUDA, wall
clock on CPU, via bench/common/timing.py's median_ms), compute_ms, comm_ms (the modelled collectives,
`transfers` lists them with their bytes and ms), host_ms, overlapped_ms (transfer time during which
computation ran, mean over the ranks, as bench/paper_ranks.py --profile reads it off the GPU; 0 where
serial) and hidden_fraction = overlapped / comm, perfect_overlap_ms = max(compute, comm) + host (the
bound for hiding all traffic), x_floor = latency / floor, floor = 2 matmuls * 2*T*K*D*F FLOPs (one
rank's useful work, the same for every system) / peak (--peak-tflops for bf16, --peak-tflops-fp32 for
fp32, or --measure-peak: a large matmul per dtype); max_rows and max/mean rows computed over ranks
(padding included), rows_per_rank; bytes each rank sends per layer (max over ranks); tokens dropped
(all ranks); speedups vs ep_capacity_cf50 (the paper's baseline), ep_capacity_cf1.25 and ep_dropless;
measured_latency_ms and sim_over_measured where --measured has the row.

Sweeps (--sweep, a comma list run in order; a configuration already run is not run again):
    headline (default) E 64, batch 250, fp32 (the paper's) and bf16, skew and uniform
    experts  E 8/16/32/64/128/256, batch 250;  batch  batch 10/100/250/450, E 64;
    skew     uniform/skew/zipf at E 64, batch 250   (experts, batch, skew: fp32 and skew unless
             --dtypes / --routings say otherwise)
    smoke    (--smoke) D 32, F 64, seq 8, batch 2, N 4 (so moeshard_g2 runs), E 4/8, on CPU, one thread
A failing system prints its error in its row and the sweep goes on; --json and --csv are rewritten
after every row; --budget-s stops starting new rows (the rest are listed as not run).

Names carry their shape: N ranks, T tokens per rank, K routing slots per token, S = N*T*K routed rows
of all ranks (in moeshard_N_overlap's blocks and combine: one rank's T*K), R rows a rank computes, D
model dim, F expert FFN dim, H = ceil(F/N) (or ceil(F/g)) one rank's FFN block, E experts, El = E/N
experts per rank, P capacity (rows per expert and source rank), g ranks per group, Q = N/g groups.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench` importable when run as a script
from bench.baselines.expert_computations import moeshard_fused, sort_grouped_mm  # noqa: E402
from bench.baselines.expert_parallel import COUNT_BYTES, deepspeed_capacity, rank_within_expert  # noqa: E402
from bench.baselines.grouped_mm import can_use_native_grouped_mm  # noqa: E402
from bench.baselines.routers import synthetic_routing  # noqa: E402
from bench.common.cli import DTYPES, comma_list, error_cell, github_table, parse_with_smoke  # noqa: E402
from bench.common.environment import environment, environment_line, recorded_config, write_json  # noqa: E402
from bench.common.floor import (  # noqa: E402
    DEFAULT_PEAK_TFLOPS, DEFAULT_PEAK_TFLOPS_FP32, expert_flops, floor_ms, measure_peak_tflops,
)
from bench.common.links import ALL_TO_ALL, GATHER, H100_NVLINK, LinkModel, Transfer  # noqa: E402
from bench.common.schedule import source_rank_schedule  # noqa: E402
from bench.common.timing import median_ms  # noqa: E402
from moeshard_compile.distributed import _SIGNATURE_LEN  # noqa: E402
from moeshard_compile.kernels.ops import use_triton  # noqa: E402

FIXED_SYSTEMS = ("moeshard_1rank", "moeshard_N", "moeshard_N_overlap", "ep_capacity_cf50", "ep_capacity_cf1.25",
                 "ep_dropless")
HYBRID = "moeshard_g"  # moeshard_g{g}: experts sharded over groups of g ranks (placement), 1 < g < N
BASELINES = {"vs_cf50": "ep_capacity_cf50", "vs_cf1.25": "ep_capacity_cf1.25", "vs_dropless": "ep_dropless"}
MEASURED_AS = {"moeshard_N": "moeshard", "ep_capacity_cf50": "ep_capacity_cf50",  # bench/paper_ranks.py's name
               "ep_capacity_cf1.25": "ep_capacity_cf1.25", "ep_dropless": "ep_dropless"}
MEASURED = (ROOT / "docs/results/paper_4gpu_h100.json", ROOT / "docs/results/paper_4gpu_h100_chunks.json")
TOP_K = 1  # Switch is top-1 (DeepSpeed's capacity layer is top-1 only)
MIN_CAPACITY = 4  # DeepSpeed's default min_capacity
PAPER_CF_CAP = 50  # the paper's DeepSpeed baseline: capacity factor min(E, 50)
CHECK_ROW_BYTES = _SIGNATURE_LEN * 8  # the backend's rank check before each call: one int64 row per rank
SWEEPS = {  # name: (experts, batches, default dtypes, default routings)
    "headline": ([64], [250], ["float32", "bfloat16"], ["skew", "uniform"]),
    "experts": ([8, 16, 32, 64, 128, 256], [250], ["float32"], ["skew"]),
    "batch": ([64], [10, 100, 250, 450], ["float32"], ["skew"]),
    "skew": ([64], [250], ["float32"], ["uniform", "skew", "zipf"]),
    "smoke": ([4, 8], [2], ["float32", "bfloat16"], ["skew", "zipf"]),  # every routing code path, both dtypes
}
ROUTINGS = SWEEPS["skew"][3]  # every routing a sweep can use
SMOKE = dict(sweep="smoke", device="cpu", d_model=32, d_ff=64, seq=8, ranks=4, warmup_ms=2.0, rep_ms=10.0, threads=1)
CSV_FIELDS = ("config", "system", "figure", "E", "batch", "T", "dtype", "routing", "N", "latency_ms", "compute_ms",
              "comm_ms", "host_ms", "overlapped_ms", "hidden_fraction", "perfect_overlap_ms", "floor_ms", "x_floor",
              "max_rows", "mean_rows", "rows_max_over_mean", "bytes_per_rank", "dropped", "dropped_pct", "capacity",
              *BASELINES, "measured_latency_ms", "sim_over_measured", "path", "error")


def hybrid_group_sizes(N: int) -> list[int]:
    """The g of the hybrid placements for N ranks: every divisor with 1 < g < N (g = 1 is
    ep_dropless's placement, g = N moeshard_N's); none for N = 2 or a prime N."""
    return [g for g in range(2, N) if N % g == 0]


def systems_for(N: int) -> tuple[str, ...]:
    """Every system bench/paper.py runs for N ranks, in run order."""
    return (*FIXED_SYSTEMS, *(f"{HYBRID}{g}" for g in hybrid_group_sizes(N)))


def is_simulated(system: str) -> bool:
    return system != "moeshard_1rank"


@dataclass(frozen=True)
class Config:
    """One benchmarked layer: E experts, `batch` sequences per rank, a dtype and a routing."""

    E: int
    batch: int
    dtype: str
    routing: str

    @property
    def name(self) -> str:
        return f"E{self.E}/b{self.batch}/{self.dtype}/{self.routing}"


@dataclass
class Problem:
    """All N ranks' tokens and routing (rank n's are [n]) and the full expert weights."""

    x_NTD: torch.Tensor
    ids_NTK: torch.Tensor
    weight_NTK: torch.Tensor
    w_in_EDF: torch.Tensor
    w_out_EFD: torch.Tensor

    @property
    def N(self) -> int:
        return self.x_NTD.shape[0]

    @property
    def T(self) -> int:
        return self.x_NTD.shape[1]

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_RD, ids_RK, weight_RK of every rank's tokens: R = N*T rows, what a MoEShard rank computes."""
        return self.x_NTD.flatten(0, 1), self.ids_NTK.flatten(0, 1), self.weight_NTK.flatten(0, 1)


@dataclass
class Outcome:
    """What one system did per layer: its busiest rank's measured time, load and modelled traffic."""

    compute_ms: float
    rows_N: list[int]  # rows each rank multiplied, padding included
    bytes_per_rank: int  # the most bytes one rank sends per layer
    transfers: list[Transfer]  # its collectives, in order
    path: str
    host_syncs: int = 0  # device-to-host syncs in the middle of the layer
    dropped: int = 0
    capacity: int | None = None
    overlapped: Overlapped | None = None  # set where transfers run under the computation (else serial)


@dataclass
class Overlapped:
    """A layer whose transfers run beside its computation: when the last rank finishes, and how much
    transfer time ran while computation did (mean over the ranks)."""

    latency_ms: float
    hidden_ms: float


Runner = Callable[[Problem, argparse.Namespace, torch.device], Outcome]  # one system: its Outcome on a Problem


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser, (*FIXED_SYSTEMS, f"{HYBRID}<g>"))
    parser.set_defaults(systems=None)  # every system for --ranks, known once parsed
    parser.add_argument("--kernel", choices=("fused", "grouped_mm"), default="fused",
                        help="grouped computation of moeshard_* and ep_dropless: the fused moeshard ops (what "
                             "passes/lower.py emits; Triton on CUDA) or sort + moeshard_bench::grouped_mm")
    parser.add_argument("--ranks", type=int, default=4, help="N, the simulated ranks (2 or more)")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-ff", type=int, default=3072)
    parser.add_argument("--seq", type=int, default=120, help="tokens per sequence")
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="one per-direction bandwidth for every collective (default: the fitted per-kind ones, "
                             "bench/common/links.py)")
    parser.add_argument("--collective-latency-ms", type=float, default=None,
                        help="fixed cost per collective (default: fitted, bench/common/links.py)")
    parser.add_argument("--host-sync-ms", type=float, default=None,
                        help="cost of a mid-layer device-to-host sync (default: fitted, bench/common/links.py)")
    parser.add_argument("--measured", default=",".join(str(path) for path in MEASURED),
                        help="comma list of bench/paper_ranks.py JSONs to compare the simulated rows with "
                             "('' for none)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no new row after this many s (0: none)")
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS, help="bf16 peak for the floor")
    parser.add_argument("--peak-tflops-fp32", type=float, default=DEFAULT_PEAK_TFLOPS_FP32,
                        help="fp32 peak for the floor (default: H100 SXM datasheet, no TF32)")
    parser.add_argument("--measure-peak", action="store_true", help="measure each dtype's peak: a large matmul")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="every row, rewritten after each")
    parser.add_argument("--csv", type=Path, default=None, help="every row, rewritten after each")
    args = parse_with_smoke(parser, argv, SMOKE, description="every system, N = 4")
    if args.ranks < 2:
        parser.error("--ranks must be 2 or more (moeshard_1rank is the one-rank row)")
    systems = systems_for(args.ranks)
    args.systems = args.systems or ",".join(systems)
    split_config_lists(parser, args, systems)
    args.measured = [Path(path) for path in args.measured.split(",") if path]
    for path in args.measured:
        if not path.is_file():
            parser.error(f"--measured: no file {path}")
    return args


def link_model(args: argparse.Namespace) -> LinkModel:
    """The fitted link model (bench/common/links.py), less what the options override."""
    overrides = {"latency_ms": args.collective_latency_ms, "host_sync_ms": args.host_sync_ms,
                 "gather_gbs": args.bandwidth_gbs, "all_to_all_gbs": args.bandwidth_gbs}
    return replace(H100_NVLINK, **{key: value for key, value in overrides.items() if value is not None})


def add_config_args(parser: argparse.ArgumentParser, systems: tuple[str, ...]) -> None:
    """--sweep, --dtypes, --routings and --systems: what configs() runs, and which systems."""
    parser.add_argument("--sweep", default="headline", help=f"comma list out of {', '.join(SWEEPS)}")
    parser.add_argument("--dtypes", default=None, help="comma list (float32, bfloat16): override every sweep's")
    parser.add_argument("--routings", default=None, help="comma list (uniform, skew, zipf): override every sweep's")
    parser.add_argument("--systems", default=",".join(systems), help=f"comma list out of {', '.join(systems)}")


def split_config_lists(parser: argparse.ArgumentParser, args: argparse.Namespace, systems: tuple[str, ...]) -> None:
    """The comma lists of add_config_args (those given) into lists, each name checked against its known values."""
    known = {"sweep": SWEEPS, "systems": systems, "dtypes": DTYPES, "routings": ROUTINGS}
    for key, values in known.items():
        if getattr(args, key) is not None:
            setattr(args, key, comma_list(parser, f"--{key}", getattr(args, key), values))


def configs(args: argparse.Namespace) -> list[tuple[Config, list[str]]]:
    """Every configuration of the chosen sweeps in run order, each once, with the sweeps it belongs to."""
    found: dict[Config, list[str]] = {}
    for sweep in args.sweep:
        experts, batches, dtypes, routings = SWEEPS[sweep]
        for dtype in args.dtypes or dtypes:
            for routing in args.routings or routings:
                for E in experts:
                    for batch in batches:
                        found.setdefault(Config(E, batch, dtype, routing), []).append(sweep)
    return list(found.items())


def make_problem(config: Config, args: argparse.Namespace, device: torch.device) -> Problem:
    """Random tokens and weights scaled by fan-in (unit-ish activations), seeded routing of all N*T tokens."""
    N, T, D, F = args.ranks, config.batch * args.seq, args.d_model, args.d_ff
    dtype = DTYPES[config.dtype]
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def randn(*size: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=generator, device=device) * std).to(dtype)

    ids_NTK, weight_NTK = (t.view(N, T, TOP_K) for t in synthetic_routing(
        config.routing, N * T, config.E, TOP_K, seed=args.seed, device=device, dtype=dtype))
    return Problem(x_NTD=randn(N * T, D).view(N, T, D), ids_NTK=ids_NTK, weight_NTK=weight_NTK,
                   w_in_EDF=randn(config.E, D, F, std=D**-0.5), w_out_EFD=randn(config.E, F, D, std=F**-0.5))


def grouped_ffn(kernel: str) -> tuple[Callable, Callable[[torch.Tensor, torch.Tensor], str]]:
    """(fn(x_TD, ids_TK, weight_TK, w_in_EDF, w_out_EFD) -> out_TD, path(x, w) in words) for --kernel."""
    if kernel == "fused":
        def fused(x_TD, ids_TK, weight_TK, w_in_EDF, w_out_EFD):
            return moeshard_fused(x_TD, ids_TK, weight_TK, w_in_EDF, None, w_out_EFD, "relu")

        return fused, lambda x, w: "fused moeshard ops, " + ("Triton" if use_triton(x, w) else "reference")

    def sorted_mm(x_TD, ids_TK, weight_TK, w_in_EDF, w_out_EFD):
        native = can_use_native_grouped_mm(x_TD, w_in_EDF)
        return sort_grouped_mm(x_TD, ids_TK, weight_TK, w_in_EDF, None, w_out_EFD, "relu", native=native)

    return sorted_mm, lambda x, w: "sort + " + (
        "torch._grouped_mm" if can_use_native_grouped_mm(x, w) else "moeshard_bench::grouped_mm loop")


def timed_ms(fn: Callable[[], object], device: torch.device, args: argparse.Namespace) -> float:
    """One call first (lazy init, allocator warm-up), then bench/common/timing.py's median_ms."""
    fn()
    return median_ms(fn, device, args.warmup_ms, args.rep_ms)


def moeshard_transfers(N: int, E: int, rows_per_rank: int, row_bytes: int) -> list[Transfer]:
    """moeshard_N's collectives (overlap "none", docs/distributed.md): the rank check before the
    call, the counts and the rows all-gathered, the partial sums reduce-scattered."""
    return [Transfer("rank check", GATHER, (N - 1) * CHECK_ROW_BYTES),
            Transfer("counts", GATHER, (N - 1) * E * COUNT_BYTES),
            Transfer("rows", GATHER, (N - 1) * rows_per_rank * row_bytes),
            Transfer("partial sums", GATHER, (N - 1) * rows_per_rank * row_bytes)]


def capacity_transfers(N: int, El: int, P: int, row_bytes: int) -> list[Transfer]:
    """DeepSpeed's two equal-split all-to-alls: (N-1)/N of each rank's [E, P, D] buffer, each way."""
    phase_bytes = (N - 1) * El * P * row_bytes
    return [Transfer("dispatch", ALL_TO_ALL, phase_bytes), Transfer("combine", ALL_TO_ALL, phase_bytes)]


def variable_all_to_all_transfers(counts_bytes: int, rows_bytes: int) -> list[Transfer]:
    """DroplessExpertParallelMoE's exchange: the counts, then the rows and their outputs back (the
    busiest rank's bytes each way, the combine mirroring the dispatch); one host sync between, for
    the split sizes of both."""
    return [Transfer("counts", ALL_TO_ALL, counts_bytes), Transfer("rows", ALL_TO_ALL, rows_bytes),
            Transfer("outputs back", ALL_TO_ALL, rows_bytes)]


def expert_group_transfers(N: int, E: int, rows_bytes: int) -> list[Transfer]:
    """The backend's expert-group exchange (option expert_group_size, passes/expert_groups.py): the
    rank check, the counts all-gathered, the rows and the partial sums back by variable all-to-alls,
    each of which reads its split sizes on the host (moeshard_compile/exchange.py: 2 host syncs)."""
    return [Transfer("rank check", GATHER, (N - 1) * CHECK_ROW_BYTES),
            Transfer("counts", GATHER, (N - 1) * E * COUNT_BYTES), Transfer("rows", ALL_TO_ALL, rows_bytes),
            Transfer("partial sums", ALL_TO_ALL, rows_bytes)]


def moeshard_1rank(p: Problem, args: argparse.Namespace, device: torch.device) -> Outcome:
    """Rank 0 alone: every whole expert on its own T tokens; no communication."""
    fn, path = grouped_ffn(args.kernel)
    x_TD, ids_TK, weight_TK = p.x_NTD[0], p.ids_NTK[0], p.weight_NTK[0]
    ms = timed_ms(lambda: fn(x_TD, ids_TK, weight_TK, p.w_in_EDF, p.w_out_EFD), device, args)
    return Outcome(ms, [p.T * TOP_K], 0, [], path(x_TD, p.w_in_EDF))


def ffn_block(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """w_in_EDH, w_out_EHD: rank 0's block of every expert, the largest (H = ceil(F/N) columns)."""
    H = -(-p.w_in_EDF.shape[2] // p.N)
    return p.w_in_EDF[:, :, :H].contiguous(), p.w_out_EFD[:, :H].contiguous()


def moeshard_n(p: Problem, args: argparse.Namespace, device: torch.device) -> Outcome:
    """Rank 0's block of every expert over all N*T gathered rows; equal on every rank."""
    fn, path = grouped_ffn(args.kernel)
    w_in_EDH, w_out_EHD = ffn_block(p)
    x_RD, ids_RK, weight_RK = p.gathered()
    ms = timed_ms(lambda: fn(x_RD, ids_RK, weight_RK, w_in_EDH, w_out_EHD), device, args)
    transfers = moeshard_transfers(p.N, p.w_in_EDF.shape[0], p.T * TOP_K, x_RD.shape[1] * x_RD.element_size())
    return Outcome(ms, [p.N * p.T * TOP_K] * p.N, sum(t.bytes for t in transfers), transfers, path(x_RD, w_in_EDH))


def sorted_rows(x_TD, ids_TK, weight_TK, E: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_SD, offs_E, token_S, weight_sorted_S: one rank's S = T*K rows sorted by expert, as
    passes/lower.py sorts them before the exchange (group_by_expert, then index_select)."""
    _, token_S, weight_sorted_S, _, offs_E = torch.ops.moeshard.group_by_expert(
        ids_TK.reshape(-1), weight_TK.reshape(-1), E, ids_TK.shape[1])
    return x_TD.index_select(0, token_S), offs_E, token_S, weight_sorted_S


def expert_block(kernel: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """part_SD = block(x_SD, offs_E, w_in_EDH, w_out_EHD): rows already sorted by expert through an
    FFN block, no gather, no scale (passes/data_parallel.py's block); --kernel's ops."""
    if kernel == "fused":
        def fused(x_SD, offs_E, w_in_EDH, w_out_EHD):
            row_S = torch.arange(x_SD.shape[0], device=x_SD.device)
            h_SH = torch.ops.moeshard.gather_grouped_ffn_in(x_SD, row_S, offs_E, w_in_EDH, None, None, None, "relu")
            return torch.ops.moeshard.grouped_ffn_out_scatter(h_SH, offs_E, w_out_EHD, None, row_S, None)

        return fused

    def grouped(x_SD, offs_E, w_in_EDH, w_out_EHD):
        mm = torch._grouped_mm if can_use_native_grouped_mm(x_SD, w_in_EDH) else torch.ops.moeshard_bench.grouped_mm
        offs_E = offs_E.to(torch.int32)
        return mm(torch.relu(mm(x_SD, w_in_EDH, offs_E)), w_out_EHD, offs_E)

    return grouped


def combine(parts_SD: list[torch.Tensor], token_S, weight_sorted_S, T: int) -> torch.Tensor:
    """out_TD: the N partial sums of a rank's rows added, scaled by the routing weights, summed into
    token order (passes/data_parallel.py's combine)."""
    y_SD = parts_SD[0]
    for part_SD in parts_SD[1:]:
        y_SD = y_SD + part_SD
    weight_S1 = weight_sorted_S[:, None]
    scaled_SD = torch.where(weight_S1 != 0, y_SD * weight_S1, 0.0)
    return scaled_SD.new_zeros(T, scaled_SD.shape[1]).index_add(0, token_S, scaled_SD)


def moeshard_n_overlap(p: Problem, args: argparse.Namespace, device: torch.device) -> Outcome:
    """overlap="source_rank": each rank's S sorted rows through rank 0's block, timed per source rank
    (the routing differs per rank; every rank computes every rank's rows once, so these N times are
    every rank's blocks), rank 0's sort and combine, put on two streams by bench/common/schedule.py."""
    N, E, D = p.N, p.w_in_EDF.shape[0], p.x_NTD.shape[2]
    block, link = expert_block(args.kernel), link_model(args)
    w_in_EDH, w_out_EHD = ffn_block(p)
    sorted_N = [sorted_rows(p.x_NTD[n], p.ids_NTK[n], p.weight_NTK[n], E) for n in range(N)]
    block_ms_N = [timed_ms(lambda x_SD=x_SD, offs_E=offs_E: block(x_SD, offs_E, w_in_EDH, w_out_EHD), device, args)
                  for x_SD, offs_E, _, _ in sorted_N]
    prologue_ms = timed_ms(lambda: sorted_rows(p.x_NTD[0], p.ids_NTK[0], p.weight_NTK[0], E), device, args)
    _, _, token_S, weight_sorted_S = sorted_N[0]
    parts_SD = [block(x_SD, offs_E, w_in_EDH, w_out_EHD) for x_SD, offs_E, _, _ in sorted_N]
    epilogue_ms = timed_ms(lambda: combine(parts_SD, token_S, weight_sorted_S, p.T), device, args)

    check, counts, rows, _ = moeshard_transfers(N, E, p.T * TOP_K, D * p.x_NTD.element_size())
    step_bytes = rows.bytes // (N - 1)  # one step moves one rank's S rows (or their partial sums) each way
    steps = [Transfer(f"{way} {j}", ALL_TO_ALL, step_bytes) for way in ("rows", "partial sums") for j in range(1, N)]
    timelines = source_rank_schedule(prologue_ms, block_ms_N, epilogue_ms, link.transfer_ms(counts),
                                     link.transfer_ms(steps[0]))
    check_ms = link.transfer_ms(check)  # before the call, nothing beside it
    overlapped = Overlapped(check_ms + max(t.finish_ms for t in timelines),
                            statistics.mean(t.hidden_ms for t in timelines))
    transfers = [check, counts, *steps]
    return Outcome(prologue_ms + sum(block_ms_N) + epilogue_ms, [N * p.T * TOP_K] * N, sum(t.bytes for t in transfers),
                   transfers, f"source-rank schedule, {N} blocks of S rows; " + grouped_ffn(args.kernel)[1](
                       p.x_NTD[0], w_in_EDH), overlapped=overlapped)


def experts_per_rank(p: Problem) -> int:
    """El, the whole experts each rank holds under expert parallelism."""
    E, N = p.w_in_EDF.shape[0], p.N
    if E % N:
        raise ValueError(f"{E} experts cannot be split evenly over {N} ranks")
    return E // N


def ep_capacity(capacity_factor: Callable[[int], float]) -> Runner:
    """DeepSpeed's top-1 capacity layer; capacity_factor(E) gives its CF (the paper's: min(E, 50))."""

    def run(p: Problem, args: argparse.Namespace, device: torch.device) -> Outcome:
        N, T, (E, D, _), El = p.N, p.T, p.w_in_EDF.shape, experts_per_rank(p)
        P = deepspeed_capacity(T, E, capacity_factor(E), MIN_CAPACITY)
        ids_NT = p.ids_NTK[..., 0]
        slot_NT = torch.stack([rank_within_expert(ids_T, E) for ids_T in ids_NT])  # DeepSpeed's "position" policy
        kept_NT = slot_NT < P
        times_ms = [timed_ms(_capacity_rank(p, r, El, P, ids_NT, slot_NT, kept_NT), device, args) for r in range(N)]
        transfers = capacity_transfers(N, El, P, D * p.x_NTD.element_size())
        return Outcome(max(times_ms), [E * P] * N, sum(t.bytes for t in transfers), transfers, "torch.bmm",
                       dropped=int((~kept_NT).sum()), capacity=P)

    return run


def _capacity_rank(p: Problem, r: int, El: int, P: int, ids_NT, slot_NT, kept_NT) -> Callable[[], torch.Tensor]:
    """Rank r's work (CapacityExpertParallelMoE.forward less the all-to-alls): fill its own [E, P, D]
    dispatch buffer, run its El experts on the [El, N*P, D] rows it received, gather its combine."""
    N, D, E = p.N, p.x_NTD.shape[2], p.w_in_EDF.shape[0]
    x_NTD = p.x_NTD
    recv_ERD = x_NTD.new_zeros(El, N * P, D)  # R = N*P rows per local expert: slot n*P + c from rank n
    for n in range(N):
        local_T = ids_NT[n] - r * El
        mine_T = kept_NT[n] & (local_T >= 0) & (local_T < El)
        recv_ERD.view(-1, D)[(local_T * N * P + n * P + slot_NT[n])[mine_T]] = x_NTD[n][mine_T]
    w_in_EDF, w_out_EFD = p.w_in_EDF[r * El:(r + 1) * El], p.w_out_EFD[r * El:(r + 1) * El]
    row_T = torch.where(kept_NT[r], ids_NT[r] * P + slot_NT[r], E * P)  # dropped: a spare row past the buffer
    gate_T = torch.where(kept_NT[r], p.weight_NTK[r, :, 0], 0)

    def work() -> torch.Tensor:
        buffer_XD = x_NTD.new_zeros(E * P + 1, D)
        buffer_XD[row_T] = x_NTD[r]
        y_ERD = torch.bmm(torch.relu(torch.bmm(recv_ERD, w_in_EDF)), w_out_EFD)  # E*P rows, as the buffer
        return y_ERD.view(E * P, D)[row_T.clamp(max=E * P - 1)] * gate_T[:, None]

    return work


def expert_groups(E: int, groups: int) -> list[range]:
    """The experts of each group: contiguous blocks, as even as possible (the first E mod groups
    one larger)."""
    base, extra = divmod(E, groups)
    starts = [q * base + min(q, extra) for q in range(groups + 1)]
    return [range(starts[q], starts[q + 1]) for q in range(groups)]


def placement_traffic(rows_NQ: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sent_N, received_N): what each rank sends and receives in the dispatch when rank n sends its
    rows_NQ[n, q] rows of group q's experts to each of group q's g ranks (ranks q*g .. q*g+g-1) but
    itself; the combine sends as much back the other way. g = 1: dropless expert parallelism's
    off-rank rows; g = N: every rank's rows to every other rank, moeshard_N's."""
    N, Q = rows_NQ.shape
    group_N = torch.arange(N, device=rows_NQ.device) // g
    member_NQ = group_N[:, None] == torch.arange(Q, device=rows_NQ.device)[None, :]
    sent_N = (rows_NQ * (g - member_NQ.to(rows_NQ.dtype))).sum(1)
    received_N = rows_NQ[:, group_N].sum(0) - rows_NQ[torch.arange(N, device=rows_NQ.device), group_N]
    return sent_N, received_N


def placement(g: int) -> Runner:
    """Experts in N/g groups of g consecutive ranks, group q holding a contiguous block of experts,
    each of its ranks an F/g block of each. Each group's rows from all ranks through its experts'
    largest F/g block, run for real, the slowest group taken; traffic: placement_traffic, exchanged
    as the dropless baseline does (g = 1, ep_dropless) or the backend's expert groups (g > 1)."""

    def run(p: Problem, args: argparse.Namespace, device: torch.device) -> Outcome:
        fn, path = grouped_ffn(args.kernel)
        N, T, (E, D, F) = p.N, p.T, p.w_in_EDF.shape
        if g == 1:
            experts_per_rank(p)  # as the dropless baseline (DroplessExpertParallelMoE) splits them
        Q, Hg = N // g, -(-F // g)
        groups = expert_groups(E, Q)
        if any(len(experts) == 0 for experts in groups):
            raise ValueError(f"{E} experts cannot fill {Q} groups of {g} ranks")
        ids_S, weight_S = p.ids_NTK.reshape(-1), p.weight_NTK.reshape(-1)  # S = N*T*K routed rows of all ranks
        group_E = torch.repeat_interleave(torch.arange(Q, device=ids_S.device),
                                          torch.tensor([len(experts) for experts in groups], device=ids_S.device))
        group_S, source_S = group_E[ids_S], torch.arange(ids_S.numel(), device=ids_S.device) // (T * TOP_K)
        times_ms, rows_Q = [], []
        for q, experts in enumerate(groups):
            mine_S = group_S == q
            x_RD = p.x_NTD.flatten(0, 1)[mine_S.nonzero()[:, 0] // TOP_K]  # R rows received, in source-rank order
            ids_R1, weight_R1 = (ids_S[mine_S] - experts.start)[:, None], weight_S[mine_S][:, None]
            w_in_EDH = p.w_in_EDF[experts.start:experts.stop, :, :Hg].contiguous()
            w_out_EHD = p.w_out_EFD[experts.start:experts.stop, :Hg].contiguous()
            times_ms.append(timed_ms(lambda: fn(x_RD, ids_R1, weight_R1, w_in_EDH, w_out_EHD), device, args))
            rows_Q.append(x_RD.shape[0])
        rows_NQ = torch.bincount(source_S * Q + group_S, minlength=N * Q).view(N, Q)
        sent_N, received_N = placement_traffic(rows_NQ, g)
        row_bytes = D * p.x_NTD.element_size()
        rows_bytes = int(torch.maximum(sent_N, received_N).max()) * row_bytes
        if g == 1:
            transfers, host_syncs = variable_all_to_all_transfers((N - 1) * (E // N) * COUNT_BYTES, rows_bytes), 1
        else:
            transfers, host_syncs = expert_group_transfers(N, E, rows_bytes), 2
        bytes_per_rank = sum(t.bytes for t in transfers[:-2]) + int((sent_N + received_N).max()) * row_bytes
        return Outcome(max(times_ms), [rows_Q[n // g] for n in range(N)], bytes_per_rank, transfers,
                       path(p.x_NTD[0], p.w_in_EDF), host_syncs=host_syncs)

    return run


RUNNERS: dict[str, Runner] = {
    "moeshard_1rank": moeshard_1rank, "moeshard_N": moeshard_n, "moeshard_N_overlap": moeshard_n_overlap,
    "ep_capacity_cf50": ep_capacity(lambda E: min(E, PAPER_CF_CAP)), "ep_capacity_cf1.25": ep_capacity(lambda E: 1.25),
    "ep_dropless": placement(1),
}


def runner(system: str) -> Runner:
    """A fixed system's runner, or moeshard_g{g}'s placement."""
    return RUNNERS[system] if system in RUNNERS else placement(int(system.removeprefix(HYBRID)))


def run_system(system: str, p: Problem, args: argparse.Namespace, device: torch.device, floor_ms: float) -> dict:
    """One system's row; its error, if any, becomes the row's `error` and the sweep goes on."""
    simulated = is_simulated(system)
    row: dict = {"system": system, "figure": "simulated" if simulated else "measured", "simulated": simulated,
                 "N": p.N if simulated else 1, "error": None}
    try:
        out = runner(system)(p, args, device)
    except Exception as error:  # out of memory, a shape a system refuses: report it, keep going
        row["error"] = error_cell(error)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row
    link = link_model(args)
    comm_ms, host_ms = link.serial_ms(out.transfers), out.host_syncs * link.host_sync_ms
    if out.overlapped:
        latency_ms, overlapped_ms = out.overlapped.latency_ms, out.overlapped.hidden_ms
    else:
        latency_ms, overlapped_ms = out.compute_ms + comm_ms + host_ms, 0.0
    mean_rows = sum(out.rows_N) / len(out.rows_N)
    return {**row, "latency_ms": latency_ms, "compute_ms": out.compute_ms, "comm_ms": comm_ms, "host_ms": host_ms,
            "overlapped_ms": overlapped_ms, "hidden_fraction": overlapped_ms / comm_ms if comm_ms else None,
            "perfect_overlap_ms": max(out.compute_ms, comm_ms) + host_ms, "x_floor": latency_ms / floor_ms,
            "max_rows": max(out.rows_N), "mean_rows": mean_rows, "rows_max_over_mean": max(out.rows_N) / mean_rows,
            "rows_per_rank": out.rows_N, "bytes_per_rank": out.bytes_per_rank, "host_syncs": out.host_syncs,
            "transfers": [{**asdict(t), "ms": link.transfer_ms(t)} for t in out.transfers], "dropped": out.dropped,
            "dropped_pct": 100 * out.dropped / (p.N * p.T * TOP_K), "capacity": out.capacity, "path": out.path}


def add_speedups(rows: list[dict]) -> None:
    """Each row's speedup over each baseline of the same configuration: baseline latency / its latency."""
    latency = {row["system"]: row.get("latency_ms") for row in rows}
    for row in rows:
        for column, baseline in BASELINES.items():
            ok = row.get("latency_ms") and latency.get(baseline)
            row[column] = latency[baseline] / row["latency_ms"] if ok else None


TABLE = (("system", ""), ("figure", ""), ("latency_ms", ".4g"), ("compute_ms", ".4g"), ("comm_ms", ".4g"),
         ("host_ms", ".3g"), ("overlapped_ms", ".3g"), ("x_floor", ".3g"), ("max_rows", ""),
         ("rows_max_over_mean", ".3g"), ("bytes_per_rank", ".4g"), ("dropped", ""), ("vs_cf50", ".3g"),
         ("vs_cf1.25", ".3g"), ("vs_dropless", ".3g"), ("sim_over_measured", ".3g"), ("error", ""), ("path", ""))
SUMMARY = ("config", "system", "figure", "latency_ms", "x_floor", "dropped", "vs_cf50", "vs_cf1.25", "vs_dropless",
           "error")
HOW_FAR = (("config", ""), ("system", ""), ("latency_ms", ".4g"), ("compute_ms", ".4g"), ("comm_ms", ".4g"),
           ("host_ms", ".3g"), ("measured_latency_ms", ".4g"), ("measured_runs", ""), ("sim_over_measured", ".3g"))
FORMATS = dict(TABLE + HOW_FAR)


def table(rows: list[dict], columns: tuple[str, ...] = tuple(name for name, _ in TABLE)) -> str:
    """A github table of rows in the given columns."""
    return github_table(rows, columns, floatfmt=[FORMATS.get(c, "") for c in columns])


def peaks(args: argparse.Namespace, dtypes: list[str], device: torch.device) -> dict[str, tuple[float, str]]:
    """dtype -> (TFLOP/s, where it comes from) for the compute floor."""
    if args.measure_peak:
        return {d: (measure_peak_tflops(d, device, args.warmup_ms, args.rep_ms), f"measured, {d} matmul on {device}")
                for d in dtypes}
    given = {"bfloat16": (args.peak_tflops, "--peak-tflops (default: H100 bf16, measured)"),
             "float32": (args.peak_tflops_fp32, "--peak-tflops-fp32 (default: H100 SXM datasheet, no TF32)")}
    return {d: given.get(d, (args.peak_tflops, "--peak-tflops")) for d in dtypes}


def measured_latencies(args: argparse.Namespace) -> dict[tuple[str, str], list[float]]:
    """(config, system) -> the latencies bench/paper_ranks.py measured for the same shapes, rank
    count and seed in the --measured files, keyed by this script's system name."""
    ours = {measured: system for system, measured in MEASURED_AS.items()}
    found: dict[tuple[str, str], list[float]] = {}
    for path in args.measured:
        result = json.loads(path.read_text())
        setup = result["config"]
        same = (result["world_size"], setup["d_model"], setup["d_ff"], setup["seq"], setup["seed"]) == (
            args.ranks, args.d_model, args.d_ff, args.seq, args.seed)
        for row in result["rows"] if same else []:
            if row.get("latency_ms") and row["system"] in ours:
                found.setdefault((row["config"], ours[row["system"]]), []).append(row["latency_ms"])
    return found


def add_measured(row: dict, measured: dict[tuple[str, str], list[float]]) -> None:
    """The row's measured counterpart (mean over the runs found) and simulated / measured latency."""
    latencies = measured.get((row["config"], row["system"]))
    if latencies and row.get("latency_ms"):
        row["measured_latency_ms"] = statistics.mean(latencies)
        row["measured_runs"] = len(latencies)
        row["sim_over_measured"] = row["latency_ms"] / row["measured_latency_ms"]


class Progress:
    """A one-line progress bar on stderr (the tables go to stdout): done/total, elapsed, the current row."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.width, self.done, self.started = total, width, 0, time.perf_counter()

    def step(self, label: str) -> None:
        filled = self.width * self.done // max(self.total, 1)
        elapsed = time.perf_counter() - self.started
        print(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {elapsed:.0f}s {label:<40}",
              end="\n" if self.done + 1 == self.total else "", file=sys.stderr, flush=True)
        self.done += 1


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # a run cut short still shows every finished row
    started = time.perf_counter()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)  # --smoke: one; tiny CPU matmuls on more only wait on each other
    plan = configs(args)
    env = environment(device)
    print(environment_line(env))
    peak = peaks(args, sorted({config.dtype for config, _ in plan}), device)
    for dtype, (tflops, source) in peak.items():
        print(f"peak {dtype}: {tflops:.4g} TFLOP/s ({source})")
    link = link_model(args)
    measured = measured_latencies(args)
    print(f"Switch-Base expert FFN: D={args.d_model} F={args.d_ff} K={TOP_K} relu, {args.seq} tokens/sequence, "
          f"N={args.ranks} ranks | kernel {args.kernel} | sweeps {','.join(args.sweep)}: {len(plan)} configurations | "
          f"budget {args.budget_s:g} s\n'simulated' rows: each rank's work run on this one device, max over ranks, "
          f"plus modelled communication; 'measured': one real rank, no communication.\nlink model "
          f"(bench/common/links.py, fitted to 4 H100s unless overridden): {link}; serial except moeshard_N_overlap's "
          f"two streams (bench/common/schedule.py) | measured counterparts: {len(measured)} rows from "
          f"{', '.join(str(path) for path in args.measured) or 'no file'}")
    if not hybrid_group_sizes(args.ranks):
        print(f"N={args.ranks}: no hybrid placement (no g with 1 < g < N divides N): ep_dropless is g = 1, "
              f"moeshard_N g = N")

    rows: list[dict] = []
    not_run: list[str] = []
    progress = Progress(len(plan) * len(args.systems))

    def save() -> None:
        """JSON and CSV of every row so far, and what was not run."""
        if args.json:
            write_json(args.json, {
                "environment": env, "config": recorded_config(args),
                "peaks": {d: {"tflops": t, "source": s} for d, (t, s) in peak.items()},
                "link_model": asdict(link), "link_source": "bench/common/links.py H100_NVLINK" + (
                    "" if link == H100_NVLINK else ", overridden by the options"),
                "measured_files": [str(path) for path in args.measured], "rows": rows, "not_run": not_run})
        if args.csv:
            with args.csv.open("w", newline="") as file:
                writer = csv.DictWriter(file, CSV_FIELDS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)

    with torch.no_grad():
        for config, sweeps_of in plan:
            T = config.batch * args.seq
            layer_floor_ms = floor_ms(expert_flops(T, TOP_K, args.d_model, args.d_ff), peak[config.dtype][0])
            base = {"config": config.name, **asdict(config), "T": T, "sweeps": sweeps_of, "floor_ms": layer_floor_ms}
            config_rows: list[dict] = []
            try:
                problem = make_problem(config, args, device)
                counts_E = torch.bincount(problem.ids_NTK.reshape(-1), minlength=config.E)
                busiest = (counts_E.max() / counts_E.double().mean()).item()
            except Exception as error:  # the inputs themselves failed (e.g. out of memory): next configuration
                problem, busiest = None, None
                base["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            print(f"\n## {config.name} ({', '.join(sweeps_of)}): T={T} tokens per rank, N*T={args.ranks * T} | "
                  f"busiest expert {busiest or float('nan'):.2f}x the mean load | floor {layer_floor_ms:.4g} ms")
            for system in args.systems:
                progress.step(f"{config.name} {system}")
                if args.budget_s and time.perf_counter() - started > args.budget_s:
                    not_run.append(f"{config.name}/{system}")
                    continue
                row = {**base, "busiest_expert_load": busiest}
                row.update(run_system(system, problem, args, device, layer_floor_ms) if problem else
                           {"system": system, "figure": "simulated" if is_simulated(system) else "measured"})
                add_measured(row, measured)
                config_rows.append(row)
                add_speedups(config_rows)
                rows.append(row)
                save()
            del problem
            if config_rows:
                print(table(config_rows))

    for sweep in args.sweep:
        sweep_rows = [row for row in rows if sweep in row["sweeps"]]
        if sweep_rows:
            print(f"\n# {sweep} (latency per MoE layer, ms; simulated rows model {args.ranks} ranks)")
            print(table(sweep_rows, SUMMARY))
    compared = [row for row in rows if row.get("sim_over_measured")]
    print(f"\n# how far off: simulated / measured latency ({len(compared)} rows with a measured counterpart)")
    if compared:
        print(table(compared, tuple(name for name, _ in HOW_FAR)))
    if not_run:
        print(f"budget of {args.budget_s:g} s spent: {len(not_run)} rows not run: {', '.join(not_run)}")
    save()
    print(f"total {time.perf_counter() - started:.1f} s" + "".join(f"; wrote {p}" for p in (args.json, args.csv) if p))


if __name__ == "__main__":
    main(sys.argv[1:])
