"""The peak bytes of live `meta` tensors while a block of code runs: what a path would hold on the
device, measured from the tensors it really creates and frees (the dry run's save and growth
transients), not from a formula.

Storages are followed, not tensors: a storage lives while any view of it, Python-visible or not,
does (megatron's buffers, `nn.Parameter` aliases), so each is held by a weak pointer to its C++
storage and its size is read when needed (`resize_(0)`, how megatron and the optimizer free a
buffer, shrinks it in place). Storages that exist when the block starts are found through the
garbage collector. The live total is refreshed only when an allocation could set a new peak
(the known sizes are upper bounds: storages die or shrink, they do not grow here), so the cost is
one weak-pointer check per new storage plus one sweep per new peak. The allocator's caching and
fragmentation on a real GPU come on top of this figure.
"""
from __future__ import annotations

import gc
from typing import Dict, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _Weak:
    __slots__ = ("cdata",)

    def __init__(self, storage):
        self.cdata = storage._weak_ref()

    def alive_bytes(self) -> int:
        """Bytes of the storage now (0 once freed)."""
        s = torch.UntypedStorage._new_with_weak_ptr(self.cdata)
        return 0 if s is None else s.nbytes()

    def __del__(self):
        torch.UntypedStorage._free_weak_ref(self.cdata)


class PeakMetaBytes(TorchDispatchMode):
    """`with PeakMetaBytes() as m: ...` then `m.start`, `m.peak`, `m.end`: live bytes of meta storages
    when the block began, at its highest, and when it ended."""

    def __init__(self):
        super().__init__()
        self._known: Dict[int, Tuple[_Weak, int]] = {}  # storage address -> (weak pointer, last size read)
        self._upper = 0
        self.start = self.peak = self.end = 0

    def __enter__(self):
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor) and obj.is_meta:  # (type: no proxy's __class__)
                self._see(obj)
        self.start = self.peak = self._refresh()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        gc.collect()
        self.end = self._refresh()
        return out

    def _see(self, t: torch.Tensor) -> bool:
        """Track t's storage; True when it is a storage not seen before."""
        st = t.untyped_storage()
        key = st._cdata
        old = self._known.get(key)
        if old is not None and old[0].alive_bytes() or old is not None and st.nbytes() == 0:
            return False
        n = st.nbytes()
        self._known[key] = (_Weak(st), n)  # (also: a new storage at a freed one's address)
        self._upper += n - (old[1] if old else 0)
        return True

    def _refresh(self) -> int:
        """The exact live total; forgets freed storages."""
        total = 0
        for key, (ref, _) in list(self._known.items()):
            n = ref.alive_bytes()
            if n == 0:
                del self._known[key]
            else:
                self._known[key] = (ref, n)
                total += n
        self._upper = total
        return total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        new = False
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_meta:
                new |= self._see(t)
        if new and self._upper > self.peak:
            self.peak = max(self.peak, self._refresh())
        return out
