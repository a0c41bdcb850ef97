"""Adding nodes to a graph: named, before the first reader of a region's output."""

from __future__ import annotations

import torch.fx as fx

from .region import MoERegion


class Emitter:
    """Appends named nodes before an anchor; keeps the lowering below readable."""

    def __init__(self, graph: fx.Graph, prefix: str):
        self.graph, self.prefix = graph, prefix

    def fn(self, target, *args, name: str, **kwargs) -> fx.Node:
        return self.graph.create_node("call_function", target, args, kwargs, name=f"{self.prefix}{name}")

    def method(self, target: str, *args, name: str, **kwargs) -> fx.Node:
        return self.graph.create_node("call_method", target, args, kwargs, name=f"{self.prefix}{name}")


def first_user(region: MoERegion) -> fx.Node:
    """Insertion point: just before the first node that reads the region's output."""
    erase = set(region.erase)
    users = [u for u in region.output_TD.users if u not in erase]
    order = {n: i for i, n in enumerate(region.output_TD.graph.nodes)}
    return min(users, key=order.__getitem__)
