"""Functional collectives in the rewritten graph: issued early, waited for late.

Each collective is two nodes, its start and its `wait_tensor`; Inductor schedules other work
between them, which is how the lowering hides communication behind computation.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .emit import Emitter

c10d = torch.ops._c10d_functional


def collective(emit: Emitter, op, *args, name: str) -> fx.Node:
    """A functional collective and its wait, one after the other."""
    return wait(emit, start(emit, op, *args, name=name), name=name)


def start(emit: Emitter, op, *args, name: str) -> fx.Node:
    """Issue a functional collective; it runs on the communication stream until its wait."""
    return emit.fn(op, *args, name=f"{name}_start")


def wait(emit: Emitter, started: fx.Node, name: str) -> fx.Node:
    return emit.fn(c10d.wait_tensor.default, started, name=name)
