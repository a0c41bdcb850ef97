"""bench/paper.py --smoke end to end, so that the script a GPU run uses cannot rot.

A subprocess, as a GPU run starts it: tiny shapes on CPU, every system, every configuration;
the metrics checked against what the shapes imply (N = 2 ranks, T = 16 tokens per rank, D = 32).
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = {"moeshard_1rank", "moeshard_N", "ep_capacity_cf50", "ep_capacity_cf1.25", "ep_dropless"}


def test_paper_smoke_runs_every_system_with_sane_metrics(tmp_path):
    json_path, csv_path = tmp_path / "paper.json", tmp_path / "paper.csv"
    result = subprocess.run(
        [sys.executable, "bench/paper.py", "--smoke", "--json", str(json_path), "--csv", str(csv_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(json_path.read_text())
    rows, (N, T, D) = output["rows"], (2, 16, 32)
    assert output["not_run"] == []
    by_config: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_config.setdefault(row["config"], {})[row["system"]] = row
        assert row["error"] is None, row
        assert row["simulated"] == (row["system"] != "moeshard_1rank")
        assert row["figure"] == ("simulated" if row["simulated"] else "measured")
        assert row["latency_ms"] > 0 and row["x_floor"] > 0
        assert row["latency_ms"] >= row["compute_ms"] > 0 and row["comm_ms"] >= 0
        assert row["rows_max_over_mean"] >= 1 and row["dropped"] >= 0
        assert (row["bytes_per_rank"] > 0) == row["simulated"]
    assert len(by_config) == 8 and all(set(systems) == SYSTEMS for systems in by_config.values()), by_config.keys()
    for config, systems in by_config.items():
        element = 2 if "bfloat16" in config else 4
        moeshard = systems["moeshard_N"]
        assert moeshard["max_rows"] == N * T and moeshard["rows_max_over_mean"] == 1 and moeshard["dropped"] == 0
        assert moeshard["bytes_per_rank"] == (N - 1) * moeshard["E"] * 8 + 2 * (N - 1) * T * D * element
        assert systems["ep_dropless"]["dropped"] == 0 and systems["ep_capacity_cf50"]["dropped"] == 0  # CF = E
        assert systems["ep_capacity_cf1.25"]["dropped"] > 0  # skew and zipf overflow 1.25x the mean
        for baseline, column in (("ep_capacity_cf50", "vs_cf50"), ("ep_capacity_cf1.25", "vs_cf1.25"),
                                 ("ep_dropless", "vs_dropless")):
            assert systems[baseline][column] == 1
            assert abs(moeshard[column] - systems[baseline]["latency_ms"] / moeshard["latency_ms"]) < 1e-9
        assert any(line.startswith(f"| {config} ") and "| moeshard_N " in line for line in result.stdout.splitlines())
    with csv_path.open() as file:
        assert len(list(csv.DictReader(file))) == len(rows)
    assert "simulated" in result.stdout
