"""Stacked expert weights as extra graph inputs, built once and rebuilt only if a parameter changes.

The rewritten graph reads stacked [E, ...] weights. Stacking per call would copy every expert's
weights each forward, so the stacked tensors are made at compile time and passed as extra
inputs. Each call compares the source parameters' in-place version counters (a few integer
reads) and restacks if the user modified them, e.g. with `load_state_dict`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from passes.region import ExpertWeights, WeightSource


class WeightFeed:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.sources: list[tuple[WeightSource, list[str]]] = []
        self.stacked: list[ExpertWeights] = []
        self.versions: list[tuple[int, ...]] = []

    def add_weights(self, prefix: str, source: WeightSource) -> dict[str, fx.Node]:
        """Stack `source` now and append one placeholder per stacked tensor."""
        weights = _stack(source)
        names = [name for name, t in weights.tensors().items() if t is not None]
        graph = self.gm.graph
        last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
        nodes = {}
        with graph.inserting_after(last_placeholder):
            for name in reversed(names):
                nodes[name] = graph.placeholder(f"{prefix}{name}")
        self.sources.append((source, names))
        self.stacked.append(weights)
        self.versions.append(_versions(source))
        return nodes

    def tensors(self) -> list[torch.Tensor]:
        """Current stacked tensors in placeholder order."""
        out = []
        for (source, names), weights in zip(self.sources, self.stacked):
            tensors = weights.tensors()
            out += [tensors[name] for name in names]
        return out

    def refresh(self) -> None:
        for i, (source, _names) in enumerate(self.sources):
            versions = _versions(source)
            if versions != self.versions[i]:
                self.stacked[i], self.versions[i] = _stack(source), versions

    def bind(self, inner: Callable) -> Callable:
        if not self.sources:
            return inner

        def run(*args):  # Dynamo calls a backend's result unboxed, and so do we
            self.refresh()
            return inner(*args, *self.tensors())

        return run


def _stack(source: WeightSource) -> ExpertWeights:
    with torch.no_grad():
        weights = source.stack()
    return ExpertWeights(**{k: v.detach() if v is not None else None for k, v in weights.tensors().items()})


def _versions(source: WeightSource) -> tuple[int, ...]:
    return tuple(p._version for p in source.params)
