"""recognise -> prepare -> (verify) -> rewrite, over one Dynamo graph."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx as fx

from .capacity import find_capacity_limits, remove_capacity_limits
from .lower import lower_region
from .recognise_loop import recognise_loops
from .recognise_stacked import recognise_stacked
from .region import MoERegion, Status, WeightSource
from .shard import ShardPlan

_ASSERTS = (torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size.default)


_EMITTED = "moeshard_emitted"


def recognise(gm: fx.GraphModule) -> list[MoERegion]:
    """Every MoE region of the graph, in graph order; the graph is left as it is."""
    stacked = recognise_stacked(gm)
    loops = recognise_loops(gm, {n for r in stacked if r.status is Status.RECOGNISED for n in r.erase})
    # where transformers' experts contract could not be read, the loop recogniser reads by meaning
    found = {n for r in loops if r.status is Status.RECOGNISED for n in r.erase}
    regions = [r for r in stacked if r.status is Status.RECOGNISED or not found.intersection(r.erase)] + loops
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(regions, key=lambda r: order.get(r.output_TD, len(order)))


def prepare(gm: fx.GraphModule, regions: list[MoERegion]) -> None:
    """Build each recognised region's routing (emitting the combine weights it reads off the
    model's code, dead until rewritten and marked so that `rewrite` removes those of regions
    it does not rewrite) and find the capacity limits its router applies."""
    before = set(gm.graph.nodes)
    for region in regions:
        if region.status is Status.RECOGNISED:
            region.routing = region.route()
            region.capacity_limits = find_capacity_limits(region)
    for node in gm.graph.nodes:
        if node not in before:
            node.meta[_EMITTED] = True


def rewrite(
    gm: fx.GraphModule,
    regions: list[MoERegion],
    dropless: bool = False,
    plan: ShardPlan | None = None,
    kernels: Mapping[MoERegion, str] | None = None,
    plans: Mapping[MoERegion, ShardPlan] | None = None,
) -> list[WeightSource]:
    """Lower every region still marked recognised; leave skipped ones as they are. Returns the
    sources of the stacked weights the rewritten graph reads after its own inputs, in order.

    dropless: also remove the routers' capacity limits (changes results where tokens drop),
    except where the model's dispatch tensor holds a fixed number of slots per expert.
    plan: shard every region's experts over plan.world_size ranks (None: one rank).
    kernels: how each region's experts run ("fused", the default, or "grouped_mm": lower.py).
    plans: a region's own plan where it differs from `plan` (its expert group size).
    """
    sources = []
    for index, region in enumerate(regions):
        if region.status is not Status.RECOGNISED:
            continue
        if plan is not None and region.activation == "graph" and region.chain_layout is None:
            region.skip("the expert's code between its projections reads its columns in a pattern other than "
                        "one to one, interleaved pairs or halves: the FFN dim cannot be sharded across ranks")
            continue
        if dropless and region.capacity_limits and not region.fixed_slots:
            remove_capacity_limits(gm.graph, region.capacity_limits)
        region_plan = (plans or {}).get(region, plan)
        sources.append(lower_region(gm, region, index, region_plan, (kernels or {}).get(region, "fused")))
        region.status = Status.REWRITTEN
    drop_unused_emitted(gm.graph)
    if sources:
        prune_dead_asserts(gm.graph)
        gm.graph.eliminate_dead_code(is_impure_node=is_impure)
    gm.graph.lint()
    gm.recompile()
    return sources


def drop_unused_emitted(graph: fx.Graph) -> None:
    """Erase what recognition added and no rewrite uses. An in-place write into an added tensor
    (the indicators of passes.linear_combine) goes with the tensor, once nothing else reads it."""
    emitted = [n for n in graph.nodes if n.meta.get(_EMITTED)]
    writes = {n for n in emitted if is_impure(n) and n.args and isinstance(n.args[0], fx.Node) and not n.users}
    for node in reversed(emitted):
        if node in writes:
            continue  # goes with the tensor it writes into
        into = [u for u in node.users if u in writes and u.args[0] is node]
        if len(into) == len(node.users):
            for write in into:
                graph.erase_node(write)
            graph.erase_node(node)


def is_impure(node: fx.Node) -> bool:
    """FX's purity test, plus in-place tensor methods (`out.index_add_(...)`), which FX's
    dead-code elimination would otherwise drop when their result is unused, and functorch's
    state calls that Dynamo records for torch.vmap (`_vmap_increment_nesting`, ...), which act
    only by their effect."""
    if node.is_impure() or getattr(node.target, "__module__", "") == "torch._functorch.predispatch":
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and isinstance(name, str) and name.endswith("_") and not name.startswith("_")


def prune_dead_asserts(graph: fx.Graph) -> None:
    """Drop runtime shape asserts whose only purpose was a tensor the rewrite made dead.

    Dynamo guards the data-dependent size of every `nonzero` with `_assert_scalar` nodes. They
    are side-effecting, so dead-code elimination keeps them and, through them, the per-expert
    `nonzero` calls (each a device sync) that the rewrite replaced.
    """
    live: set[fx.Node] = set()
    stack = [n for n in graph.nodes if n.op == "output" or (is_impure(n) and n.target not in _ASSERTS)]
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    for node in list(graph.nodes):
        if node.target in _ASSERTS and not all(_tensor_inputs_live(a, live) for a in node.all_input_nodes):
            graph.erase_node(node)


def _tensor_inputs_live(node: fx.Node, live: set[fx.Node]) -> bool:
    """True if every tensor this symbolic-value node is computed from is still needed."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if isinstance(n.meta.get("example_value"), torch.Tensor) and n not in live:
            return False
        if not isinstance(n.meta.get("example_value"), torch.Tensor):
            stack.extend(n.all_input_nodes)
    return True
