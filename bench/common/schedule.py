"""When each rank finishes moeshard's source-rank schedule (option overlap="source_rank",
passes/data_parallel.py), from its computation and its transfers: an event-time simulation of N
ranks, each with a compute stream and a communication stream.

Rank r runs, as passes/data_parallel.py's _by_source_rank issues it:

    compute stream: prologue (sort its S rows by expert)  own block  block 1  ...  block N-1  epilogue
    comm stream:    counts  forward 1 ... forward N-1     return 1 ... return N-1

- The counts all-gather and every forward exchange are issued when the prologue ends; forward j
  sends rank r's sorted rows to rank r + j and receives rank r - j's (mod N).
- Block j (rank r - j's rows on rank r's FFN block) starts when the block before it has ended and
  forward j (and the counts) have arrived; return j, its partial sums back to rank r - j (and rank
  r + j's partial sums of rank r's rows in), is issued when block j ends.
- The comm stream runs its transfers in issue order, one at a time. A transfer is a collective: it
  ends `duration` after the last of its participants has started it (all ranks for the counts;
  ranks r - j, r, r + j for step j's exchanges: a rank that issues late holds its peers up).
- The epilogue (sum the N partial sums, scale by the routing weights, back to token order) starts
  when the last block has ended and the last return has arrived.

Each rank computes every rank's rows once, in its own order (rank r: block_ms_N[r], then
block_ms_N[r - 1], ...), so all ranks do the same total computation; only the order differs.
Reported per rank: when it finishes, its transfer time and the part of it during which its compute
stream ran (hidden), as bench/common/kernel_timeline.py reads them off a real GPU's timeline.

Times in ms; N ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from bench.common.kernel_timeline import Interval, intersection, merged, total


@dataclass(frozen=True)
class RankTimeline:
    """One rank's run of the schedule."""

    finish_ms: float
    compute: list[Interval]  # the compute stream's busy intervals
    transfers: list[Interval]  # each transfer's [start, end), in issue order: counts, forwards, returns

    @property
    def transfer_ms(self) -> float:
        return sum(end - start for start, end in self.transfers)

    @property
    def hidden_ms(self) -> float:
        """Transfer time during which the compute stream ran."""
        return total(intersection(merged(self.transfers), merged(self.compute)))


def source_rank_schedule(prologue_ms: float, block_ms_N: Sequence[float], epilogue_ms: float,
                         counts_ms: float, exchange_ms: float) -> list[RankTimeline]:
    """Every rank's timeline. block_ms_N[n]: rank n's S rows through one rank's FFN block (the
    same on every rank); counts_ms / exchange_ms: one counts all-gather / one step's exchange of S
    rows (forward or return) on the link."""
    N = len(block_ms_N)
    if N < 2:
        raise ValueError(f"the source-rank schedule needs 2 ranks or more, got {N}")
    free_N = [prologue_ms] * N  # when each comm stream is next free
    transfers_N: list[list[Interval]] = [[] for _ in range(N)]

    def collective(issued_N: list[float], duration: float, peers) -> list[float]:
        """One collective on every rank's comm stream; peers(r) are the ranks it waits for. Its ends."""
        start_N = [max(issued, free) for issued, free in zip(issued_N, free_N)]
        end_N = [max(start_N[p] for p in (r, *peers(r))) + duration for r in range(N)]
        for r, end in enumerate(end_N):
            transfers_N[r].append((end - duration, end))
            free_N[r] = end
        return end_N

    def step_peers(j: int):
        return lambda r: ((r - j) % N, (r + j) % N)

    counts_N = collective([prologue_ms] * N, counts_ms, lambda r: range(N))
    arrived_JN = [collective([prologue_ms] * N, exchange_ms, step_peers(j)) for j in range(1, N)]

    compute_N: list[list[Interval]] = [[] for _ in range(N)]
    computed_JN: list[list[float]] = [[0.0] * N for _ in range(1, N)]
    for r in range(N):
        compute_N[r] += [(0.0, prologue_ms), (prologue_ms, prologue_ms + block_ms_N[r])]
        now = prologue_ms + block_ms_N[r]
        for j in range(1, N):
            begin = max(now, arrived_JN[j - 1][r], counts_N[r])
            now = begin + block_ms_N[(r - j) % N]
            compute_N[r].append((begin, now))
            computed_JN[j - 1][r] = now
    returned_JN = [collective(computed_JN[j - 1], exchange_ms, step_peers(j)) for j in range(1, N)]

    timelines = []
    for r in range(N):
        begin = max(compute_N[r][-1][1], returned_JN[-1][r])
        compute_N[r].append((begin, begin + epilogue_ms))
        timelines.append(RankTimeline(begin + epilogue_ms, compute_N[r], transfers_N[r]))
    return timelines
