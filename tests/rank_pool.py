"""A persistent pool of ranks (gloo on CPU, or NCCL with one GPU each), for tests that need real
torch.distributed processes.

Starting a rank costs seconds (importing torch and transformers on 2 cores), so a pool lives for
a whole test module: the parent sends one task (an importable function and its kwargs) to every
rank and gathers each rank's return value or formatted exception. Every wait in the parent has
a deadline; a pool that misses one (a hung collective, a dead rank) is killed and the test
fails, so nothing can hang CI.

    pool = RankPool(world_size=2)                   # gloo on CPU; RankPool(4, device="cuda"): NCCL, rank r on cuda:r
    outcomes = pool.run_outcomes(some_module.task, seed=0)   # one RankOutcome per rank
    values = pool.run(some_module.task, seed=0)              # values, or AssertionError naming each failed rank
    pool.close()

This module is imported by the spawned workers before torch: keep its top level light.
"""

from __future__ import annotations

import importlib
import itertools
import os
import pickle
import queue
import shutil
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

STARTUP_TIMEOUT_S = 180.0  # N workers importing torch + transformers on 2 shared cores
TASK_TIMEOUT_S = 120.0
_POLL_S = 0.5  # how often a waiting parent checks that its workers are alive, and workers their parent
_LOG_TAIL_CHARS = 3000


@dataclass
class RankOutcome:
    """What one rank's task did: its return value, or the exception it raised."""

    rank: int
    value: Any = None
    error: str | None = None  # the exception's type name; None when the task returned
    error_types: tuple[str, ...] = ()  # the names of the exception's classes (its MRO)
    message: str = ""
    traceback: str = ""
    elapsed_s: float = 0.0  # the whole task, measured in the worker

    @property
    def ok(self) -> bool:
        return self.error is None

    def raised(self, type_name: str) -> bool:
        """Whether the exception is a `type_name` (its class or a base class has that name)."""
        return type_name in self.error_types


class PoolError(AssertionError):
    """The pool missed a deadline or lost a rank; it has been killed."""


class RankPool:
    """`world_size` spawned processes, each rank of one process group, looping on tasks.

    device "cpu": gloo; "cuda": NCCL, rank r on cuda:r. pg_timeout_s is the process group's
    timeout: how long a collective waits for missing ranks.
    """

    def __init__(self, world_size: int, pg_timeout_s: float = 60.0, startup_timeout_s: float = STARTUP_TIMEOUT_S,
                 device: str = "cpu"):
        import torch.multiprocessing as mp  # the parent has torch already; the workers import it after setting env

        self.world_size, self.pg_timeout_s = world_size, pg_timeout_s
        self.broken: str | None = None
        self._task_ids = itertools.count()
        self._dir = tempfile.mkdtemp(prefix=f"moeshard-{device}{world_size}-")
        context = mp.get_context("spawn")
        self._tasks = [context.Queue() for _ in range(world_size)]
        self._results = context.Queue()
        port = _free_port()
        self._procs = [
            context.Process(
                target=_worker_main,
                args=(rank, world_size, port, pg_timeout_s, device, self._dir, os.getpid(), self._tasks[rank],
                      self._results),
                name=f"{device}-rank{rank}",
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for proc in self._procs:
            proc.start()
        # Two phases: every rank imports first, then all rendezvous together, so a short
        # pg_timeout_s is not spent waiting for a slower rank's imports.
        deadline = time.monotonic() + startup_timeout_s
        self._gather("imported", deadline, "importing torch")
        for tasks in self._tasks:
            tasks.put("init")
        self._gather("ready", deadline, "init_process_group")

    # ------------------------------------------------------------------ tasks

    def run_outcomes(self, fn: Callable, timeout_s: float = TASK_TIMEOUT_S, **kwargs) -> list[RankOutcome]:
        """Run `fn(**kwargs)` on every rank; each rank's outcome, by rank.

        `fn` must be a module-level function of an importable module (workers import it by name).
        """
        if self.broken:
            raise PoolError(f"the rank pool (world {self.world_size}) was killed before this task: {self.broken}")
        target = f"{fn.__module__}:{fn.__qualname__}"
        task_id = next(self._task_ids)
        for tasks in self._tasks:
            tasks.put((task_id, target, kwargs))
        outcomes = self._gather(task_id, time.monotonic() + timeout_s, target)
        return [outcomes[rank] for rank in range(self.world_size)]

    def run(self, fn: Callable, timeout_s: float = TASK_TIMEOUT_S, **kwargs) -> list[Any]:
        """Run `fn(**kwargs)` on every rank and return the values by rank; fail naming each failed rank."""
        outcomes = self.run_outcomes(fn, timeout_s, **kwargs)
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise AssertionError(
                f"{len(failed)} of {self.world_size} ranks failed in {fn.__qualname__}:\n"
                + "\n".join(f"--- rank {o.rank}:\n{o.traceback}" for o in failed)
            )
        return [o.value for o in outcomes]

    def _gather(self, tag, deadline: float, what: str) -> dict[int, Any]:
        """One `tag` message from every rank before `deadline`, or kill the pool and fail."""
        got: dict[int, Any] = {}
        while len(got) < self.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(self.world_size)) - set(got))
                self._kill(f"ranks {missing} did not finish {what} in time")
            try:
                got_tag, rank, payload = self._results.get(timeout=min(_POLL_S, remaining))
            except queue.Empty:
                got_tag = None
            if got_tag is None:
                dead = [r for r, p in enumerate(self._procs) if r not in got and not p.is_alive()]
                if dead:
                    self._kill(f"ranks {dead} died during {what} (exit codes {[self._procs[r].exitcode for r in dead]})")
                continue
            if got_tag == "startup_failed":
                self._kill(f"rank {rank} failed to start:\n{payload}")
            if got_tag == tag:
                got[rank] = payload
        return got

    # ------------------------------------------------------------------ teardown

    def _kill(self, reason: str) -> None:
        logs = "\n".join(f"--- rank {r} log (tail):\n{self._log_tail(r)}" for r in range(self.world_size))
        self.broken = reason
        self.close(graceful=False)
        raise PoolError(f"rank pool (world {self.world_size}): {reason}; pool killed\n{logs}")

    def _log_tail(self, rank: int) -> str:
        try:
            with open(os.path.join(self._dir, f"rank{rank}.log"), errors="replace") as log:
                return log.read()[-_LOG_TAIL_CHARS:]
        except OSError:
            return "(no log)"

    def close(self, graceful: bool = True) -> None:
        """Stop every worker (asking first when `graceful`), within a few seconds in any case."""
        if graceful and not self.broken:
            for tasks in self._tasks:
                tasks.put(None)
            for proc in self._procs:
                proc.join(timeout=10)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5)
        for q in (*self._tasks, self._results):
            q.cancel_join_thread()  # never block interpreter exit on an undelivered message
            q.close()
        self.broken = self.broken or "closed"
        shutil.rmtree(self._dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------- worker side


def _worker_main(rank, world_size, port, pg_timeout_s, device, directory, parent_pid, tasks, results) -> None:
    """A rank: set its environment, import, join the group, then run tasks until told to stop."""
    log_fd = os.open(os.path.join(directory, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.environ.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TORCHINDUCTOR_COMPILE_THREADS="1",  # no compile-worker pool per rank on 2 cores
        TORCHINDUCTOR_CACHE_DIR=os.path.join(directory, f"inductor-rank{rank}"),
    )
    try:
        import torch
        import torch.distributed as dist
        import transformers  # noqa: F401  (paid once here rather than inside the first task's timeout)

        import moeshard_compile  # noqa: F401

        torch.set_num_threads(1)
        results.put(("imported", rank, None))
        if _next_task(tasks, parent_pid) != "init":
            return
        if device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            "nccl" if device == "cuda" else "gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}",
            timeout=timedelta(seconds=pg_timeout_s),
        )
        results.put(("ready", rank, None))
    except BaseException:
        results.put(("startup_failed", rank, traceback.format_exc()))
        return
    while (task := _next_task(tasks, parent_pid)) is not None:
        task_id, target, kwargs = task
        results.put((task_id, rank, _run_task(rank, target, kwargs)))
    sys.stdout.flush()
    sys.stderr.flush()
    # skip gloo's teardown, which now and then corrupts the heap ("malloc(): unaligned tcache chunk
    # detected"), and the interpreter's teardown of torch and Dynamo state: seconds per rank on 2 cores
    os._exit(0)


def _next_task(tasks, parent_pid: int):
    """The next message; None (stop) once the parent is gone, so no worker outlives a killed run."""
    while True:
        try:
            return tasks.get(timeout=_POLL_S)
        except queue.Empty:
            if os.getppid() != parent_pid:
                return None


def _run_task(rank: int, target: str, kwargs: dict) -> RankOutcome:
    import torch

    start = time.monotonic()
    try:
        torch._dynamo.reset()  # every task compiles from scratch, as the tests in one process do
        module_name, name = target.split(":")
        value = getattr(importlib.import_module(module_name), name)(**kwargs)
        pickle.dumps(value)  # fail here, as this task's error, rather than silently in the queue's thread
        return RankOutcome(rank, value=value, elapsed_s=time.monotonic() - start)
    except BaseException as error:
        return RankOutcome(
            rank,
            error=type(error).__name__,
            error_types=tuple(cls.__name__ for cls in type(error).__mro__),
            message=str(error),
            traceback=traceback.format_exc(),
            elapsed_s=time.monotonic() - start,
        )
