"""The real DeepSpeed-MoE layer against the project's reimplementation of it, on one device.

    python bench/deepspeed_layer.py --json deepspeed_layer.json   # GPU: E 64, 30000 tokens, CF 50 / 1.25, fp32 / bf16
    python bench/deepspeed_layer.py --smoke                        # CPU, tiny shapes, seconds

bench/paper.py and bench/paper_ranks.py measure DeepSpeed-MoE's semantics through
bench/baselines' CapacityExpertParallelMoE. This script runs the real layer beside it, so the
two can be compared: `deepspeed.moe.layer.MoE(ep_size=1, k=1, use_rts=False)` with Switch's
expert (relu FFN, no biases) on one process, and CapacityExpertParallelMoE with the same
weights, routed as DeepSpeed's gate routes (argmax of its softmax, weighted by that probability).

Per configuration, before timing: the tokens each layer kept (DeepSpeed zeroes the rows of the
tokens it drops) and the largest relative difference on the tokens both kept. DeepSpeed picks
the kept tokens of a full expert with torch.topk over a 0/1 mask, whose choice among ties the
backend decides; the reimplementation keeps the first ones in token order. Both keep
min(count, capacity) tokens of every expert; which ones may differ (`kept_differ`).

deepspeed is not a dependency of moeshard: `DS_BUILD_OPS=0 pip install deepspeed` (no compiled ops
are used; docs/results.md says how to carry it to a machine without network access).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tabulate import tabulate
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` importable when run as a script
from bench.baselines.expert_parallel import CapacityExpertParallelMoE, deepspeed_capacity  # noqa: E402
from bench.common.cli import DTYPES, comma_list, parse_with_smoke  # noqa: E402
from bench.common.environment import environment, recorded_config, write_json  # noqa: E402
from bench.common.timing import median_ms  # noqa: E402
from bench.paper import MIN_CAPACITY, PAPER_CF_CAP  # noqa: E402

SMOKE = dict(device="cpu", experts=8, tokens="64", d_model=32, d_ff=64, dtypes="float32", warmup_ms=2.0, rep_ms=10.0)


class SwitchExpert(nn.Module):
    """Switch's expert FFN, as DeepSpeed's Experts deep-copies it: relu(x @ wi) @ wo, no biases."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(torch.relu(self.wi(x)))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--tokens", default="3000,30000", help="comma list of tokens per call (30000: batch 250 x 120)")
    parser.add_argument("--max-mask-gb", type=float, default=16.0,
                        help="skip DeepSpeed where its dense dispatch mask (tokens x experts x capacity) would be larger")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-ff", type=int, default=3072)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup-ms", type=float, default=50.0)
    parser.add_argument("--rep-ms", type=float, default=300.0, help="time spent in timed calls (median reported)")
    parser.add_argument("--json", type=Path, default=None)
    args = parse_with_smoke(parser, argv, SMOKE)
    args.dtypes = comma_list(parser, "--dtypes", args.dtypes, DTYPES)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    return args


def init_deepspeed(device: torch.device):
    """deepspeed imported and its one-process group joined (it needs torch.distributed even for ep_size 1)."""
    try:
        import deepspeed
    except ImportError as error:
        raise SystemExit(f"bench/deepspeed_layer.py needs deepspeed: DS_BUILD_OPS=0 pip install deepspeed ({error})")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29533")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return deepspeed


def deepspeed_moe(deepspeed, w_in_EDF, w_out_EFD, gate_DE, capacity_factor: float):
    """deepspeed.moe.layer.MoE holding these weights: expert e is relu(x @ w_in[e]) @ w_out[e]."""
    E, D, F = w_in_EDF.shape
    layer = deepspeed.moe.layer.MoE(hidden_size=D, expert=SwitchExpert(D, F), num_experts=E, ep_size=1, k=1,
                                    capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
                                    min_capacity=MIN_CAPACITY, use_rts=False)
    layer.set_deepspeed_parallelism()
    layer = layer.to(w_in_EDF.device, w_in_EDF.dtype).eval()
    gate = layer.deepspeed_moe.gate
    gate.wg = gate.wg.float()  # DeepSpeed's gate is fp32 whatever the model's dtype
    with torch.no_grad():
        for e, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            expert.wi.weight.copy_(w_in_EDF[e].T)
            expert.wo.weight.copy_(w_out_EFD[e].T)
        gate.wg.weight.copy_(gate_DE.T)
    return layer


def deepspeed_routing(gate_DE: torch.Tensor, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids_T1, weight_T1 as DeepSpeed's top-1 gate computes them (fp32 logits, softmax, argmax)."""
    probs_TE = torch.softmax(x_TD.float() @ gate_DE.float(), dim=1)
    weight_T1, ids_T1 = probs_TE.max(dim=1, keepdim=True)
    return ids_T1, weight_T1.to(x_TD.dtype)


def compare(ours_TD: torch.Tensor, theirs_TD: torch.Tensor) -> dict:
    """Tokens kept by each layer (non-zero output rows) and the difference on those both kept."""
    kept_ours_T, kept_theirs_T = ours_TD.ne(0).any(1), theirs_TD.ne(0).any(1)
    both_T = kept_ours_T & kept_theirs_T
    diff = (ours_TD[both_T].double() - theirs_TD[both_T].double()).abs().max().item() if both_T.any() else 0.0
    scale = theirs_TD[both_T].double().abs().max().item() if both_T.any() else 1.0
    return {"kept_ours": int(kept_ours_T.sum()), "kept_deepspeed": int(kept_theirs_T.sum()),
            "kept_differ": int((kept_ours_T != kept_theirs_T).sum()), "max_rel_diff": diff / max(scale, 1e-30)}


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    deepspeed = init_deepspeed(device)
    E, D, F = args.experts, args.d_model, args.d_ff
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        generator = torch.Generator(device=device).manual_seed(0)
        w_in_EDF = (torch.randn(E, D, F, generator=generator, device=device) * D**-0.5).to(dtype)
        w_out_EFD = (torch.randn(E, F, D, generator=generator, device=device) * F**-0.5).to(dtype)
        gate_DE = torch.randn(D, E, generator=generator, device=device) * D**-0.5
        for T in args.tokens:
            x_TD = torch.randn(T, D, generator=generator, device=device).to(dtype)
            ids_T1, weight_T1 = deepspeed_routing(gate_DE, x_TD)
            for capacity_factor in (min(E, PAPER_CF_CAP), 1.25):
                row = {"dtype": dtype_name, "E": E, "T": T, "capacity_factor": capacity_factor}
                rows.append(row)
                # DeepSpeed's dispatch and combine are einsums with a dense fp32 mask of T x E x capacity
                # (DeepSpeed's [T, E, C], as the row says)
                mask_gb = T * E * deepspeed_capacity(T, E, capacity_factor, MIN_CAPACITY) * 4 / 1e9
                if mask_gb > args.max_mask_gb:
                    row["error"] = f"not run: DeepSpeed's [T, E, C] dispatch mask would take {mask_gb:.3g} GB"
                    continue
                theirs = deepspeed_moe(deepspeed, w_in_EDF, w_out_EFD, gate_DE, capacity_factor)
                ours = CapacityExpertParallelMoE(w_in_EDF, w_out_EFD, capacity_factor=capacity_factor,
                                                 min_capacity=MIN_CAPACITY)
                with torch.no_grad():
                    row.update(compare(ours(x_TD, ids_T1, weight_T1), theirs(x_TD)[0]))
                    row["deepspeed_ms"] = median_ms(lambda: theirs(x_TD), device, args.warmup_ms, args.rep_ms)
                    row["ours_ms"] = median_ms(lambda: ours(x_TD, ids_T1, weight_T1), device, args.warmup_ms,
                                               args.rep_ms)
                print(table([row]), flush=True)
                del theirs, ours
    return rows


def table(rows: list[dict]) -> str:
    return tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4g")


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    rows = run(args)
    dist.destroy_process_group()
    print(table(rows))
    if args.json:
        write_json(args.json, {"environment": environment(torch.device(args.device)), "config": recorded_config(args),
                               "rows": rows})


if __name__ == "__main__":
    main(sys.argv[1:])
