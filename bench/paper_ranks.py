"""The paper's per-MoE-layer comparison on N real ranks: moeshard against the expert-parallel baselines.

    torchrun --nproc-per-node 4 bench/paper_ranks.py --json paper_4gpu.json      # 4 GPUs, NCCL
    python bench/paper_ranks.py --smoke                                           # 2 gloo ranks on CPU, seconds

bench/paper.py simulates N ranks on one device; this script runs them: one process per rank
(torchrun's, or spawned here with --world-size on CPU), NCCL on CUDA (rank r on cuda:LOCAL_RANK),
gloo on CPU. Every rank brings its own batch of `batch` sequences x `seq` tokens; all N*T
tokens' routing is drawn as in bench/paper.py (same seed, rank r takes rows r*T:(r+1)*T), so a
configuration here and there routes the same tokens; --sweep, --dtypes and --routings pick the
configurations as there. Systems, each on the same weights:
    moeshard            the expert FFN written as a per-expert loop (ExpertLoop), compiled with
                        torch.compile(backend="moeshard", options={"world_size": N}): every rank
                        holds its 1/N block of every expert; the real backend path, collectives included
    moeshard_chunks2/4  the same with options comm_chunks 2 / 4: traffic in chunks, under the computation
    moeshard_overlap    the same with overlap="source_rank": N-1 pairwise exchanges, each source rank's
                        rows computed as they arrive (docs/distributed.md)
    moeshard_g1         the same with expert_group_size=1: whole experts, E/N a rank (dropless expert
                        parallelism through the backend), rows to their expert's rank by variable all-to-alls
    moeshard_auto       the same with expert_group_size="auto": the backend's cost model picks g (the row
                        gives it as `group_size`)
    ep_capacity_cf50    bench/baselines CapacityExpertParallelMoE (DeepSpeed-MoE's top-1 semantics),
    ep_capacity_cf1.25  CF = min(E, 50) as in the paper, or 1.25; equal-split all-to-alls
    ep_dropless         bench/baselines DroplessExpertParallelMoE: variable all-to-alls, grouped matmul
Each call is timed on every rank between barriers (device synchronised); a call's latency is the
slowest rank's, and the row reports the median over --repeats calls. Rows are "measured (N ranks)".
Metrics also gathered over ranks: rows computed (max / mean), bytes sent off-rank (max), tokens
dropped (all ranks); speedups vs the three baselines as in bench/paper.py. moeshard's row also
checks that the loop was rewritten and gives its max relative error against the eager loop.
--profile adds, per system, the GPU kernel timeline of --profile-calls calls (bench/common/kernel_timeline.py,
mean over ranks): comm_ms (NCCL kernels), compute_ms (the others) and overlapped_ms (both at once).

Names carry their shape: N ranks, T tokens per rank, K routing slots per token, R the rows of one expert,
D model dim, F expert FFN dim, E experts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` importable when run as a script
import moeshard_compile  # noqa: E402
from moeshard_compile.passes.shard import ffn_block  # noqa: E402  (the backend's even expert blocks)
from bench.baselines.expert_parallel import CapacityExpertParallelMoE, DroplessExpertParallelMoE, load_summary  # noqa: E402
from bench.baselines.routers import synthetic_routing  # noqa: E402
from bench.common.cli import DTYPES, error_cell, github_table, parse_with_smoke  # noqa: E402
from bench.common.environment import environment, recorded_config, write_json  # noqa: E402
from bench.common.kernel_timeline import overlap_summary, profiled_kernels  # noqa: E402
from bench.common.ranks import spawn_local_ranks  # noqa: E402
from bench.paper import (  # noqa: E402
    BASELINES, MIN_CAPACITY, PAPER_CF_CAP, TOP_K, Config, add_config_args, add_speedups, configs, split_config_lists,
)

MOESHARD_OPTIONS = {  # system -> its moeshard options
    "moeshard": {}, "moeshard_chunks2": {"comm_chunks": 2}, "moeshard_chunks4": {"comm_chunks": 4},
    "moeshard_overlap": {"overlap": "source_rank"}, "moeshard_g1": {"expert_group_size": 1},
    "moeshard_auto": {"expert_group_size": "auto"},
}
SYSTEMS = (*MOESHARD_OPTIONS, "ep_capacity_cf50", "ep_capacity_cf1.25", "ep_dropless")
SMOKE = dict(sweep="smoke", device="cpu", d_model=32, d_ff=64, seq=8, world_size=2, repeats=3)


class ExpertLoop(nn.Module):
    """Switch's expert FFN as users write it: a loop over experts reading stacked weights w[e]."""

    def __init__(self, w_in_EDF: torch.Tensor, w_out_EFD: torch.Tensor):
        super().__init__()
        self.w_in_EDF = nn.Parameter(w_in_EDF, requires_grad=False)
        self.w_out_EFD = nn.Parameter(w_out_EFD, requires_grad=False)

    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
        out_TD = torch.zeros_like(x_TD)
        for e in range(self.w_in_EDF.shape[0]):
            token_R, slot_R = torch.where(ids_TK == e)
            y_RD = torch.relu(x_TD[token_R] @ self.w_in_EDF[e]) @ self.w_out_EFD[e]
            out_TD.index_add_(0, token_R, y_RD * weight_TK[token_R, slot_R, None])
        return out_TD


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser, SYSTEMS)
    parser.add_argument("--world-size", type=int, default=None,
                        help="spawn this many ranks here (CPU or one GPU each); default: torchrun's, else 2")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-ff", type=int, default=3072)
    parser.add_argument("--seq", type=int, default=120, help="tokens per sequence")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per system (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="add comm/compute/overlap per call (CUDA)")
    parser.add_argument("--profile-calls", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parse_with_smoke(parser, argv, SMOKE, description="2 gloo ranks")
    split_config_lists(parser, args, SYSTEMS)
    if args.profile and args.device != "cuda":
        parser.error("--profile reads the GPU's kernel timeline: it needs --device cuda")
    return args


def build(system: str, w_in_EDF: torch.Tensor, w_out_EFD: torch.Tensor, world: int, device: torch.device):
    """The callable fn(x_TD, ids_TK, weight_TK) of one system on this rank, and what reports on it:
    the baseline module (its stats) or moeshard's Report."""
    E = w_in_EDF.shape[0]
    if system in MOESHARD_OPTIONS:
        options = moeshard_compile.Options(world_size=world, inductor=device.type == "cuda",
                                           **MOESHARD_OPTIONS[system])
        report = moeshard_compile.Report()
        loop = ExpertLoop(w_in_EDF, w_out_EFD)
        backend = moeshard_compile.backend.make_backend(options, report)
        return torch.compile(loop, backend=backend, fullgraph=True), report
    if system == "ep_dropless":
        module = DroplessExpertParallelMoE(w_in_EDF, w_out_EFD)
    else:
        capacity_factor = min(E, PAPER_CF_CAP) if system == "ep_capacity_cf50" else 1.25
        module = CapacityExpertParallelMoE(w_in_EDF, w_out_EFD, capacity_factor=capacity_factor,
                                           min_capacity=MIN_CAPACITY)
    return module, module


def _check_moeshard(report, out_TD: torch.Tensor, eager_TD: torch.Tensor, row: dict) -> None:
    """The loop must have been rewritten (else the row would time eager code) and equal eager's result."""
    statuses = [(r["status"], r.get("reason")) for r in report.regions]
    if [status for status, _ in statuses] != ["rewritten"]:
        raise RuntimeError(f"moeshard did not rewrite the expert loop: {statuses}")
    err = (out_TD.double() - eager_TD.double()).abs().max() / eager_TD.double().abs().max().clamp_min(1e-30)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)  # the worst rank's
    row["max_rel_err"] = err.item()


def timed_call_ms(fn, inputs, device: torch.device) -> float:
    """One call between barriers; the slowest rank's wall time (device synchronised)."""
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn(*inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = torch.tensor([(time.perf_counter() - started) * 1e3], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def run_config(config: Config, args: argparse.Namespace, rank: int, world: int, device: torch.device) -> list[dict]:
    dtype, T, D, F = DTYPES[config.dtype], config.batch * args.seq, args.d_model, args.d_ff
    generator = torch.Generator(device=device).manual_seed(args.seed)
    w_in_EDF = (torch.randn(config.E, D, F, generator=generator, device=device) * D**-0.5).to(dtype)
    w_out_EFD = (torch.randn(config.E, F, D, generator=generator, device=device) * F**-0.5).to(dtype)
    ids_NTK, weight_NTK = (t.view(world, T, TOP_K) for t in synthetic_routing(
        config.routing, world * T, config.E, TOP_K, seed=args.seed, device=device, dtype=dtype))
    x_TD = torch.randn(world * T, D, generator=generator, device=device).to(dtype).view(world, T, D)[rank]
    inputs = (x_TD, ids_NTK[rank], weight_NTK[rank])
    rows = []
    for system in args.systems:
        row = {"config": config.name, "E": config.E, "batch": config.batch, "T": T, "dtype": config.dtype,
               "routing": config.routing, "system": system, "figure": f"measured ({world} ranks)", "N": world,
               "error": None}
        try:
            torch._dynamo.reset()
            fn, reporter = build(system, w_in_EDF, w_out_EFD, world, device)
            with torch.no_grad():
                out_TD = fn(*inputs)  # compiles
                if isinstance(reporter, moeshard_compile.Report):
                    _check_moeshard(reporter, out_TD, ExpertLoop(w_in_EDF, w_out_EFD)(*inputs), row)
                fn(*inputs)
                times = [timed_call_ms(fn, inputs, device) for _ in range(args.repeats)]
                if args.profile:
                    row.update(_timeline(lambda: fn(*inputs), args.profile_calls, world, device))
            row["latency_ms"] = statistics.median(times)
            if isinstance(reporter, nn.Module):
                summary = load_summary(reporter.stats)
                row.update(max_rows=summary["max_rows_computed"], mean_rows=summary["mean_rows_computed"],
                           dropped=summary["dropped"], max_offrank_bytes=summary["max_offrank_bytes"])
            else:
                g = reporter.regions[0]["expert_group_size"]
                row.update(group_size=g, dropped=0,
                           **_moeshard_load(ids_NTK, config.E, g, D * x_TD.element_size()))
        except Exception as error:  # every rank fails alike (same shapes); report it and go on
            row["error"] = error_cell(error)
        rows.append(row)
    add_speedups(rows)
    return rows


def _moeshard_load(ids_NTK: torch.Tensor, E: int, g: int, row_bytes: int) -> dict:
    """Rows each rank multiplies and bytes it sends off-rank per layer, with expert groups of g
    ranks (g = N: MoEShard, every rank all N*T*K rows on its FFN block), from every rank's routing."""
    N, T, K = ids_NTK.shape
    if g == N:
        return dict(max_rows=N * T * K, mean_rows=N * T * K, max_offrank_bytes=2 * (N - 1) * T * K * row_bytes)
    Q = N // g
    blocks = [ffn_block(E, q, Q) for q in range(Q)]
    group_E = torch.cat([torch.full((stop - start,), q) for q, (start, stop) in enumerate(blocks)])
    rows_NQ = torch.stack([torch.bincount(group_E[ids.reshape(-1).long().cpu()], minlength=Q) for ids in ids_NTK])
    rows_Q = rows_NQ.sum(0)
    sent_N = [g * T * K - rows_NQ[r, r // g].item() for r in range(N)]  # each segment to g ranks, not itself
    received_N = [rows_Q[r // g].item() - rows_NQ[r, r // g].item() for r in range(N)]
    return dict(max_rows=rows_Q.max().item(), mean_rows=rows_Q.double().mean().item(),
                max_offrank_bytes=2 * max(max(sent_N), max(received_N)) * row_bytes)


def _timeline(fn, calls: int, world: int, device: torch.device) -> dict[str, float]:
    """comm_ms, compute_ms, overlapped_ms per call on this rank's GPU, averaged over the ranks."""
    dist.barrier()
    summary = overlap_summary(profiled_kernels(fn, calls), calls)
    values = torch.tensor(list(summary.values()), dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(summary, (values / world).tolist()))


def rank_main(rank: int, world: int, args: argparse.Namespace, init_method: str | None) -> None:
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method,
                            rank=rank, world_size=world)
    rows: list[dict] = []
    plan = configs(args)
    for index, (config, sweeps) in enumerate(plan, 1):
        if rank == 0:
            print(f"[{index}/{len(plan)}] {config.name}", file=sys.stderr, flush=True)
        rows += [{**row, "sweeps": sweeps} for row in run_config(config, args, rank, world, device)]
        if rank == 0:
            print(table([r for r in rows if r["config"] == config.name]), flush=True)
    if rank == 0 and args.json:
        write_json(args.json, {"environment": environment(device), "world_size": world, "config": recorded_config(args),
                               "rows": rows})
        print(f"wrote {args.json}", flush=True)
    dist.barrier()
    if init_method is not None:  # spawned ranks: leave without gloo's teardown and the interpreter's,
        sys.stdout.flush()       # where gloo's threads corrupt the heap now and then ("malloc(): unaligned
        sys.stderr.flush()       # tcache chunk detected", SIGABRT after every config has run)
        os._exit(0)
    dist.destroy_process_group()


COLUMNS = ("config", "system", "figure", "latency_ms", "comm_ms", "compute_ms", "overlapped_ms", "max_rows", "dropped",
           "max_offrank_bytes", *BASELINES, "max_rel_err", "error")


def table(rows: list[dict]) -> str:
    return github_table(rows, COLUMNS)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ:  # launched by torchrun: join its ranks
        rank_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
        return
    world = args.world_size or 2
    spawn_local_ranks(rank_main, world, world, args)


if __name__ == "__main__":
    main(sys.argv[1:])
