"""No arbitrary unpickling when loading a checkpoint.

A dist checkpoint holds tensors (`*.distcp`, raw storage), `common.pt` (read by megatron with
`torch.load`, whose default in torch >= 2.6 is `weights_only=True`), our JSON files, and torch's
`.metadata`, which `torch.distributed.checkpoint`'s FileSystemReader reads with plain
`pickle.load`: a crafted file could run code on load. `restricted_metadata_loading()` makes that
one `pickle.load` accept only the classes the metadata is made of (torch's checkpoint metadata and
planner dataclasses, `torch.Size`, dtypes, the layout helper) and refuse anything else by name.
"""
from __future__ import annotations

import io
import pickle

import torch

from .. import patches

_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
            "torch.distributed.checkpoint.filesystem")
_BUILTINS = {"set", "frozenset", "slice", "tuple", "list", "dict", "bytearray"}


class UnsafeCheckpoint(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module in _MODULES:
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return super().find_class(module, name)
        if (module, name) == ("collections", "OrderedDict") or (module == "builtins" and name in _BUILTINS):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"checkpoint metadata refers to `{module}.{name}`, which is not part of a torch "
                               "checkpoint's metadata; refusing to unpickle it (the file may be crafted)")


class _SafePickle:
    """Stands in for the `pickle` module inside torch's checkpoint filesystem reader."""

    def __init__(self, real):
        self._real = real

    def load(self, file, **kw):
        return _RestrictedUnpickler(file, **kw).load()

    def loads(self, data, **kw):
        return _RestrictedUnpickler(io.BytesIO(data), **kw).load()

    def __getattr__(self, name):  # dump/dumps and the rest: the real module
        return getattr(self._real, name)


def restricted_metadata_loading():
    """During the block, torch's checkpoint reader unpickles `.metadata` with the restricted unpickler."""
    import torch.distributed.checkpoint.filesystem as fs

    real = fs.pickle._real if isinstance(fs.pickle, _SafePickle) else fs.pickle
    return patches.metadata_pickle(_SafePickle(real))
