"""A dist_checkpointing save whose tensors are made while they are written (msg-grow streams).

megatron's torch_dist writer (`FileSystemWriterAsync.prepare_write_data`) resolves every tensor of
the state dict before the first byte is written, so what is saved must exist whole in memory. For
a save whose tensors are *computed* (offline growth, one layer at a time), `streamed_save(source)`
swaps in `StreamingWriter` for one save: the state dict holds placeholders (meta tensors: shapes
only), the plan is megatron's own (same `.metadata`, same files, loadable as any checkpoint), and
each tensor is asked of `source(key, like)` when its turn to be written comes, in this process,
in the order of this rank's plan (megatron groups the boxes of one key together) or, when the source has an
`order(item)`, in that order, then written and dropped.

`source` may run collectives (it loads from another checkpoint in lockstep with the other ranks):
writing happens in the main process, between megatron's collective planning and finalisation, and
every rank calls `source.finish()` after its last item so that all ranks run the same collectives.
Verified against megatron-core 0.16.1 (`strategies/torch.py` names the writer class it builds).
"""
from __future__ import annotations

import os
from functools import partial
from typing import Callable, List

import torch

from .. import patches


class _Queue:
    """In-process stand-in for the multiprocessing queues megatron's writer reports through."""

    def __init__(self):
        self.items = []

    def put(self, x):
        self.items.append(x)

    def get(self):
        return self.items.pop(0)

    def get_nowait(self):
        import queue

        if not self.items:
            raise queue.Empty
        return self.get()

    def task_done(self):
        pass


class _Resolved:
    """The write items' tensors, each made when the writer iterates to it."""

    def __init__(self, items: List, source):
        self.items, self.source = items, source

    def __iter__(self):
        for item in self.items:
            t = self.source(item.index.fqn, item)
            t = t.detach().to("cpu")
            if t.untyped_storage().size() != t.numel() * t.itemsize:
                t = t.clone()  # torch.save writes a view's whole storage
            yield item, t
            del t
        self.source.finish()


def _streaming_writer_class(source):
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
    from torch.distributed.checkpoint.planner import WriteItemType

    class StreamingWriter(FileSystemWriterAsync):
        def prepare_write_data(self, plan, planner) -> None:
            prefix = plan.storage_data.prefix
            items = list(plan.items)
            bytes_data = [(it, planner.resolve_data(it)) for it in items if it.type == WriteItemType.BYTE_IO]
            tensors = [it for it in items if it.type != WriteItemType.BYTE_IO]
            if hasattr(source, "order"):  # (the order the source makes them in cheaply, e.g. layer by layer)
                tensors.sort(key=source.order)
            name = f"{prefix}0{DEFAULT_SUFFIX}"  # one file per rank, written in plan order
            self.write_buckets = [(os.path.join(self.checkpoint_dir, name), name,
                                   (bytes_data, _Resolved(tensors, source)))]
            self.results_queue = _Queue()

        def get_save_function_and_args(self):
            return partial(self._write_here), None, []

        def _write_here(self) -> None:
            results, counts = _Queue(), _Queue()
            counts.put(0)
            transforms = [self.transforms] if hasattr(self, "transforms") else []
            FileSystemWriterAsync.write_preloaded_data(transforms, 0, self.write_buckets[0], results, counts, True)
            idx, out = results.get()
            if isinstance(out, Exception):
                raise out
            self.results_queue.put({idx: out})

    return StreamingWriter


def streamed_save(source: Callable):
    """During the block, dist_checkpointing saves write the tensors `source(key, item)` makes
    (`source.finish()` is called once this rank's last tensor is written)."""
    return patches.async_writer_class(_streaming_writer_class(source))


def placeholder(t: torch.Tensor) -> torch.Tensor:
    """A tensor with t's shape and dtype and no storage, for a state dict whose data comes later."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta")
