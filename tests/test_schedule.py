"""bench/common/schedule.py: the source-rank schedule's event times, against cases worked by hand
and the bounds any schedule of this work must meet."""

import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench`
from bench.common.schedule import source_rank_schedule  # noqa: E402


def flat(intervals):
    return [time for interval in intervals for time in interval]


def test_without_transfer_time_the_ranks_just_compute():
    for t in source_rank_schedule(0.5, [2.0, 1.0, 3.0, 1.5], 0.25, 0.0, 0.0):
        assert t.finish_ms == pytest.approx(0.5 + 7.5 + 0.25)
        assert t.transfer_ms == 0 and t.hidden_ms == 0


def test_without_computation_the_transfers_run_back_to_back():
    N, counts_ms, exchange_ms = 4, 0.1, 1.0
    for t in source_rank_schedule(0.0, [0.0] * N, 0.0, counts_ms, exchange_ms):
        assert t.finish_ms == pytest.approx(counts_ms + 2 * (N - 1) * exchange_ms)
        assert t.transfer_ms == pytest.approx(counts_ms + 2 * (N - 1) * exchange_ms) and t.hidden_ms == 0


def test_short_transfers_hide_but_the_last_return():
    """Each block longer than the counts and an exchange: every forward runs under the own rows,
    every return but the last under the next block; only the last return shows."""
    N, prologue, epilogue, counts, exchange = 4, 0.2, 0.3, 0.05, 0.1
    blocks = [1.0, 1.2, 0.9, 1.1]
    for t in source_rank_schedule(prologue, blocks, epilogue, counts, exchange):
        assert t.finish_ms == pytest.approx(prologue + sum(blocks) + exchange + epilogue)
        assert t.hidden_ms == pytest.approx(counts + (2 * N - 3) * exchange)


def test_a_late_peer_holds_a_return_up():
    """N = 3, source rank 0's rows the slow ones: rank 2 computes its step-1 block early, but its
    step-1 return waits until its peers (ranks 0 and 1, busy with rank 0's and rank 2's rows) issue
    theirs at 6 ms. Worked by hand: every rank finishes at 7.5 ms."""
    timelines = source_rank_schedule(0.0, [5.0, 1.0, 1.0], 0.0, 0.0, 0.5)
    assert [t.finish_ms for t in timelines] == pytest.approx([7.5, 7.5, 7.5])
    rank2 = timelines[2]
    assert flat(rank2.compute) == pytest.approx(flat([(0, 0), (0, 1), (1, 2), (2, 7), (7.5, 7.5)]))
    assert flat(rank2.transfers) == pytest.approx(flat([(0, 0), (0, 0.5), (0.5, 1.0), (6.0, 6.5), (7.0, 7.5)]))
    assert rank2.hidden_ms == pytest.approx(1.5)  # both forwards, and return 1 under rank 0's rows


@settings(max_examples=200, deadline=None)
@given(N=st.integers(2, 6), prologue=st.floats(0, 2), epilogue=st.floats(0, 2), counts=st.floats(0, 1),
       exchange=st.floats(0, 3), data=st.data())
def test_bounds(N, prologue, epilogue, counts, exchange, data):
    """No rank finishes before its own computation or its own transfers could, nor after both run
    one after the other; hidden time lies within the transfer time."""
    blocks = data.draw(st.lists(st.floats(0, 5), min_size=N, max_size=N))
    compute = prologue + sum(blocks) + epilogue
    transfers = counts + 2 * (N - 1) * exchange
    for t in source_rank_schedule(prologue, blocks, epilogue, counts, exchange):
        assert t.transfer_ms == pytest.approx(transfers)
        assert max(compute, prologue + transfers + epilogue) - 1e-9 <= t.finish_ms <= compute + transfers + 1e-9
        assert -1e-9 <= t.hidden_ms <= t.transfer_ms + 1e-9


def test_one_rank_has_no_schedule():
    with pytest.raises(ValueError, match="2 ranks or more"):
        source_rank_schedule(0.0, [1.0], 0.0, 0.0, 0.0)
