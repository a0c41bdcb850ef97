"""Dumps (graph code before/after, report.txt, report.json), the Report object and `explain`."""

import json

import pytest
import torch
import torch.nn as nn
from helpers import assert_close_to_eager
from moe_zoo import MoEBlock, MoEConfig

import moeshard_compile
from moeshard_compile import Options, Report

# Every value distinct, so a field reported from the wrong source cannot pass by accident.
CFG = MoEConfig(num_experts=6, top_k=3, d_model=12, d_ff=20, activation="silu", gated=True)
MODULE = "decoder.0.moe.experts"  # the experts container of the HandWrittenMoE inside Decoder
REQUIRED_FIELDS = (
    "module", "form", "num_experts", "top_k", "d_model", "d_ff", "activation", "gated",
    "dtype", "world_size", "status", "reason",
)


class Decoder(nn.Module):
    """Puts the MoE under a distinctive module path."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.decoder = nn.ModuleList([MoEBlock(cfg)])

    def forward(self, x):
        for block in self.decoder:
            x = block(x)
        return x


# --- counting real executions of a model -----------------------------------------------------
# Why a custom op: a Python side effect in forward (or in a hook) runs while Dynamo *traces*, or
# is replayed by Dynamo as a side effect, and a `torch._dynamo.disable`d call forces a graph
# break (which changes the very path explain takes). A custom op is an opaque node in the graph:
# tracing only calls its fake implementation, so its real implementation runs exactly once per
# real execution of the compiled (or eager) model, whichever graph runs it.
_RUNS = {"count": 0}


@torch.library.custom_op("moeshard_tests::count_runs", mutates_args=())
def count_runs(x: torch.Tensor) -> torch.Tensor:
    _RUNS["count"] += 1
    return x.clone()


@count_runs.register_fake
def _(x):
    return torch.empty_like(x)


class Counted(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(count_runs(x))


class TwoBlocksWithBreak(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.first, self.second = MoEBlock(cfg), MoEBlock(cfg)

    def forward(self, x):
        x = self.first(count_runs(x))
        torch._dynamo.graph_break()
        return self.second(x)


def _compile_with_dumps(model, tmp_path, fullgraph=True):
    return torch.compile(model, backend="moeshard", fullgraph=fullgraph, options={"inductor": False, "dump_dir": tmp_path})


# --- dumps ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dumps_and_report_json(tmp_path, dtype):
    torch.manual_seed(0)
    model = Decoder(CFG).to(dtype).eval()
    x = torch.randn(2, 5, CFG.d_model, dtype=dtype)
    with torch.no_grad():
        out = _compile_with_dumps(model, tmp_path)(x)
        assert_close_to_eager(out, model(x))

    for name in ("graph_0_before.py", "graph_0_after.py", "report.txt", "report.json"):
        assert (tmp_path / name).is_file(), f"{name} not written"

    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) >= {"regions", "graph_breaks"}
    assert report["graph_breaks"] == []
    assert len(report["regions"]) == 1
    row = report["regions"][0]
    assert set(row) >= set(REQUIRED_FIELDS)
    expected = {
        "module": MODULE,
        "num_experts": CFG.num_experts,
        "top_k": CFG.top_k,
        "d_model": CFG.d_model,
        "d_ff": CFG.d_ff,
        "activation": "silu",
        "gated": True,
        "dtype": str(dtype).removeprefix("torch."),
        "world_size": 1,
        "status": "rewritten",
    }
    assert {k: row[k] for k in expected} == expected
    assert isinstance(row["form"], str) and row["form"]
    assert isinstance(row["reason"], str)

    before = (tmp_path / "graph_0_before.py").read_text()
    after = (tmp_path / "graph_0_after.py").read_text()
    assert "moeshard.gather_grouped_ffn_in" in after
    assert "moeshard.gather_grouped_ffn_in" not in before

    text = (tmp_path / "report.txt").read_text()
    assert MODULE in text
    assert "rewritten" in text


def test_dumps_per_graph_with_graph_break(tmp_path):
    """Two graphs, one region each: numbered dumps, rows tagged with their graph, break listed."""
    torch.manual_seed(0)
    model = TwoBlocksWithBreak(MoEConfig(style="dense")).eval()  # dense: no nonzero, no extra breaks
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        out = _compile_with_dumps(model, tmp_path, fullgraph=False)(x)
        assert_close_to_eager(out, model(x))
    for name in ("graph_0_before.py", "graph_0_after.py", "graph_1_before.py", "graph_1_after.py"):
        assert (tmp_path / name).is_file(), f"{name} not written"
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(r["graph"], r["module"], r["status"]) for r in report["regions"]] == [
        (0, "first.moe.experts", "rewritten"),
        (1, "second.moe.experts", "rewritten"),
    ]
    assert any("graph_break" in reason for reason in report["graph_breaks"]), report["graph_breaks"]


# --- explain ----------------------------------------------------------------------------------


def test_explain_reports_region_and_runs_model_once():
    torch.manual_seed(0)
    model = Counted(Decoder(CFG)).eval()
    x = torch.randn(2, 5, CFG.d_model)
    _RUNS["count"] = 0
    # Deliberately not under torch.no_grad(): explain runs under no_grad itself.
    report = moeshard_compile.explain(model, x)
    assert _RUNS["count"] == 1, f"explain ran the model {_RUNS['count']} times"
    assert torch.is_grad_enabled()

    assert isinstance(report, Report)
    assert len(report.regions) == 1
    row = report.regions[0]
    assert row["status"] == "rewritten"
    assert row["module"] == "inner." + MODULE
    assert (row["num_experts"], row["top_k"], row["d_model"], row["d_ff"]) == (6, 3, 12, 20)

    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["regions"][0]["status"] == "rewritten"
    text = str(report)
    for column in ("graph", *REQUIRED_FIELDS, "capacity"):
        assert column in text, f"column {column!r} missing from str(report)"
    assert "inner." + MODULE in text


def test_explain_with_graph_break_runs_model_once():
    """fullgraph=True fails at the break (before anything runs); the retry runs the model once."""
    torch.manual_seed(0)
    model = TwoBlocksWithBreak(MoEConfig()).eval()
    x = torch.randn(2, 5, 8)
    _RUNS["count"] = 0
    moeshard_compile.explain(model, x)
    assert _RUNS["count"] == 1, f"explain ran the model {_RUNS['count']} times"


def test_explain_lists_every_graph_break():
    """The report must list the graph breaks Dynamo recorded during explain (explain clears
    Dynamo's graph-break counters first, so those are exactly this call's breaks)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = TwoBlocksWithBreak(MoEConfig()).eval()
    report = moeshard_compile.explain(model, torch.randn(2, 5, 8))
    recorded = set(counters["graph_break"])
    assert any("graph_break()" in reason for reason in recorded)  # the user's break, seen by Dynamo
    missing = recorded - set(report.graph_breaks)
    assert not missing, f"graph breaks recorded by Dynamo but not in the report: {sorted(missing)}"


@pytest.mark.parametrize("options", [None, {"inductor": True}, Options(inductor=True)], ids=["none", "dict", "Options"])
def test_explain_never_runs_inductor(monkeypatch, options):
    """explain's docstring: "Inductor is skipped, since the report does not depend on it"."""

    def no_inductor(*args, **kwargs):
        raise AssertionError("explain called Inductor")

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", no_inductor)
    torch.manual_seed(0)
    model = Decoder(CFG).eval()
    report = moeshard_compile.explain(model, torch.randn(2, 5, CFG.d_model), options=options)
    assert [r["status"] for r in report.regions] == ["rewritten"]


# --- models without MoE -----------------------------------------------------------------------


def _plain_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval()


def test_explain_model_without_moe():
    model = _plain_model()
    report = moeshard_compile.explain(model, torch.randn(3, 8))
    assert report.regions == []
    assert report.fallbacks == []
    json.dumps(report.to_dict())
    assert "no MoE regions" in str(report)


def test_compile_model_without_moe(tmp_path):
    model = _plain_model()
    x = torch.randn(3, 8)
    with torch.no_grad():
        out = _compile_with_dumps(model, tmp_path)(x)
        assert_close_to_eager(out, model(x))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["regions"] == []
    assert "moeshard.gather_grouped_ffn_in" not in (tmp_path / "graph_0_after.py").read_text()
