"""What the per-call check of stacked expert weights costs, against the call it guards.

    python bench/weight_check.py                       # Switch-Base layer shapes, E 8..64, CPU
    python bench/weight_check.py --device cuda         # on a GPU (the fingerprint is one host sync)
    python bench/weight_check.py --smoke               # tiny shapes, for the tests

One transformers SwitchTransformersSparseMLP (random weights, a ModuleDict of experts, so the
stacked weights are copies and every call checks identity, version counter, storage and the
sampled fingerprint of every expert parameter), compiled with moeshard. Times, as medians:
the check alone (WeightFeed.current on the call's arguments), the check with
weight_check="version" (no fingerprint), and the whole compiled call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from tabulate import tabulate
from transformers import SwitchTransformersConfig
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` importable when run as a script
import moeshard_compile  # noqa: E402
from bench.common.cli import parse_with_smoke  # noqa: E402
from bench.common.timing import wall_times_ms  # noqa: E402
from moeshard_compile import weights  # noqa: E402

SMOKE = dict(experts=[4], d_model=16, d_ff=32, tokens=16, repeat=3)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-ff", type=int, default=3072)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls of each (median reported)")
    return parse_with_smoke(parser, argv, SMOKE)


def _median_ms(fn, repeat: int, device: torch.device) -> float:
    return statistics.median(wall_times_ms(fn, repeat, device))


def measure(experts: int, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = SwitchTransformersConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=experts,
                                      expert_capacity=args.tokens)
    layer = SwitchTransformersSparseMLP(config).eval().to(device)
    x_BLD = torch.randn(1, args.tokens, args.d_model, device=device)
    feeds = []
    real_feed = weights.WeightFeed

    def recording_feed(*a, **k):  # keep the feed the backend builds, to time its check alone
        feeds.append(real_feed(*a, **k))
        return feeds[-1]

    moeshard_compile.backend.WeightFeed = recording_feed
    try:
        # the backend object rather than "moeshard": works from a source checkout without the entry point
        compiled = torch.compile(layer, backend=moeshard_compile.moeshard_backend,
                                 options={"inductor": device.type == "cuda"})
        with torch.no_grad():
            out_BLD, ref_BLD = compiled(x_BLD), layer(x_BLD)
    finally:
        moeshard_compile.backend.WeightFeed = real_feed
    assert (out_BLD - ref_BLD).abs().max().item() < 1e-4, "compiled layer differs from eager"
    (feed,) = [f for f in feeds if f.regions]
    with torch.no_grad():  # the compile-time inputs hold the same parameters as every call's
        check_ms = _median_ms(lambda: feed.current(feed.example_inputs), args.repeat, device)
        feed.fingerprint = False  # weight_check="version"
        version_ms = _median_ms(lambda: feed.current(feed.example_inputs), args.repeat, device)
        feed.fingerprint = True
        call_ms = _median_ms(lambda: compiled(x_BLD), args.repeat, device)
    return {"experts": experts, "expert params": sum(len(r.indices) for r in feed.regions),
            "check ms": check_ms, "version-only check ms": version_ms, "call ms": call_ms,
            "check / call": check_ms / call_ms}


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = [measure(e, args) for e in args.experts]
    print(f"device {args.device}, d_model {args.d_model}, d_ff {args.d_ff}, {args.tokens} tokens, torch {torch.__version__}")
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4g"))


if __name__ == "__main__":
    main()
