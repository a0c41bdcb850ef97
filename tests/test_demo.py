"""The README's demo command, on a small shape, and the from_pretrained path it offers."""

import re

import torch

import hf_tiny
from moeshard_compile.demo import main


def test_demo_reports_rewritten_regions_and_small_error(capsys):
    main(["--batch", "2", "--seq", "8", "--no-inductor", "--repeats", "1"])
    out = capsys.readouterr().out
    assert out.count("rewritten") == 2
    error = float(re.search(r"max \|compiled - eager\| = (\S+)", out).group(1))
    assert error < 1e-4
    assert re.search(r"eager [\d.]+ ms \| moeshard [\d.]+ ms", out)


def test_demo_loads_local_pretrained_weights(tmp_path, capsys):
    torch.manual_seed(0)
    hf_tiny.switch().save_pretrained(tmp_path)
    main(["--pretrained", str(tmp_path), "--batch", "2", "--seq", "6", "--no-inductor", "--repeats", "1",
          "--dump-dir", str(tmp_path / "dump")])
    out = capsys.readouterr().out
    assert "d_model 16, d_ff 32" in out and out.count("rewritten") == 2
    assert (tmp_path / "dump" / "report.json").exists()
