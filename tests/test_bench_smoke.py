"""The bench scripts a GPU run uses, end to end on CPU (--smoke) or as far as CPU allows (--help, an sm_90 compile), so that they cannot rot.

A subprocess, as a GPU run starts it: tiny shapes on CPU, every variant, about 30 s on 2 cores
with a cold Inductor cache (conftest gives each test run its own).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"hf_eager", "sort_grouped_mm", "sort_grouped_mm_inductor", "moeshard_fused", "moeshard_fused_inductor"}


def run_bench(script: str, *argv: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """bench/<script> as a GPU run starts it (a subprocess from the repository root); it must succeed."""
    result = subprocess.run([sys.executable, f"bench/{script}", *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_expert_kernels_smoke_runs_every_variant_correctly(tmp_path):
    result_path = tmp_path / "smoke.json"
    result = run_bench("expert_kernels.py", "--smoke", "--json", str(result_path), timeout=120)
    rows = json.loads(result_path.read_text())["rows"]
    by_shape: dict[str, set[str]] = {}
    for row in rows:
        by_shape.setdefault(row["shape"], set()).add(row["variant"])
        assert row["check"] == "ok" and row["max_rel_err"] < 1e-5 and row["median_ms"] > 0, row
        assert f"| {row['variant']} " in result.stdout
    assert by_shape and all(variants == VARIANTS for variants in by_shape.values()), by_shape


def test_encoder_smoke_runs_every_variant_correctly(tmp_path):
    """bench/encoder.py --smoke: MoE and dense encoders, every variant matches its eager model."""
    result_path = tmp_path / "encoder.json"
    run_bench("encoder.py", "--smoke", "--json", str(result_path))
    output = json.loads(result_path.read_text())
    rows = {row["variant"]: row for row in output["rows"]}
    assert set(rows) == {"moe_hf_eager", "moe_inductor", "moe_moeshard", "dense_eager", "dense_inductor"}
    for row in rows.values():
        assert row["error"] is None and row["max_rel_err"] < 1e-5 and row["median_ms"] > 0, row
        assert row["tokens_per_s"] == pytest.approx(2 * 8 / (row["median_ms"] * 1e-3))
    assert rows["dense_inductor"]["vs_dense_inductor"] == 1.0
    assert output["floor_ms"] > 0 and output["flops"] > 0


def test_compile_time_reports_the_first_call():
    """bench/compile_time.py on a tiny encoder on CPU, with the stack dumps armed."""
    result = run_bench("compile_time.py", "--device", "cpu", "--dtype", "float32", "--d-model", "32", "--d-ff", "64",
                       "--heads", "4", "--layers", "2", "--experts", "4", "--batch", "2", "--seq", "8",
                       "--stack-every", "300")
    assert "moeshard: first call" in result.stdout and "2 layers, E 4" in result.stdout
    assert re.search(r"verification of 1 regions: \d+\.\d\d s \(\d+\.\d% of the first call\)", result.stdout), result.stdout


def test_dispatch_smoke_checks_and_times_both():
    """bench/dispatch.py --smoke: the op equals the torch ops it replaced (it exits non-zero if not), both timed."""
    result = run_bench("dispatch.py", "--smoke")
    table = [line for line in result.stdout.splitlines() if line.startswith("|") and "---" not in line]
    assert len(table) == 1 + 2 and "group_by_expert ms" in table[0], result.stdout


def test_expert_ceilings_imports_and_parses():
    """bench/expert_ceilings.py needs a GPU to measure; here its imports and options must still hold."""
    result = run_bench("expert_ceilings.py", "--help")
    assert "--split" in result.stdout


def test_kernel_configs_imports_parses_and_rejects_no_rounds():
    """bench/kernel_configs.py needs a GPU to time; here its imports, its candidates (the split ones
    among them) and its options must hold, and --repeat 0 is an error, not an empty table."""
    assert "--repeat" in run_bench("kernel_configs.py", "--help").stdout
    sys.path.insert(0, str(ROOT))
    from bench.kernel_configs import CANDIDATES, config_label

    assert any(config_label(config).endswith("rows split 1") for config in CANDIDATES)
    result = subprocess.run([sys.executable, "bench/kernel_configs.py", "--repeat", "0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 2 and "--repeat must be at least 1" in result.stderr


def test_gluon_experts_imports_and_parses():
    """bench/gluon_experts.py needs an H100 to run; here its imports and options must still hold."""
    result = run_bench("gluon_experts.py", "--help")
    assert "Gluon" in result.stdout


@pytest.mark.parametrize("variant", ["pingpong 2x[128,128] s4", "cooperative [128,256] s4"])
def test_gluon_experts_kernel_compiles_for_sm90(variant):
    """Gluon has no interpreter, so compiling for sm_90 is CI's check: warp-specialised (setmaxnreg moves
    registers between the partitions), wgmma and TMA, and the ring fits an H100's shared memory."""
    sys.path.insert(0, str(ROOT))
    from bench.gluon_experts import compile_for_sm90

    for ffn_out in (False, True):
        compiled = compile_for_sm90(variant, ffn_out)
        ptx = compiled.asm["ptx"]
        assert "setmaxnreg" in ptx and "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx, variant
        assert compiled.metadata.num_warps == 12 and compiled.metadata.shared <= 232448, compiled.metadata


def test_weight_check_smoke_prints_the_check_against_the_call():
    result = run_bench("weight_check.py", "--smoke")
    assert "check ms" in result.stdout and "check / call" in result.stdout
    row = [line for line in result.stdout.splitlines() if line.startswith("|") and line.split("|")[1].strip() == "4"]
    assert len(row) == 1 and float(row[0].split("|")[3]) > 0, result.stdout
