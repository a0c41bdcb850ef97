"""torch.distributed plumbing: which group to shard over, and checks that fail on every rank.

Every check here sees the same facts on every rank (options, the model, all-gathered shapes),
so every rank raises the same error instead of one rank hanging in a collective.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from moeshard_compile.options import OptionError, Options
from passes.region import MoERegion
from passes.shard import ShardPlan

c10d = torch.ops._c10d_functional
_SIGNATURE_LEN = 64  # ints per rank in the per-call shape comparison


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
    plan = ShardPlan(dist.get_rank(group), size, group.group_name, opts.input_mode, opts.comm_chunks)
    return plan, group


def check_fits(regions: list[MoERegion], plan: ShardPlan) -> None:
    """Every rank must hold at least one FFN column of every expert."""
    for region in regions:
        if region.status == "recognised" and region.d_ff < plan.world_size:
            raise OptionError(
                f"moeshard: world_size={plan.world_size} is larger than the FFN size d_ff={region.d_ff} of the "
                f"experts in {region.module or 'the model'}: each rank needs at least one FFN column; "
                "shard over a smaller group"
            )


def check_same_inputs(group: "dist.ProcessGroup") -> Callable[[tuple], None]:
    """A per-call check that every rank's inputs have this rank's shapes (one small all-gather)."""
    world = dist.get_world_size(group)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")

    def check(args: tuple) -> None:
        signature = _signature(_input_shapes(args))
        mine = torch.tensor(signature, dtype=torch.int64, device=device)
        every = c10d.wait_tensor(c10d.all_gather_into_tensor(mine, world, group.group_name))
        rows = every.view(world, _SIGNATURE_LEN).tolist()
        if any(row != signature for row in rows):
            described = "; ".join(f"rank {r}: {_describe(row)}" for r, row in enumerate(rows))
            raise ValueError(
                "moeshard: the ranks called the compiled model with inputs of different shapes "
                f"({described}); every rank must bring a batch of the same shape"
            )

    return check


def _input_shapes(args: tuple) -> list[tuple[int, ...]]:
    """Shapes of the graph's tensor inputs other than parameters (the batch, buffers). The ints
    Dynamo passes for dynamic sizes are left out: they repeat these shapes, and a rank running a
    static graph and one running a dynamic graph of the same model must compare equal."""
    return [tuple(a.shape) for a in args if isinstance(a, torch.Tensor) and not isinstance(a, torch.nn.Parameter)]


def _signature(shapes: list[tuple[int, ...]]) -> list[int]:
    """_SIGNATURE_LEN ints: the shape count and each shape's (ndim, *dims) as far as they fit,
    padded with -1, then the full length and a hash of it all (ints hash alike in every process),
    so shapes past the readable head still count."""
    flat = [len(shapes)] + [d for shape in shapes for d in (len(shape), *shape)]
    head = flat[: _SIGNATURE_LEN - 2]
    return head + [-1] * (_SIGNATURE_LEN - 2 - len(head)) + [len(flat), hash(tuple(flat))]


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
