"""What the backend did: one row per MoE region, plus graph breaks and graph-level fallbacks."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch.fx as fx
from tabulate import tabulate

from moeshard_compile.passes.capacity import describe
from moeshard_compile.passes.region import MoERegion, Status
from moeshard_compile.passes.shard import ShardPlan
from moeshard_compile.passes.unrecognised import Unrecognised
from moeshard_compile.kernel_choice import KernelChoice
from moeshard_compile.placement import PlacementChoice
from moeshard_compile.weights import Held

COLUMNS = (
    "module", "form", "num_experts", "top_k", "d_model", "d_ff", "activation", "gated",
    "dtype", "world_size", "capacity", "kernel", "status", "reason",
)
# Sharding fields (the table condenses them into "ffn_block" and "expert weights held").
SHARD_FIELDS = ("input_mode", "ffn_block", "expert_group_size", "experts_held", "placement", "shard_shapes",
                "expert_bytes", "expert_bytes_per_rank")
# The kernel choice in full (the table shows its text in "kernel").
CHOICE_FIELDS = ("kernel_choice",)


def dynamo_breaks() -> Counter:
    from torch._dynamo.utils import counters

    return Counter(counters["graph_break"])


def region_row(graph: int, region: MoERegion, plan: ShardPlan | None, held: Held | None, dropless: bool,
               choice: KernelChoice | None = None, placement: PlacementChoice | None = None) -> dict:
    """A region's row: the record, the plan it was lowered with (its placement and why), the
    kernel its experts run and what its weights hold."""
    row = {name: getattr(region, name) for name in COLUMNS if hasattr(region, name)}
    row.update(dtype=str(region.dtype).removeprefix("torch."), status=region.status.value,
               capacity=describe(region, dropless), world_size=1, input_mode="", ffn_block=None,
               expert_group_size=None, experts_held=None, placement=None, shard_shapes={}, expert_bytes=0,
               expert_bytes_per_rank=0, kernel="", kernel_choice=None)
    if choice is not None and region.status is Status.REWRITTEN:
        row.update(kernel=choice.text(), kernel_choice=choice.to_dict())
    if plan is not None and region.status is Status.REWRITTEN:
        row.update(world_size=plan.world_size, input_mode=plan.input_mode, ffn_block=list(plan.ffn_block(region.d_ff)),
                   expert_group_size=plan.g, experts_held=list(plan.expert_block(region.num_experts)))
        if placement is not None:
            row.update(placement=placement.text(plan.world_size))
    if held is not None:
        row.update(shard_shapes=held.shapes, expert_bytes=held.expert_bytes, expert_bytes_per_rank=held.nbytes)
    return {"graph": graph, **row}


def unrecognised_row(graph: int, item: Unrecognised) -> dict:
    """A row for a structure that looks like an MoE layer and was not rewritten (fields it lacks empty)."""
    row = {name: None for name in COLUMNS + SHARD_FIELDS + CHOICE_FIELDS}
    row.update(module=item.module, form=item.form, num_experts=item.num_experts, status="skipped", reason=item.reason)
    return {"graph": graph, **row}


def _shard_cells(row: dict) -> list[str]:
    """ffn_block (and the experts held, in expert groups), the bytes held, the placement's why."""
    block = "{}:{}".format(*row["ffn_block"]) if row["ffn_block"] else ""
    experts = row.get("experts_held")
    if block and experts and experts != [0, row["num_experts"]]:
        block = "experts {}:{}, F {}".format(*experts, block)
    held = f"{size_text(row['expert_bytes_per_rank'])} of {size_text(row['expert_bytes'])}" if row.get("expert_bytes") else ""
    return [block, held, row.get("placement") or ""]


def size_text(nbytes: float) -> str:
    """Bytes as the report shows them: 3 significant digits, B to GiB."""
    for unit in ("B", "KiB", "MiB"):
        if nbytes < 1024:
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1024
    return f"{nbytes:.3g} GiB"


@dataclass
class Report:
    """Accumulates over every graph one torch.compile call produced.

    `regions`: dicts with the COLUMNS fields (and "graph", the graph's index);
    `graph_breaks`: Dynamo's reasons for splitting the model into several graphs;
    `fallbacks`: graphs compiled unchanged as a whole, with the reason;
    `rewritten_graphs`: each graph as the backend handed it on (to Inductor), to inspect in tests
    or by hand (`print(gm.code)`); not written to the dump, which has them as files.
    """

    regions: list[dict] = field(default_factory=list)
    graph_breaks: list[str] = field(default_factory=list)
    fallbacks: list[dict] = field(default_factory=list)
    graphs: int = 0
    rewritten_graphs: list[fx.GraphModule] = field(default_factory=list, repr=False)
    verify_seconds: float = 0.0  # compile time spent checking records against their graphs (passes.verify)
    # Dynamo counts graph breaks per process; those already counted here are left out
    breaks_before: Counter = field(default_factory=Counter, repr=False)

    def note_graph_breaks(self) -> None:
        now = dynamo_breaks()
        self.graph_breaks = sorted(reason for reason, n in now.items() if n > self.breaks_before.get(reason, 0))

    def to_dict(self) -> dict:  # the fields report.json holds
        return {"regions": self.regions, "graph_breaks": self.graph_breaks, "fallbacks": self.fallbacks,
                "verify_seconds": round(self.verify_seconds, 3)}

    def table(self) -> str:
        rows = [[r[c] for c in ("graph", *COLUMNS)] + _shard_cells(r) for r in self.regions]
        headers = ("graph", *COLUMNS, "ffn_block", "expert weights held", "placement")
        text = tabulate(rows, headers=headers, tablefmt="github") if rows else "(no MoE regions found)"
        for fallback in self.fallbacks:
            text += f"\ngraph {fallback['graph']} compiled unchanged: {fallback['reason']}"
        for reason in self.graph_breaks:
            text += f"\ngraph break: {reason}"
        return text

    def __str__(self) -> str:
        return self.table()

    def write(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "report.txt").write_text(self.table() + "\n")
        (directory / "report.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
