"""The whole Switch-Base encoder, MoE against dense: is the sparse model run at dense cost?

    python bench/encoder.py --measure-peak --json encoder.json   # H100: E 64, batch 250 x 120 tokens, bf16
    python bench/encoder.py --smoke                              # tiny shapes on CPU, seconds

Models (transformers' SwitchTransformersEncoderModel, random weights, nothing downloaded):
    moe    Switch-Base: d_model 768, d_ff 3072, 12 heads, 12 layers, an MoE FFN (E experts, top-1,
           capacity = the sequence length, so nothing is dropped) in every other layer
    dense  the same encoder with every FFN dense, d_ff 3072, which is the MoE layers' per-token
           FLOPs (top-1), so it is the cost the sparse model should match. num_sparse_encoder_layers=0
           alone does not make it: transformers then sets encoder_sparse_step = num_layers, and
           layer 1 is still sparse (i % step == 1), an MoE layer that graph-breaks under Inductor;
           encoder_sparse_step = 0 makes none sparse, which build_encoder checks
Variants, each checked against its model's eager output (max_rel_err):
    moe_hf_eager   moe_inductor (torch.compile, Inductor)   moe_moeshard (torch.compile, backend moeshard)
    dense_eager    dense_inductor                           (the dense reference: the target is
                                                             moe_moeshard <= 1.15x dense_inductor)
Floor: the encoder's matmul FLOPs (projections, attention, FFNs; routers too) / the matmul peak.
Tokens per second = batch * seq / latency. Names: B sequences, L tokens per sequence, T = B*L tokens,
D model dim.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import SwitchTransformersConfig, SwitchTransformersEncoderModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` importable when run as a script
import moeshard_compile  # noqa: E402
from bench.common.accuracy import max_rel_error  # noqa: E402
from bench.common.cli import DTYPES, comma_list, error_cell, github_table, parse_with_smoke  # noqa: E402
from bench.common.environment import environment, environment_line, recorded_config, write_json  # noqa: E402
from bench.common.floor import add_peak_args, floor_ms, peak_from_args  # noqa: E402
from bench.common.timing import median_ms  # noqa: E402

VARIANTS = ("moe_hf_eager", "moe_inductor", "moe_moeshard", "dense_eager", "dense_inductor")
SMOKE = dict(d_model=32, d_ff=64, heads=4, layers=2, experts=4, batch=2, seq=8, dtype="float32", device="cpu",
             warmup_ms=5.0, rep_ms=20.0)


def add_encoder_args(parser: argparse.ArgumentParser, batch: int) -> None:
    """The encoder's shape, dtype, device and seed: what build_encoder reads (Switch-Base by default)."""
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-ff", type=int, default=3072)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--layers", type=int, default=12, help="encoder layers; every other one is MoE")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--seq", type=int, default=120)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_encoder_args(parser, batch=250)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list out of {', '.join(VARIANTS)}")
    parser.add_argument("--warmup-ms", type=float, default=50.0)
    parser.add_argument("--rep-ms", type=float, default=300.0)
    add_peak_args(parser)
    parser.add_argument("--json", type=Path, default=None)
    args = parse_with_smoke(parser, argv, SMOKE)
    args.variants = comma_list(parser, "--variants", args.variants, VARIANTS)
    return args


def build_encoder(args: argparse.Namespace, moe: bool) -> SwitchTransformersEncoderModel:
    """Switch-Base-shaped encoder with random weights on the device (MoE every other layer, or all dense)."""
    config = SwitchTransformersConfig(
        d_model=args.d_model, d_ff=args.d_ff, d_kv=args.d_model // args.heads, num_heads=args.heads,
        num_layers=args.layers, num_sparse_encoder_layers=args.layers // 2 if moe else 0,
        num_experts=args.experts, expert_capacity=args.seq,
    )
    if not moe:
        config.encoder_sparse_step = 0  # no sparse layer at all (see the docstring)
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = SwitchTransformersEncoderModel(config)
    sparse = sum(type(m).__name__ == "SwitchTransformersSparseMLP" for m in model.modules())
    if sparse != (args.layers // 2 if moe else 0):
        raise RuntimeError(f"the {'moe' if moe else 'dense'} encoder has {sparse} sparse layers of {args.layers}")
    with torch.device(args.device):
        for module in model.modules():  # spread the routers' logits: fewer bf16 argmax ties (bench/moe_layer.py)
            if module.__class__.__name__ == "SwitchTransformersTop1Router":
                torch.nn.init.normal_(module.classifier.weight, std=args.d_model**-0.5)
    return model.to(DTYPES[args.dtype]).eval()


def encoder_flops(args: argparse.Namespace) -> int:
    """Matmul FLOPs of one forward: per layer 4 projections, scores and values, the FFN (top-1: one
    expert per token, the same as dense), plus each MoE layer's router."""
    T, L, D, F = args.batch * args.seq, args.seq, args.d_model, args.d_ff
    per_layer = 2 * T * 4 * D * D + 2 * 2 * T * L * D + 2 * 2 * T * D * F
    return args.layers * per_layer + (args.layers // 2) * 2 * T * D * args.experts


def compile_variant(name: str, model: torch.nn.Module):
    if name.endswith("eager"):
        return model
    if name.endswith("inductor"):
        return torch.compile(model, backend="inductor")
    return torch.compile(model, backend=moeshard_compile.moeshard_backend)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    device = torch.device(args.device)
    env = environment(device)
    print(environment_line(env))
    peak, peak_source = peak_from_args(args, device)
    flops = encoder_flops(args)
    encoder_floor_ms = floor_ms(flops, peak)
    tokens = args.batch * args.seq
    print(f"Switch encoder: {args.layers} layers (MoE every other: E={args.experts}, top-1), D={args.d_model} "
          f"F={args.d_ff}, {args.batch} x {args.seq} = {tokens} tokens, {args.dtype} | floor {flops / 1e12:.4g} TFLOP "
          f"/ {peak:.4g} TFLOP/s ({peak_source}) = {encoder_floor_ms:.4g} ms")
    generator = torch.Generator().manual_seed(args.seed)
    input_ids_BL = torch.randint(1, 32000, (args.batch, args.seq), generator=generator).to(device)

    rows, models, references = [], {}, {}
    with torch.no_grad():
        for index, name in enumerate(args.variants, 1):
            kind = name.split("_")[0]
            if kind not in models:
                models.clear(), references.clear()  # one model on the device at a time
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                models[kind] = build_encoder(args, moe=kind == "moe")
                references[kind] = models[kind](input_ids=input_ids_BL).last_hidden_state
            print(f"[{index}/{len(args.variants)}] {name} ...", file=sys.stderr, flush=True)
            torch._dynamo.reset()
            fn = compile_variant(name, models[kind])
            row = {"variant": name, "median_ms": None, "max_rel_err": None, "error": None}
            try:
                started = time.perf_counter()
                out_BLD = fn(input_ids=input_ids_BL).last_hidden_state
                row["first_call_s"] = time.perf_counter() - started
                row["max_rel_err"] = max_rel_error(out_BLD, references[kind])
                row["median_ms"] = median_ms(lambda: fn(input_ids=input_ids_BL), device, args.warmup_ms, args.rep_ms)
                row["x_floor"] = row["median_ms"] / encoder_floor_ms
                row["tokens_per_s"] = tokens / (row["median_ms"] * 1e-3)
            except Exception as error:  # one broken variant must not cost the others' numbers
                row["error"] = error_cell(error)
            rows.append(row)

    by_name = {row["variant"]: row["median_ms"] for row in rows}
    dense = by_name.get("dense_inductor")
    for row in rows:
        row["vs_dense_inductor"] = row["median_ms"] / dense if row["median_ms"] and dense else None
    columns = ("variant", "median_ms", "x_floor", "tokens_per_s", "vs_dense_inductor", "max_rel_err", "first_call_s",
               "error")
    print(github_table(rows, columns, floatfmt=("", ".4g", ".3g", ".4g", ".3g", ".2e", ".3g", "")))
    if args.json:
        write_json(args.json, {"environment": env, "config": recorded_config(args), "peak_tflops": peak,
                               "peak_source": peak_source, "flops": flops, "floor_ms": encoder_floor_ms,
                               "rows": rows})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
