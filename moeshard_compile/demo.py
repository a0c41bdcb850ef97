"""The demo: a Switch encoder (or a Mixtral decoder) sharded over ranks with moeshard, checked
against eager and timed, then the same model on one rank beside eager and torch.compile.

    python -m moeshard_compile                          # 2 ranks on CPU, then one: 35-75 s on 2 cores
    python -m moeshard_compile --world-size 1           # one process, no torch.distributed
    python -m moeshard_compile --config switch-base-64  # the paper's shapes (random weights)
    python -m moeshard_compile --config mixtral-small   # a stacked-expert decoder, prefill
    python -m moeshard_compile --pretrained PATH        # local HF weights (e.g. google/switch-base-8)
    torchrun --nproc-per-node 4 -m moeshard_compile     # ranks started by torchrun

Every rank builds the same model (--seed), holds 1/N of every expert (MoEShard) and calls the
compiled model on a batch of --batch x --seq tokens: its own (seed + rank) with --input-mode
data_parallel, the same on every rank with replicated. Rank 0 prints the MoE regions rewritten
(--dump-dir writes the full report), each rank's shard, error against eager and times. Then one
process times rank 0's batch eager, under torch.compile (Inductor) and under moeshard on one
rank, and the demo ends with the figures bench/ measures on GPUs (docs/results.md).

Launch: without torchrun the demo spawns --world-size processes itself, joined by gloo on
127.0.0.1 with a free port (nccl with one GPU per rank on CUDA); on CPU the ranks share the
cores (torch threads = cores // N, and as many for the one-rank comparison). Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK set) it joins
torchrun's ranks: nccl on cuda:LOCAL_RANK, gloo on CPU; rank 0 runs the one-rank comparison
after the group is gone. Only rank 0 prints; if a rank fails the demo exits non-zero with that
rank's error (collectives give up after 120 s). --dump-dir receives rank 0's dumps (the other
ranks' differ in their FFN block).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm import tqdm
from torch.multiprocessing.spawn import ProcessException
from transformers import (MixtralConfig, MixtralModel, PretrainedConfig, SwitchTransformersConfig,
                          SwitchTransformersEncoderModel)

import moeshard_compile
from moeshard_compile import demo_output
from moeshard_compile.options import INPUT_MODES

PAPER_EXPERTS = (8, 16, 32, 64, 128, 256)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
TIMEOUT = timedelta(seconds=120)  # a rank stuck in a collective after a peer failed gives up


@dataclass(frozen=True)
class Rank:
    """Where this process runs; only rank 0 prints, so N ranks do not interleave."""

    rank: int
    world: int
    device: torch.device

    def say(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def step(self, message: str) -> float:
        self.say(f"[moeshard demo] {message}")
        return time.perf_counter()


def model_config(name: str) -> PretrainedConfig:
    """'small' (the default demo), 'switch-base-E' (the paper's Switch-Base encoder with E experts)
    or 'mixtral-small' (a small Mixtral decoder, prefill: transformers' stacked 3-D experts, top-2)."""
    if name == "mixtral-small":
        return MixtralConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                             num_experts_per_tok=2, max_position_embeddings=1024)
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
    parser.add_argument("--config", default="small",
                        choices=["small", "mixtral-small"] + [f"switch-base-{e}" for e in PAPER_EXPERTS],
                        help="model, random weights: small (default) and switch-base-E are Switch encoders, "
                             "mixtral-small a Mixtral decoder run on a prompt (prefill)")
    parser.add_argument("--pretrained", metavar="PATH", help="load SwitchTransformersEncoderModel weights from PATH")
    parser.add_argument("--world-size", type=int, metavar="N",
                        help="ranks to spawn (default: 2 on CPU, one per GPU on CUDA, torchrun's under torchrun); "
                             "1 runs in this process without torch.distributed")
    parser.add_argument("--input-mode", default="data_parallel", choices=INPUT_MODES,
                        help="data_parallel (default): each rank its own batch; replicated: the same batch")
    parser.add_argument("--batch", type=int, default=8, help="sequences per call and rank (default 8)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda; with several ranks rank r uses cuda:r (cuda:LOCAL_RANK under torchrun)")
    parser.add_argument("--no-inductor", action="store_true",
                        help="run the rewritten graph without Inductor; plain torch.compile is left out")
    parser.add_argument("--dropless", action="store_true", help="remove Switch's capacity limit (changes results)")
    parser.add_argument("--dump-dir", default=os.environ.get("MOESHARD_DUMP_DIR") or None,
                        help="write rank 0's graph dumps and report.txt/json here (default: $MOESHARD_DUMP_DIR)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.world_size = _world_size(parser, args)
    return args


def _world_size(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """--world-size, defaulted and checked against torchrun and the GPUs."""
    cuda = torch.device(args.device).type == "cuda"
    if _under_torchrun():
        launched = int(os.environ["WORLD_SIZE"])
        if args.world_size not in (None, launched):
            parser.error(f"--world-size {args.world_size}, but torchrun started {launched} ranks")
        return launched
    world = args.world_size if args.world_size is not None else torch.cuda.device_count() if cuda else 2
    if world < 1:
        parser.error(f"--world-size must be at least 1, got {world}")
    if cuda and world > 1 and world > torch.cuda.device_count():
        parser.error(f"--world-size {world} needs one GPU per rank; {torch.cuda.device_count()} visible")
    return world


def _under_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


def main(argv=None) -> None:
    args = parse_args(argv)
    if _under_torchrun():
        _torchrun_rank(args)
    elif args.world_size == 1:
        run(args, Rank(0, 1, torch.device(args.device)))
        print(demo_output.gpu_figures_section(), flush=True)
    else:
        _spawn(args)
        if torch.device(args.device).type == "cpu":
            torch.set_num_threads(_threads_per_rank(args.world_size))  # as the ranks had: a like-for-like rank
        closing(args)


def closing(args: argparse.Namespace) -> None:
    """After the sharded ranks: the same model on one rank, then what GPUs measure."""
    one_rank_comparison(args)
    print(demo_output.gpu_figures_section(), flush=True)


def _spawn(args: argparse.Namespace) -> None:
    """Start the ranks here; the first rank to fail ends the others and the demo, with its error."""
    # The store listens before the ranks start: no other process can take its port in between.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    print(f"[moeshard demo] spawning {args.world_size} ranks ({_backend(torch.device(args.device))} "
          f"on 127.0.0.1:{store.port})", flush=True)
    try:
        mp.spawn(_spawned_rank, args=(args, store.port), nprocs=args.world_size)
    except ProcessException as error:
        rank, trace = error.error_index, str(error).strip()
        if store.check([FIRST_FAILURE]):  # the rank whose error broke the others' collectives
            rank, trace = store.get(FIRST_FAILURE).decode().split("\n", 1)
        sys.exit(f"[moeshard demo] rank {rank} failed, the other ranks were stopped:\n{trace}")


FIRST_FAILURE = "moeshard_demo/first_failure"  # store key: "<rank>\n<traceback>" of the first rank to raise


def _spawned_rank(rank: int, args: argparse.Namespace, port: int) -> None:
    # tqdm (torch.fx's interpreter calls it) makes a multiprocessing lock on first use, whose
    # semaphore a rank leaving by os._exit would leak (and the spawner warn of); a thread lock does
    tqdm.set_lock(threading.RLock())
    where = _rank(rank, args.world_size, rank, args.device)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=TIMEOUT)
    _join(where, args.world_size, store)
    try:
        run(args, where)
    except Exception:
        # Said before this process exits: its exit breaks the other ranks' collectives, and
        # whichever process ends first is what the spawner would report.
        if store.add(FIRST_FAILURE + "/count", 1) == 1:
            store.set(FIRST_FAILURE, f"{rank}\n{traceback.format_exc()}")
        raise
    _leave()


def _torchrun_rank(args: argparse.Namespace) -> None:
    where = _rank(int(os.environ["RANK"]), args.world_size, int(os.environ["LOCAL_RANK"]), args.device)
    _join(where, int(os.environ.get("LOCAL_WORLD_SIZE", args.world_size)))
    run(args, where)
    _leave(lambda: closing(args) if where.rank == 0 else None)


def _leave(finish: Callable[[], None] = lambda: None) -> None:
    """Leave together, run `finish` outside the group, and skip the interpreter's teardown: gloo's
    threads sometimes abort the process there ("terminate called without an active exception",
    seen about once in six runs)."""
    dist.barrier()
    dist.destroy_process_group()
    finish()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _rank(rank: int, world: int, local_rank: int, device: str) -> Rank:
    """One GPU per rank on CUDA."""
    kind = torch.device(device).type
    return Rank(rank, world, torch.device(kind, local_rank) if kind == "cuda" else torch.device(kind))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _threads_per_rank(local_world: int) -> int:
    """This host's cores split between its ranks."""
    return max(1, _cores() // local_world)


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _join(where: Rank, local_world: int, store: dist.Store | None = None) -> None:
    """Join the default process group (through `store`, else torchrun's env://); on CPU split
    the cores between this host's ranks."""
    if where.device.type == "cuda":
        torch.cuda.set_device(where.device)
    else:
        torch.set_num_threads(_threads_per_rank(local_world))
    dist.init_process_group(_backend(where.device), store=store, rank=where.rank, world_size=where.world,
                            timeout=TIMEOUT, device_id=where.device if where.device.type == "cuda" else None)


def run(args: argparse.Namespace, where: Rank) -> None:
    """The demo on one rank: build, eager, compile, say what the backend did, check, time."""
    report = moeshard_compile.Report()
    dump_dir = args.dump_dir if where.rank == 0 else None
    with torch.no_grad():
        model, inputs, reference, moeshard = prepare(args, where, report, dump_dir)
        regions_per_rank = gather(report.regions)
        agreements = gather(demo_output.Agreement.of(moeshard.output, reference))
        where.say(demo_output.regions_section(report, dump_dir))
        where.say(demo_output.shards_section(regions_per_rank))
        where.say(demo_output.equality_section(agreements, args.dtype, args.input_mode))
        if where.world == 1:
            compare_on_one_rank(args, where, model, inputs, reference, moeshard)
        else:
            time_sharded(args, where, model, inputs, moeshard)


def prepare(args: argparse.Namespace, where: Rank, report: moeshard_compile.Report,
            dump_dir: str | None) -> tuple[torch.nn.Module, dict, torch.Tensor, Compiled]:
    """The model, its batch, its eager output, and the model compiled with moeshard after its first call."""
    model = build_model(args, where)
    inputs = make_batch(args, model.config, where)
    t0 = where.step("eager forward")
    reference = model(**inputs).last_hidden_state
    where.say(f"  {time.perf_counter() - t0:.1f}s")
    compiled = compile_moeshard(model, args, report, dump_dir)
    return model, inputs, reference, first_call(f"moeshard on {demo_output.count(where.world, 'rank')}", compiled,
                                                inputs, where)


def time_sharded(args: argparse.Namespace, where: Rank, model: torch.nn.Module, inputs: dict,
                 moeshard: Compiled) -> None:
    """Eager and moeshard on every rank, each rank on its own batch."""
    times = median_ms({"eager": lambda: model(**inputs), "moeshard": moeshard.call}, args.repeats, where.device)
    where.say(demo_output.sharded_timing_section(gather((times["eager"], times["moeshard"])), setup(args, where)))


@dataclass(frozen=True)
class Compiled:
    """A compiled model after its first call (which compiles it)."""

    name: str
    call: Callable[[], object]  # the compiled model on the demo's batch
    first_call_s: float
    output: torch.Tensor


def compile_moeshard(model: torch.nn.Module, args: argparse.Namespace, report: moeshard_compile.Report,
                     dump_dir: str | None) -> Callable:
    """torch.compile with the moeshard backend, recording into `report` (the demo prints it)."""
    options = moeshard_compile.Options.from_user({"inductor": not args.no_inductor, "dropless": args.dropless,
                                                  "input_mode": args.input_mode, "dump_dir": dump_dir})
    return torch.compile(model, backend=moeshard_compile.make_backend(options, report))


def first_call(name: str, compiled: Callable, inputs: dict, where: Rank) -> Compiled:
    """The first call compiles: its time is what a user waits for before the first output."""
    t0 = where.step(f"compiling with {name} and first call")
    output = compiled(**inputs).last_hidden_state
    seconds = time.perf_counter() - t0
    where.say(f"  {seconds:.1f}s")
    return Compiled(name, lambda: compiled(**inputs), seconds, output)


def one_rank_comparison(args: argparse.Namespace) -> None:
    """After the sharded ranks: rank 0's batch in one process with a rank's threads, compiled for one rank."""
    where = Rank(0, 1, torch.device(args.device))
    where.step("one rank in this process, with one rank's threads, no torch.distributed")
    with torch.no_grad():
        compare_on_one_rank(args, where, *prepare(args, where, moeshard_compile.Report(), None))


def compare_on_one_rank(args: argparse.Namespace, where: Rank, model: torch.nn.Module, inputs: dict,
                        reference: torch.Tensor, moeshard: Compiled) -> None:
    """Eager, plain torch.compile (Inductor) and moeshard, timed in turn in this process."""
    compiled = [moeshard]
    if not args.no_inductor:
        compiled.insert(0, first_call("torch.compile (Inductor)", torch.compile(model), inputs, where))
    times = median_ms({"eager": lambda: model(**inputs), **{c.name: c.call for c in compiled}},
                      args.repeats, where.device)
    rows = [demo_output.Timed("eager", times["eager"])]
    rows += [demo_output.Timed(c.name, times[c.name], c.first_call_s,
                               demo_output.Agreement.of(c.output, reference).max_error) for c in compiled]
    left_out = "torch.compile (Inductor) is left out: --no-inductor." if args.no_inductor else None
    where.say(demo_output.comparison_section(rows, setup(args, where), left_out))


def setup(args: argparse.Namespace, where: Rank) -> demo_output.Setup:
    """Where the timings ran, for the text that explains them."""
    return demo_output.Setup(where.device.type, where.world, _cores(), torch.get_num_threads(),
                             f"{args.batch}x{args.seq}", args.repeats, args.input_mode)


def build_model(args: argparse.Namespace, where: Rank) -> torch.nn.Module:
    """The same weights on every rank: the same seed before building."""
    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    if args.pretrained:
        t0 = where.step(f"loading {args.pretrained}")
        model = SwitchTransformersEncoderModel.from_pretrained(args.pretrained, torch_dtype=dtype)
    else:
        t0 = where.step(f"building {args.config} (random weights)")
        config = model_config(args.config)
        model_class = MixtralModel if isinstance(config, MixtralConfig) else SwitchTransformersEncoderModel
        model = model_class(config).to(dtype)
    model = model.eval().to(where.device)
    where.say(f"  {demo_output.describe(model.config)}; {time.perf_counter() - t0:.1f}s")
    return model


def make_batch(args: argparse.Namespace, cfg: PretrainedConfig, where: Rank) -> dict:
    """data_parallel: each rank its own tokens (seed + rank); replicated: the same tokens on every rank."""
    seed = args.seed + (where.rank if args.input_mode == "data_parallel" else 0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(where.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def gather(value) -> list:
    """Every rank's value, in rank order (on every rank, for rank 0 to print)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def median_ms(calls: dict[str, Callable], repeats: int, device: torch.device) -> dict[str, float]:
    """The median of `repeats` calls of each, called in turn, so load that comes and goes hits every
    variant alike. Ranks start each call together (a barrier): one rank's time is not another's idle time."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            _sync(device)
            if dist.is_initialized():
                dist.barrier()
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
