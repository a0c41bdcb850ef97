"""bench/paper_ranks.py --smoke: the real-ranks comparison on 2 spawned gloo ranks, so the script a
multi-GPU run uses cannot rot. Checks the rows against what the shapes imply."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MOESHARD = {"moeshard", "moeshard_chunks2", "moeshard_chunks4", "moeshard_overlap", "moeshard_g1", "moeshard_auto"}
SYSTEMS = MOESHARD | {"ep_capacity_cf50", "ep_capacity_cf1.25", "ep_dropless"}


def test_paper_ranks_smoke(tmp_path):
    json_path = tmp_path / "ranks.json"
    result = subprocess.run([sys.executable, "bench/paper_ranks.py", "--smoke", "--json", str(json_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(json_path.read_text())
    N, T = 2, 16  # SMOKE: 2 ranks, batch 2 x seq 8
    assert output["world_size"] == N
    by_config: dict[str, dict[str, dict]] = {}
    for row in output["rows"]:
        by_config.setdefault(row["config"], {})[row["system"]] = row
        assert row["error"] is None, row
        assert row["figure"] == "measured (2 ranks)" and row["latency_ms"] > 0 and row["sweeps"] == ["smoke"]
    assert len(by_config) == 8 and all(set(systems) == SYSTEMS for systems in by_config.values())
    for config, systems in by_config.items():
        for name in MOESHARD:
            assert systems[name]["dropped"] == 0, systems[name]
            assert systems[name]["max_rel_err"] < (2e-2 if "bfloat16" in config else 1e-5), systems[name]
        for name in ("moeshard", "moeshard_chunks2", "moeshard_chunks4", "moeshard_overlap"):
            assert systems[name]["group_size"] == N and systems[name]["max_rows"] == N * T
        g1 = systems["moeshard_g1"]  # whole experts: the busiest rank's rows, at least the mean, at most all
        assert g1["group_size"] == 1 and N * T / N <= g1["mean_rows"] <= g1["max_rows"] <= N * T
        assert g1["max_rows"] == systems["ep_dropless"]["max_rows"], (g1, systems["ep_dropless"])
        assert systems["moeshard_auto"]["group_size"] in (1, N)
        moeshard = systems["moeshard"]
        cf50, cf125 = systems["ep_capacity_cf50"], systems["ep_capacity_cf1.25"]
        assert cf50["dropped"] == 0 and cf125["dropped"] >= 0  # CF = min(E, 50) = E: room for every token
        assert systems["ep_dropless"]["dropped"] == 0
        assert cf50["vs_cf50"] == 1.0 and moeshard["vs_cf50"] == cf50["latency_ms"] / moeshard["latency_ms"]
