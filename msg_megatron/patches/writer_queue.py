"""megatron's checkpoint writers report to a queue served by a process that survives the preemption signals.

`dist_checkpointing.strategies.filesystem_async._get_write_results_queue` serves the writers' results
from a multiprocessing Manager: a spawned server process that megatron starts at the first save and
keeps for the process's lifetime, in the trainer's process group, with the default signal actions.
torchrun forwards SIGTERM to each worker's whole process group (`os.killpg`), so that server died
with the signal that asked the trainer to save, and the preemption save then failed with
BrokenPipeError: no checkpoint, exit 1. Here the queue comes from a Manager whose server ignores
SIGTERM, SIGUSR1 and SIGINT (they are the trainer's: it saves and exits 75); it still ends with the
trainer (the Manager's finalizer at exit, or SIGKILL of the group).
"""
from __future__ import annotations

import multiprocessing as mp
import signal
from multiprocessing.managers import SyncManager

_MANAGER = None  # (kept referenced: a collected Manager shuts its server down)


def _ignore_preemption_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def install_writer_queue() -> None:
    """Give megatron's writers a results queue served by a signal-proof Manager (once per process,
    before its first save; a no-op once megatron has its queue)."""
    global _MANAGER
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    _MANAGER = SyncManager(ctx=mp.get_context("spawn"))
    _MANAGER.start(initializer=_ignore_preemption_signals)
    filesystem_async._results_queue = _MANAGER.Queue()
