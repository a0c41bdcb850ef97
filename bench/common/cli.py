"""What the benchmarks' command lines share: dtype names, --smoke, comma lists, error cells, tables."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tabulate import tabulate

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def add_run_args(parser: argparse.ArgumentParser, warmup_ms: float = 100.0, rep_ms: float = 500.0) -> None:
    """--warmup-ms / --rep-ms (the timing), --seed and --json: what every timed benchmark takes."""
    parser.add_argument("--warmup-ms", type=float, default=warmup_ms)
    parser.add_argument("--rep-ms", type=float, default=rep_ms)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")


def parse_with_smoke(parser: argparse.ArgumentParser, argv: Sequence[str] | None, smoke: dict,
                     description: str | None = None) -> argparse.Namespace:
    """Add --smoke (tiny shapes on CPU: `smoke` as the defaults; other flags still apply) and parse."""
    described = description or ", ".join(f"{key}={value}" for key, value in smoke.items())
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny shapes on CPU ({described}); other flags still apply")
    # --smoke changes the defaults, so parse once to see it and once more with its defaults in place
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(**smoke)
    return parser.parse_args(argv)


def comma_list(parser: argparse.ArgumentParser, option: str, text: str, choices: Iterable[str]) -> list[str]:
    """`text` split at commas, each name one of `choices` (else the parser's usage error)."""
    names, choices = text.split(","), list(choices)
    unknown = sorted(set(names) - set(choices))
    if unknown:
        parser.error(f"{option}: unknown {unknown}; choose from {', '.join(choices)}")
    return names


def error_cell(error: BaseException) -> str:
    """An exception as one short table cell: its type and the first line of its message."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


def github_table(rows: list[dict], columns: Sequence[str], floatfmt: str | Sequence[str] = ".4g",
                 missingval: str = "-") -> str:
    """rows in the given columns as a GitHub markdown table (a missing value as `missingval`)."""
    return tabulate([[row.get(column) for column in columns] for row in rows], headers=columns, tablefmt="github",
                    floatfmt=floatfmt, missingval=missingval)
