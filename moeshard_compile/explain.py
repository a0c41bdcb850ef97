"""`explain(model, *args, **kwargs)`: the backend's report for a model, from one traced call."""

from __future__ import annotations

import dataclasses

import torch
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from moeshard_compile.backend import make_backend
from moeshard_compile.options import Options
from moeshard_compile.report import Report, dynamo_breaks


def explain(model: torch.nn.Module, *args, options=None, **kwargs) -> Report:
    """Compile `model` with moeshard, call it once on the given inputs, return the Report.

    Runs under torch.no_grad() (the rewrite is for inference). Inductor is skipped, since the
    report does not depend on it; the model runs once, through the rewritten graph. Tracing
    tries fullgraph=True first (Dynamo then captures data-dependent ops such as `nonzero`),
    and falls back to allowing graph breaks, which the report lists.
    """
    opts = dataclasses.replace(Options.from_user(options), inductor=False)
    report = Report(breaks_before=dynamo_breaks())  # this call's graph breaks only
    backend = make_backend(opts, report)
    with torch.no_grad():
        try:
            torch.compile(model, backend=backend, fullgraph=True)(*args, **kwargs)
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError, GuardOnDataDependentSymNode):  # not one graph
            report.regions.clear()
            report.fallbacks.clear()
            report.rewritten_graphs.clear()
            report.graphs = 0
            torch.compile(model, backend=backend)(*args, **kwargs)
    report.note_graph_breaks()  # breaks found after the last graph too
    return report
