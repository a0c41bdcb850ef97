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
import time

import torch
from tabulate import tabulate
from transformers import SwitchTransformersConfig
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

import moeshard_compile
from moeshard_compile import weights


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-ff", type=int, default=3072)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="E 4, d 16, f 32, 16 tokens, 3 repeats")
    args = parser.parse_args(argv)
    if args.smoke:
        args.experts, args.d_model, args.d_ff, args.tokens, args.repeat = [4], 16, 32, 16, 3
    return args


def _median_s(fn, repeat: int, device: torch.device) -> float:
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(experts: int, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = SwitchTransformersConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=experts,
                                      expert_capacity=args.tokens)
    layer = SwitchTransformersSparseMLP(config).eval().to(device)
    x_BSD = torch.randn(1, args.tokens, args.d_model, device=device)
    feeds = []
    real_feed = weights.WeightFeed

    def recording_feed(*a, **k):  # keep the feed the backend builds, to time its check alone
        feeds.append(real_feed(*a, **k))
        return feeds[-1]

    moeshard_compile.backend.WeightFeed = recording_feed
    try:
        compiled = torch.compile(layer, backend="moeshard", options={"inductor": device.type == "cuda"})
        with torch.no_grad():
            out_BSD, ref_BSD = compiled(x_BSD), layer(x_BSD)
    finally:
        moeshard_compile.backend.WeightFeed = real_feed
    assert (out_BSD - ref_BSD).abs().max().item() < 1e-4, "compiled layer differs from eager"
    (feed,) = [f for f in feeds if f.regions]
    with torch.no_grad():  # the compile-time inputs hold the same parameters as every call's
        check_s = _median_s(lambda: feed.current(feed.example_inputs), args.repeat, device)
        feed.fingerprint = False  # weight_check="version"
        version_s = _median_s(lambda: feed.current(feed.example_inputs), args.repeat, device)
        feed.fingerprint = True
        call_s = _median_s(lambda: compiled(x_BSD), args.repeat, device)
    return {"experts": experts, "expert params": sum(len(r.indices) for r in feed.regions),
            "check ms": check_s * 1e3, "version-only check ms": version_s * 1e3, "call ms": call_s * 1e3,
            "check / call": check_s / call_s}


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = [measure(e, args) for e in args.experts]
    print(f"device {args.device}, d_model {args.d_model}, d_ff {args.d_ff}, {args.tokens} tokens, torch {torch.__version__}")
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4g"))


if __name__ == "__main__":
    main()
