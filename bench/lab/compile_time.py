"""How long the first call of a compiled Switch encoder takes, and where the compiler spends it.

    python bench/lab/compile_time.py --layers 2 --stack-every 45      # H100: one MoE layer, stacks every 45 s
    python bench/lab/compile_time.py --device cpu --dtype float32     # the same on CPU

Builds bench/encoder.py's Switch-Base encoder (random weights), compiles it with --backend
(moeshard or inductor) and times the first call (Dynamo, the backend, Inductor, Triton, one run).
--stack-every S prints every thread's Python stack to stderr each S seconds while it runs
(faulthandler), which shows where a slow compile is; set TORCHINDUCTOR_COMPILE_THREADS=1 so that
Triton compiles in this process, where the stacks can see it.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `bench` importable when run as a script
import moeshard_compile  # noqa: E402
from bench.encoder import add_encoder_args, build_encoder  # noqa: E402
from moeshard_compile.backend import make_backend  # noqa: E402
from moeshard_compile.options import Options  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("moeshard", "inductor"), default="moeshard")
    add_encoder_args(parser, batch=8)
    parser.add_argument("--stack-every", type=float, default=0, metavar="S", help="dump stacks every S s (0: never)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    model = build_encoder(args, moe=True)
    input_ids_BL = torch.randint(1, 32000, (args.batch, args.seq), device=args.device)
    report = moeshard_compile.Report()
    backend = make_backend(Options(), report) if args.backend == "moeshard" else "inductor"
    compiled = torch.compile(model, backend=backend)
    if args.stack_every:
        faulthandler.dump_traceback_later(args.stack_every, repeat=True, file=sys.stderr)
    started = time.perf_counter()
    with torch.no_grad():
        compiled(input_ids=input_ids_BL)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    faulthandler.cancel_dump_traceback_later()
    print(torch._dynamo.utils.compile_times(repr="str"))
    first_call = time.perf_counter() - started
    print(f"{args.backend}: first call {first_call:.1f} s ({args.layers} layers, "
          f"E {args.experts}, {args.batch} x {args.seq} tokens, {args.dtype}, {args.device})")
    if args.backend == "moeshard":
        share = report.verify_seconds / first_call
        print(f"verification of {len(report.regions)} regions: {report.verify_seconds:.2f} s ({share:.1%} of the first call)")


if __name__ == "__main__":
    main(sys.argv[1:])
