"""Fits bench/common/links.py's link model to the 4-H100 runs, and says how far the one-GPU
simulation is from them with it: the constants links.py holds and the residuals docs/results.md quotes.

    python bench/calibrate_links.py          # reads docs/results/ only: seconds, no device

The fit (why these rows and steps: bench/common/links.py's docstring): every measured row of
--measured (bench/paper_ranks.py's JSONs) becomes a sample, the time it spent outside its
computation X = latency - compute and the collectives bench/paper.py charges its system
(moeshard_transfers, capacity_transfers, variable_all_to_all_transfers, the same functions the
simulation runs). Rows of moeshard with comm_chunks are left out: their collectives run under the
computation, which the serial model does not describe.

The residuals: each measured row against its simulated counterpart in --simulated (bench/paper.py
on one H100, the same shapes and routing seed), costed again with the fitted model: the stored
simulated compute plus the model's transfers and host syncs, over the measured latency; beside it
the stored simulated latency over the measured one (for docs/results/paper_h100.json: the nominal
link model, 450 GB/s and no fixed costs).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench` importable when run as a script
from bench.baselines.expert_parallel import COUNT_BYTES  # noqa: E402
from bench.common.cli import DTYPES, github_table  # noqa: E402
from bench.common.links import ALL_TO_ALL, GATHER, H100_NVLINK, LinkModel, Transfer  # noqa: E402
from bench.paper import (  # noqa: E402
    MEASURED, MEASURED_AS, TOP_K, capacity_transfers, moeshard_transfers, variable_all_to_all_transfers,
)

SIMULATED = ROOT / "docs/results/paper_h100.json"
BALANCED = ("moeshard_N", "ep_capacity_cf50", "ep_capacity_cf1.25")  # every rank the same work: mean compute = max


@dataclass
class Sample:
    """One measured row, with what the simulation charges its system."""

    file: str
    config: str
    system: str  # bench/paper.py's name
    dtype: str
    measured_ms: float  # latency
    measured_compute_ms: float  # non-NCCL kernel time, mean over the ranks
    simulated_compute_ms: float  # bench/paper.py's busiest rank
    simulated_ms: float  # bench/paper.py's latency, with the link model it ran with
    transfers: list[Transfer]
    host_syncs: int

    @property
    def outside_ms(self) -> float:
        """X: the measured time outside computation, against the busiest rank's compute (measured
        where the ranks are balanced, simulated where the mean hides a hot rank)."""
        compute_ms = self.measured_compute_ms if self.system in BALANCED else self.simulated_compute_ms
        return self.measured_ms - compute_ms


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", type=Path, nargs="+", default=list(MEASURED), help="bench/paper_ranks.py JSONs")
    parser.add_argument("--simulated", type=Path, default=SIMULATED, help="bench/paper.py's JSON of the same shapes")
    return parser.parse_args(argv)


def charged(system: str, measured: dict, simulated: dict, setup: dict, bandwidth_gbs: float | None
            ) -> tuple[list[Transfer], int]:
    """(transfers, host syncs) of a system as bench/paper.py charges them: the simulated row's own
    list where it has one; else built here, the dropless rows' busiest phase read back off the
    simulated row's comm_ms (its bytes at the one bandwidth it ran with, no fixed costs)."""
    if "transfers" in simulated:
        return [Transfer(t["name"], t["kind"], t["bytes"]) for t in simulated["transfers"]], simulated["host_syncs"]
    N, E, D = measured["N"], measured["E"], setup["d_model"]
    row_bytes = D * torch.empty(0, dtype=DTYPES[measured["dtype"]]).element_size()
    if system == "moeshard_N":
        return moeshard_transfers(N, E, measured["T"] * TOP_K, row_bytes), 0
    if system.startswith("ep_capacity"):
        return capacity_transfers(N, E // N, simulated["capacity"], row_bytes), 0
    counts_bytes = (N - 1) * (E // N) * COUNT_BYTES
    total_bytes = simulated["comm_ms"] * bandwidth_gbs * 1e6
    return variable_all_to_all_transfers(counts_bytes, round((total_bytes - counts_bytes) / 2)), 1


def load_samples(measured_paths: list[Path], simulated_path: Path) -> list[Sample]:
    """Every measured row with a simulated counterpart, as a Sample."""
    simulated_result = json.loads(simulated_path.read_text())
    simulated = {(row["config"], row["system"]): row for row in simulated_result["rows"] if row.get("latency_ms")}
    ours = {name: system for system, name in MEASURED_AS.items()}
    samples = []
    for path in measured_paths:
        result = json.loads(path.read_text())
        for row in result["rows"]:
            system = ours.get(row["system"])
            twin = simulated.get((row["config"], system))
            if twin is None or not row.get("latency_ms"):
                continue
            transfers, syncs = charged(system, row, twin, result["config"], simulated_result.get("bandwidth_gbs"))
            samples.append(Sample(path.name, row["config"], system, row["dtype"], row["latency_ms"], row["compute_ms"],
                                  twin["compute_ms"], twin["latency_ms"], transfers, syncs))
    return samples


def fit(samples: list[Sample]) -> LinkModel:
    """1. latency and per-kind bandwidths: least squares on X of the balanced rows, each weighted
    by 1/X; 2. the host sync: the mean of what the bf16 dropless rows' X leaves over."""
    balanced = [s for s in samples if fitted_by(s) == "1"]
    A = torch.tensor([[len(s.transfers), *(sum(t.bytes for t in s.transfers if t.kind == kind) / 1e9
                                           for kind in (GATHER, ALL_TO_ALL))] for s in balanced], dtype=torch.float64)
    X = torch.tensor([s.outside_ms for s in balanced], dtype=torch.float64)
    latency_ms, gather_ms_per_gb, all_to_all_ms_per_gb = torch.linalg.lstsq(A / X[:, None], X[:, None] / X[:, None],
                                                                             driver="gelsd").solution[:, 0].tolist()
    link = LinkModel(1 / gather_ms_per_gb * 1e3, 1 / all_to_all_ms_per_gb * 1e3, latency_ms, 0.0)
    dropless = [s for s in samples if fitted_by(s) == "2"]
    left_ms = [s.outside_ms - link.serial_ms(s.transfers) for s in dropless]
    return LinkModel(link.gather_gbs, link.all_to_all_gbs, latency_ms, sum(left_ms) / len(left_ms))


def fitted_by(sample: Sample) -> str:
    """Which step of fit() the row serves: 1, 2 or none."""
    if sample.system in BALANCED:
        return "1"
    return "2" if sample.dtype == "bfloat16" else "-"


def residuals(samples: list[Sample], link: LinkModel) -> list[dict]:
    """Per measured row: the simulated latency costed with `link`, over the measured latency."""
    rows = []
    for s in samples:
        outside_ms = link.serial_ms(s.transfers) + s.host_syncs * link.host_sync_ms
        modelled_ms = s.simulated_compute_ms + outside_ms
        rows.append({"file": s.file, "config": s.config, "system": s.system, "fit": fitted_by(s),
                     "measured_ms": s.measured_ms, "X_ms": s.outside_ms, "modelled_X_ms": outside_ms,
                     "simulated_ms": modelled_ms, "sim_over_measured": modelled_ms / s.measured_ms,
                     "stored_over_measured": s.simulated_ms / s.measured_ms})
    return rows


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    samples = load_samples(args.measured, args.simulated)
    link = fit(samples)
    print(f"fitted on {len(samples)} rows of {', '.join(p.name for p in args.measured)}: {link}")
    print(f"bench/common/links.py H100_NVLINK: {H100_NVLINK}")
    print(github_table(residuals(samples, H100_NVLINK),
                       ("file", "config", "system", "fit", "measured_ms", "X_ms", "modelled_X_ms", "simulated_ms",
                        "sim_over_measured", "stored_over_measured"), floatfmt=".3g"))


if __name__ == "__main__":
    main(sys.argv[1:])
