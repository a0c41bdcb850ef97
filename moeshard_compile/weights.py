"""Stacked expert weights as extra graph inputs, built once and rebuilt only if a parameter changes.

The rewritten graph reads stacked [E, ...] weights. Stacking per call would copy every expert's
weights each forward, so the stacked tensors are made at compile time and passed as extra
inputs. Each call looks at the parameters Dynamo passes in (a few identity and version-counter
reads) and restacks if the user replaced or modified one, e.g. with `load_state_dict`.
Graphs of the same model (recompilations for new shapes, graph breaks) share one stacked copy
per region, keyed by the parameters it was built from and released with them.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.fx as fx

from passes.region import MoERegion, WeightSource


def _released(t: torch.Tensor) -> bool:
    return t.numel() > 0 and t.untyped_storage().nbytes() == 0


def _version(t: torch.Tensor) -> int:
    """In-place version counter; tensors made under inference_mode have none (and cannot change
    outside it), so they count as never modified."""
    return -1 if t.is_inference() else t._version


class _Stacked:
    """One region's stacked weights and the parameter values they were built from."""

    def __init__(self, source: WeightSource, params: list[torch.Tensor]):
        self.source = source
        self.refresh(params, force=True)

    def refresh(self, params: list[torch.Tensor], force: bool = False) -> None:
        if not force and all(p is q() and _version(p) == v for p, (q, v) in zip(params, self.built_from)):
            return
        if any(_released(p) for p in params):
            raise RuntimeError(
                "moeshard: the expert parameters were released (option release_unsharded=True) and then "
                "replaced or modified: build and compile a fresh model to change its weights"
            )
        with torch.no_grad():
            weights = self.source.stack([p.detach() for p in params])
        stacked = {name: t for name, t in weights.tensors().items() if t is not None}
        self.names, self.tensors = list(stacked), list(stacked.values())
        self.built_from = [(weakref.ref(p), _version(p)) for p in params]  # weak: the model may go


# id(first parameter) -> {(parameter ids, layout): stack}; an entry dies with that parameter
# (tensors cannot key a WeakKeyDictionary: their == is elementwise)
_SHARED: dict[int, dict[tuple, _Stacked]] = {}


def _shared_stack(source: WeightSource, params: list[torch.Tensor]) -> _Stacked:
    if not source.copies:  # views of the parameters: free to make, and they would pin the model
        return _Stacked(source, params)
    key = (tuple(id(p) for p in params), source.layout)
    if id(params[0]) not in _SHARED:
        _SHARED[id(params[0])] = {}
        weakref.finalize(params[0], _SHARED.pop, id(params[0]), None)
    per_param = _SHARED[id(params[0])]
    stacked = per_param.get(key)
    if stacked is None:
        stacked = per_param[key] = _Stacked(source, params)
    else:
        stacked.refresh(params)
    return stacked


class WeightFeed:
    def __init__(self, gm: fx.GraphModule, example_inputs: list):
        self.gm, self.example_inputs = gm, list(example_inputs)
        self.input_index = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
        self.regions: list[tuple[_Stacked, list[int]]] = []

    def add_weights(self, prefix: str, source: WeightSource) -> dict[str, fx.Node]:
        """Stack `source` now and append one placeholder per stacked tensor."""
        indices = [self.input_index[n] for n in source.inputs]
        stacked = _shared_stack(source, [self.example_inputs[i] for i in indices])
        self.regions.append((stacked, indices))
        names = stacked.names
        graph = self.gm.graph
        last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
        nodes = {}
        with graph.inserting_after(last_placeholder):
            for name in reversed(names):
                nodes[name] = graph.placeholder(f"{prefix}{name}")
        return nodes

    def describe(self, regions: list[MoERegion]) -> None:
        """Record on each rewritten region (in lowering order) what it holds: shapes and bytes."""
        assert len(regions) == len(self.regions), "one stacked set per rewritten region"
        for region, (stacked, indices) in zip(regions, self.regions):
            region.shard_shapes = {name: list(t.shape) for name, t in zip(stacked.names, stacked.tensors)}
            region.expert_bytes_per_rank = sum(t.nbytes for t in stacked.tensors)
            region.expert_bytes = sum(self.example_inputs[i].nbytes for i in indices)

    def release_unsharded(self) -> None:
        """Free the storage of the user's expert parameters; the stacked shards stay.

        Shapes and strides are kept (Dynamo's guards read them), so the compiled graphs run on.
        """
        for stacked, indices in self.regions:
            assert stacked.source.copies, "shards are copies: nothing of ours views the originals"
            for i in indices:
                self.example_inputs[i].untyped_storage().resize_(0)

    def tensors(self) -> list[torch.Tensor]:
        """Current stacked tensors in placeholder order."""
        return [t for stacked, _ in self.regions for t in stacked.tensors]

    def bind(self, inner: Callable) -> Callable:
        if not self.regions:
            return inner

        def run(*args):  # Dynamo calls a backend's result unboxed, and so do we
            for stacked, indices in self.regions:
                stacked.refresh([args[i] for i in indices])
            return inner(*args, *self.tensors())

        return run
