"""PNG plots of bench/paper.py's JSON in the style of the MoEShard paper's figures.

    python bench/plot_paper.py paper_h100.json --out docs/results/    # needs matplotlib: pip install -e '.[plots]'

    python bench/plot_paper.py paper_4gpu.json --out docs/results/    # bench/paper_ranks.py's, measured

One figure per sweep found in the JSON, each a line per baseline: moeshard's speedup over it
(baseline latency / moeshard latency; above 1: moeshard is faster) against the sweep's axis:
    experts  speedup vs E           (paper_experts_<dtype>.png)
    batch    speedup vs batch       (paper_batch_<dtype>.png)
    skew     speedup vs routing     (paper_skew_<dtype>.png)
From bench/paper.py the moeshard rows are moeshard_N and the figures say "simulated" in their
title; from bench/paper_ranks.py they are measured and the files end in _<N>ranks.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

AXES = {"experts": ("E", "experts"), "batch": ("batch", "batch per GPU (sequences of 120 tokens)"),
        "skew": ("routing", "routing")}
BASELINES = {"vs_cf50": "DeepSpeed-style EP, CF = min(E, 50)", "vs_cf1.25": "DeepSpeed-style EP, CF = 1.25",
             "vs_dropless": "dropless EP"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="bench/paper.py --json output")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the PNGs")
    return parser.parse_args(argv)


def plot(result: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_paper.py needs matplotlib: pip install -e '.[plots]'")
    simulated = "ranks" in result["config"]  # bench/paper.py's; bench/paper_ranks.py's has world_size
    ranks = result["config"]["ranks"] if simulated else result["world_size"]
    system = "moeshard_N" if simulated else "moeshard"
    rows = [row for row in result["rows"] if row["system"] == system and row.get("latency_ms")]
    device = result["environment"]["device"]
    written = []
    for sweep, (key, label) in AXES.items():
        for dtype in sorted({row["dtype"] for row in rows}):
            points = [row for row in rows if sweep in row["sweeps"] and row["dtype"] == dtype]
            if key != "routing":
                points.sort(key=lambda row: row[key])
            if len(points) < 2:
                continue
            xs = [str(row[key]) for row in points]
            fig, ax = plt.subplots(figsize=(6, 4))
            for column, name in BASELINES.items():
                ax.plot(xs, [row.get(column) or float("nan") for row in points], marker="o", label=name)
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("moeshard speedup (baseline ms / moeshard ms)")
            how = "simulated" if simulated else "measured"
            ax.set_title(f"MoE layer, {ranks} ranks ({how}), {dtype}\n{device}", fontsize=9)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out / f"paper_{sweep}_{dtype}{'' if simulated else f'_{ranks}ranks'}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in plot(json.loads(args.json.read_text()), args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
