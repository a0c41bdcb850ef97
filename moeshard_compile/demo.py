"""The demo: a Switch encoder compiled with moeshard, checked against eager, timed.

    python -m moeshard_compile                          # small default, about a minute on 2 CPU cores
    python -m moeshard_compile --config switch-base-64  # the paper's shapes (random weights)
    python -m moeshard_compile --pretrained PATH        # local HF weights (e.g. google/switch-base-8)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import SwitchTransformersConfig, SwitchTransformersEncoderModel

import moeshard_compile

PAPER_EXPERTS = (8, 16, 32, 64, 128, 256)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def switch_config(name: str) -> SwitchTransformersConfig:
    """'small' (the default demo) or 'switch-base-E': the paper's Switch-Base encoder with E experts."""
    if name == "small":
        return SwitchTransformersConfig(
            vocab_size=1024, d_model=256, d_ff=1024, d_kv=32, num_heads=8, num_layers=4,
            num_sparse_encoder_layers=2, num_experts=8, expert_capacity=64,
        )
    experts = int(name.removeprefix("switch-base-"))
    return SwitchTransformersConfig(
        d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_sparse_encoder_layers=6,
        num_experts=experts, expert_capacity=64,
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moeshard_compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=["small"] + [f"switch-base-{e}" for e in PAPER_EXPERTS],
                        help="model shape, random weights (default: small)")
    parser.add_argument("--pretrained", metavar="PATH", help="load SwitchTransformersEncoderModel weights from PATH")
    parser.add_argument("--batch", type=int, default=8, help="sequences per call (default 8)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-inductor", action="store_true", help="run the rewritten graph without Inductor")
    parser.add_argument("--dropless", action="store_true", help="remove Switch's capacity limit (changes results)")
    parser.add_argument("--dump-dir", help="write graph dumps and report.txt/json here")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def step(message: str) -> float:
    print(f"[moeshard demo] {message}", flush=True)
    return time.perf_counter()


def median_ms(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    if args.pretrained:
        t0 = step(f"loading {args.pretrained}")
        model = SwitchTransformersEncoderModel.from_pretrained(args.pretrained, torch_dtype=dtype)
    else:
        t0 = step(f"building {args.config} (random weights)")
        model = SwitchTransformersEncoderModel(switch_config(args.config)).to(dtype)
    model = model.eval().to(args.device)
    cfg = model.config
    print(f"  d_model {cfg.d_model}, d_ff {cfg.d_ff}, {cfg.num_layers} layers, {cfg.num_experts} experts, "
          f"capacity {cfg.expert_capacity}; {time.perf_counter() - t0:.1f}s")
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=args.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    options = {"inductor": not args.no_inductor, "dropless": args.dropless}
    if args.dump_dir:
        options["dump_dir"] = args.dump_dir
    report = moeshard_compile.Report()
    compiled = torch.compile(model, backend=moeshard_compile.backend.make_backend(
        moeshard_compile.Options.from_user(options), report))
    with torch.no_grad():
        t0 = step("eager forward")
        reference = model(**inputs).last_hidden_state
        print(f"  {time.perf_counter() - t0:.1f}s")
        t0 = step(f"compiling with moeshard ({'Inductor' if options['inductor'] else 'no Inductor'}) and first call")
        out = compiled(**inputs).last_hidden_state
        print(f"  {time.perf_counter() - t0:.1f}s")
        if args.dump_dir:
            report.write(args.dump_dir)
        print(report)
        error = (out.double() - reference.double()).abs().max().item()
        scale = reference.double().abs().max().item()
        print(f"max |compiled - eager| = {error:.3g} (max |eager| = {scale:.3g}, {args.dtype})")
        t0 = step(f"timing, median of {args.repeats} calls, {args.batch}x{args.seq} tokens on {args.device}")
        eager_ms = median_ms(lambda: model(**inputs), args.repeats, args.device)
        compiled_ms = median_ms(lambda: compiled(**inputs), args.repeats, args.device)
    print(f"eager {eager_ms:.1f} ms | moeshard {compiled_ms:.1f} ms | speedup {eager_ms / compiled_ms:.2f}x")
