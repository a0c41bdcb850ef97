"""bench/paper.py --smoke end to end, so that the script a GPU run uses cannot rot.

A subprocess, as a GPU run starts it: tiny shapes on CPU, every system, every configuration;
the metrics checked against what the shapes imply (N = 4 ranks, T = 16 tokens per rank, D = 32),
and the simulated/measured comparison against a measured file written here for the smoke shapes.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench`
from bench.common.links import H100_NVLINK  # noqa: E402

SYSTEMS = {"moeshard_1rank", "moeshard_N", "moeshard_N_overlap", "ep_capacity_cf50", "ep_capacity_cf1.25",
           "ep_dropless", "moeshard_g2"}
CHECK_ROW_BYTES = 64 * 8  # moeshard_compile/distributed.py: the rank check's row, per rank
MEASURED = {"moeshard": 0.5, "ep_dropless": 2.0, "moeshard_chunks4": 9.0}  # ms, for E4/b2/float32/skew


def measured_file(tmp_path: Path) -> Path:
    """A bench/paper_ranks.py JSON of the smoke shapes (made up: 3 systems of one configuration)."""
    path = tmp_path / "measured.json"
    path.write_text(json.dumps({
        "world_size": 4, "config": {"d_model": 32, "d_ff": 64, "seq": 8, "seed": 0},
        "rows": [{"config": "E4/b2/float32/skew", "system": system, "latency_ms": ms}
                 for system, ms in MEASURED.items()],
    }))
    return path


def test_paper_smoke_runs_every_system_with_sane_metrics(tmp_path):
    json_path, csv_path = tmp_path / "paper.json", tmp_path / "paper.csv"
    result = subprocess.run(
        [sys.executable, "bench/paper.py", "--smoke", "--json", str(json_path), "--csv", str(csv_path),
         "--measured", str(measured_file(tmp_path))],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(json_path.read_text())
    rows, (N, T, D) = output["rows"], (4, 16, 32)
    assert output["not_run"] == [] and output["link_model"] == vars(H100_NVLINK)
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
        assert row["comm_ms"] == sum(t["ms"] for t in row["transfers"])
        assert row["host_ms"] == row["host_syncs"] * H100_NVLINK.host_sync_ms
    assert len(by_config) == 8 and all(set(systems) == SYSTEMS for systems in by_config.values()), by_config.keys()
    for config, systems in by_config.items():
        element = 2 if "bfloat16" in config else 4
        moeshard = systems["moeshard_N"]
        assert moeshard["max_rows"] == N * T and moeshard["rows_max_over_mean"] == 1 and moeshard["dropped"] == 0
        assert moeshard["bytes_per_rank"] == ((N - 1) * (moeshard["E"] * 8 + CHECK_ROW_BYTES)
                                              + 2 * (N - 1) * T * D * element)
        assert moeshard["latency_ms"] == moeshard["compute_ms"] + moeshard["comm_ms"] and moeshard["host_ms"] == 0
        check_overlap(systems["moeshard_N_overlap"], moeshard, N)
        check_hybrid(systems["moeshard_g2"], systems["ep_dropless"], config)
        assert systems["ep_dropless"]["dropped"] == 0 and systems["ep_capacity_cf50"]["dropped"] == 0  # CF = E
        assert systems["ep_capacity_cf1.25"]["dropped"] > 0  # skew and zipf overflow 1.25x the mean
        for baseline, column in (("ep_capacity_cf50", "vs_cf50"), ("ep_capacity_cf1.25", "vs_cf1.25"),
                                 ("ep_dropless", "vs_dropless")):
            assert systems[baseline][column] == 1
            assert abs(moeshard[column] - systems[baseline]["latency_ms"] / moeshard["latency_ms"]) < 1e-9
        assert any(line.startswith(f"| {config} ") and "| moeshard_N " in line for line in result.stdout.splitlines())
    check_measured(by_config, result.stdout)
    with csv_path.open() as file:
        assert len(list(csv.DictReader(file))) == len(rows)
    assert "simulated" in result.stdout


def check_overlap(overlap: dict, moeshard: dict, N: int) -> None:
    """The two-stream schedule: the same bytes as moeshard_N in 2(N-1) exchanges; no faster than its
    own computation or its transfers one after another, no slower than both in a row."""
    assert overlap["bytes_per_rank"] == moeshard["bytes_per_rank"] and overlap["host_ms"] == 0
    assert [t["kind"] for t in overlap["transfers"]] == ["gather", "gather"] + ["all_to_all"] * 2 * (N - 1)
    assert 0 <= overlap["overlapped_ms"] <= overlap["comm_ms"]
    assert 0 <= overlap["hidden_fraction"] <= 1
    assert overlap["hidden_fraction"] == overlap["overlapped_ms"] / overlap["comm_ms"]
    assert max(overlap["compute_ms"], overlap["comm_ms"]) <= overlap["latency_ms"] + 1e-9
    assert overlap["latency_ms"] <= overlap["compute_ms"] + overlap["comm_ms"] + 1e-9


def check_hybrid(hybrid: dict, dropless: dict, config: str) -> None:
    """Groups of 2 ranks: both ranks of a group compute its rows; under skew the group holding the
    first (hot) experts is the busiest; the backend's exchange (check and counts all-gathered, two
    variable all-to-alls with a host sync each) against the dropless baseline's (three, one sync)."""
    rows = hybrid["rows_per_rank"]
    assert rows[0] == rows[1] and rows[2] == rows[3] and sum(rows) == 2 * 4 * 16  # every row to both ranks of a group
    if config.endswith("skew"):
        assert rows[0] == hybrid["max_rows"] > rows[2]
    assert (hybrid["host_syncs"], dropless["host_syncs"]) == (2, 1) and hybrid["dropped"] == 0
    assert [t["kind"] for t in hybrid["transfers"]] == ["gather", "gather", "all_to_all", "all_to_all"]
    assert [t["kind"] for t in dropless["transfers"]] == ["all_to_all"] * 3
    assert hybrid["latency_ms"] == hybrid["compute_ms"] + hybrid["comm_ms"] + hybrid["host_ms"]


def check_measured(by_config: dict[str, dict[str, dict]], stdout: str) -> None:
    """moeshard_N against the measured moeshard, ep_dropless against itself; nothing else has a counterpart."""
    compared = [(config, system) for config, systems in by_config.items() for system, row in systems.items()
                if "sim_over_measured" in row]
    assert sorted(compared) == [("E4/b2/float32/skew", "ep_dropless"), ("E4/b2/float32/skew", "moeshard_N")]
    for system, measured in (("moeshard_N", "moeshard"), ("ep_dropless", "ep_dropless")):
        row = by_config["E4/b2/float32/skew"][system]
        assert row["measured_latency_ms"] == MEASURED[measured] and row["measured_runs"] == 1
        assert row["sim_over_measured"] == row["latency_ms"] / MEASURED[measured]
    assert "# how far off: simulated / measured latency (2 rows with a measured counterpart)" in stdout
