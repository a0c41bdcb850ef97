"""Ranks spawned on this machine, joined over gloo (or NCCL) through a free local port."""

from __future__ import annotations

import os
import socket
from typing import Callable

import torch.multiprocessing as mp


def spawn_local_ranks(rank_main: Callable, world: int, *args: object) -> None:
    """rank_main(rank, *args, init_method) on `world` processes of this machine, one thread each on CPU."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(rank_main, args=(*args, f"tcp://127.0.0.1:{_free_port()}"), nprocs=world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
