"""HF MoE decoder prefill on one GPU: is moeshard faster than what a user would otherwise run?

    python bench/decoder_prefill.py --peak-tflops 790 --json decoder_prefill.json   # H200, every model (long:
                                                                                     # split it with --models)
    python bench/decoder_prefill.py --models qwen3 --variants compile,moeshard     # one model, two variants
    python bench/decoder_prefill.py --sweep --models qwen3                         # decode-sized calls, 1..512 tokens
    python bench/decoder_prefill.py --smoke            # tiny qwen3 and gpt_oss on CPU, to check the script
    python bench/decoder_prefill.py --sweep --smoke    # the sweep, the same way

Models (bench/common/decoders.py): the decoder stack of each family's transformers model, 2 layers
at real layer shapes, random weights, nothing downloaded, vocabulary 1024, attention "sdpa"
(gpt_oss: "eager", its attention sinks have no SDPA path), transformers' default experts
implementation (grouped_mm); the time is one forward, input_ids in, last_hidden_state out (no lm head):
    qwen3        Qwen3-30B-A3B      D 2048, F 768, E 128, top-8, 32 heads (4 kv), head dim 128
    mixtral      Mixtral-8x7B       D 4096, F 14336, E 8, top-2, 32 heads (8 kv)
    olmoe        OLMoE-1B-7B        D 2048, F 1024, E 64, top-8, 16 heads
    deepseek_v3  DeepSeek-V2-Lite   D 2048, F 1408, E 64 routed + 2 shared, top-6, MLA: 16 heads,
                 shapes             kv_lora_rank 512, q/k head dim 128 + 64 rope, v head dim 128
    gpt_oss      gpt-oss-20b        D 2880, F 2880, E 32, top-4, 64 heads (8 kv), head dim 64, layer 0
                                    in a 128-token sliding window
Tokens (--tokens, default 8192,32768) as B x L = tokens / --seq x --seq (1 x tokens below --seq).
Variants (--variants), every compiled one with dynamic=False, one compiled model per variant called
at every token count (Dynamo's recompile limit raised, so each count gets its own graphs):
    hf_eager                  the model as it is, under torch.no_grad()
    compile                   torch.compile(model): Inductor, the baseline of `speedup_vs_compile`
    compile_max_autotune      torch.compile(model, mode="max-autotune")
    compile_reduce_overhead   torch.compile(model, mode="reduce-overhead") (not in the default list)
    moeshard                  torch.compile(model, backend="moeshard")
    moeshard_reduce_overhead  torch.compile(model, backend="moeshard", options={"mode": "reduce-overhead"});
                              a backend that rejects the option (OptionError) gives "not supported: <why>"
Per row: median ms (warm; triton's do_bench on CUDA), the speedup over `compile`, the multiple of the
whole stack's compute floor, `expert_ms` (CUDA only, torch.profiler: device time per call of the
kernels named in EXPERT_KERNELS, i.e. the expert matmuls of moeshard, torch._grouped_mm and Inductor's
grouped-mm template) and its multiple of the routed experts' floor, max_rel_err against hf_eager on
the same input_ids, and the check: in bf16, every variant's per-token error against the same
weights in fp32 (`token_err_p99`), at the median and the 99th percentile at most 1.5x hf_eager's
+ 1e-3, or `check` says MISMATCH (bf16 rounding flips near-tied routing choices differently in
any two compilations, torch.compile's as much as moeshard's, so max_rel_err against bf16 eager
measures those flips); in fp32, max_rel_err within bench/expert_kernels.py's tolerance; the graphs
Dynamo compiled, and for moeshard the report's regions rewritten / found and the expert kernel it
chose for them (fused, grouped_mm). A MISMATCH or an error in any row makes the script exit non-zero
once every row has run. Each model's table is followed by the report of its first moeshard variant.
Floors (bench/common/floor.py; bench/common/decoders.py's decoder_flops): matmul FLOPs of one forward
(attention projections 2*T*D*(q+k+v+o dims), scores and values 2*2*B*pairs*H*hd over the (query, key)
pairs attended, L(L+1)/2 causal, at most 128 a query in gpt_oss's sliding window; router 2*T*D*E;
routed experts 2*T*K*D*F*3, all gated; shared experts) / the matmul peak (--peak-tflops; one H200
measured ~790 TFLOP/s bf16; or --measure-peak).
--sweep: instead, per model, B 1 x L tokens for L in --sweep-tokens (1, 2, 4, ..., 512) through the
same compiled models, variants compile_reduce_overhead, moeshard_reduce_overhead, moeshard, compile
unless --variants says otherwise; speedups are over compile_reduce_overhead. Reduce-overhead variants
run 3 calls at each size before the check (CUDA graphs record on the first calls).
--smoke: tiny shapes (D 32, 4-8 experts, 2 layers) of qwen3 and gpt_oss only (--models still applies),
T 16 and 32 (sweep: 1 and 8), float32 on CPU, variants hf_eager, compile and moeshard (the
sweep's: its reduce-overhead ones, which run as plain Inductor on CPU; max-autotune's CPU
autotuning would add a minute): about 2 minutes on 2 CPU cores with a cold Inductor cache.
Progress goes to stderr, one line per row as it starts and ends; --json is rewritten after each model.
Names carry their shape: B sequences, L tokens per sequence, T = B*L tokens, D model dim, F expert FFN
dim, E experts, K routing slots per token.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` importable when run as a script
import moeshard_compile  # noqa: E402
from bench.common.accuracy import max_rel_error, no_worse_than_eager  # noqa: E402
from bench.common.cli import DTYPES, add_run_args, comma_list, error_cell, github_table, parse_with_smoke  # noqa: E402
from bench.common.decoders import FAMILIES, build_decoder, decoder_flops, describe  # noqa: E402
from bench.common.environment import environment, environment_line, recorded_config, write_json  # noqa: E402
from bench.common.floor import add_peak_args, floor_ms, peak_from_args  # noqa: E402
from bench.common.kernel_timeline import profiled_kernels  # noqa: E402
from bench.common.timing import median_ms  # noqa: E402
from bench.expert_kernels import TOLERANCE  # noqa: E402

MOESHARD = moeshard_compile.moeshard_backend  # the backend object: works from a checkout without the entry point
VARIANTS = {  # name: torch.compile's arguments (None: the model itself)
    "hf_eager": None,
    "compile": {},
    "compile_max_autotune": {"mode": "max-autotune"},
    "compile_reduce_overhead": {"mode": "reduce-overhead"},
    "moeshard": {"backend": MOESHARD},
    "moeshard_reduce_overhead": {"backend": MOESHARD, "options": {"mode": "reduce-overhead"}},
}
TABLE_VARIANTS = ("hf_eager", "compile", "compile_max_autotune", "moeshard", "moeshard_reduce_overhead")
SWEEP_VARIANTS = ("compile_reduce_overhead", "moeshard_reduce_overhead", "moeshard", "compile")
SMOKE_VARIANTS = ("hf_eager", "compile", "moeshard")  # the sweep's smoke runs the reduce-overhead variants
SWEEP_TOKENS = ",".join(str(2**i) for i in range(10))
SMOKE = dict(models="qwen3,gpt_oss", tokens="16,32", seq=16, sweep_tokens="1,8", dtype="float32", device="cpu",
             warmup_ms=5.0, rep_ms=20.0)
# Kernels that compute expert matmuls: moeshard's fused Triton kernels, torch._grouped_mm's CUTLASS kernel
# (cutlass::gemm::GroupProblemShape; bare "cutlass" would also take cuBLAS's dense GEMMs), Inductor's
# grouped-mm template (triton_tem_fused__grouped_mm...). Matched case-insensitively.
EXPERT_KERNELS = ("_ffn_in_kernel", "_ffn_out_kernel", "grouped", "groupproblemshape")
PROFILED_CALLS = 3
GRAPH_WARM_CALLS = 3  # calls of a reduce-overhead variant before its check: CUDA graphs record on the first ones
RECOMPILE_LIMIT = 64  # graphs per compiled model: one per token count


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(FAMILIES), help=f"comma list out of {', '.join(FAMILIES)}")
    parser.add_argument("--tokens", default="8192,32768", help="tokens per forward, comma list")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence L (batch B = tokens / L)")
    parser.add_argument("--variants", default=None,
                        help=f"comma list out of {', '.join(VARIANTS)} (default: {','.join(TABLE_VARIANTS)}; "
                             f"with --sweep {','.join(SWEEP_VARIANTS)})")
    parser.add_argument("--sweep", action="store_true", help="decode-sized calls: B 1 x each of --sweep-tokens")
    parser.add_argument("--sweep-tokens", default=SWEEP_TOKENS)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda")
    add_run_args(parser)
    add_peak_args(parser)
    args = parse_with_smoke(parser, argv, SMOKE)
    args.models = comma_list(parser, "--models", args.models, FAMILIES)
    default_variants = SWEEP_VARIANTS if args.sweep else SMOKE_VARIANTS if args.smoke else TABLE_VARIANTS
    args.variants = comma_list(parser, "--variants", args.variants or ",".join(default_variants), VARIANTS)
    tokens = [int(t) for t in (args.sweep_tokens if args.sweep else args.tokens).split(",")]
    if any(t % args.seq for t in tokens if t >= args.seq):
        parser.error(f"token counts from --seq {args.seq} up must be multiples of it, got {tokens}")
    args.shapes = [(1, t) if args.sweep or t < args.seq else (t // args.seq, args.seq) for t in tokens]
    return args


def compile_variant(name: str, model: torch.nn.Module, dump_dir: Path) -> Callable:
    """The callable a variant times; moeshard's dump_dir only writes its report."""
    kwargs = VARIANTS[name]
    if kwargs is None:
        return model
    if kwargs.get("backend") is MOESHARD:
        kwargs = {**kwargs, "options": {**kwargs.get("options", {}), "dump_dir": str(dump_dir)}}
    return torch.compile(model, dynamic=False, **kwargs)


def report_regions(dump_dir: Path) -> list[dict]:
    """The moeshard report's region rows so far (none before the backend has run)."""
    path = dump_dir / "report.json"
    return json.loads(path.read_text())["regions"] if path.exists() else []


def expert_kernel_ms(call: Callable, calls: int) -> float:
    """Device ms per call of the kernels named in EXPERT_KERNELS, from a torch.profiler trace."""
    kernels = profiled_kernels(call, calls)
    expert_us = sum(end - start for name, start, end in kernels
                    if any(part in name.lower() for part in EXPERT_KERNELS))
    return expert_us * 1e-3 / calls


def measure(fn: Callable, variant: str, ids_BL: torch.Tensor, ref_BLD: torch.Tensor, truth_BLD: torch.Tensor | None,
            floors: dict, args: argparse.Namespace, dump_dir: Path) -> dict:
    """One row: first call(s) (the compile), the check, the timings.

    The check: in fp32, against hf_eager (TOLERANCE); in bf16, per token against the same
    weights in fp32 (truth_BLD), no further off than hf_eager is (bench/common/accuracy.py)."""
    device = ids_BL.device
    graphed = variant.endswith("reduce_overhead")

    def call() -> torch.Tensor:
        if graphed:
            torch.compiler.cudagraph_mark_step_begin()  # each call a new step: earlier outputs may be overwritten
        return fn(input_ids=ids_BL).last_hidden_state

    row = {"tokens": ids_BL.numel(), "variant": variant, "check": "ok"}
    graphs_before, regions_before = counters["stats"]["unique_graphs"], len(report_regions(dump_dir))
    try:
        for _ in range(GRAPH_WARM_CALLS if graphed else 1):
            out_BLD = call()
        row["max_rel_err"] = max_rel_error(out_BLD, ref_BLD)  # here: the next replay overwrites a graph's output
        if truth_BLD is not None:
            row["tokens_ok"], errors = no_worse_than_eager(out_BLD, ref_BLD, truth_BLD)
            row["token_err_p50"], row["token_err_p99"] = errors["q0.5"][0], errors["q0.99"][0]
        row["median_ms"] = median_ms(call, device, args.warmup_ms, args.rep_ms)
        if device.type == "cuda":
            row["expert_ms"] = expert_kernel_ms(call, PROFILED_CALLS)
            row["experts_x_floor"] = row["expert_ms"] / floors["expert_floor_ms"]
    except moeshard_compile.OptionError as error:
        row["check"] = f"not supported: {str(error).strip().splitlines()[0]}"
    except Exception as error:  # one broken variant must not cost the others' numbers
        row["check"] = f"error: {error_cell(error)}"
    row["graphs"] = counters["stats"]["unique_graphs"] - graphs_before
    if "median_ms" in row:
        row["x_floor"] = row["median_ms"] / floors["floor_ms"]
        if not row.get("tokens_ok", row["max_rel_err"] <= TOLERANCE[ref_BLD.dtype]):
            row["check"] = "MISMATCH"
    regions = report_regions(dump_dir)[regions_before:]
    if regions:
        row["rewritten"] = f"{sum(r['status'] == 'rewritten' for r in regions)}/{len(regions)}"
        kernels = {(r.get("kernel_choice") or {}).get("kernel") for r in regions} - {None}
        row["kernel"] = "+".join(sorted(kernels)) or None
    return row


def run_model(name: str, args: argparse.Namespace, peak_tflops: float, dump_root: Path, result: dict) -> None:
    """Every variant of one model at every shape, printed as a table; its rows, floors and report go to `result`."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = build_decoder(name, args.smoke, dtype, device, args.seed)
    print(f"{name} ({FAMILIES[name].about}): {describe(model)}")
    result["models"][name] = describe(model)
    generator = torch.Generator().manual_seed(args.seed)
    inputs, refs, truths, floors = {}, {}, {}, {}
    fp32_model = copy.deepcopy(model).float() if dtype in (torch.bfloat16, torch.float16) else None
    for batch, seq in args.shapes:
        tokens = batch * seq
        inputs[tokens] = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator).to(device)
        refs[tokens] = model(input_ids=inputs[tokens]).last_hidden_state
        truths[tokens] = None if fp32_model is None else fp32_model(input_ids=inputs[tokens]).last_hidden_state
        flops, expert_flops = decoder_flops(model, batch, seq)
        floors[tokens] = {"model": name, "tokens": tokens, "batch": batch, "seq": seq, "flops": flops,
                          "floor_ms": floor_ms(flops, peak_tflops), "expert_flops": expert_flops,
                          "expert_floor_ms": floor_ms(expert_flops, peak_tflops)}
        print(f"  T={tokens} ({batch} x {seq}): floor {flops / 1e9:.4g} GFLOP = {floors[tokens]['floor_ms']:.4g} ms, "
              f"routed experts {expert_flops / 1e9:.4g} GFLOP = {floors[tokens]['expert_floor_ms']:.4g} ms "
              f"at {peak_tflops:.4g} TFLOP/s")
    result["floors"] += floors.values()
    del fp32_model

    rows, report = [], None
    steps = len(args.variants) * len(args.shapes)
    for variant in args.variants:
        dump_dir = dump_root / f"{name}_{variant}"
        fn = compile_variant(variant, model, dump_dir)
        for tokens in inputs:
            label = f"[{len(rows) + 1}/{steps}] {name} T={tokens} {variant}"
            print(f"{label} ...", file=sys.stderr, flush=True)
            row = {"model": name, **measure(fn, variant, inputs[tokens], refs[tokens], truths[tokens], floors[tokens],
                                            args, dump_dir)}
            timed = f"{row['median_ms']:.4g} ms, " if "median_ms" in row else ""
            print(f"{label}: {timed}{row['check']}", file=sys.stderr, flush=True)
            rows.append(row)
        if report is None and (dump_dir / "report.txt").exists():
            report = {"variant": variant, "table": (dump_dir / "report.txt").read_text(),
                      "regions": report_regions(dump_dir)}
        del fn
        torch._dynamo.reset()  # the next variant compiles from scratch; this one's graphs and CUDA graphs go
        if device.type == "cuda":
            torch.cuda.empty_cache()

    baseline = "compile_reduce_overhead" if args.sweep else "compile"
    baseline_ms = {row["tokens"]: row.get("median_ms") for row in rows if row["variant"] == baseline}
    for row in rows:
        ms, base = row.get("median_ms"), baseline_ms.get(row["tokens"])
        row[f"speedup_vs_{baseline}"] = base / ms if ms and base else None
    columns = ("model", "tokens", "variant", "median_ms", f"speedup_vs_{baseline}", "x_floor", "expert_ms",
               "experts_x_floor", "max_rel_err", "token_err_p99", "check", "graphs", "rewritten", "kernel")
    print(github_table(rows, columns, floatfmt=("", "", "", ".4g", ".3g", ".3g", ".4g", ".3g", ".2e", ".2e", "", "", "",
                                                "")))
    if report is not None:
        print(f"moeshard report ({name}, {report['variant']}):\n{report['table']}", end="")
        result["reports"][name] = report
    result["rows"] += rows
    del model, refs, truths
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    device = torch.device(args.device)
    for limit in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), RECOMPILE_LIMIT))
    env = environment(device)
    print(environment_line(env))
    peak_tflops, peak_source = peak_from_args(args, device)
    print(f"peak {peak_tflops:.4g} TFLOP/s ({peak_source}), {args.dtype}")
    result = {"config": recorded_config(args), "environment": env, "peak_tflops": peak_tflops,
              "peak_source": peak_source, "models": {}, "floors": [], "rows": [], "reports": {}}
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="moeshard_bench_") as dump_root:
        for name in args.models:
            run_model(name, args, peak_tflops, Path(dump_root), result)
            if args.json:
                write_json(args.json, result)
    if args.json:
        print(f"wrote {args.json}")
    failed = [f"{row['model']} T={row['tokens']} {row['variant']}: {row['check']}" for row in result["rows"]
              if row["check"] == "MISMATCH" or row["check"].startswith("error")]
    if failed:
        sys.exit("failed checks:\n  " + "\n  ".join(failed))


if __name__ == "__main__":
    main(sys.argv[1:])
