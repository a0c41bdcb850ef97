"""The options of `torch.compile(..., backend="moeshard", options={...})`, validated."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from torch._dynamo.exc import ShortenTraceback

INPUT_MODES = ("data_parallel", "replicated")
WEIGHT_CHECKS = ("fingerprint", "version")
EXPERT_KERNELS = ("auto", "fused", "grouped_mm")
OVERLAPS = ("none", "source_rank")


class OptionError(ShortenTraceback, ValueError):
    """A bad `options=` entry. A ValueError that Dynamo lets through unwrapped."""

    def __init__(self, message: str):
        super().__init__(message, first_useful_frame=None)


@dataclass(frozen=True)
class Options:
    """Every option of the moeshard backend.

    dump_dir: write each graph's code before/after the rewrite and report.txt / report.json
        there. Defaults to the environment variable MOESHARD_DUMP_DIR, else no dumps.
    inductor: lower the rewritten graph with Inductor (default). False runs the rewritten FX
        graph as it is: much faster to compile, for tests and debugging.
    dropless: remove the model's capacity limits (e.g. Switch's expert_capacity), so no token
        is dropped. This CHANGES results wherever the model would have dropped tokens.
        Default False: the model's own routing semantics are kept exactly.
    world_size: the number of ranks that share every expert (MoEShard). None (default): the
        size of `group` / `mesh`, else of the default process group when it is initialised,
        else 1. Given together with a group, it must match the group's size.
    group: the torch.distributed ProcessGroup to shard over (default: the default group).
    mesh: a 1-D DeviceMesh to shard over, instead of `group`.
    input_mode: "data_parallel" (default: every rank brings its own batch; tokens are
        all-gathered and partial outputs reduce-scattered back) or "replicated" (every rank
        brings the same batch; partial outputs are all-reduced).
    release_unsharded: after compiling, free the storage of the user's expert parameters,
        keeping only this rank's shard (memory / N). The model's experts can no longer run
        eagerly or be reloaded. Default False: nothing in the user's model is modified.
    comm_chunks: data_parallel only: split each rank's routed rows into this many chunks, each
        all-gathered, computed and reduce-scattered on its own, with every chunk's all-gather
        issued first; chunk c + 1's traffic then runs under chunk c's grouped computation.
        Default 1 (no split). Each chunk re-reads the expert weights, so more chunks pay only
        where the collectives take longer than that (docs/distributed.md has measurements).
        Graphs whose row count is symbolic (dynamic shapes) are not split.
    overlap: data_parallel only: how the exchange is scheduled. "none" (default): all-gather
        every rank's rows, compute them, reduce-scatter the partial sums. "source_rank": N - 1
        pairwise exchanges, all issued first; this rank's own rows compute while the others'
        travel, each other rank's rows as they arrive, and their partial sums go back while the
        next rank's rows compute. The same bytes travel; cannot be combined with comm_chunks.
    expert_group_size: g, how many ranks share each expert (docs/distributed.md, placements).
        None (default): every rank (MoEShard, g = N). An int g dividing N: experts in N / g
        groups of g ranks, each rank a 1/g block of its group's experts (g = 1: dropless expert
        parallelism); data_parallel only, and not with overlap or comm_chunks. "auto": per MoE
        layer, the g whose modelled time is least (moeshard_compile/placement.py), from the
        layer's shapes, the routing of the first call's batch on every rank, and the link's
        bandwidth measured once.
    check_inputs: before each call of a sharded graph, compare every rank's options, sharded
        regions, expert-weight checksums and input shapes with one small all-gather and raise on
        every rank if they differ (True). False: compared at the first call of each graph only.
        Default: True, but False under CUDA graphs (mode "reduce-overhead" or "max-autotune"),
        where the per-call check's host sync would cost what the graphs save.
    weight_check: how each call makes sure stacked copies of expert weights are current.
        "fingerprint": identity, version counter and storage of every expert parameter, and 32
        sampled elements of each (sees writes through `.data`; one host sync per call on a GPU).
        "version": identity, version counter and storage only (no sync; in-place writes through
        `.data` are not seen). Default: "fingerprint", but "version" under CUDA graphs
        (mode "reduce-overhead" or "max-autotune"), where a host sync per call would cost what
        the graphs save.
    mode: Inductor's mode, as `torch.compile(mode=...)` gives it (which cannot be combined with
        `options=`, so it is an option too): None or "default", "reduce-overhead" (CUDA graphs,
        through Inductor's cudagraph trees), "max-autotune", "max-autotune-no-cudagraphs".
    inductor_config: Inductor config entries for this compile, e.g. {"max_autotune_gemm": True}
        (names as in torch._inductor.config, dotted for nested ones); they override the mode's.
    expert_kernel: how the experts of each rewritten region run. "auto" (default): on one CUDA
        GPU of SM90 or newer in bf16, the faster of the fused Triton kernels and
        torch._grouped_mm for the region's shape class, timed once and cached on disk
        (moeshard_compile.kernel_choice); the fused kernels elsewhere. "fused" or "grouped_mm"
        force one (grouped_mm where it can run: bf16, one rank). The report's kernel column
        says what ran and why.
    """

    dump_dir: str | None = field(default_factory=lambda: os.environ.get("MOESHARD_DUMP_DIR") or None)
    inductor: bool = True
    dropless: bool = False
    world_size: int | None = None
    group: Any = None
    mesh: Any = None
    input_mode: str = "data_parallel"
    release_unsharded: bool = False
    comm_chunks: int = 1
    overlap: str = "none"
    expert_group_size: int | str | None = None
    check_inputs: bool | None = None
    weight_check: str | None = None
    mode: str | None = None
    inductor_config: Mapping[str, Any] = field(default_factory=dict)
    expert_kernel: str = "auto"

    def __post_init__(self):
        """Validate every field, however the Options were built (dict, keywords, replace)."""
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"moeshard: option {name!r} must be True or False, got {getattr(self, name)!r}")
        dump_dir = self.dump_dir
        if dump_dir is not None and not isinstance(dump_dir, (str, os.PathLike)):
            raise OptionError(f"moeshard: option 'dump_dir' must be a path (str or os.PathLike), got {dump_dir!r}")
        object.__setattr__(self, "dump_dir", os.fspath(dump_dir) or None if dump_dir is not None else None)
        _check_inductor(self)
        graphed = inductor_patches(self).get("triton.cudagraphs", False)
        if self.weight_check is None:
            object.__setattr__(self, "weight_check", "version" if graphed else "fingerprint")
        if self.check_inputs is None:
            object.__setattr__(self, "check_inputs", not graphed)
        if not isinstance(self.check_inputs, bool):
            raise OptionError(f"moeshard: option 'check_inputs' must be True, False or None, got {self.check_inputs!r}")
        if self.weight_check not in WEIGHT_CHECKS:
            raise OptionError(f"moeshard: option 'weight_check' must be one of "
                              f"{', '.join(map(repr, WEIGHT_CHECKS))}, got {self.weight_check!r}")
        _check_distributed(self)

    @classmethod
    def from_user(cls, options: "Mapping[str, Any] | Options | None") -> "Options":
        """Options from what `torch.compile(options=...)` was given: a mapping, an Options or None."""
        if isinstance(options, Options):
            return options
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise OptionError(
                "moeshard: options must be a dict of option names to values (or a moeshard_compile.Options), "
                f"got {type(options).__name__} {options!r}"
            )
        options = dict(options)
        accepted = [f.name for f in fields(cls)]
        for key in options:
            if key not in accepted:
                raise OptionError(f"moeshard: unknown option {key!r}; accepted options are {', '.join(accepted)}")
        return cls(**options)


_FLAGS = ("inductor", "dropless", "release_unsharded")


def _check_inductor(options: Options) -> None:
    """mode, inductor_config and expert_kernel; mode "default" is stored as None."""
    from torch._inductor import config as inductor_config, list_mode_options

    mode = None if options.mode == "default" else options.mode
    modes = [m for m in list_mode_options() if m != "default"]
    if mode is not None and mode not in modes:
        raise OptionError(f"moeshard: option 'mode' must be None or one of 'default', {', '.join(map(repr, modes))}, "
                          f"got {options.mode!r}")
    if mode is not None and not options.inductor:
        raise OptionError(f"moeshard: option 'mode' ({mode!r}) is Inductor's: it needs inductor=True")
    object.__setattr__(options, "mode", mode)
    entries = options.inductor_config
    if not isinstance(entries, Mapping):
        raise OptionError(f"moeshard: option 'inductor_config' must be a dict of Inductor config entries, got {entries!r}")
    known = inductor_config.get_config_copy()
    unknown = [name for name in entries if name not in known]
    if unknown:
        raise OptionError(f"moeshard: option 'inductor_config': {', '.join(map(repr, unknown))} "
                          "not in torch._inductor.config")
    object.__setattr__(options, "inductor_config", dict(entries))
    if options.expert_kernel not in EXPERT_KERNELS:
        raise OptionError(f"moeshard: option 'expert_kernel' must be one of {', '.join(map(repr, EXPERT_KERNELS))}, "
                          f"got {options.expert_kernel!r}")


def inductor_patches(options: Options) -> dict[str, Any]:
    """The Inductor config entries this compile runs under: the mode's, then the user's."""
    from torch._inductor import list_mode_options

    return {**(list_mode_options(options.mode) if options.mode else {}), **options.inductor_config}


def _check_distributed(options: Options) -> None:
    world_size = options.world_size
    if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1):
        raise OptionError(f"moeshard: option 'world_size' must be a positive int or None, got {world_size!r}")
    chunks = options.comm_chunks
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise OptionError(f"moeshard: option 'comm_chunks' must be a positive int, got {chunks!r}")
    mode = options.input_mode
    if mode not in INPUT_MODES:
        raise OptionError(f"moeshard: option 'input_mode' must be one of {', '.join(map(repr, INPUT_MODES))}, got {mode!r}")
    overlap = options.overlap
    if overlap not in OVERLAPS:
        raise OptionError(f"moeshard: option 'overlap' must be one of {', '.join(map(repr, OVERLAPS))}, got {overlap!r}")
    if overlap != "none" and mode != "data_parallel":
        raise OptionError(f"moeshard: option 'overlap'={overlap!r} schedules the data_parallel exchange; "
                          f"input_mode {mode!r} has a single all-reduce to overlap nothing with")
    g = options.expert_group_size
    if g is not None and g != "auto" and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
        raise OptionError(f"moeshard: option 'expert_group_size' must be None, 'auto' or a positive int, got {g!r}")
    if isinstance(g, int) and mode != "data_parallel":
        raise OptionError(f"moeshard: option 'expert_group_size'={g} places experts for the data_parallel exchange; "
                          f"input_mode {mode!r} shards every expert over every rank")
    if overlap != "none" and chunks > 1:
        raise OptionError(f"moeshard: option 'overlap'={overlap!r} already splits the exchange by source rank: "
                          f"leave 'comm_chunks' at 1 (got {chunks})")
    group, mesh = options.group, options.mesh
    if group is not None and mesh is not None:
        raise OptionError("moeshard: give either option 'group' or option 'mesh', not both")
    if group is not None:
        from torch.distributed import ProcessGroup

        if not isinstance(group, ProcessGroup):
            raise OptionError(f"moeshard: option 'group' must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    if mesh is not None:
        from torch.distributed.device_mesh import DeviceMesh

        if not isinstance(mesh, DeviceMesh) or mesh.ndim != 1:
            raise OptionError(f"moeshard: option 'mesh' must be a 1-D torch.distributed.DeviceMesh, got {mesh!r}")
