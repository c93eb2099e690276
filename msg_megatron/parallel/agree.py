"""Decisions every rank must make the same way, taken once and shared.

On several nodes each host has its own view of the filesystem (NFS attribute caches, a Lustre
client that lags), its own free memory, its own signals. A rank that decides alone (to resume
another step, or to refuse and exit) leaves the others with a different model or waiting in their
next collective until a timeout. So such decisions are either taken on global rank 0 and
broadcast (`on_rank0`), or checked on every rank and agreed (`first_error`): one collective at
start, none per step.
"""
from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def on_rank0(fn: Callable[[], T]) -> T:
    """fn() on global rank 0; its result, or the exception it raised, on every rank (one broadcast).
    Every rank must call it."""
    if _world() == 1:
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 (re-raised on every rank, this one included)
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def first_error(err: Optional[str]) -> Optional[str]:
    """Each rank's own error message (None: fine) in; the lowest rank's error, on every rank, out
    (one all_gather). Every rank must call it."""
    if _world() == 1:
        return err
    errs = [None] * _world()
    dist.all_gather_object(errs, err)
    return next((e for e in errs if e), None)


def differs_from_rank0(value, what: str) -> Optional[str]:
    """None when `value` (something each rank found on its own, before it could ask: the step
    directory `latest` names) is global rank 0's on every rank; else, on every rank, the message
    naming the first rank that differs. Every rank must call it (a broadcast and an all_gather)."""
    import socket

    ref = on_rank0(lambda: value)
    mine = None
    if value != ref:
        mine = (f"{what}: rank {dist.get_rank()} on host {socket.gethostname()} found {value!r}, global rank 0 "
                f"{ref!r} (every node must see the same files at the same path, on a shared filesystem; a "
                "save finishing meanwhile can also cause this: run again once it is done)")
    return first_error(mine)
