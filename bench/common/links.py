"""What the one-GPU simulation (bench/paper.py) charges for moving bytes between ranks: a link
model fitted to the 4-H100 runs of bench/paper_ranks.py.

One collective costs    latency_ms + bytes / bandwidth(kind)
    bytes    the busiest rank's bytes in one direction (the larger of sent and received)
    kind     "gather": all-gather and reduce-scatter (NCCL rings: moeshard's exchange);
             "all_to_all": all_to_all_single (expert parallelism's dispatch and combine, and the
             pairwise exchanges of moeshard's source-rank schedule)
and a device-to-host sync in the middle of a layer (the split sizes a variable all-to-all needs on
the host) costs host_sync_ms: the device runs dry, then waits for the host to launch the rest.

H100_NVLINK was fitted by `python bench/calibrate_links.py` to docs/results/paper_4gpu_h100.json
and docs/results/paper_4gpu_h100_chunks.json (4 H100 SXM, NVLink NV18, NCCL, E 8-256, 30000
tokens per rank, skew), in two steps:
 1. latency_ms, gather_gbs and all_to_all_gbs: least squares (linear in the latency and the two
    inverse bandwidths, each row weighted by 1 / X) on the time each measured call spent outside
    its computation, X = latency - compute (compute: the non-NCCL kernels' time, mean over the
    ranks), for the systems whose ranks carry equal work, so that the mean is the busiest rank's:
    moeshard (4 gather collectives: the rank check, the counts, the rows, the partial sums),
    ep_capacity_cf50 and ep_capacity_cf1.25 (2 all-to-alls), fp32 and bf16: 25 rows.
 2. host_sync_ms: the ep_dropless bf16 rows (2), X - (3 latency_ms + bytes / all_to_all_gbs)
    averaged, with X taken against the simulated busiest rank's compute (the measured mean over
    ranks hides the hot rank). The fp32 dropless rows are not used: there the measured baseline
    multiplies with a per-expert cuBLAS loop (torch._grouped_mm takes bf16 only) and the
    simulation with the fused Triton kernels, so their X carries the two kernels' difference.

The rows it came from (ms; compute: the non-NCCL kernels' time, mean over the ranks; X = latency -
compute; bytes: the busiest rank's per collective, one direction; fp32 rows E 8 to 256, bf16 E 64;
two runs where two values stand):

    system, dtype                 latency              compute              X                    bytes
    moeshard, fp32                10.51 to 13.79       7.76 to 9.43         2.71 to 4.36         276.5 MB, 276.5 MB
    moeshard, bf16                3.568, 3.497         1.024, 1.035         2.54, 2.46           138.2 MB, 138.2 MB
    ep_capacity_cf1.25, fp32      9.46 to 10.41        8.29 to 8.88         1.13 to 1.64         86.4 MB twice
    ep_capacity_cf1.25, bf16      2.250, 2.233         1.194, 1.201         1.06, 1.03           43.2 MB twice
    ep_capacity_cf50, fp32 E 8    52.8                 48.5                 4.32                 0.55 GB twice
                           E 16   103.7                96.7                 6.96                 1.11 GB twice
                           E 32   206.1                192.5                13.55                2.21 GB twice
                           E 64+  320.5, 320.8, 326.1  299.9, 300.7, 305.8  20.59, 20.08, 20.33  3.46 GB twice
    ep_capacity_cf50, bf16        40.14                29.28                10.86                1.73 GB twice
    ep_dropless, bf16             4.602, 5.300         1.749 (simulated)    2.85, 3.55           115.6 MB twice

(E 64+: E 64, 128, 256; moeshard's counts and rank check add under 2 kB; CF 1.25 at E 256 moves 86.7 MB.)

What the values say: 330 to 350 GB/s per direction is about three quarters of NVLink 4's nominal
450 GB/s. The 0.42 ms per collective is far above NCCL's own latency (tens of microseconds): it
is what each collective cost in these runs beyond its bytes, ranks arriving at different times
and the host's launch gaps around it (moeshard's bf16 kernel timeline has about 1.3 ms of its
3.57 ms with no kernel running). The bf16 rows need no launch-gap term of their own: with the
latency per collective their X is fitted within 5% (moeshard 2.51 against 2.54 and 2.46,
CF 1.25 1.08 against 1.06 and 1.03, CF 50 10.75 against 10.86). The fit is for these shapes on
this machine; the model's residuals per row: docs/results.md.

bench/paper.py's --bandwidth-gbs, --collective-latency-ms and --host-sync-ms override the fitted
values; NVLink 4's nominal 450 GB/s per direction with no fixed costs (--bandwidth-gbs 450
--collective-latency-ms 0 --host-sync-ms 0) is an optimistic floor.
"""

from __future__ import annotations

from dataclasses import dataclass

GATHER, ALL_TO_ALL = "gather", "all_to_all"


@dataclass(frozen=True)
class Transfer:
    """One collective of a layer: what it moves, and through which kind of collective."""

    name: str
    kind: str  # GATHER or ALL_TO_ALL
    bytes: int  # the busiest rank's bytes in one direction


@dataclass(frozen=True)
class LinkModel:
    """Per-kind bandwidth, a fixed cost per collective and per mid-layer host sync."""

    gather_gbs: float
    all_to_all_gbs: float
    latency_ms: float
    host_sync_ms: float

    def transfer_ms(self, transfer: Transfer) -> float:
        bandwidth_gbs = self.gather_gbs if transfer.kind == GATHER else self.all_to_all_gbs
        return self.latency_ms + transfer.bytes / (bandwidth_gbs * 1e9) * 1e3

    def serial_ms(self, transfers: list[Transfer]) -> float:
        """The transfers one after another, none under computation."""
        return sum((self.transfer_ms(t) for t in transfers), 0.0)

    def __str__(self) -> str:
        return (f"all-gather/reduce-scatter {self.gather_gbs:g} GB/s, all-to-all {self.all_to_all_gbs:g} GB/s, "
                f"{self.latency_ms:g} ms per collective, {self.host_sync_ms:g} ms per mid-layer host sync")


H100_NVLINK = LinkModel(gather_gbs=329.0, all_to_all_gbs=349.0, latency_ms=0.416, host_sync_ms=1.29)
