"""The options of `torch.compile(..., backend="moeshard", options={...})`, validated."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from torch._dynamo.exc import ShortenTraceback


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
    """

    dump_dir: str | None = field(default_factory=lambda: os.environ.get("MOESHARD_DUMP_DIR") or None)
    inductor: bool = True
    dropless: bool = False

    @classmethod
    def from_user(cls, options: "dict[str, Any] | Options | None") -> "Options":
        if isinstance(options, Options):
            return options
        options = dict(options or {})
        accepted = [f.name for f in fields(cls)]
        for key in options:
            if key not in accepted:
                raise OptionError(f"moeshard: unknown option {key!r}; accepted options are {', '.join(accepted)}")
        for key in ("inductor", "dropless"):
            if key in options and not isinstance(options[key], bool):
                raise OptionError(f"moeshard: option {key!r} must be True or False, got {options[key]!r}")
        dump_dir = options.get("dump_dir", os.environ.get("MOESHARD_DUMP_DIR") or None)
        if dump_dir is not None and not isinstance(dump_dir, (str, os.PathLike)):
            raise OptionError(f"moeshard: option 'dump_dir' must be a path (str or os.PathLike), got {dump_dir!r}")
        options["dump_dir"] = os.fspath(dump_dir) if dump_dir is not None else None
        return cls(**options)
