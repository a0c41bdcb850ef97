"""Stacked expert weights as extra graph inputs, built once and rebuilt only if a parameter changes.

The rewritten graph reads stacked [E, ...] weights. Stacking per call would copy every expert's
weights each forward, so the stacked tensors are made at compile time and passed as extra
inputs. Each call looks at the parameters Dynamo passes in (a few identity and version-counter
reads) and restacks if the user replaced or modified one, e.g. with `load_state_dict`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from passes.region import WeightSource


class _Stacked:
    """One region's stacked weights and the parameter values they were built from."""

    def __init__(self, source: WeightSource, input_indices: list[int], args: list):
        self.source, self.input_indices = source, input_indices
        self.refresh(args, force=True)

    def refresh(self, args, force: bool = False) -> None:
        params = [args[i] for i in self.input_indices]
        if not force and all(p is q and p._version == v for p, (q, v) in zip(params, self.built_from)):
            return
        with torch.no_grad():
            weights = self.source.stack([p.detach() for p in params])
        self.names = [name for name, t in weights.tensors().items() if t is not None]
        self.tensors = [weights.tensors()[name] for name in self.names]
        self.built_from = [(p, p._version) for p in params]  # holding p keeps its id() unique


class WeightFeed:
    def __init__(self, gm: fx.GraphModule, example_inputs: list):
        self.gm, self.example_inputs = gm, list(example_inputs)
        self.input_index = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
        self.regions: list[_Stacked] = []

    def add_weights(self, prefix: str, source: WeightSource) -> dict[str, fx.Node]:
        """Stack `source` now and append one placeholder per stacked tensor."""
        stacked = _Stacked(source, [self.input_index[n] for n in source.inputs], self.example_inputs)
        self.regions.append(stacked)
        names = stacked.names
        graph = self.gm.graph
        last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
        nodes = {}
        with graph.inserting_after(last_placeholder):
            for name in reversed(names):
                nodes[name] = graph.placeholder(f"{prefix}{name}")
        return nodes

    def tensors(self) -> list[torch.Tensor]:
        """Current stacked tensors in placeholder order."""
        return [t for region in self.regions for t in region.tensors]

    def bind(self, inner: Callable) -> Callable:
        if not self.regions:
            return inner

        def run(*args):  # Dynamo calls a backend's result unboxed, and so do we
            for region in self.regions:
                region.refresh(args)
            return inner(*args, *self.tensors())

        return run
