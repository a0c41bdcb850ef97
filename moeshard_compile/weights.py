"""Stacked expert weights as extra graph inputs, always made from the parameters' current values.

The rewritten graph reads stacked [E, ...] weights. Where they are views of the user's
parameters (transformers' 3-D experts on one rank) they are made again at every call: a few view
ops, and never stale. Where they are copies (a ModuleList's experts, every rank's shard), copying
per call would cost a full pass over the weights, so each copy is kept with a record of what it
was made from and checked at every call:

    what changed                                   seen by
    the parameter object (module.w = Parameter)    identity
    in-place ops, load_state_dict                  the version counter
    `.data = t`, model.to(dtype)                   the data pointer (new storage)
    in-place writes through `.data`                a fingerprint: 32 sampled elements per
                                                   parameter, read through 1-D views, compared
                                                   for all regions at once (weight_check=
                                                   "version" leaves it out: no host sync)

Copies are keyed by the identities of the parameters they came from, so two models running one
compiled graph (copies of a model share Dynamo's cache) each get their own, and a fresh compile
of a changed model never finds a stale one. A lock makes the check-and-rebuild safe from threads.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from moeshard_compile.passes.region import WeightSource

_SAMPLES_PER_PARAM = 32
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_LOCK = threading.RLock()


class ReleasedError(RuntimeError):
    """A parameter released by release_unsharded=True was changed or is needed again."""


def _state(t: torch.Tensor) -> tuple[int, int]:
    """In-place version counter and data pointer. Tensors made under inference_mode have no
    version counter (and cannot change outside it): they count as never modified in place. A
    new dtype, device or layout comes with new storage, so the pointer covers them too."""
    return (-1 if t.is_inference() else t._version), t.data_ptr()


class _Snapshot:
    """Identity, version counter and storage of each parameter."""

    def __init__(self, params: list[torch.Tensor]):
        self.refs = [weakref.ref(p) for p in params]  # weak: the model may go
        self.states = [_state(p) for p in params]

    def matches(self, params: list[torch.Tensor]) -> bool:
        return all(p is ref() and _state(p) == state for p, ref, state in zip(params, self.refs, self.states))


class _Fingerprint:
    """Sampled elements of every parameter, read through views of their storage, as raw bits
    (NaN compares equal to itself): a write that moves no version counter still changes them."""

    def __init__(self, params: list[torch.Tensor]):
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(_sample(p.detach()))
        self.views = list(by_dtype.values())
        self.bits = [self._read(views) for views in self.views]

    @staticmethod
    def _read(views: list[torch.Tensor]) -> torch.Tensor:
        values = torch.cat(views)  # 1-D views: no Python work per parameter
        return values.view(_INT_OF_SIZE[values.element_size()])

    def changed(self) -> torch.Tensor:
        """A 0-d bool tensor on the parameters' device: no host sync until it is read."""
        flags = [(self._read(views) != bits).any() for views, bits in zip(self.views, self.bits)]
        return flags[0] if len(flags) == 1 else torch.stack(flags).any()


def _any_changed(fingerprints: list[_Fingerprint]) -> list[bool]:
    """Which fingerprints changed, read with one host sync per device."""
    flags: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, fingerprint in enumerate(fingerprints):
        flag = fingerprint.changed()
        flags.setdefault(flag.device, []).append((i, flag))
    changed = [False] * len(fingerprints)
    for on_device in flags.values():
        for (i, _), value in zip(on_device, torch.stack([f for _, f in on_device]).tolist()):
            changed[i] = value
    return changed


def _sample(t: torch.Tensor) -> torch.Tensor:
    """About _SAMPLES_PER_PARAM evenly spaced elements as a 1-D view of the tensor's storage
    (of a non-contiguous tensor: along its first dimension, at index 0 of the others)."""
    if t.numel() == 0:
        return t.new_empty(0)
    if t.dim() == 0:
        return t.reshape(1)
    if t.is_contiguous():
        return t.view(-1)[:: max(1, t.numel() // _SAMPLES_PER_PARAM)]
    column = t[(slice(None),) + (0,) * (t.dim() - 1)]
    return column[:: max(1, column.numel() // _SAMPLES_PER_PARAM)]


def digest(params: list[torch.Tensor]) -> int:
    """An exact checksum of the parameters' bits, per leading index (so the order of experts in
    a 3-D parameter counts): equal on ranks holding equal weights, whatever their devices."""
    sums = []
    with torch.no_grad():
        for p in params:
            t = p.detach().contiguous()
            rows = t.view(_INT_OF_SIZE[t.element_size()]).reshape(t.shape[0] if t.dim() else 1, -1)
            sums += rows.sum(1, dtype=torch.int64).tolist()
    return hash(tuple(sums))


class _Views:
    """Stacked views of the parameters, made for one call."""

    digest = None

    def __init__(self, source: WeightSource, params: list[torch.Tensor]):
        self.names, self.tensors = _stacked(source, params)


class _Stacked:
    """One region's stacked copies and what they were made from."""

    def __init__(self, source: WeightSource, params: list[torch.Tensor], with_digest: bool):
        self.names, self.tensors = _stacked(source, params)
        self.snapshot, self.fingerprint = _Snapshot(params), _Fingerprint(params)
        self.digest = digest(params) if with_digest else None
        self.released = False

    def matches(self, params: list[torch.Tensor]) -> bool:
        """The same parameters, unmodified as far as identity, version and storage tell (the
        fingerprint is read for all regions at once, by WeightFeed.current)."""
        if self.released and not self.snapshot.matches(params):
            raise ReleasedError(
                "moeshard: expert parameters released by release_unsharded=True were replaced or "
                "modified: their stacked shards cannot be rebuilt; build and compile a fresh model to "
                "change its weights"
            )
        return self.snapshot.matches(params)

    def release(self, params: list[torch.Tensor]) -> None:
        """Point each parameter at one NaN broadcast to its shape: the memory goes, and any later
        write fails with an error instead of reaching freed storage (an eager call gives NaN)."""
        with torch.no_grad():
            for p in params:
                if not getattr(p, "_moeshard_released", False):
                    p.data = torch.full((1,), float("nan"), dtype=p.dtype, device=p.device).expand(p.shape)
                    p._moeshard_released = True
        self.snapshot, self.fingerprint, self.released = _Snapshot(params), None, True


# (parameter ids, layout) -> stack; an entry dies with its first parameter
_SHARED: dict[tuple, _Stacked] = {}


def _key(source: WeightSource, params: list[torch.Tensor]) -> tuple:
    return tuple(id(p) for p in params), source.layout


def _lookup(source: WeightSource, params: list[torch.Tensor], with_digest: bool) -> tuple[_Stacked, bool]:
    """The stack for these parameters, and whether its fingerprint is still to be compared
    (False when it was just built)."""
    key = _key(source, params)
    stacked = _SHARED.get(key)
    if stacked is not None and stacked.matches(params):
        return stacked, not stacked.released
    return _rebuild(key, source, params, with_digest, new=stacked is None), False


def _rebuild(key: tuple, source: WeightSource, params: list[torch.Tensor], with_digest: bool, new: bool) -> _Stacked:
    if any(getattr(p, "_moeshard_released", False) for p in params):
        raise ReleasedError(
            "moeshard: these expert parameters were released by release_unsharded=True (in another "
            "compiled graph, or before a change): nothing can be stacked from them; build and compile a "
            "fresh model"
        )
    if new:
        weakref.finalize(params[0], _SHARED.pop, key, None)
    stacked = _SHARED[key] = _Stacked(source, params, with_digest)
    return stacked


def _stacked(source: WeightSource, params: list[torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
    with torch.no_grad():
        weights = source.stack([p.detach() for p in params])
    stacked = weights.present()
    return list(stacked), list(stacked.values())


class _RegionWeights:
    """Where one region's stacked tensors come from: its source and its parameters' input slots."""

    def __init__(self, source: WeightSource, indices: list[int], with_digest: bool):
        self.source, self.indices, self.with_digest = source, indices, with_digest

    def stack(self, args) -> tuple[_Stacked | _Views, bool]:
        """The stacked tensors for these arguments (fresh views, or the copies matching their
        identities, versions and storage), and whether a fingerprint is still to be compared."""
        params = [args[i] for i in self.indices]
        if self.source.copies:
            return _lookup(self.source, params, self.with_digest)
        return _Views(self.source, params), False

    def rebuild(self, args) -> _Stacked:
        params = [args[i] for i in self.indices]
        return _rebuild(_key(self.source, params), self.source, params, self.with_digest, new=False)


@dataclass(frozen=True)
class Held:
    """What one rewritten region's stacked weights hold on this rank, for the report."""

    shapes: dict[str, list[int]]  # each stacked tensor's shape
    nbytes: int  # their bytes (this rank's shard)
    expert_bytes: int  # bytes of the user's expert parameters they are made from (all experts, unsharded)


class WeightFeed:
    """The stacked weights of one rewritten graph, appended to its inputs at each call.

    `sources` (passes.rewrite's result) say how each group of the graph's weight inputs is
    stacked from its parameters; they are stacked now, from the example inputs.
    with_digest: keep an exact checksum of every copy's parameters (sharded graphs: the ranks
    compare them, moeshard_compile.distributed). fingerprint: compare the copies' fingerprints
    at every call (Options.weight_check)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, sources: list[WeightSource] = (),
                 with_digest: bool = False, fingerprint: bool = True):
        self.example_inputs, self.fingerprint = list(example_inputs), fingerprint
        input_index = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
        self.regions = [_RegionWeights(s, [input_index[n] for n in s.inputs], with_digest) for s in sources]
        self.built = [(stacked.names, stacked.tensors) for stacked, _ in (r.stack(self.example_inputs) for r in self.regions)]
        self.release_pending = False

    def held(self) -> list[Held]:
        """What each rewritten region (in lowering order) holds: shapes and bytes."""
        return [Held(shapes={name: list(t.shape) for name, t in zip(names, tensors)}, nbytes=sum(t.nbytes for t in tensors),
                     expert_bytes=sum(self.example_inputs[i].nbytes for i in weights.indices))
                for weights, (names, tensors) in zip(self.regions, self.built)]

    def release_unsharded(self) -> None:
        """At the first call (Dynamo has built its guards by then), free the user's expert parameters."""
        assert all(r.source.copies for r in self.regions), "shards are copies: nothing of ours views the originals"
        self.release_pending = True

    def tensors(self) -> list[torch.Tensor]:
        """The compile-time stacked tensors in placeholder order."""
        return [t for _, tensors in self.built for t in tensors]

    def current(self, args) -> list[_Stacked | _Views]:
        """Every region's stacked tensors for this call, rebuilt where a parameter changed: the
        fingerprints of all regions are compared together (one host sync on a GPU)."""
        with _LOCK:
            looked_up = [region.stack(args) for region in self.regions]
            stacks = [stacked for stacked, _ in looked_up]
            unverified = [i for i, (_, compare) in enumerate(looked_up) if compare and self.fingerprint]
            changed = _any_changed([stacks[i].fingerprint for i in unverified]) if unverified else []
            for i, was_changed in zip(unverified, changed):
                if was_changed:
                    stacks[i] = self.regions[i].rebuild(args)
            if self.release_pending:
                for region, stacked in zip(self.regions, stacks):
                    stacked.release([args[i] for i in region.indices])
                self.release_pending = False
        return stacks

    def bind(self, inner: Callable, check: Callable[[tuple, list], None] | None = None) -> Callable:
        """`inner` over the graph's inputs and the current stacked weights; `check(args, stacks)`
        runs first when given (the ranks' agreement, moeshard_compile.distributed)."""
        if not self.regions:
            return inner

        def run(*args):  # Dynamo calls a backend's result unboxed, and so do we
            stacks = self.current(args)
            if check is not None:
                check(args, stacks)
            return inner(*args, *(t for stacked in stacks for t in stacked.tensors))

        return run

