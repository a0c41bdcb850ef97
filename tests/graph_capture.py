"""Capture a model's Dynamo graph, with its example inputs, to run the passes on it directly.

Recognition runs inside the backend call: Dynamo drops the graph's links to the parameters
(which recognisers read to name them) once the backend returns."""

from __future__ import annotations

from dataclasses import dataclass

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


def capture(model: torch.nn.Module, *args, **kwargs) -> Captured:
    """The one graph Dynamo traces for `model(*args, **kwargs)` under moeshard's capture shims,
    with the regions passes.recognise finds in it."""
    graphs: list[Captured] = []

    def backend(gm: fx.GraphModule, example_inputs: list):
        copy = fx.GraphModule(gm, copy_graph(gm.graph))  # recognition adds nodes: run Dynamo's graph as it is
        graphs.append(Captured(copy, list(example_inputs), passes.recognise(copy)))
        return gm.forward

    backend._moeshard = True  # the capture shims apply, as under the real backend
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*args, **kwargs)
    (captured,) = graphs
    return captured
