"""The README's demo command: 2 ranks by default, one process with --world-size 1, torchrun,
a failing rank, and the from_pretrained path it offers.

The multi-rank runs are subprocesses (the demo spawns its ranks, or torchrun does) on the
small config without Inductor, about 10 s each on 2 cores.
"""

import json
import re
import subprocess
import sys
import time

import pytest
import torch

import hf_tiny
from moeshard_compile.demo import main, parse_args

SMALL = ["--device", "cpu", "--batch", "2", "--seq", "8", "--no-inductor", "--repeats", "1"]
TORCHRUN_ENV = {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}


def run_demo(*argv: str, launcher=("-m", "moeshard_compile"), timeout=90) -> subprocess.CompletedProcess:
    """The demo as a user starts it; the timeout is below the demo's 120 s collective timeout."""
    return subprocess.run([sys.executable, *launcher, *argv], capture_output=True, text=True, timeout=timeout)


def rank_errors(out: str) -> dict[int, float]:
    return {int(r): float(e) for r, e in re.findall(r"rank (\d+): max \|compiled - eager\| = (\S+)", out)}


def test_default_demo_shards_over_two_spawned_ranks(tmp_path):
    result = run_demo(*SMALL, "--dump-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "spawning 2 ranks (gloo on 127.0.0.1:" in out
    assert out.count("[moeshard demo] building") == 1  # only rank 0 prints
    assert out.count("rewritten") == 2 and out.count("8 MiB of 16 MiB") == 2  # d_ff 1024: half each
    errors = rank_errors(out)
    assert sorted(errors) == [0, 1] and max(errors.values()) < 1e-4
    assert len(re.findall(r"rank [01]: eager [\d.]+ ms \| moeshard [\d.]+ ms", out)) == 2
    regions = json.loads((tmp_path / "report.json").read_text())["regions"]
    assert [(r["world_size"], r["ffn_block"]) for r in regions] == [(2, [0, 512])] * 2  # rank 0's dumps


def test_mixtral_decoder_shards_over_two_spawned_ranks():
    """--config mixtral-small: transformers' stacked experts (top-2, gated) on 2 ranks, prefill."""
    result = run_demo(*SMALL, "--config", "mixtral-small")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Mixtral decoder: hidden 256, intermediate 512, 4 layers, 8 experts, top-2" in out
    assert out.count("stacked/grouped_mm") == 4 and out.count("rewritten") == 4 and out.count("6 MiB of 12 MiB") == 4
    errors = rank_errors(out)
    assert sorted(errors) == [0, 1] and max(errors.values()) < 1e-4


def test_torchrun_ranks_replicated_input():
    result = run_demo(*SMALL, "--input-mode", "replicated",
                      launcher=("-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "moeshard_compile"))
    assert result.returncode == 0, result.stderr
    assert "spawning" not in result.stdout and result.stdout.count("rewritten") == 2
    errors = rank_errors(result.stdout)
    assert sorted(errors) == [0, 1] and max(errors.values()) < 1e-4
    assert errors[0] == errors[1]  # the same batch on both ranks


def test_failing_rank_stops_the_others_and_exits_nonzero(tmp_path):
    """Rank 0 cannot write its dumps while rank 1 waits for it in a collective."""
    (tmp_path / "file").touch()
    start = time.perf_counter()
    result = run_demo(*SMALL, "--dump-dir", str(tmp_path / "file" / "dump"))
    assert result.returncode != 0
    assert "rank 0 failed, the other ranks were stopped" in result.stderr
    assert "NotADirectoryError" in result.stderr
    assert time.perf_counter() - start < 60


def test_world_size_one_runs_in_this_process(capsys):
    main([*SMALL, "--world-size", "1"])
    out = capsys.readouterr().out
    assert "spawning" not in out and out.count("rewritten") == 2
    assert rank_errors(out)[0] < 1e-4
    assert re.search(r"rank 0: eager [\d.]+ ms \| moeshard [\d.]+ ms", out)


def test_demo_loads_local_pretrained_weights(tmp_path, capsys):
    torch.manual_seed(0)
    hf_tiny.switch().save_pretrained(tmp_path)
    main(["--pretrained", str(tmp_path), "--world-size", "1", "--batch", "2", "--seq", "6", "--no-inductor",
          "--repeats", "1", "--dump-dir", str(tmp_path / "dump")])
    out = capsys.readouterr().out
    assert "d_model 16, d_ff 32" in out and out.count("rewritten") == 2
    assert (tmp_path / "dump" / "report.json").exists()


def test_world_size_defaults_to_two_on_cpu_and_to_torchrun_under_torchrun(monkeypatch):
    assert parse_args(["--device", "cpu"]).world_size == 2
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--world-size", "0"])
    for name, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(name, value)
    assert parse_args(["--device", "cpu"]).world_size == 3
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--world-size", "2"])
