"""Ranks that disagree, fail or go away: every rank ends with an error that names the cause,
within the process group's timeout, and no configuration aborts a process.

Disagreements (weights, options, a rank running unsharded, batch shapes) are caught by the check
row every rank all-gathers before a sharded call (moeshard_compile.distributed.RankCheck), so they
run in the healthy pools of 2 and 4 ranks. A fault (a rank raising, or killed) breaks the group's
connections: each gets a pool of its own with a short timeout.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
import torch.distributed as dist

from moe_zoo import MoEConfig
from moeshard_compile import Report
from rank_pool import RankPool
from test_distributed import FAULT_MARGIN_S, FAULT_PG_TIMEOUT_S, _batch_BSD, _compile, _model

CFG = MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=9)


# ---------------------------------------------------------------------- rank side


def _call_until_error(options_by_rank: dict, seed_by_rank: dict, grad_rank: int = -1, calls: int = 2,
                      batch_by_rank: dict | None = None) -> str:
    """Compile with this rank's options, weights' seed and batch size, call `calls` times; the
    error's type and message."""
    rank = dist.get_rank()
    model = _model(CFG, torch.float64, seed=seed_by_rank.get(rank, 0))
    x_BSD = _batch_BSD(((batch_by_rank or {}).get(rank, 2), 5, CFG.d_model), torch.float64, seed=rank)
    compiled = _compile(model, Report(), **options_by_rank.get(rank, {}))
    try:
        with torch.set_grad_enabled(rank == grad_rank):
            for _ in range(calls):
                compiled(x_BSD)
    except Exception as error:  # noqa: BLE001 - the parent checks which
        return f"{type(error).__name__}: {error}"
    return "no error"


def _called_once():
    """This rank's model, its batch and the compiled model, called once (every rank agreed)."""
    model = _model(CFG, torch.float64)
    x_BSD = _batch_BSD((2, 5, CFG.d_model), torch.float64, seed=dist.get_rank())
    compiled = _compile(model, Report())
    with torch.no_grad():
        compiled(x_BSD)
    return model, x_BSD, compiled


def rank_changed_weights_then_recheck() -> str:
    """The first call agrees; then rank 1 alone changes a weight: its rebuilt copy has another
    checksum, which the next call's check sees."""
    model, x_BSD, compiled = _called_once()
    with torch.no_grad():
        if dist.get_rank() == 1:
            model.moe.experts[2].w_out.weight.mul_(1.01)
        try:
            compiled(x_BSD)
        except Exception as error:  # noqa: BLE001
            return f"{type(error).__name__}: {error}"
    return "no error"


def rank_fault(fault: str) -> tuple[str, float]:
    """Both ranks call once; then rank 1 raises in its own code before its second call, stops
    calling, or is killed, while rank 0 calls again. Rank 0: (its error, seconds from its call to it)."""
    _, x_BSD, compiled = _called_once()
    with torch.no_grad():
        if dist.get_rank() == 1:
            if fault == "killed":
                threading.Timer(2.0, os._exit, args=(1,)).start()  # after this task has reported
                return "will be killed", 0.0
            if fault == "fewer_calls":
                return "called once", 0.0
            raise ValueError("rank 1's own code failed")
        start = time.monotonic()
        try:
            compiled(x_BSD)
        except Exception as error:  # noqa: BLE001
            return f"{type(error).__name__}: {error}", time.monotonic() - start
    return "no error", time.monotonic() - start


# ---------------------------------------------------------------------- parent side


def _every_rank_raises(pool: RankPool, expected: str, **kwargs) -> list[str]:
    results = pool.run(_call_until_error, timeout_s=90, **kwargs)
    for rank, message in enumerate(results):
        assert message.startswith("RankMismatchError") and expected in message, f"rank {rank}: {message}"
    return results


def test_ranks_holding_different_weights_are_named(world_4):
    messages = _every_rank_raises(world_4, "the expert weights of ranks [2] differ from rank 0's",
                                  options_by_rank={}, seed_by_rank={2: 7})
    assert all(m.startswith(f"RankMismatchError: moeshard: rank {r}: the ranks disagree") for r, m in enumerate(messages))


@pytest.mark.parametrize(("option", "values", "shown"), [
    ("input_mode", ("data_parallel", "replicated"), "option 'input_mode': rank 0: 'data_parallel', rank 1: 'replicated'"),
    ("comm_chunks", (1, 2), "option 'comm_chunks': rank 0: 1, rank 1: 2"),
    ("overlap", ("none", "source_rank"), "option 'overlap': rank 0: 'none', rank 1: 'source_rank'"),
    ("check_inputs", (True, False), "option 'check_inputs': rank 0: True, rank 1: False"),
    ("dropless", (False, True), "option 'dropless': rank 0: False, rank 1: True"),
])
def test_options_that_differ_between_ranks_are_named(world_2, option, values, shown):
    """Each of these used to abort the process inside gloo or hang until its timeout."""
    _every_rank_raises(world_2, shown, options_by_rank={r: {option: v} for r, v in enumerate(values)}, seed_by_rank={})


def test_a_rank_running_unsharded_is_named(world_2):
    """Rank 1 calls with autograd on, so its graph is not rewritten: both ranks say so at once."""
    messages = _every_rank_raises(world_2, "MoE regions sharded: rank 0: 1, rank 1: 0",
                                  options_by_rank={}, seed_by_rank={}, grad_rank=1)
    assert "This rank left 1 MoE regions unsharded" in messages[1]


def test_options_differing_in_check_inputs_false_are_caught_at_the_first_call(world_4):
    _every_rank_raises(world_4, "option 'comm_chunks': rank 0: 1, rank 1: 1, rank 2: 1, rank 3: 3",
                       options_by_rank={r: {"check_inputs": False, "comm_chunks": 3 if r == 3 else 1} for r in range(4)},
                       seed_by_rank={}, calls=1)


def test_batch_shapes_that_differ_on_four_ranks_are_named(world_4):
    _every_rank_raises(world_4, "rank 0: [2, 5, 8], [4]; rank 1: [2, 5, 8], [4]; rank 2: [2, 5, 8], [4]; rank 3: [4, 5, 8], [4]",
                       options_by_rank={}, seed_by_rank={}, batch_by_rank={3: 4})


def test_a_weight_change_on_one_rank_is_checked_again(world_2):
    for rank, message in enumerate(world_2.run(rank_changed_weights_then_recheck, timeout_s=90)):
        assert message.startswith("RankMismatchError") and "the expert weights of ranks [1]" in message, (rank, message)


@pytest.mark.parametrize("fault", ["raised", "fewer_calls", "killed"])
def test_a_failed_rank_ends_the_other_with_a_named_error(fault):
    pool = RankPool(world_size=2, pg_timeout_s=FAULT_PG_TIMEOUT_S)
    try:
        waiting, failed = pool.run_outcomes(rank_fault, timeout_s=FAULT_PG_TIMEOUT_S + FAULT_MARGIN_S + 30, fault=fault)
    finally:
        pool.close(graceful=False)
    if fault == "raised":
        assert failed.raised("ValueError"), failed
    else:
        assert failed.ok and failed.value[0] == {"killed": "will be killed", "fewer_calls": "called once"}[fault], failed
    assert waiting.ok, waiting.traceback
    message, elapsed_s = waiting.value
    assert message.startswith("CollectiveFailedError: moeshard: rank 0: the ranks' check before a sharded call failed "
                              f"(process group timeout {FAULT_PG_TIMEOUT_S:g} s): another rank did not take part"), message
    cause = "Connection closed by peer" if fault == "killed" else "Timed out"
    assert cause in message and message.count("moeshard:") == 1, message
    assert elapsed_s <= FAULT_PG_TIMEOUT_S + FAULT_MARGIN_S, elapsed_s
    print(f"\n{fault}: rank 0 ended after {elapsed_s:.2f} s: {message[:160]}")
