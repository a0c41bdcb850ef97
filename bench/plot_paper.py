"""PNG plots of bench/paper.py's JSON in the style of the MoEShard paper's figures.

    python bench/plot_paper.py paper_h100.json --out docs/results/    # needs matplotlib: pip install -e '.[plots]'
    python bench/plot_paper.py paper_4gpu.json --out docs/results/    # bench/paper_ranks.py's, measured
    python bench/plot_paper.py --smoke                                # a made-up result, into a temporary folder

One figure per sweep found in the JSON, each a line per baseline: moeshard's speedup over it
(baseline latency / moeshard latency; above 1: moeshard is faster) against the sweep's axis:
    experts  speedup vs E           (paper_experts_<dtype>.png)
    batch    speedup vs batch       (paper_batch_<dtype>.png)
    skew     speedup vs routing     (paper_skew_<dtype>.png)
From bench/paper.py the moeshard rows are moeshard_N and the figures say "simulated" in their
title; from bench/paper_ranks.py they are measured and the files end in _<N>ranks.png.
--smoke prints the figures of a made-up two-point result on every axis, and draws them where
matplotlib is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

AXES = {"experts": ("E", "experts"), "batch": ("batch", "batch per GPU (sequences of 120 tokens)"),
        "skew": ("routing", "routing")}
BASELINES = {"vs_cf50": "DeepSpeed-style EP, CF = min(E, 50)", "vs_cf1.25": "DeepSpeed-style EP, CF = 1.25",
             "vs_dropless": "dropless EP"}


@dataclass
class Figure:
    """One PNG: moeshard's speedup over each baseline (a line each) at the sweep's points."""

    name: str
    title: str
    xlabel: str
    xs: list[str]
    speedups: dict[str, list[float]]  # baseline label -> a speedup per point


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="?", help="bench/paper.py or bench/paper_ranks.py --json output")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the PNGs (default: the current one; with --smoke a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="plot a made-up result instead of a JSON")
    args = parser.parse_args(argv)
    if (args.json is None) != args.smoke:
        parser.error("give either a JSON file or --smoke")
    return args


def figures(result: dict) -> list[Figure]:
    """Every sweep and dtype of the result with two points or more."""
    simulated = "ranks" in result["config"]  # bench/paper.py's; bench/paper_ranks.py's has world_size
    ranks = result["config"]["ranks"] if simulated else result["world_size"]
    system = "moeshard_N" if simulated else "moeshard"
    rows = [row for row in result["rows"] if row["system"] == system and row.get("latency_ms")]
    device = result["environment"]["device"]
    found = []
    for sweep, (key, label) in AXES.items():
        for dtype in sorted({row["dtype"] for row in rows}):
            points = [row for row in rows if sweep in row["sweeps"] and row["dtype"] == dtype]
            if key != "routing":
                points.sort(key=lambda row: row[key])
            if len(points) < 2:
                continue
            how = "simulated" if simulated else "measured"
            found.append(Figure(
                name=f"paper_{sweep}_{dtype}{'' if simulated else f'_{ranks}ranks'}.png",
                title=f"MoE layer, {ranks} ranks ({how}), {dtype}\n{device}", xlabel=label,
                xs=[str(row[key]) for row in points],
                speedups={name: [row.get(column) or float("nan") for row in points]
                          for column, name in BASELINES.items()}))
    return found


def draw(figure: Figure, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, speedups in figure.speedups.items():
        ax.plot(figure.xs, speedups, marker="o", label=name)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel(figure.xlabel)
    ax.set_ylabel("moeshard speedup (baseline ms / moeshard ms)")
    ax.set_title(figure.title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / figure.name
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def smoke_result() -> dict:
    """A bench/paper.py result made up for --smoke: two points on every axis, fp32, 2 simulated ranks."""
    rows = []
    for sweep, (key, _) in AXES.items():
        for point, value in enumerate({"E": (8, 16), "batch": (10, 100), "routing": ("uniform", "skew")}[key]):
            rows.append({"system": "moeshard_N", "latency_ms": 1.0, "dtype": "float32", "sweeps": [sweep], key: value,
                         **{column: 2.0 + point for column in BASELINES}})
    return {"config": {"ranks": 2}, "environment": {"device": "smoke (made-up rows)"}, "rows": rows}


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    result = smoke_result() if args.smoke else json.loads(args.json.read_text())
    found = figures(result)
    if args.smoke:
        for figure in found:
            print(f"{figure.name}: {figure.xlabel} {figure.xs}, " + ", ".join(
                f"{name} {speedups}" for name, speedups in figure.speedups.items()))
    if importlib.util.find_spec("matplotlib") is None:
        if args.smoke:
            print("matplotlib not installed: figures listed, not drawn")
            return
        sys.exit("plot_paper.py needs matplotlib: pip install -e '.[plots]'")
    out = args.out or (Path(tempfile.mkdtemp(prefix="plot_paper_")) if args.smoke else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    for figure in found:
        print(f"wrote {draw(figure, out)}")


if __name__ == "__main__":
    main(sys.argv[1:])
