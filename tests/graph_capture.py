"""Capture a model's Dynamo graph, with its example inputs, to run the passes on it directly.

Recognition runs inside the backend call: Dynamo drops the graph's links to the parameters
(which recognisers read to name them) once the backend returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

import moeshard_compile  # noqa: F401  (installs the capture shims)
from moeshard_compile import passes
from moeshard_compile.passes.region import MoERegion


@dataclass
class Captured:
    gm: fx.GraphModule
    example_inputs: list
    regions: list[MoERegion]

    def inputs(self) -> dict[fx.Node, object]:
        """Each placeholder's example value, as the backend hands them to the passes."""
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        return dict(zip(placeholders, self.example_inputs))


def copy_graph(graph: fx.Graph) -> fx.Graph:
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    return copy


def on_graph(model: torch.nn.Module, run: Callable[[fx.GraphModule, list], Any], *args, **kwargs) -> Any:
    """`run(gm, example_inputs)` on a copy of the one graph Dynamo traces for `model(*args,
    **kwargs)` under moeshard's capture shims, inside the backend call; its result."""
    results = []

    def backend(gm: fx.GraphModule, example_inputs: list):
        results.append(run(fx.GraphModule(gm, copy_graph(gm.graph)), list(example_inputs)))
        return gm.forward

    backend._moeshard = True  # the capture shims apply, as under the real backend
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*args, **kwargs)
    (result,) = results
    return result


def capture(model: torch.nn.Module, *args, **kwargs) -> Captured:
    """The graph of `model(*args, **kwargs)` with the regions passes.recognise finds in it,
    prepared (their routing built)."""

    def recognised(gm: fx.GraphModule, example_inputs: list) -> Captured:
        regions = passes.recognise(gm)
        passes.prepare(gm, regions)
        return Captured(gm, example_inputs, regions)

    return on_graph(model, recognised, *args, **kwargs)
