"""The expert computation of one MoE layer, five ways side by side, each against its compute floor.

    python bench/expert_kernels.py --measure-peak --json expert_kernels.json   # H100: the `issue` sweep, ~7 min
    python bench/expert_kernels.py --sweep full --only '/T30000/' --budget-s 0   # a slice of the full sweep
    python bench/expert_kernels.py --smoke                                     # tiny shapes on CPU, seconds

Given tokens x_TD, top-k routing ids_TK / weights_TK and stacked expert weights w_in_EDF
(w_gate_EDF when gated), w_out_EFD, every variant computes
    out_TD[t] = sum_k weights_TK[t, k] * ffn_{ids_TK[t, k]}(x_TD[t]),
    ffn_e(x) = act(x @ w_in[e]) @ w_out[e]   or, gated,   (act(x @ w_gate[e]) * (x @ w_in[e])) @ w_out[e]
(no router, no biases). Variants (the functions in bench/baselines/expert_computations.py):
    hf_eager                  transformers' eager experts loop (MixtralExperts.forward): one_hot mask,
                              nonzero() over the experts hit, per expert where/index/matmuls/index_add_
    sort_grouped_mm           sort the T*K rows by expert, gather, torch._grouped_mm (bf16 on sm90+ CUDA;
                              elsewhere moeshard_bench::grouped_mm's per-expert loop, said in the `path` column),
                              activation, grouped matmul, scale, index_add: what passes/lower.py emits, eager
    sort_grouped_mm_inductor  the same function under torch.compile(mode="max-autotune"), which also
                              replays it as a CUDA graph (no launch overhead); CPU: default mode
    moeshard_fused            moeshard::group_by_expert (a counting sort in Triton on CUDA, torch.sort elsewhere),
                              moeshard::gather_grouped_ffn_in and moeshard::grouped_ffn_out_scatter (stored in
                              slot order), the K slots summed: the fused Triton kernels on CUDA, eager
    moeshard_fused_inductor   the same function under torch.compile, mode reduce-overhead on CUDA (replayed
                              as a CUDA graph, like the max-autotune variant; nothing to autotune), default on CPU
    moeshard_grouped_mm       what the backend emits with expert_kernel="grouped_mm": the counting sort, then
                              the gather, torch._grouped_mm and the scatter around it (passes/grouped_mm_experts.py)
    moeshard_grouped_mm_inductor  the same under torch.compile, reduce-overhead (bf16 on sm90+ CUDA only:
                              torch._grouped_mm traces in bf16 only)
The backend's expert_kernel="auto" picks one of the two moeshard paths per shape class by timing
them eagerly (moeshard_compile/kernel_choice.py); the summary's last column names the pick and
its compiled time over the best compiled variant's (1 or less: the pick is the fastest there is).
Each variant is checked against a float64 per-expert loop of the same computation (max_rel_err =
max |out - ref| / max |ref|; `check` says WRONG above the dtype's tolerance) before it is timed
(bench/common/timing.py's median_ms: triton's do_bench median on CUDA). A failing variant prints its
error in the table and the run goes on.

Floors (bench/common/floor.py): FLOPs = M matmuls x 2*T*K*D*F (M = 2, 3 when gated);
floor_ms = FLOPs / peak, the peak from --measure-peak (a large matmul on the device) or
--peak-tflops (default 750: H100 bf16, measured). Every time is also shown as a multiple of its floor,
and per shape the ratio moeshard_fused / sort_grouped_mm (below 1: the fused kernels are faster).

Shapes (name model/E/T/k/routing; routing from bench/baselines/routers.py: uniform, skew = the
MoEShard paper's synthetic router, p_i ∝ 1/E + 0.6 for the first 10% of experts, zipf with s = 1):
    switch-base      D 768,  F 3072,  relu         E 8/64/128, T 4096/16384/30000, k 1/2
    switch-base-f4   D 768,  F 768,   relu         one rank's shard of every expert at 4 ranks (MoEShard)
    switch-base-f8   D 768,  F 384,   relu         ... at 8 ranks
    mixtral          D 4096, F 14336, gated silu   E 8,   k 2, T 4096/16384
    qwen3-30b-a3b    D 2048, F 768,   gated silu   E 128, k 8, T 4096/16384
Sweeps (--sweep), run in order; shapes that share everything but the routing share one compile:
    issue  (default) the issue's target first: switch-base E 64, T 16384, top-1, skew, then uniform
           and zipf; the f4 and f8 shards; qwen3 and mixtral at T 4096; switch-base top-2, E 8 and
           128, T 4096 and 30000: 15 shapes, 10 compiles (estimated 6-8 minutes on an H100, most
           of it max-autotune compiles; --budget-s keeps it inside a 10-minute device call)
    full   the issue sweep's compiles first, then the rest of the cross product above: 72 shapes,
           24 compiles (estimated 15-20 minutes: split it over device calls with --only, e.g.
           --only '^switch-base/E(8|64)/' and --only '^(?!switch-base/E(8|64)/)')
    smoke  (--smoke) tiny shapes on CPU, every variant (Inductor in its default mode)
--budget-s (default 400) stops starting new shapes once that many seconds have passed; skipped shapes are
listed, and --json is rewritten after every shape, so a run cut short keeps what it measured.

Names carry their shape: T tokens, K routing slots per token, S = T*K routed rows, D model dim,
F expert FFN dim, E experts.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` importable when run as a script
from bench.baselines.expert_computations import (  # noqa: E402
    hf_eager, moeshard_fused, moeshard_grouped_mm, reference_TD, sort_grouped_mm,
)
from bench.baselines.grouped_mm import can_use_native_grouped_mm  # noqa: E402
from bench.baselines.routers import synthetic_routing  # noqa: E402
from bench.common.accuracy import max_rel_error  # noqa: E402
from bench.common.cli import DTYPES, comma_list, error_cell, github_table, parse_with_smoke  # noqa: E402
from bench.common.environment import environment, environment_line, recorded_config, write_json  # noqa: E402
from bench.common.floor import add_peak_args, expert_flops, floor_ms, peak_from_args  # noqa: E402
from bench.common.timing import median_ms  # noqa: E402
from moeshard_compile.kernel_choice import auto_choice  # noqa: E402
from moeshard_compile.kernels.ops import use_triton  # noqa: E402
from moeshard_compile.passes.region import ExpertWeights  # noqa: E402

VARIANTS = ("hf_eager", "sort_grouped_mm", "sort_grouped_mm_inductor", "moeshard_fused", "moeshard_fused_inductor",
            "moeshard_grouped_mm", "moeshard_grouped_mm_inductor")
# what the backend's expert_kernel="auto" chooses between, and what the choice is held against
CHOICES = {"fused": "moeshard_fused_inductor", "grouped_mm": "moeshard_grouped_mm_inductor"}
COMPILED = ("sort_grouped_mm_inductor", *CHOICES.values())
TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}  # max_rel_err above this: WRONG
# model: (D, F, gated, activation)
MODELS = {
    "switch-base": (768, 3072, False, "relu"),
    "switch-base-f4": (768, 768, False, "relu"),
    "switch-base-f8": (768, 384, False, "relu"),
    "mixtral": (4096, 14336, True, "silu"),
    "qwen3-30b-a3b": (2048, 768, True, "silu"),
    "tiny": (16, 32, False, "relu"),
    "tiny-gated": (16, 24, True, "silu"),
}
ROUTINGS = ("skew", "uniform", "zipf")
SMOKE = dict(sweep="smoke", device="cpu", dtype="float32", warmup_ms=5.0, rep_ms=20.0)


@dataclass(frozen=True)
class Shape:
    """One benchmarked problem: a model's expert dimensions, E experts, T tokens, top-K, a routing."""

    model: str
    E: int
    T: int
    K: int
    routing: str

    @property
    def name(self) -> str:
        return f"{self.model}/E{self.E}/T{self.T}/k{self.K}/{self.routing}"

    @property
    def compile_key(self) -> tuple:
        """Shapes equal but for the routing run the same compiled code (same tensor shapes)."""
        return (self.model, self.E, self.T, self.K)


def _shapes(model: str, experts, tokens, top_ks, routings=ROUTINGS) -> list[Shape]:
    return [Shape(model, E, T, K, r) for E in experts for T in tokens for K in top_ks for r in routings]


def sweeps() -> dict[str, list[Shape]]:
    """The named sweeps, in run order; shapes of one compile key are adjacent (one compile each)."""
    issue = [
        *_shapes("switch-base", [64], [16384], [1]),
        *_shapes("switch-base-f4", [64], [16384], [1], ["skew"]),
        *_shapes("switch-base-f8", [64], [16384], [1], ["skew"]),
        *_shapes("qwen3-30b-a3b", [128], [4096], [8], ["skew", "uniform"]),
        *_shapes("mixtral", [8], [4096], [2], ["skew", "uniform"]),
        *_shapes("switch-base", [64], [16384], [2], ["skew", "uniform"]),
        *_shapes("switch-base", [8, 128], [16384], [1], ["skew"]),
        *_shapes("switch-base", [64], [4096, 30000], [1], ["skew"]),
    ]
    cross = [
        *_shapes("switch-base", [8, 64, 128], [4096, 16384, 30000], [1, 2]),
        *_shapes("switch-base-f4", [64], [16384], [1]),
        *_shapes("switch-base-f8", [64], [16384], [1]),
        *_shapes("mixtral", [8], [4096, 16384], [2]),
        *_shapes("qwen3-30b-a3b", [128], [4096, 16384], [8]),
    ]
    full = issue + [shape for shape in cross if shape not in issue]
    first_of_key = {}
    for index, shape in enumerate(full):
        first_of_key.setdefault(shape.compile_key, index)
    full.sort(key=lambda shape: first_of_key[shape.compile_key])  # stable: the issue's rows stay first per key
    smoke = [*_shapes("tiny", [4], [64], [1], ["skew", "uniform"]), *_shapes("tiny-gated", [8], [48], [2], ["zipf"])]
    return {"issue": issue, "full": full, "smoke": smoke}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=("issue", "full", "smoke"), default="issue")
    parser.add_argument("--only", default=None, help="regex: keep the sweep's shapes whose name matches (re.search)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list out of {', '.join(VARIANTS)}")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="start no new shape after this many seconds (0: no limit)")
    add_peak_args(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write every row here (after each shape)")
    args = parse_with_smoke(parser, argv, SMOKE)
    args.variants = comma_list(parser, "--variants", args.variants, VARIANTS)
    return args


@dataclass
class Problem:
    """One compile key's tensors: tokens and weights (random, unit-ish outputs); routing set per shape."""

    x_TD: torch.Tensor
    w_in_EDF: torch.Tensor
    w_gate_EDF: torch.Tensor | None
    w_out_EFD: torch.Tensor
    activation: str


def make_problem(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> Problem:
    """Weights scaled by fan-in; marked static so cudagraphs (max-autotune) don't copy them each call."""
    D, F_, gated, activation = MODELS[shape.model]
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=generator, device=device) * std).to(dtype)

    problem = Problem(
        x_TD=randn(shape.T, D),
        w_in_EDF=randn(shape.E, D, F_, std=D**-0.5),
        w_gate_EDF=randn(shape.E, D, F_, std=D**-0.5) if gated else None,
        w_out_EFD=randn(shape.E, F_, D, std=F_**-0.5),
        activation=activation,
    )
    for t in (problem.x_TD, problem.w_in_EDF, problem.w_gate_EDF, problem.w_out_EFD):
        if t is not None:
            torch._dynamo.mark_static_address(t, guard=False)
    return problem


def build_variants(problem: Problem, device: torch.device) -> dict[str, tuple[Callable, str]]:
    """name -> (callable, path): what each variant runs, said in words for the table."""
    native = can_use_native_grouped_mm(problem.x_TD, problem.w_in_EDF)
    mm_path = "torch._grouped_mm" if native else "moeshard_bench::grouped_mm loop (no _grouped_mm: needs bf16, sm90+ CUDA)"
    triton = use_triton(problem.x_TD, problem.w_in_EDF)
    fused_path = "Triton kernels" if triton else "reference ops (per-expert torch; Triton needs CUDA)"
    sorted_fn = functools.partial(sort_grouped_mm, native=native)
    # CPU: the default mode, to stay fast; moeshard_bench::grouped_mm's loop reads offs_E on the host,
    # which a CUDA graph cannot capture
    autotune = None if device.type != "cuda" else "max-autotune" if native else "max-autotune-no-cudagraphs"
    fused_mode = "reduce-overhead" if triton else None  # CUDA graphs too (no host sync to stop them)
    variants = {
        "hf_eager": (hf_eager, "eager, per-expert loop"),
        "sort_grouped_mm": (sorted_fn, f"eager, {mm_path}"),
        "sort_grouped_mm_inductor": (torch.compile(sorted_fn, mode=autotune, dynamic=False),
                                     f"inductor {autotune or 'default'}, {mm_path}"),
        "moeshard_fused": (moeshard_fused, f"eager, {fused_path}"),
        "moeshard_fused_inductor": (torch.compile(moeshard_fused, mode=fused_mode, dynamic=False),
                                    f"inductor {fused_mode or 'default'}, {fused_path}"),
        "moeshard_grouped_mm": (moeshard_grouped_mm, "eager, counting sort + torch._grouped_mm"),
    }
    if native:  # _grouped_mm traces in bf16 only
        variants["moeshard_grouped_mm_inductor"] = (
            torch.compile(moeshard_grouped_mm, mode="reduce-overhead", dynamic=False),
            "inductor reduce-overhead, counting sort + torch._grouped_mm")
    return variants


def run_variant(name: str, fn: Callable, path: str, inputs: tuple, ref_TD: torch.Tensor, shape_floor_ms: float,
                args: argparse.Namespace) -> dict:
    """Call (compiles on the first call), check against the reference, then time; errors become the row."""
    row = {"variant": name, "path": path, "median_ms": None, "x_floor": None, "max_rel_err": None, "check": None}
    try:
        start = time.perf_counter()
        out_TD = fn(*inputs)
        row["first_call_s"] = time.perf_counter() - start
        row["max_rel_err"] = max_rel_error(out_TD, ref_TD)
        row["check"] = "ok" if row["max_rel_err"] <= TOLERANCE[out_TD.dtype] else "WRONG"
        del out_TD  # cudagraph replays reuse its memory
        for _ in range(3):  # cudagraph trees record on a later call: keep that out of do_bench's estimate
            fn(*inputs)
        row["median_ms"] = median_ms(lambda: fn(*inputs), ref_TD.device, args.warmup_ms, args.rep_ms)
        row["x_floor"] = row["median_ms"] / shape_floor_ms
    except Exception as error:  # one broken variant must not cost the others' numbers
        row["check"] = error_cell(error)
        if ref_TD.is_cuda:
            torch.cuda.empty_cache()
    return row


def shape_flops(shape: Shape) -> int:
    """The shape's expert matmuls: 2 of 2*T*K*D*F each, 3 when gated."""
    D, F_, gated, _ = MODELS[shape.model]
    return expert_flops(shape.T, shape.K, D, F_, matmuls=3 if gated else 2)


def run_shape(shape: Shape, problem: Problem, variants: dict, args: argparse.Namespace, peak_tflops: float,
              device: torch.device) -> list[dict]:
    """Every selected variant on one shape; prints its table as soon as it is done."""
    ids_TK, weights_TK = synthetic_routing(shape.routing, shape.T, shape.E, shape.K, seed=args.seed,
                                           device=device, dtype=problem.x_TD.dtype)
    inputs = (problem.x_TD, ids_TK, weights_TK, problem.w_in_EDF, problem.w_gate_EDF, problem.w_out_EFD,
              problem.activation)
    ref_TD = reference_TD(*inputs)
    counts_E = torch.bincount(ids_TK.reshape(-1), minlength=shape.E)
    busiest = (counts_E.max() / counts_E.double().mean()).item()
    shape_floor_ms = floor_ms(shape_flops(shape), peak_tflops)
    D, F_, gated, activation = MODELS[shape.model]
    print(f"\n## {shape.name}: D={D} F={F_} {'gated ' if gated else ''}{activation} | busiest expert "
          f"{busiest:.2f}x the mean load | floor {shape_flops(shape) / 1e9:.4g} GFLOP = {shape_floor_ms:.4g} ms")
    rows = []
    for name in args.variants:
        if name not in variants:
            print(f"{name}: not run (torch._grouped_mm compiles in bf16 on sm90+ CUDA only)")
            continue
        fn, path = variants[name]
        row = run_variant(name, fn, path, inputs, ref_TD, shape_floor_ms, args)
        rows.append({"shape": shape.name, **asdict(shape), "D": D, "F": F_, "gated": gated, "activation": activation,
                     "busiest_load": busiest, "floor_ms": shape_floor_ms, **row})
    chosen = chosen_kernel(problem, shape, device)
    for row in rows:
        row["chosen_kernel"] = chosen
    print(f"expert_kernel='auto' chooses {chosen}")
    columns = ("variant", "median_ms", "x_floor", "max_rel_err", "check", "first_call_s", "path")
    print(github_table(rows, columns, floatfmt=("", ".4g", ".3g", ".2e", "", ".3g", "")))
    return rows


def chosen_kernel(problem: Problem, shape: Shape, device: torch.device) -> str:
    """What the backend's expert_kernel="auto" takes for this shape and these weights."""
    weights = ExpertWeights(problem.w_in_EDF, problem.w_out_EFD, problem.w_gate_EDF)
    return auto_choice(weights, lambda: weights, device, shape.E, shape.K, shape.T * shape.K, problem.activation).kernel


def summary(rows: list[dict], variants: list[str]) -> str:
    """One line per shape: each variant's 'ms (x floor)', and the fused / sorted ratios."""
    by_shape: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_shape.setdefault(row["shape"], {})[row["variant"]] = row

    def cell(row: dict | None) -> str:
        if row is None or row["median_ms"] is None:
            return "failed" if row else "-"
        return f"{row['median_ms']:.4g} ({row['x_floor']:.3g}x)" + ("" if row["check"] == "ok" else " WRONG")

    def ratio(shape_rows: dict, num: str, den: str) -> str:
        a, b = shape_rows.get(num), shape_rows.get(den)
        if a is None or b is None or a["median_ms"] is None or b["median_ms"] is None:
            return "-"
        return f"{a['median_ms'] / b['median_ms']:.3g}"

    def floor(shape_rows: dict) -> str:
        shape_floor_ms = next(iter(shape_rows.values())).get("floor_ms")
        return "-" if shape_floor_ms is None else f"{shape_floor_ms:.4g}"

    def chosen_vs_best(shape_rows: dict) -> str:
        """The chosen kernel's compiled time over the best compiled one's (at most 1: the right choice)."""
        kernel = next(iter(shape_rows.values())).get("chosen_kernel")
        timed = [shape_rows[v]["median_ms"] for v in COMPILED if shape_rows.get(v, {}).get("median_ms")]
        chosen = shape_rows.get(CHOICES.get(kernel), {}).get("median_ms")
        return "-" if not chosen or not timed else f"{kernel} {chosen / min(timed):.3g}"

    headers = ["shape", "floor ms", *[f"{v} ms (x floor)" for v in variants],
               "fused / sort_grouped_mm", "fused_inductor / sort_inductor", "chosen, / best compiled"]
    table = [[shape, floor(r), *[cell(r.get(v)) for v in variants],
              ratio(r, "moeshard_fused", "sort_grouped_mm"),
              ratio(r, "moeshard_fused_inductor", "sort_grouped_mm_inductor"), chosen_vs_best(r)]
             for shape, r in by_shape.items()]
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # a run cut short still shows every finished shape
    started = time.perf_counter()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shapes = [s for s in sweeps()[args.sweep] if args.only is None or re.search(args.only, s.name)]
    env = {**environment(device), "dtype": args.dtype}
    print(environment_line(env))
    peak_tflops, peak_source = peak_from_args(args, device)
    print(f"peak {peak_tflops:.4g} TFLOP/s ({peak_source}) | sweep {args.sweep}: {len(shapes)} shapes | "
          f"do_bench warmup {args.warmup_ms:g} ms, rep {args.rep_ms:g} ms | budget {args.budget_s:g} s")

    rows: list[dict] = []

    def save() -> None:
        """The JSON so far: every row, and the shapes not (yet) run."""
        done = {row["shape"] for row in rows}
        write_json(args.json, {"environment": env, "config": recorded_config(args), "peak_tflops": peak_tflops,
                               "peak_source": peak_source, "rows": rows,
                               "not_run": [s.name for s in shapes if s.name not in done]})

    skipped: list[str] = []
    key, problem, variants = None, None, None
    with torch.no_grad():
        for shape in shapes:
            if args.budget_s and time.perf_counter() - started > args.budget_s:
                skipped.append(shape.name)
                continue
            try:
                if shape.compile_key != key:  # new tensor shapes: fresh tensors, fresh compiles
                    key, problem, variants = None, None, None
                    torch._dynamo.reset()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    problem = make_problem(shape, dtype, device, args.seed)
                    variants = build_variants(problem, device)
                    key = shape.compile_key
                rows += run_shape(shape, problem, variants, args, peak_tflops, device)
            except Exception as error:  # the reference or the inputs failed (e.g. out of memory): next shape
                print(f"\n## {shape.name}: failed before timing: {type(error).__name__}: {error}")
                rows += [{"shape": shape.name, **asdict(shape), "variant": name, "median_ms": None,
                          "check": f"shape failed: {type(error).__name__}"} for name in args.variants]
            if args.json:
                save()

    print(f"\n# summary ({args.dtype}, {env['device']}, peak {peak_tflops:.4g} TFLOP/s, {peak_source})")
    print(summary(rows, args.variants))
    if skipped:
        print(f"budget of {args.budget_s:g} s spent: skipped {len(skipped)} shapes: {', '.join(skipped)}")
    if args.json:
        save()
    print(f"total {time.perf_counter() - started:.0f} s" + (f"; wrote {args.json}" if args.json else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
