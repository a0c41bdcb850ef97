"""torch.distributed plumbing: which group to shard over, and checks that fail on every rank.

Every check here sees the same facts on every rank (options, the model, all-gathered shapes),
so every rank raises the same error instead of one rank hanging in a collective.
"""

from __future__ import annotations

import zlib
from typing import Callable

import torch
import torch.distributed as dist

from moeshard_compile.options import INPUT_MODES, OVERLAPS, OptionError, Options
from moeshard_compile.passes.region import MoERegion
from moeshard_compile.passes.shard import ShardPlan

c10d = torch.ops._c10d_functional
_SIGNATURE_LEN = 64  # ints per rank in the check row


def resolve(opts: Options) -> tuple[ShardPlan | None, "dist.ProcessGroup | None"]:
    """The shard plan and group the options ask for; (None, None) for one rank."""
    group = opts.group
    if opts.mesh is not None:
        group = opts.mesh.get_group()
    if group is None:
        if dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        elif opts.world_size not in (None, 1):
            raise OptionError(
                f"moeshard: world_size={opts.world_size} but torch.distributed is not initialised: call "
                "torch.distributed.init_process_group() on every rank first (torchrun sets up its environment)"
            )
        else:
            return None, None
    size = dist.get_world_size(group)
    if opts.world_size is not None and opts.world_size != size:
        given = "option 'mesh'" if opts.mesh is not None else "option 'group'" if opts.group is not None else "the default group"
        raise OptionError(f"moeshard: world_size={opts.world_size} does not match {given}, which has {size} ranks")
    if size == 1:
        return None, None
    g = opts.expert_group_size
    if isinstance(g, int):
        if size % g:
            raise OptionError(f"moeshard: expert_group_size={g} does not divide the {size} ranks into groups")
        if g < size and (opts.overlap != "none" or opts.comm_chunks > 1):
            raise OptionError(f"moeshard: expert_group_size={g} exchanges rows by expert group; overlap and "
                              "comm_chunks schedule MoEShard's exchange (expert_group_size None)")
    plan = ShardPlan(dist.get_rank(group), size, group.group_name, opts.input_mode, opts.comm_chunks, opts.overlap,
                     g if isinstance(g, int) else None)
    return plan, group


def check_fits(regions: list[MoERegion], plan: ShardPlan) -> None:
    """Every rank must hold at least one FFN column of every expert."""
    for region in regions:
        if region.status == "recognised" and region.num_experts < plan.world_size // plan.g:
            raise OptionError(
                f"moeshard: expert_group_size={plan.g} makes {plan.world_size // plan.g} expert groups, more than the "
                f"{region.num_experts} experts in {region.module or 'the model'}: every group needs an expert"
            )
        if region.status == "recognised" and region.d_ff < plan.g:
            sharers = f"world_size={plan.world_size}" if plan.sharded_everywhere else f"expert_group_size={plan.g}"
            raise OptionError(
                f"moeshard: {sharers} is larger than the FFN size d_ff={region.d_ff} of the "
                f"experts in {region.module or 'the model'}: each rank needs at least one FFN column; "
                "shard over a smaller group"
            )


# The facts every rank must agree on before running a sharded graph, in the check row's order.
FACTS = ("input_mode", "comm_chunks", "overlap", "expert_group_size", "check_inputs", "dropless", "world_size",
         "regions sharded", "region shapes", "expert weights")
_MAGIC = 0x6D6F657368617264 & (2**62 - 1)  # marks a moeshard check row ("moeshard")
_HEAD = 1 + len(FACTS)


class RankMismatchError(ValueError):
    """The ranks disagree on what a sharded graph must compute; raised on every rank."""


class CollectiveFailedError(RuntimeError):
    """A collective of a sharded graph failed: another rank is missing, or the link broke."""


class RankCheck:
    """Before a call of a sharded graph: one all-gather of a fixed-size row per rank, holding the
    options that shape the collectives, the regions sharded, a checksum of the expert weights and
    the input shapes. Every rank sees every row, so every rank raises the same error.

    Runs before every call when check_inputs is on (a host sync each), otherwise at the first
    call only: a later check on some ranks only would meet the others' graph collectives."""

    def __init__(self, group: "dist.ProcessGroup", opts: Options, rewritten: list[MoERegion], skipped: int):
        self.group, self.every_call = group, opts.check_inputs
        self.world = dist.get_world_size(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
        shapes = [(r.module, r.num_experts, r.top_k, r.d_model, r.d_ff, r.activation, r.gated) for r in rewritten]
        g = {None: 0, "auto": -1}.get(opts.expert_group_size, opts.expert_group_size)
        self.facts = [INPUT_MODES.index(opts.input_mode), opts.comm_chunks, OVERLAPS.index(opts.overlap), g,
                      int(opts.check_inputs), int(opts.dropless),
                      self.world, len(rewritten), zlib.crc32(repr(shapes).encode())]  # FACTS but the weights
        self.skipped = skipped
        self.agreed = False

    def __call__(self, args: tuple, stacks: list = ()) -> None:
        if self.agreed and not self.every_call:
            return
        weights = hash(tuple(s.digest for s in stacks)) & (2**62 - 1)
        shapes = _signature(_input_shapes(args), _SIGNATURE_LEN - _HEAD)
        mine = torch.tensor([_MAGIC, *self.facts, weights, *shapes], dtype=torch.int64, device=self.device)
        every = guarded(lambda: c10d.wait_tensor(c10d.all_gather_into_tensor(mine, self.world, self.group.group_name)),
                        self.group, "the ranks' check before a sharded call")
        rows = every.view(self.world, _SIGNATURE_LEN).tolist()
        if any(row != rows[0] for row in rows):
            raise RankMismatchError(self._explain(rows))
        self.agreed = True

    def _explain(self, rows: list[list[int]]) -> str:
        rank = dist.get_rank(self.group)
        if any(row[0] != _MAGIC for row in rows):
            odd = [r for r, row in enumerate(rows) if row[0] != _MAGIC]
            return (f"moeshard: rank {rank}: ranks {odd} were in another collective than moeshard's check before a "
                    "sharded call: the ranks run different graphs (different models, or a rank that compiles a "
                    "graph the others do not)")
        problems = []
        for i, name in enumerate(FACTS, start=1):
            values = [row[i] for row in rows]
            if len(set(values)) == 1:
                continue
            if name == "expert weights":
                odd = [r for r, v in enumerate(values) if v != values[0]]
                problems.append(f"the expert weights of ranks {odd} differ from rank 0's (every rank must hold the "
                                "same model: build it from the same seed or checkpoint)")
            elif name == "regions sharded":
                problems.append("MoE regions sharded: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                                + " (a rank that rewrote fewer runs them unsharded: its report says why, e.g. "
                                "autograd on or dropout active)")
            elif name == "region shapes":
                problems.append("the ranks' sharded MoE regions differ in shapes (different models)")
            else:
                names = {"input_mode": INPUT_MODES, "overlap": OVERLAPS}.get(name)
                shown = [names[v] if names else bool(v) if name in ("check_inputs", "dropless")
                         else {0: None, -1: "auto"}.get(v, v) if name == "expert_group_size" else v for v in values]
                problems.append(f"option {name!r}: " + ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(shown)))
        if any(row[_HEAD:] != rows[0][_HEAD:] for row in rows):
            described = "; ".join(f"rank {r}: {_describe(row[_HEAD:])}" for r, row in enumerate(rows))
            problems.append(f"the ranks called the compiled model with inputs of different shapes ({described}); "
                            "every rank must bring a batch of the same shape")
        skipped = f" This rank left {self.skipped} MoE regions unsharded." if self.skipped else ""
        return f"moeshard: rank {rank}: the ranks disagree: " + "; ".join(problems) + "." + skipped


def guarded(run: Callable, group: "dist.ProcessGroup", what: str):
    """run(), turning a failed collective into an error that says what waiting on other ranks means."""
    try:
        return run()
    except CollectiveFailedError:
        raise
    except RuntimeError as error:
        if not _collective_failure(error):
            raise
        timeout = _timeout_s(group)
        bound = f" (process group timeout {timeout:g} s)" if timeout is not None else ""
        raise CollectiveFailedError(
            f"moeshard: rank {dist.get_rank(group)}: {what} failed{bound}: another rank did not take part: it "
            "stopped calling the compiled model, raised, exited or was killed, or calls it a different number of "
            f"times or with other inputs. {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from error


def _collective_failure(error: RuntimeError) -> bool:
    text = str(error).lower()
    return isinstance(error, dist.DistError) or any(
        k in text for k in ("gloo", "nccl", "timed out", "timeout", "connection closed", "connection reset"))


def _timeout_s(group: "dist.ProcessGroup") -> float | None:
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout.total_seconds()
        except Exception:  # noqa: BLE001, S112 - private API; the message then leaves the number out
            continue
    return None


def _input_shapes(args: tuple) -> list[tuple[int, ...]]:
    """Shapes of the graph's tensor inputs other than parameters (the batch, buffers). The ints
    Dynamo passes for dynamic sizes are left out: they repeat these shapes, and a rank running a
    static graph and one running a dynamic graph of the same model must compare equal."""
    return [tuple(a.shape) for a in args if isinstance(a, torch.Tensor) and not isinstance(a, torch.nn.Parameter)]


def _signature(shapes: list[tuple[int, ...]], length: int) -> list[int]:
    """`length` ints: the shape count and each shape's (ndim, *dims) as far as they fit, padded
    with -1, then the full length and a hash of it all (ints hash alike in every process), so
    shapes past the readable head still count."""
    flat = [len(shapes)] + [d for shape in shapes for d in (len(shape), *shape)]
    head = flat[: length - 2]
    return head + [-1] * (length - 2 - len(head)) + [len(flat), hash(tuple(flat))]


def _describe(row: list[int]) -> str:
    """The readable head of a signature: the shapes, '...' where they were cut."""
    count, rest, shapes = row[0], row[1:-2], []
    for _ in range(count):
        if not rest or rest[0] < 0:
            shapes.append("...")
            break
        ndim, rest = rest[0], rest[1:]
        shapes.append(str(list(rest[:ndim])))
        rest = rest[ndim:]
    return ", ".join(shapes)
