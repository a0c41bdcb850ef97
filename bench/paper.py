"""The MoEShard paper's per-MoE-layer comparison (arXiv 2503.08467, Switch-Base) on one GPU: MoEShard
against DeepSpeed-style capacity expert parallelism and dropless expert parallelism, N ranks simulated.

    python bench/paper.py --measure-peak --sweep headline,skew,experts,batch --budget-s 480 \\
        --json paper_h100.json --csv paper_h100.csv     # one H100, one call: estimated 2-4 min, not yet run
    python bench/paper.py --smoke                       # tiny shapes on CPU, seconds

The layer: Switch-Base's expert FFN, y = relu(x @ W_in) @ W_out (d_model 768, d_ff 3072, top-1, no
biases), E experts, each of N ranks (default 4) bringing its own batch of B sequences x 120 tokens
(T = 120 B tokens per rank), routing drawn by bench/baselines/routers.py (uniform; skew, the paper's
router with alpha 0.6 on the first 10% of experts; zipf). The router's own matmul is left out.

Systems (all N ranks' N*T tokens and their routing are drawn on the one device; each rank's work
is derived from them and run for real; "simulated" marks every figure that models N ranks):
    moeshard_1rank      measured: one rank does every expert on its own T tokens (sort + the fused expert
                        ops, bench/baselines/expert_computations.py's moeshard_fused: what passes/lower.py emits;
                        --kernel grouped_mm: sort + library grouped matmuls instead, for all systems)
    moeshard_N          simulated: every rank runs the grouped computation over all N*T gathered rows
                        on its ceil(F/N) block of every expert (every rank has that shape: run once);
                        traffic: all-gather of the counts and of the rows, reduce-scatter of the partial
                        outputs, (N-1)*E*8 + 2*(N-1)*T*K*D*bytes per rank (docs/distributed.md)
    ep_capacity_cf50    simulated DeepSpeed top-1 (bench/baselines CapacityExpertParallelMoE): capacity
    ep_capacity_cf1.25  P = deepspeed_capacity(T, E, CF, 4) per expert per source rank, CF = min(E, 50)
                        as in the paper, or 1.25; each rank fills its [E, P, D] dispatch buffer, runs its
                        E/N experts over their N*P padded rows (torch.bmm) and gathers its combine;
                        run for every rank, the max taken; two equal-split all-to-alls of
                        (N-1)/N of the [E, P, D] buffer each; tokens past capacity are dropped
    ep_dropless         simulated dropless EP (DroplessExpertParallelMoE): each rank runs the grouped
                        computation over exactly the rows routed to its E/N experts from all ranks
                        (max over ranks); variable all-to-alls of the counts, the rows and back
Latency = the busiest rank's measured compute + modelled communication, serial (no overlap; the JSON
also gives max(compute, comm), the bound for overlapping). Communication: every collective phase takes
max over ranks of max(bytes sent, bytes received) / --bandwidth-gbs (default 450 GB/s per direction:
NVLink 4 nominal on H100 SXM, 900 GB/s bidirectional; NCCL reaches less, so this is optimistic for
every system alike); no per-collective latency term.

Metrics per row: latency_ms (median: triton's do_bench on CUDA, wall clock on CPU, via
bench/common/timing.py's median_ms), x_floor = latency / floor, floor = 2 matmuls * 2*T*K*D*F FLOPs (one
rank's useful work, the same for every system) / peak (--peak-tflops for bf16, --peak-tflops-fp32 for
fp32, or --measure-peak: a large matmul per dtype); max_rows and max/mean rows computed over ranks
(padding included); bytes each rank sends per layer (max over ranks); tokens dropped (all ranks);
speedups vs ep_capacity_cf50 (the paper's baseline), ep_capacity_cf1.25 and ep_dropless.

Sweeps (--sweep, a comma list run in order; a configuration already run is not run again):
    headline (default) E 64, batch 250, fp32 (the paper's) and bf16, skew and uniform
    experts  E 8/16/32/64/128/256, batch 250;  batch  batch 10/100/250/450, E 64;
    skew     uniform/skew/zipf at E 64, batch 250   (experts, batch, skew: fp32 and skew unless
             --dtypes / --routings say otherwise)
    smoke    (--smoke) D 32, F 64, seq 8, batch 2, N 2, E 4/8, on CPU
A failing system prints its error in its row and the sweep goes on; --json and --csv are rewritten
after every row; --budget-s stops starting new rows (the rest are listed as not run).

Names carry their shape: N ranks, T tokens per rank, K routing slots per token, S = N*T*K routed rows
of all ranks, R rows a rank computes, D model dim, F expert FFN dim, H = ceil(F/N) one rank's FFN
block, E experts, El = E/N experts per rank, P capacity (rows per expert and source rank).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` importable when run as a script
from bench.baselines.expert_computations import moeshard_fused, sort_grouped_mm  # noqa: E402
from bench.baselines.expert_parallel import COUNT_BYTES, deepspeed_capacity, rank_within_expert  # noqa: E402
from bench.baselines.grouped_mm import can_use_native_grouped_mm  # noqa: E402
from bench.baselines.routers import synthetic_routing  # noqa: E402
from bench.common.cli import DTYPES, comma_list, error_cell, github_table, parse_with_smoke  # noqa: E402
from bench.common.environment import environment, environment_line, recorded_config, write_json  # noqa: E402
from bench.common.floor import (  # noqa: E402
    DEFAULT_PEAK_TFLOPS, DEFAULT_PEAK_TFLOPS_FP32, NVLINK4_GBS, expert_flops, floor_ms, measure_peak_tflops,
    transfer_ms,
)
from bench.common.timing import median_ms  # noqa: E402
from moeshard_compile.kernels.ops import use_triton  # noqa: E402

SYSTEMS = ("moeshard_1rank", "moeshard_N", "ep_capacity_cf50", "ep_capacity_cf1.25", "ep_dropless")
SIMULATED = {"moeshard_N", "ep_capacity_cf50", "ep_capacity_cf1.25", "ep_dropless"}
BASELINES = {"vs_cf50": "ep_capacity_cf50", "vs_cf1.25": "ep_capacity_cf1.25", "vs_dropless": "ep_dropless"}
TOP_K = 1  # Switch is top-1 (DeepSpeed's capacity layer is top-1 only)
MIN_CAPACITY = 4  # DeepSpeed's default min_capacity
PAPER_CF_CAP = 50  # the paper's DeepSpeed baseline: capacity factor min(E, 50)
SWEEPS = {  # name: (experts, batches, default dtypes, default routings)
    "headline": ([64], [250], ["float32", "bfloat16"], ["skew", "uniform"]),
    "experts": ([8, 16, 32, 64, 128, 256], [250], ["float32"], ["skew"]),
    "batch": ([64], [10, 100, 250, 450], ["float32"], ["skew"]),
    "skew": ([64], [250], ["float32"], ["uniform", "skew", "zipf"]),
    "smoke": ([4, 8], [2], ["float32", "bfloat16"], ["skew", "zipf"]),  # every routing code path, both dtypes
}
ROUTINGS = SWEEPS["skew"][3]  # every routing a sweep can use
SMOKE = dict(sweep="smoke", device="cpu", d_model=32, d_ff=64, seq=8, ranks=2, warmup_ms=2.0, rep_ms=10.0)
CSV_FIELDS = ("config", "system", "figure", "E", "batch", "T", "dtype", "routing", "N", "latency_ms", "compute_ms",
              "comm_ms", "overlapped_ms", "floor_ms", "x_floor", "max_rows", "mean_rows", "rows_max_over_mean",
              "bytes_per_rank", "dropped", "dropped_pct", "capacity", *BASELINES, "path", "error")


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
    comm_ms: float  # modelled, serial sum over the collective phases
    path: str
    dropped: int = 0
    capacity: int | None = None


Runner = Callable[[Problem, argparse.Namespace, torch.device], Outcome]  # one system: its Outcome on a Problem


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser, SYSTEMS)
    parser.add_argument("--kernel", choices=("fused", "grouped_mm"), default="fused",
                        help="grouped computation of moeshard_* and ep_dropless: the fused moeshard ops (what "
                             "passes/lower.py emits; Triton on CUDA) or sort + moeshard_bench::grouped_mm")
    parser.add_argument("--ranks", type=int, default=4, help="N, the simulated ranks")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-ff", type=int, default=3072)
    parser.add_argument("--seq", type=int, default=120, help="tokens per sequence")
    parser.add_argument("--bandwidth-gbs", type=float, default=NVLINK4_GBS,
                        help="per-direction link bandwidth for the modelled collectives (default: NVLink 4 nominal)")
    parser.add_argument("--device", default="cuda")
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
    args = parse_with_smoke(parser, argv, SMOKE, description="every system")
    split_config_lists(parser, args, SYSTEMS)
    return args


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


def phases_ms(phase_bytes: list[int], args: argparse.Namespace) -> float:
    """Collective phases one after another, each the busiest rank's bytes over the link bandwidth."""
    return transfer_ms(sum(phase_bytes), args.bandwidth_gbs)


def moeshard_1rank(p: Problem, args: argparse.Namespace, device: torch.device) -> Outcome:
    """Rank 0 alone: every whole expert on its own T tokens; no communication."""
    fn, path = grouped_ffn(args.kernel)
    x_TD, ids_TK, weight_TK = p.x_NTD[0], p.ids_NTK[0], p.weight_NTK[0]
    ms = timed_ms(lambda: fn(x_TD, ids_TK, weight_TK, p.w_in_EDF, p.w_out_EFD), device, args)
    return Outcome(ms, [p.T * TOP_K], 0, 0.0, path(x_TD, p.w_in_EDF))


def moeshard_n(p: Problem, args: argparse.Namespace, device: torch.device) -> Outcome:
    """Rank 0's block (the largest: ceil(F/N)) of every expert over all N*T gathered rows; equal on every rank."""
    fn, path = grouped_ffn(args.kernel)
    N, E, F = p.N, p.w_in_EDF.shape[0], p.w_in_EDF.shape[2]
    H = -(-F // N)
    w_in_EDH, w_out_EHD = p.w_in_EDF[:, :, :H].contiguous(), p.w_out_EFD[:, :H].contiguous()
    x_RD, ids_RK, weight_RK = p.gathered()
    ms = timed_ms(lambda: fn(x_RD, ids_RK, weight_RK, w_in_EDH, w_out_EHD), device, args)
    row_bytes = x_RD.shape[1] * x_RD.element_size()
    phases = [(N - 1) * E * COUNT_BYTES, (N - 1) * p.T * TOP_K * row_bytes, (N - 1) * p.T * TOP_K * row_bytes]
    return Outcome(ms, [N * p.T * TOP_K] * N, sum(phases), phases_ms(phases, args), path(x_RD, w_in_EDH))


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
        phase_bytes = (N - 1) * El * P * D * p.x_NTD.element_size()
        return Outcome(max(times_ms), [E * P] * N, 2 * phase_bytes, phases_ms([phase_bytes] * 2, args), "torch.bmm",
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


def ep_dropless(p: Problem, args: argparse.Namespace, device: torch.device) -> Outcome:
    """Each rank's grouped computation over the rows routed to its El experts from all ranks; max over ranks."""
    fn, path = grouped_ffn(args.kernel)
    N, T, D, El = p.N, p.T, p.w_in_EDF.shape[1], experts_per_rank(p)
    ids_S, weight_S = p.ids_NTK.reshape(-1), p.weight_NTK.reshape(-1)  # S = N*T*K routed rows of all ranks
    owner_S = ids_S // El  # the rank holding each slot's expert
    source_S = torch.arange(ids_S.numel(), device=ids_S.device) // (T * TOP_K)
    times_ms, rows_N = [], []
    for r in range(N):
        mine_S = owner_S == r
        x_RD = p.x_NTD.flatten(0, 1)[mine_S.nonzero()[:, 0] // TOP_K]  # R rows received, in source-rank order
        ids_R1, weight_R1 = (ids_S[mine_S] - r * El)[:, None], weight_S[mine_S][:, None]
        w_in_EDF, w_out_EFD = p.w_in_EDF[r * El:(r + 1) * El], p.w_out_EFD[r * El:(r + 1) * El]
        times_ms.append(timed_ms(lambda: fn(x_RD, ids_R1, weight_R1, w_in_EDF, w_out_EFD), device, args))
        rows_N.append(x_RD.shape[0])
    offrank_S = owner_S != source_S
    sent_N = torch.bincount(source_S[offrank_S], minlength=N)  # dispatch; the combine sends back what came in
    received_N = torch.bincount(owner_S[offrank_S], minlength=N)
    row_bytes = D * p.x_NTD.element_size()
    phases = [(N - 1) * El * COUNT_BYTES] + [int(torch.maximum(sent_N, received_N).max()) * row_bytes] * 2
    bytes_per_rank = (N - 1) * El * COUNT_BYTES + int((sent_N + received_N).max()) * row_bytes
    return Outcome(max(times_ms), rows_N, bytes_per_rank, phases_ms(phases, args), path(p.x_NTD[0], p.w_in_EDF))


RUNNERS: dict[str, Runner] = {
    "moeshard_1rank": moeshard_1rank, "moeshard_N": moeshard_n,
    "ep_capacity_cf50": ep_capacity(lambda E: min(E, PAPER_CF_CAP)), "ep_capacity_cf1.25": ep_capacity(lambda E: 1.25),
    "ep_dropless": ep_dropless,
}


def run_system(system: str, p: Problem, args: argparse.Namespace, device: torch.device, floor_ms: float) -> dict:
    """One system's row; its error, if any, becomes the row's `error` and the sweep goes on."""
    row: dict = {"system": system, "figure": "simulated" if system in SIMULATED else "measured",
                 "simulated": system in SIMULATED, "N": p.N if system in SIMULATED else 1, "error": None}
    try:
        out = RUNNERS[system](p, args, device)
    except Exception as error:  # out of memory, a shape a system refuses: report it, keep going
        row["error"] = error_cell(error)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row
    latency_ms = out.compute_ms + out.comm_ms
    mean_rows = sum(out.rows_N) / len(out.rows_N)
    return {**row, "latency_ms": latency_ms, "compute_ms": out.compute_ms, "comm_ms": out.comm_ms,
            "overlapped_ms": max(out.compute_ms, out.comm_ms), "x_floor": latency_ms / floor_ms,
            "max_rows": max(out.rows_N), "mean_rows": mean_rows, "rows_max_over_mean": max(out.rows_N) / mean_rows,
            "bytes_per_rank": out.bytes_per_rank, "dropped": out.dropped,
            "dropped_pct": 100 * out.dropped / (p.N * p.T * TOP_K), "capacity": out.capacity, "path": out.path}


def add_speedups(rows: list[dict]) -> None:
    """Each row's speedup over each baseline of the same configuration: baseline latency / its latency."""
    latency = {row["system"]: row.get("latency_ms") for row in rows}
    for row in rows:
        for column, baseline in BASELINES.items():
            ok = row.get("latency_ms") and latency.get(baseline)
            row[column] = latency[baseline] / row["latency_ms"] if ok else None


TABLE = (("system", ""), ("figure", ""), ("latency_ms", ".4g"), ("compute_ms", ".4g"), ("comm_ms", ".4g"),
         ("x_floor", ".3g"), ("max_rows", ""), ("rows_max_over_mean", ".3g"), ("bytes_per_rank", ".4g"),
         ("dropped", ""), ("vs_cf50", ".3g"), ("vs_cf1.25", ".3g"), ("vs_dropless", ".3g"), ("error", ""), ("path", ""))
SUMMARY = ("config", "system", "figure", "latency_ms", "x_floor", "dropped", "vs_cf50", "vs_cf1.25", "vs_dropless",
           "error")


def table(rows: list[dict], columns: tuple[str, ...] = tuple(name for name, _ in TABLE)) -> str:
    """A github table of rows in the given columns."""
    formats = dict(TABLE)
    return github_table(rows, columns, floatfmt=[formats.get(c, "") for c in columns])


def peaks(args: argparse.Namespace, dtypes: list[str], device: torch.device) -> dict[str, tuple[float, str]]:
    """dtype -> (TFLOP/s, where it comes from) for the compute floor."""
    if args.measure_peak:
        return {d: (measure_peak_tflops(d, device, args.warmup_ms, args.rep_ms), f"measured, {d} matmul on {device}")
                for d in dtypes}
    given = {"bfloat16": (args.peak_tflops, "--peak-tflops (default: H100 bf16, measured)"),
             "float32": (args.peak_tflops_fp32, "--peak-tflops-fp32 (default: H100 SXM datasheet, no TF32)")}
    return {d: given.get(d, (args.peak_tflops, "--peak-tflops")) for d in dtypes}


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
    plan = configs(args)
    env = environment(device)
    print(environment_line(env))
    peak = peaks(args, sorted({config.dtype for config, _ in plan}), device)
    for dtype, (tflops, source) in peak.items():
        print(f"peak {dtype}: {tflops:.4g} TFLOP/s ({source})")
    print(f"Switch-Base expert FFN: D={args.d_model} F={args.d_ff} K={TOP_K} relu, {args.seq} tokens/sequence, "
          f"N={args.ranks} ranks | communication modelled at {args.bandwidth_gbs:g} GB/s per direction, serial | "
          f"kernel {args.kernel} | sweeps {','.join(args.sweep)}: {len(plan)} configurations | "
          f"budget {args.budget_s:g} s\n'simulated' rows: each rank's work run on this one device, max over ranks, "
          f"plus modelled communication; 'measured': one real rank, no communication.")

    rows: list[dict] = []
    not_run: list[str] = []
    progress = Progress(len(plan) * len(args.systems))

    def save() -> None:
        """JSON and CSV of every row so far, and what was not run."""
        if args.json:
            write_json(args.json, {
                "environment": env, "config": recorded_config(args),
                "peaks": {d: {"tflops": t, "source": s} for d, (t, s) in peak.items()},
                "bandwidth_gbs": args.bandwidth_gbs, "bandwidth_source": "--bandwidth-gbs" if
                args.bandwidth_gbs != NVLINK4_GBS else "default: NVLink 4 nominal per direction (not measured)",
                "rows": rows, "not_run": not_run})
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
                           {"system": system, "figure": "simulated" if system in SIMULATED else "measured"})
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
    if not_run:
        print(f"budget of {args.budget_s:g} s spent: {len(not_run)} rows not run: {', '.join(not_run)}")
    save()
    print(f"total {time.perf_counter() - started:.1f} s" + "".join(f"; wrote {p}" for p in (args.json, args.csv) if p))


if __name__ == "__main__":
    main(sys.argv[1:])
