"""The launch choices both kernels share: the persistent TMA loop or one program per tile, the
grid, the TF32 flag and the arguments that stand in for absent tensors."""

from __future__ import annotations

import functools

import torch
import triton

from moeshard_compile.kernels.schedule import MAX_PERSISTENT_PROGRAMS
from moeshard_compile.kernels.tile_config import TileConfig


def _input_precision_tf32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


def _strides(t: torch.Tensor | None, rank: int) -> tuple[int, ...]:
    """Strides of an optional tensor (zeros for None: its kernel loads are compiled out)."""
    return tuple(t.stride()) if t is not None else (0,) * rank


def _or(t: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """A pointer for an absent tensor: never read, its constexpr flag compiles the loads out."""
    return t if t is not None else stand_in


def _use_tma(config: TileConfig, device: torch.device, *weights: torch.Tensor | None) -> bool:
    """The persistent TMA kernel, where asked, on a chip with TMA (sm_90+, or Triton's interpreter),
    and where every weight's layout allows it (Mixtral's transposed views keep pointer loads)."""
    has_tma = device.type != "cuda" or _has_tma(_index(device))
    return config.persistent_tma and has_tma and all(_tma_layout(w) for w in weights if w is not None)


def _tma_layout(t: torch.Tensor) -> bool:
    """What a TMA descriptor needs: a unit stride on the last dim, 16-byte aligned offset and strides."""
    return t.stride(-1) == 1 and all(s * t.element_size() % 16 == 0 for s in (t.storage_offset(), *t.stride()[:-1]))


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _has_tma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Triton's global scratch (the device-side TMA descriptors), as Inductor allocates it."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


@functools.cache
def _install_scratch_allocator() -> None:
    """At the first TMA launch of the process, for eager launches (Inductor installs its own before
    each of its launches); an allocator the user sets after that stays."""
    triton.set_allocator(_scratch)


def _grid(tma: bool, tiles: int, device: torch.device) -> tuple[int]:
    """One program per tile, or with tma one per SM (a few on Triton's CPU interpreter)."""
    if not tma:
        return (tiles,)
    if device.type != "cuda":
        return (min(tiles, 3),)
    _install_scratch_allocator()
    return (max(1, min(tiles, _sm_count(_index(device)), MAX_PERSISTENT_PROGRAMS.value)),)
