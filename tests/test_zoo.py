"""Every MoE family of the installed transformers, built tiny with random weights: each MoE layer
is rewritten and the model equals eager, or the family is a documented limitation whose layers
are all reported as skipped, with its reason. A full run writes docs/families.md."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers

import zoo_families
from helpers import assert_close_to_eager
from moeshard_compile.backend import make_backend
from moeshard_compile.options import Options
from moeshard_compile.report import Report

TABLE = Path(__file__).resolve().parents[1] / "docs" / "families.md"

# Families moeshard does not rewrite today, with the words every one of their report rows says
# (docs/usage.md explains each and what to do).
LIMITS = {
    "doge": "a routing decision (topk)",  # experts are rows of embedding tables (rank-1 FFNs)
    "jetmoe": "expert bank",  # its FFN experts are rewritten; its mixture of attention heads is not an FFN
    "muse_spark_text": "unsupported submodules inside the experts",  # a norm after each expert
    "ergo": "unsupported submodules inside the experts",  # a norm after each expert (transformers >= 5.25)
}

BUILDABLE = [f for f in zoo_families.FAMILIES if f not in zoo_families.UNBUILDABLE]
_results: dict[str, tuple[str, str, str]] = {}  # family -> (status, forms, reason)


def _first_tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@pytest.mark.parametrize("family", BUILDABLE)
def test_family(family):
    model, inputs, expected = zoo_families.tiny_model(family)
    torch._dynamo.reset()
    report = Report()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped rows' warning is asserted through the report
        ref = _first_tensor(model(**inputs))
        out = _first_tensor(torch.compile(model, backend=make_backend(Options(inductor=False), report))(**inputs))
    assert_close_to_eager(out, ref)
    rewritten = [r for r in report.regions if r["status"] == "rewritten"]
    others = [r for r in report.regions if r["status"] != "rewritten"]
    forms = ", ".join(sorted({r["form"] for r in rewritten}))
    if family in LIMITS:
        assert len(rewritten) + len(others) >= expected and others, "a layer of a limited family went unreported"
        assert all(LIMITS[family] in r["reason"] for r in others), [r["reason"] for r in others]
        _results[family] = ("partly rewritten" if rewritten else "skipped", forms, others[0]["reason"])
    else:
        assert [(r["module"], r["reason"]) for r in others] == []
        assert len(rewritten) == expected
        _results[family] = ("rewritten", forms, "")


@pytest.fixture(scope="module", autouse=True)
def family_table():
    """After a run over every family, docs/families.md holds the table of what happened."""
    yield
    if set(_results) != set(BUILDABLE):
        return  # a partial run (-k, a failure) does not rewrite the table
    lines = [
        "# Transformers MoE families",
        "",
        f"What `torch.compile(model, backend=\"moeshard\")` does with every MoE family of transformers "
        f"{transformers.__version__}, each built tiny from its config with random weights (2 layers, every layer "
        "MoE where the config allows) and checked against eager. Written by `pytest tests/test_zoo.py`; "
        "docs/usage.md explains every reason.",
        "",
        "| family | status | forms / reason |",
        "|---|---|---|",
    ]
    for family in sorted(_results):
        status, forms, reason = _results[family]
        cell = forms if status == "rewritten" else reason.replace("|", "\\|")
        if status == "partly rewritten":
            cell = f"{forms}; the rest: {cell}"
        lines.append(f"| {family} | {status} | {cell} |")
    for family, why in sorted(zoo_families.UNBUILDABLE.items()):
        lines.append(f"| {family} | not built | {why} |")
    for composite, text in sorted(zoo_families.COVERED_BY.items()):
        lines.append(f"| {composite} | as {text} | its MoE layers are those of the family it holds |")
    counts = [s for s, _, _ in _results.values()]
    lines += ["", f"{counts.count('rewritten')} families rewritten, {counts.count('partly rewritten')} partly "
              f"rewritten (the rest skipped with a reason), {counts.count('skipped')} skipped with a reason, "
              f"{len(zoo_families.UNBUILDABLE)} not built, {len(zoo_families.COVERED_BY)} composites covered "
              "by the family they hold.", ""]
    TABLE.write_text("\n".join(lines))
