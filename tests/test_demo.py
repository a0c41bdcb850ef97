"""The README's demo command: 2 ranks by default, one process with --world-size 1, torchrun,
a failing rank, the from_pretrained path it offers, and what it prints: the regions rewritten,
each rank's shard, equality per rank, timings explained, the one-rank comparison and the GPU
figures docs/results.md gives, every line within a terminal's width.

The multi-rank runs are subprocesses (the demo spawns its ranks, or torchrun does) on the
small config without Inductor, about 10 s each on 2 cores; one run compiles with Inductor.
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hf_tiny
from moeshard_compile import demo_output
from moeshard_compile.demo import main, parse_args
from moeshard_compile.report import Report

SMALL = ["--device", "cpu", "--batch", "2", "--seq", "8", "--no-inductor", "--repeats", "1"]
TORCHRUN_ENV = {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}
TOLERANCE = 1e-4  # float32, compiled against eager
DOCS = Path(__file__).resolve().parents[1] / "docs"


def run_demo(*argv: str, launcher=("-m", "moeshard_compile"), timeout=90) -> subprocess.CompletedProcess:
    """The demo as a user starts it; the timeout is below the demo's 120 s collective timeout."""
    return subprocess.run([sys.executable, *launcher, *argv], capture_output=True, text=True, timeout=timeout)


def rank_errors(out: str) -> dict[int, float]:
    return {int(r): float(e) for r, e in re.findall(r"rank (\d+): max \|compiled - eager\| = (\S+)", out)}


def section(out: str, title: str) -> str:
    """The text under '== title... ==' up to the next heading or demo step."""
    match = re.search(rf"^== {re.escape(title)}.*? ==\n(.*?)(?=^== |^\[moeshard demo\]|\Z)", out, re.M | re.S)
    assert match, f"no section {title!r} in:\n{out}"
    return match.group(1)


def prose(text: str) -> str:
    """Wrapped paragraphs as one line."""
    return " ".join(text.split())


def table(text: str) -> list[dict[str, str]]:
    """The first markdown table in `text`, as one dict per row keyed by the header."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header, rows = _cells(lines[0]), [_cells(line) for line in lines[2:]]
    return [dict(zip(header, row)) for row in rows]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip("|").split("|")]


def assert_fits_a_terminal(out: str) -> None:
    wide = [line for line in out.splitlines() if len(line) > demo_output.WIDTH]
    assert not wide, wide


def assert_regions(out: str, modules: list[str], form: str, experts: str, top_k: str) -> None:
    rows = table(section(out, "What the backend did"))
    assert [(r["module"], r["form"], r["experts"], r["top_k"], r["status"]) for r in rows] == [
        (module, form, experts, top_k, "rewritten") for module in modules
    ]


def comparison(out: str) -> dict[str, dict[str, str]]:
    return {row["variant"]: row for row in table(section(out, "One rank on CPU"))}


SWITCH_MOE = ["encoder.block.1.layer.1.mlp.experts", "encoder.block.3.layer.1.mlp.experts"]


def test_default_demo_shards_over_two_spawned_ranks(tmp_path):
    result = run_demo(*SMALL, "--dump-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "spawning 2 ranks (gloo on 127.0.0.1:" in out
    assert out.count("[moeshard demo] building") == 2  # rank 0 only, then the one-rank comparison
    assert_fits_a_terminal(out)
    assert "2 MoE regions found in 1 graph, 2 rewritten" in out
    assert_regions(out, SWITCH_MOE, "module_loop/index", "8", "1")
    assert f"{tmp_path / 'report.txt'}, and report.json beside it" in prose(out)
    assert "d_model" in (tmp_path / "report.txt").read_text().splitlines()[0]  # the full table, in the dump
    shards = table(section(out, "Shards: 2 ranks"))  # d_ff 1024: half of every expert on each rank
    assert [(s["rank"], s["regions"], s["FFN columns of every expert"], s["expert weights held"]) for s in shards] == [
        ("0", "2", "0:512 of 1024", "16 MiB of 32 MiB"), ("1", "2", "512:1024 of 1024", "16 MiB of 32 MiB")]
    errors = rank_errors(section(out, "Equality with the eager model, each rank on its own batch"))
    assert sorted(errors) == [0, 1] and max(errors.values()) < TOLERANCE
    timing = section(out, "Timing on 2 ranks")
    assert len(re.findall(r"rank [01]: eager [\d.]+ ms \| moeshard [\d.]+ ms \| speedup [\d.]+x", timing)) == 2
    timing = prose(timing)
    assert "median of 1 call each, eager and moeshard in turn" in timing
    assert "Why sharding cannot gain here: the 2 ranks are 2 processes on this machine's" in timing
    assert "gloo over the loopback interface" in timing and "all-gather and a reduce-scatter" in timing
    variants = comparison(out)
    assert list(variants) == ["eager", "moeshard on 1 rank"]  # --no-inductor leaves plain torch.compile out
    assert "torch.compile (Inductor) is left out: --no-inductor." in out
    assert float(variants["moeshard on 1 rank"]["max error vs eager"]) < TOLERANCE
    assert re.fullmatch(r"\d+\.\d\dx", variants["moeshard on 1 rank"]["speedup"])
    assert_gpu_figures(out)
    regions = json.loads((tmp_path / "report.json").read_text())["regions"]
    assert [(r["world_size"], r["ffn_block"]) for r in regions] == [(2, [0, 512])] * 2  # rank 0's dumps


def assert_gpu_figures(out: str) -> None:
    figures = section(out, "On GPUs")
    assert "docs/results.md" in figures and "docs/performance.md" in figures
    encoder = {row["dtype"]: row for row in table(figures)}
    assert encoder["bf16"]["moeshard ms"] == "31.6" and encoder["bf16"]["torch.compile (Inductor) ms"] == "107.9"
    ranks = {row["compared with"]: row for row in table(figures.split("bench/paper_ranks.py")[1])}
    assert ranks["dropless expert parallelism"]["speedup"] == "2.20x"
    assert ranks["DeepSpeed-style, capacity 1.25"]["tokens dropped"] == "69%"


def test_mixtral_decoder_shards_over_two_spawned_ranks():
    """--config mixtral-small: transformers' stacked experts (top-2, gated) on 2 ranks, prefill."""
    result = run_demo(*SMALL, "--config", "mixtral-small")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Mixtral decoder: hidden 256, intermediate 512, 4 layers, 8 experts, top-2" in out
    assert_fits_a_terminal(out)
    assert_regions(out, [f"layers.{i}.mlp.experts" for i in range(4)], "stacked/grouped_mm", "8", "2")
    shards = table(section(out, "Shards: 2 ranks"))  # 4 layers of 6 MiB of 12 MiB each
    assert [s["expert weights held"] for s in shards] == ["24 MiB of 48 MiB"] * 2
    assert "run with --dump-dir DIR, which writes DIR/report.txt" in prose(out)  # no dump: how to get one
    errors = rank_errors(out)
    assert sorted(errors) == [0, 1] and max(errors.values()) < TOLERANCE


def test_torchrun_ranks_replicated_input():
    result = run_demo(*SMALL, "--input-mode", "replicated",
                      launcher=("-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "moeshard_compile"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "spawning" not in out
    assert_regions(out, SWITCH_MOE, "module_loop/index", "8", "1")
    errors = rank_errors(section(out, "Equality with the eager model, each rank on the same batch on every rank"))
    assert sorted(errors) == [0, 1] and max(errors.values()) < TOLERANCE
    assert errors[0] == errors[1]  # the same batch on both ranks
    assert "What sharding costs and saves here" in out and "an all-reduce per MoE layer" in prose(out)
    assert float(comparison(out)["moeshard on 1 rank"]["max error vs eager"]) < TOLERANCE  # rank 0, after the group
    assert_gpu_figures(out)


def test_failing_rank_stops_the_others_and_exits_nonzero(tmp_path):
    """Rank 0 cannot write its dumps while rank 1 waits for it in a collective."""
    (tmp_path / "file").touch()
    start = time.perf_counter()
    result = run_demo(*SMALL, "--dump-dir", str(tmp_path / "file" / "dump"))
    assert result.returncode != 0
    assert "rank 0 failed, the other ranks were stopped" in result.stderr
    assert "NotADirectoryError" in result.stderr
    assert "One rank on" not in result.stdout  # nothing runs after a failed rank
    assert time.perf_counter() - start < 60


def test_world_size_one_runs_in_this_process(capsys):
    main([*SMALL, "--world-size", "1"])
    out = capsys.readouterr().out
    assert "spawning" not in out and "Timing on" not in out
    assert_fits_a_terminal(out)
    assert_regions(out, SWITCH_MOE, "module_loop/index", "8", "1")
    assert "One rank: every rewritten region keeps every expert whole." in section(out, "Shards")
    assert rank_errors(out)[0] < TOLERANCE
    assert list(comparison(out)) == ["eager", "moeshard on 1 rank"]
    assert_gpu_figures(out)


def test_demo_on_local_pretrained_weights_compares_eager_inductor_and_moeshard(tmp_path, capsys):
    """The one-rank comparison with Inductor: plain torch.compile beside moeshard, both equal to eager."""
    torch.manual_seed(0)
    hf_tiny.switch().save_pretrained(tmp_path)
    main(["--pretrained", str(tmp_path), "--world-size", "1", "--batch", "2", "--seq", "6", "--repeats", "2",
          "--dump-dir", str(tmp_path / "dump")])
    out = capsys.readouterr().out
    assert "d_model 16, d_ff 32" in out
    assert_regions(out, SWITCH_MOE, "module_loop/index", "4", "1")
    assert (tmp_path / "dump" / "report.json").exists()
    variants = comparison(out)
    assert list(variants) == ["eager", "torch.compile (Inductor)", "moeshard on 1 rank"]
    assert "median of 2 forwards each, the variants in turn" in prose(out)
    for name in ("torch.compile (Inductor)", "moeshard on 1 rank"):
        assert float(variants[name]["max error vs eager"]) < TOLERANCE
        assert float(variants[name]["first call s"]) > 0 and float(variants[name]["median ms"]) > 0


def test_gpu_figures_are_those_docs_results_gives():
    """The demo quotes docs/results.md: a figure measured again there must change here too."""
    results = (DOCS / "results.md").read_text()
    quoted = [ms for pair in demo_output.ENCODER_MS.values() for ms in pair]
    quoted += [demo_output.RANKS_MOESHARD_MS] + [ms for _, ms, _ in demo_output.RANKS_BASELINES_MS]
    missing = [ms for ms in quoted if f"{ms:g} ms" not in results]
    assert not missing, f"figures the demo quotes that docs/results.md does not give: {missing}"
    for script in (demo_output.ENCODER_SCRIPT, demo_output.RANKS_SCRIPT):
        assert (DOCS.parent / script).exists() and script in results


def test_regions_section_wraps_skip_reasons_and_points_to_the_full_table():
    skipped = {"module": "encoder.block.1.layer.1.mlp.experts", "form": "module_loop/index", "num_experts": 8,
               "top_k": None, "status": "skipped", "reason": "the combine is not linear in the expert outputs " * 4}
    report = Report(regions=[skipped], graph_breaks=["a data-dependent branch " * 6], graphs=2)
    text = demo_output.regions_section(report, None)
    assert "1 MoE region found in 2 graphs, 0 rewritten" in text
    assert table(text)[0]["top_k"] == "" and table(text)[0]["status"] == "skipped"
    assert "not rewritten, encoder.block.1.layer.1.mlp.experts: the combine is not linear" in text
    assert "graph break: a data-dependent branch" in text and "run with --dump-dir DIR" in prose(text)
    assert_fits_a_terminal(text)


def test_world_size_defaults_to_two_on_cpu_and_to_torchrun_under_torchrun(monkeypatch):
    assert parse_args(["--device", "cpu"]).world_size == 2
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--world-size", "0"])
    for name, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(name, value)
    assert parse_args(["--device", "cpu"]).world_size == 3
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--world-size", "2"])
