"""What the demo prints: the backend's regions and shards, equality per rank, timings explained,
and the GPU figures measured by bench/. Every line fits a terminal of WIDTH columns."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate
from transformers import MixtralConfig, PretrainedConfig

from moeshard_compile.report import Report, size_text

WIDTH = 100
REGION_COLUMNS = {"module": "module", "form": "form", "num_experts": "experts", "top_k": "top_k", "status": "status"}


def describe(cfg: PretrainedConfig) -> str:
    if isinstance(cfg, MixtralConfig):
        return (f"Mixtral decoder: hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, "
                f"{cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts, top-{cfg.num_experts_per_tok}")
    return (f"Switch encoder: d_model {cfg.d_model}, d_ff {cfg.d_ff}, {cfg.num_layers} layers, "
            f"{cfg.num_experts} experts, capacity {cfg.expert_capacity}")


def wrapped(text: str, indent: str = "") -> str:
    """A paragraph folded to WIDTH columns, its later lines indented."""
    return textwrap.fill(text, width=WIDTH, subsequent_indent=indent, break_on_hyphens=False)


def count(n: int, noun: str) -> str:
    """'1 graph', '2 graphs'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _names_then_numbers(columns: int) -> tuple[str, ...]:
    """Column alignment of a table whose first column names and whose others are figures."""
    return ("left",) + ("right",) * (columns - 1)


def heading(title: str) -> str:
    return f"\n== {title} =="


def regions_section(report: Report, dump_dir: str | None) -> str:
    """The report's columns that say what the backend did; the full table is pointed to."""
    rows = report.regions
    rewritten = sum(row["status"] == "rewritten" for row in rows)
    lines = [heading("What the backend did"),
             wrapped(f"{count(len(rows), 'MoE region')} found in {count(report.graphs, 'graph')}, {rewritten} "
                     "rewritten into grouped computations (form: how the graph spells the layer, docs/usage.md §3):")]
    if rows:
        cells = [[_cell(row, name) for name in REGION_COLUMNS] for row in rows]
        lines.append(tabulate(cells, headers=list(REGION_COLUMNS.values()), tablefmt="github"))
    lines += [wrapped(f"not rewritten, {_cell(row, 'module')}: {row['reason']}", "  ")
              for row in rows if row["status"] != "rewritten"]
    lines += [wrapped(f"graph {item['graph']} compiled unchanged: {item['reason']}", "  ") for item in report.fallbacks]
    lines += [wrapped(f"graph break: {reason}", "  ") for reason in report.graph_breaks]
    lines.append(_full_table_pointer(dump_dir))
    return "\n".join(lines)


def _cell(row: dict, name: str):
    if name == "module":
        return row["module"] or "(top level)"
    return "" if row[name] is None else row[name]


def _full_table_pointer(dump_dir: str | None) -> str:
    if dump_dir:
        return wrapped(f"Every column of the report (d_model, d_ff, activation, capacity, reason, shapes): "
                       f"{Path(dump_dir) / 'report.txt'}, and report.json beside it.")
    return wrapped("Every column of the report (d_model, d_ff, activation, capacity, reason, shapes): run with "
                   "--dump-dir DIR, which writes DIR/report.txt and DIR/report.json.")


def shards_section(regions_per_rank: list[list[dict]]) -> str:
    """Each rank's FFN columns and expert bytes, from every rank's report rows."""
    if len(regions_per_rank) == 1:
        return heading("Shards") + "\n" + "One rank: every rewritten region keeps every expert whole."
    cells = []
    for rank, rows in enumerate(regions_per_rank):
        for (start, stop, d_ff), held in _blocks(rows).items():
            cells.append([rank, held["regions"], f"{start}:{stop} of {d_ff}",
                          f"{size_text(held['bytes_per_rank'])} of {size_text(held['bytes'])}"])
    table = tabulate(cells, headers=["rank", "regions", "FFN columns of every expert", "expert weights held"],
                     tablefmt="github")
    return "\n".join([heading(f"Shards: {len(regions_per_rank)} ranks, each holding a slice of every expert"), table])


def _blocks(rows: list[dict]) -> dict[tuple, dict]:
    """Rewritten regions grouped by the FFN block this rank holds, with their bytes summed."""
    blocks: dict[tuple, dict] = {}
    for row in rows:
        if row["status"] != "rewritten" or not row["ffn_block"]:
            continue
        held = blocks.setdefault((*row["ffn_block"], row["d_ff"]), {"regions": 0, "bytes": 0, "bytes_per_rank": 0})
        held["regions"] += 1
        held["bytes"] += row["expert_bytes"] or 0
        held["bytes_per_rank"] += row["expert_bytes_per_rank"] or 0
    return blocks


@dataclass(frozen=True)
class Agreement:
    """How closely one rank's compiled output matches eager on the same batch."""

    max_error: float  # max |compiled - eager|
    max_eager: float  # max |eager|, for scale
    median_token_error: float  # median over tokens of |compiled - eager| / |eager|

    @classmethod
    def of(cls, out: torch.Tensor, reference: torch.Tensor) -> "Agreement":
        """In bf16 the max error is dominated by the few tokens whose near-tied router choice flips
        under rounding (any compiler flips some); the median says whether the rest agree."""
        out, reference = out.double(), reference.double()
        diff = (out - reference).flatten(0, -2).norm(dim=-1)
        token = (diff / reference.flatten(0, -2).norm(dim=-1).clamp_min(1e-30)).median().item()
        return cls((out - reference).abs().max().item(), reference.abs().max().item(), token)


def equality_section(per_rank: list[Agreement], dtype: str, input_mode: str) -> str:
    batches = "its own batch" if input_mode == "data_parallel" else "the same batch on every rank"
    ranks = f", each rank on {batches}" if len(per_rank) > 1 else ""
    lines = [heading(f"Equality with the eager model{ranks} ({dtype})")]
    lines += [f"rank {rank}: max |compiled - eager| = {a.max_error:.3g} (max |eager| = {a.max_eager:.3g}); "
              f"median token error {a.median_token_error:.2g}" for rank, a in enumerate(per_rank)]
    return "\n".join(lines)


@dataclass(frozen=True)
class Setup:
    """Where and what the timings measure."""

    device: str
    world: int
    cores: int
    threads: int  # torch threads per process (CPU)
    tokens: str  # "8x64"
    repeats: int
    input_mode: str


def sharded_timing_section(per_rank: list[tuple[float, float]], setup: Setup) -> str:
    """Each rank's eager and moeshard times, what they measure, and (on CPU) why sharding does not pay."""
    lines = [heading(f"Timing on {setup.world} ranks"),
             wrapped(f"One forward of the whole model on {setup.tokens} tokens per rank, median of "
                     f"{count(setup.repeats, 'call')} each, eager and moeshard in turn, every call started on all "
                     "ranks together:")]
    lines += [f"rank {rank}: eager {eager:.1f} ms | moeshard {sharded:.1f} ms | speedup {eager / sharded:.2f}x"
              for rank, (eager, sharded) in enumerate(per_rank)]
    if setup.device == "cpu":
        lines.append(wrapped(_why_cpu(setup)))
    return "\n".join(lines)


def _why_cpu(setup: Setup) -> str:
    n = setup.world
    shared = f"the {n} ranks are {n} processes on this machine's {count(setup.cores, 'CPU core')}, " \
             f"{count(setup.threads, 'thread')} each"
    pays = "Sharding pays with one GPU per rank and fast links (the GPU figures at the end)."
    if setup.input_mode == "data_parallel":
        return (f"Why sharding cannot gain here: {shared}. Each rank computes 1/{n} of every expert for the tokens "
                f"of {'both' if n == 2 else f'all {n}'} ranks, the same expert work as eager on its own tokens, and adds an all-gather and "
                "a reduce-scatter per MoE layer, which go through gloo over the loopback interface. What differs "
                "from eager is the grouped computation (one rank, below) less the cost of those collectives. "
                + pays)
    return (f"What sharding costs and saves here: {shared}. Each rank computes 1/{n} of every expert for the "
            "same tokens, runs the dense layers in full, and adds an all-reduce per MoE layer, which goes through "
            f"gloo over the loopback interface. {pays}")


@dataclass(frozen=True)
class Timed:
    """One variant of the one-rank comparison."""

    name: str
    median_ms: float
    first_call_s: float | None = None  # compile and first call; None for eager
    max_error: float | None = None  # max |variant - eager|


def comparison_section(rows: list[Timed], setup: Setup, left_out: str | None) -> str:
    """Eager, plain torch.compile and moeshard in one process: what the rewrite gains without sharding."""
    eager_ms = rows[0].median_ms
    where = f"{count(setup.threads, 'thread')} on {count(setup.cores, 'CPU core')}" if setup.device == "cpu" \
        else setup.device
    cells = [[row.name, row.first_call_s, row.median_ms, f"{eager_ms / row.median_ms:.2f}x", row.max_error]
             for row in rows]
    table = tabulate(cells, headers=["variant", "first call s", "median ms", "speedup", "max error vs eager"],
                     tablefmt="github", floatfmt=("", ".1f", ".1f", "", ".2g"), colalign=_names_then_numbers(5))
    lines = [heading(f"One rank on {setup.device.upper()}"),
             wrapped(f"The same model in one process ({where}, no torch.distributed) on {setup.tokens} tokens; "
                     f"median of {count(setup.repeats, 'forward')} each, the variants in turn; speedup over eager:"),
             table]
    if left_out:
        lines.append(wrapped(left_out))
    return "\n".join(lines)


# Measured on GPUs by bench/ and quoted from docs/results.md ("One whole model", "Measured on 4 H100s").
ENCODER_SCRIPT = "bench/encoder.py"
ENCODER_MS = {"bf16": (31.6, 107.9), "fp32": (155.7, 308.3)}  # dtype: (moeshard, torch.compile with Inductor)
RANKS_SCRIPT = "bench/paper_ranks.py"
RANKS_MOESHARD_MS = 11.47
RANKS_BASELINES_MS = (  # (system, ms, tokens dropped)
    ("dropless expert parallelism", 25.21, "none"),
    ("DeepSpeed-style, capacity 1.25", 9.84, "69%"),
    ("DeepSpeed-style, capacity 50", 320.5, "none"),
)


def gpu_figures_section() -> str:
    """The headline figures of docs/results.md, with their hardware and the script that measures them."""
    encoder = [[dtype, ours, theirs, f"{theirs / ours:.2f}x"] for dtype, (ours, theirs) in ENCODER_MS.items()]
    ranks = [[system, ms, RANKS_MOESHARD_MS, f"{ms / RANKS_MOESHARD_MS:.2f}x", dropped]
             for system, ms, dropped in RANKS_BASELINES_MS]
    return "\n".join([
        heading("On GPUs"),
        wrapped("Measured by the bench/ scripts; commands, versions and every row in docs/results.md, the "
                "kernels and one MoE layer in docs/performance.md."),
        wrapped(f"One NVIDIA H100 80GB HBM3, the Switch-Base encoder (12 layers, 6 of them MoE, 64 experts), 30000 "
                f"tokens ({ENCODER_SCRIPT}):"),
        tabulate(encoder, headers=["dtype", "moeshard ms", "torch.compile (Inductor) ms", "speedup"],
                 tablefmt="github", floatfmt="g", colalign=_names_then_numbers(4)),
        wrapped(f"4 NVIDIA H100 SXM of one host (NVLink, NCCL), one MoE layer, 64 experts, 30000 tokens per GPU, "
                f"skewed routing, fp32, against expert parallelism ({RANKS_SCRIPT}):"),
        tabulate(ranks, headers=["compared with", "its ms", "moeshard ms", "speedup", "tokens dropped"],
                 tablefmt="github", floatfmt="g", colalign=_names_then_numbers(5)),
    ])
