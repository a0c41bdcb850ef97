"""Expert-weight bytes each rank holds under MoEShard, measured from the backend's report.

    python bench/lab/shard_memory.py --experts 128 --world-size 4            # Switch-base-128 layer, N = 4
    python bench/lab/shard_memory.py --experts 8 --world-size 2 --d-ff 3000  # uneven FFN blocks

Spawns N gloo ranks on this machine (CPU), builds one transformers SwitchTransformersSparseMLP
with the Switch-Base shapes (d_model 768, d_ff 3072, random weights), compiles it with moeshard
on every rank, calls it once on the rank's own tokens, checks the result against eager, and
prints per rank the FFN block, the shard shapes and the bytes held, against the unsharded bytes.
With --release the user's expert parameters are freed after compiling (release_unsharded).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tabulate import tabulate
from transformers import SwitchTransformersConfig
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `bench` importable when run as a script
import moeshard_compile  # noqa: E402
from bench.common.cli import DTYPES  # noqa: E402
from bench.common.ranks import spawn_local_ranks  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-ff", type=int, default=3072)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="bfloat16 by default: N ranks of fp32 Switch-base-128 weights need 4x 5 GB at the peak")
    parser.add_argument("--release", action="store_true", help="release_unsharded=True")
    return parser.parse_args(argv)


def rank_main(rank: int, args: argparse.Namespace, init_method: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=args.world_size)
    torch.manual_seed(0)  # the same layer on every rank
    config = SwitchTransformersConfig(
        d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, expert_capacity=args.tokens
    )
    layer = SwitchTransformersSparseMLP(config).to(DTYPES[args.dtype]).eval()
    torch.manual_seed(1 + rank)  # this rank's own tokens
    x_BLD = torch.randn(1, args.tokens, args.d_model, dtype=DTYPES[args.dtype])
    report = moeshard_compile.Report()
    options = moeshard_compile.Options(inductor=False, release_unsharded=args.release)
    compiled = torch.compile(layer, backend=moeshard_compile.backend.make_backend(options, report))
    with torch.no_grad():
        reference_BLD = layer(x_BLD)
        out_BLD = compiled(x_BLD)
    error = (out_BLD.double() - reference_BLD.double()).abs().max().item()
    (region,) = [r for r in report.regions if r["status"] == "rewritten"]
    rows = [None] * args.world_size
    dist.all_gather_object(rows, (rank, region, error))
    if rank == 0:
        print(table(rows, args), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo's threads sometimes abort in the interpreter's teardown (see moeshard_compile/demo.py)


def table(rows: list, args: argparse.Namespace) -> str:
    unsharded = rows[0][1]["expert_bytes"]
    lines = [
        [rank, "{}:{}".format(*r["ffn_block"]), r["shard_shapes"]["w_in_EDF"], r["shard_shapes"]["w_out_EFD"],
         r["expert_bytes_per_rank"], f"{r['expert_bytes_per_rank'] / unsharded:.4f}", f"{error:.2g}"]
        for rank, r, error in rows
    ]
    headers = ["rank", "ffn_block", "w_in_EDF", "w_out_EFD", "bytes held", "of unsharded", "max |out - eager|"]
    title = (f"Switch layer d_model {args.d_model}, d_ff {args.d_ff}, {args.experts} experts, {args.dtype}, "
             f"N = {args.world_size}: unsharded expert weights {unsharded} bytes ({unsharded / 2**20:.1f} MiB)")
    return title + "\n" + tabulate(lines, headers=headers, tablefmt="github")


if __name__ == "__main__":
    arguments = parse_args()
    spawn_local_ranks(rank_main, arguments.world_size, arguments)
