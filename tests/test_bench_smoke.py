"""The bench scripts end to end on CPU (--smoke) or as far as CPU allows (--help, an sm_90 compile),
each run as a user runs it (a subprocess from the repository root), so that none can rot.

Tiny shapes on CPU, every variant, with a cold Inductor cache (conftest gives each test run its
own). bench/paper.py, bench/paper_ranks.py and bench/deepspeed_layer.py have their --smoke runs in
tests/test_paper_smoke.py, tests/test_paper_ranks_smoke.py and tests/test_deepspeed_layer.py.
"""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench`, for the tests that import a tool
# moeshard_grouped_mm_inductor compiles only where torch._grouped_mm traces (bf16 on sm90+ CUDA)
EXPERT_VARIANTS = {"hf_eager", "sort_grouped_mm", "sort_grouped_mm_inductor", "moeshard_fused",
                   "moeshard_fused_inductor", "moeshard_grouped_mm"}


def run_script(path: str, *argv: str, timeout: int = 180, returncode: int = 0) -> subprocess.CompletedProcess:
    """`python <path> <argv>` from the repository root; it must exit with `returncode`."""
    result = subprocess.run([sys.executable, path, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == returncode, result.stderr[-3000:]
    return result


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of every row of the GitHub tables printed, headers included."""
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("|") and not line.startswith("|--")]


def test_moe_layer_smoke_checks_every_variant_against_eager(tmp_path):
    """bench/moe_layer.py --smoke: HF eager, Inductor and moeshard on one Switch layer, equal to eager."""
    result_path = tmp_path / "moe_layer.json"
    result = run_script("bench/moe_layer.py", "--smoke", "--json", str(result_path))
    output = json.loads(result_path.read_text())
    rows = {row["variant"]: row for row in output["rows"]}
    assert set(rows) == {"hf_eager", "inductor", "moeshard"}
    for row in rows.values():
        assert row["max_rel_err"] < 1e-5 and row["median_ms"] > 0, row
        assert row["x_floor"] == pytest.approx(row["median_ms"] / output["floor_ms"])
    assert rows["moeshard"]["graphs"] == 1 and rows["hf_eager"]["speedup_vs_hf_eager"] == 1
    assert output["flops"] == 2 * 2 * (2 * 8) * 1 * 16 * 32  # 2 matmuls x 2*T*K*D*F, T = 2 x 8 tokens
    assert "| rewritten |" in result.stdout  # the backend's report: the layer was rewritten
    assert {row[0] for row in table_rows(result.stdout)} >= {"variant", "hf_eager", "inductor", "moeshard"}


def test_expert_kernels_smoke_runs_every_variant_correctly(tmp_path):
    result_path = tmp_path / "smoke.json"
    result = run_script("bench/expert_kernels.py", "--smoke", "--json", str(result_path), timeout=240)
    rows = json.loads(result_path.read_text())["rows"]
    by_shape: dict[str, set[str]] = {}
    for row in rows:
        by_shape.setdefault(row["shape"], set()).add(row["variant"])
        assert row["check"] == "ok" and row["max_rel_err"] < 1e-5 and row["median_ms"] > 0, row
        assert f"| {row['variant']} " in result.stdout
    assert by_shape and all(variants == EXPERT_VARIANTS for variants in by_shape.values()), by_shape
    # off CUDA the backend's choice keeps the fused kernels, and the summary says so per shape
    assert {row["chosen_kernel"] for row in rows} == {"fused"}
    assert "chosen, / best compiled" in result.stdout and "| fused " in result.stdout


def test_encoder_smoke_runs_every_variant_correctly(tmp_path):
    """bench/encoder.py --smoke: MoE and dense encoders, every variant matches its eager model."""
    result_path = tmp_path / "encoder.json"
    run_script("bench/encoder.py", "--smoke", "--json", str(result_path))
    output = json.loads(result_path.read_text())
    rows = {row["variant"]: row for row in output["rows"]}
    assert set(rows) == {"moe_hf_eager", "moe_inductor", "moe_moeshard", "dense_eager", "dense_inductor"}
    for row in rows.values():
        assert row["error"] is None and row["max_rel_err"] < 1e-5 and row["median_ms"] > 0, row
        assert row["tokens_per_s"] == pytest.approx(2 * 8 / (row["median_ms"] * 1e-3))
    assert rows["dense_inductor"]["vs_dense_inductor"] == 1.0
    assert output["floor_ms"] > 0 and output["flops"] > 0


def test_weight_check_smoke_prints_the_check_against_the_call():
    """bench/weight_check.py --smoke: the compiled layer equals eager (it asserts so), the check is timed."""
    result = run_script("bench/weight_check.py", "--smoke")
    header, *rows = table_rows(result.stdout)
    assert "check ms" in header and "check / call" in header
    assert len(rows) == 1 and rows[0][0] == "4" and float(rows[0][header.index("check ms")]) > 0, result.stdout


def test_plot_paper_smoke_lists_a_figure_per_sweep(tmp_path):
    """bench/plot_paper.py --smoke: one figure per sweep of a made-up result, drawn where matplotlib is."""
    result = run_script("bench/plot_paper.py", "--smoke", "--out", str(tmp_path))
    names = ("paper_experts_float32.png", "paper_batch_float32.png", "paper_skew_float32.png")
    for name in names:
        assert re.search(rf"^{re.escape(name)}: .*dropless EP \[2\.0, 3\.0\]$", result.stdout, re.M), result.stdout
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib not installed" in result.stdout
    else:
        assert all((tmp_path / name).read_bytes().startswith(b"\x89PNG") for name in names)


def test_deepspeed_layer_parses_without_deepspeed():
    """bench/deepspeed_layer.py needs deepspeed to run (tests/test_deepspeed_layer.py runs it where it is);
    its imports and options hold without it."""
    assert "--smoke" in run_script("bench/deepspeed_layer.py", "--help").stdout


def test_compile_time_reports_the_first_call():
    """bench/lab/compile_time.py on a tiny encoder on CPU, with the stack dumps armed."""
    result = run_script("bench/lab/compile_time.py", "--device", "cpu", "--dtype", "float32", "--d-model", "32",
                        "--d-ff", "64", "--heads", "4", "--layers", "2", "--experts", "4", "--batch", "2", "--seq", "8",
                        "--stack-every", "300")
    assert "moeshard: first call" in result.stdout and "2 layers, E 4" in result.stdout
    assert re.search(r"verification of 1 regions: \d+\.\d\d s \(\d+\.\d% of the first call\)", result.stdout), result.stdout


def test_dispatch_smoke_checks_and_times_both():
    """bench/lab/dispatch.py --smoke: the op equals the torch ops it replaced (it exits non-zero if not), both timed."""
    result = run_script("bench/lab/dispatch.py", "--smoke")
    table = table_rows(result.stdout)
    assert len(table) == 1 + 2 and "group_by_expert ms" in table[0], result.stdout


def test_shard_memory_holds_a_block_of_every_expert_per_rank():
    """bench/lab/shard_memory.py on 2 gloo ranks, tiny shapes: each rank holds half the expert bytes."""
    result = run_script("bench/lab/shard_memory.py", "--experts", "4", "--world-size", "2", "--d-model", "16",
                        "--d-ff", "32", "--tokens", "8", "--dtype", "float32")
    header, *rows = table_rows(result.stdout)
    assert [row[0] for row in rows] == ["0", "1"] and [row[1] for row in rows] == ["0:16", "16:32"], result.stdout
    assert all(float(row[header.index("of unsharded")]) == 0.5 for row in rows), result.stdout


def test_expert_ceilings_imports_and_parses():
    """bench/lab/expert_ceilings.py needs a GPU to measure; here its imports and options must still hold."""
    result = run_script("bench/lab/expert_ceilings.py", "--help")
    assert "--split" in result.stdout


def test_kernel_configs_imports_parses_and_rejects_no_rounds():
    """bench/lab/kernel_configs.py needs a GPU to time; here its imports, its candidates (the split ones
    among them) and its options must hold, and --repeat 0 is an error, not an empty table."""
    assert "--repeat" in run_script("bench/lab/kernel_configs.py", "--help").stdout
    from bench.lab.kernel_configs import CANDIDATES, config_label

    assert any(config_label(config).endswith("rows split 1") for config in CANDIDATES)
    result = run_script("bench/lab/kernel_configs.py", "--repeat", "0", returncode=2)
    assert "--repeat must be at least 1" in result.stderr


def test_gluon_experts_imports_and_parses():
    """bench/lab/gluon_experts.py needs an H100 to run; here its imports and options must still hold."""
    result = run_script("bench/lab/gluon_experts.py", "--help")
    assert "Gluon" in result.stdout


@pytest.mark.parametrize("variant", ["pingpong 2x[128,128] s4", "cooperative [128,256] s4"])
def test_gluon_experts_kernel_compiles_for_sm90(variant):
    """Gluon has no interpreter, so compiling for sm_90 is CI's check: warp-specialised (setmaxnreg moves
    registers between the partitions), wgmma and TMA, and the ring fits an H100's shared memory."""
    from bench.lab.gluon_experts import compile_for_sm90

    for ffn_out in (False, True):
        compiled = compile_for_sm90(variant, ffn_out)
        ptx = compiled.asm["ptx"]
        assert "setmaxnreg" in ptx and "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx, variant
        assert compiled.metadata.num_warps == 12 and compiled.metadata.shared <= 232448, compiled.metadata


def decoder_prefill_rows(tmp_path, *argv: str, models=("qwen3", "gpt_oss")) -> tuple[dict, subprocess.CompletedProcess]:
    """bench/decoder_prefill.py --smoke with `argv`: its JSON and the run; every row checked on the way.

    Every row matches hf_eager and has a positive time; each moeshard row rewrote both MoE layers
    of its graph."""
    result_path = tmp_path / "decoder_prefill.json"
    # about 90 s alone on 2 cores with a cold Inductor cache; other compiles beside it can double that
    result = run_script("bench/decoder_prefill.py", "--smoke", *argv, "--json", str(result_path), timeout=300)
    output = json.loads(result_path.read_text())
    for row in output["rows"]:
        assert row["check"] == "ok" and row["max_rel_err"] < 1e-5 and row["median_ms"] > 0, row
        assert row["graphs"] >= 1 or row["variant"] == "hf_eager", row
        assert row.get("expert_ms") is None, row  # CPU: no device kernels to profile
        if row["variant"].startswith("moeshard"):
            assert row["rewritten"] == "2/2" and row["kernel"] == "fused", row  # off CUDA: the fused kernels
    assert set(output["reports"]) == set(models)
    for report in output["reports"].values():
        assert report["regions"] and all(region["status"] == "rewritten" for region in report["regions"]), report
    assert "| rewritten |" in result.stdout
    return output, result


def test_decoder_prefill_smoke_checks_every_variant_against_eager(tmp_path):
    """bench/decoder_prefill.py --smoke: tiny Qwen3-MoE and GPT-OSS stacks, the smoke's variants at T 16 (1 x 16)
    and 32 (2 x 16) through one compiled model per variant, equal to eager, floored and compared with compile."""
    output, result = decoder_prefill_rows(tmp_path)
    rows = {(row["model"], row["tokens"], row["variant"]): row for row in output["rows"]}
    variants = {"hf_eager", "compile", "moeshard"}
    assert set(rows) == {(model, tokens, variant) for model in ("qwen3", "gpt_oss") for tokens in (16, 32)
                         for variant in variants}
    floors = {(floor["model"], floor["tokens"]): floor for floor in output["floors"]}
    assert floors["qwen3", 32]["batch"] == 2 and floors["qwen3", 16]["seq"] == 16
    # Qwen3 smoke: 2 layers x 2*T*K*3*D*F routed, T 32, K 2, D 32, F 16
    assert floors["qwen3", 32]["expert_flops"] == 2 * 2 * 32 * 2 * 3 * 32 * 16
    for (model, tokens, variant), row in rows.items():
        if "median_ms" in row:
            assert row["x_floor"] == pytest.approx(row["median_ms"] / floors[model, tokens]["floor_ms"])
            compile_ms = rows[model, tokens, "compile"]["median_ms"]
            assert row["speedup_vs_compile"] == pytest.approx(compile_ms / row["median_ms"])
    assert {row[2] for row in table_rows(result.stdout)} >= {"variant", *variants}


def test_decoder_prefill_sweep_smoke_calls_one_compiled_model_at_every_size(tmp_path):
    """bench/decoder_prefill.py --sweep --smoke: decode-sized calls (1 x 1, 1 x 8) of the sweep's variants,
    each size its own graph, compared with compile_reduce_overhead (Qwen3 only: the table's smoke runs GPT-OSS)."""
    output, _ = decoder_prefill_rows(tmp_path, "--sweep", "--models", "qwen3", models=("qwen3",))
    rows = {(row["model"], row["tokens"], row["variant"]): row for row in output["rows"]}
    variants = {"compile_reduce_overhead", "moeshard_reduce_overhead", "moeshard", "compile"}
    assert set(rows) == {(model, tokens, variant) for model in ("qwen3",) for tokens in (1, 8)
                         for variant in variants}
    assert all(floor["batch"] == 1 and floor["seq"] == floor["tokens"] for floor in output["floors"])
    for (model, tokens, variant), row in rows.items():
        assert row["graphs"] == 1, row  # dynamic=False: one graph a size
        if variant == "compile_reduce_overhead":
            assert row["speedup_vs_compile_reduce_overhead"] == 1
