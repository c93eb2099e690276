"""The activation memory autograd really holds: saved tensors, counted once per storage from when
they are saved until their last use in the backward (parameters excluded). Measures the formula
of training/sizes.activation_bytes on any device (tests/test_recompute.py, tools/bench_parallel.py)."""
from __future__ import annotations

import torch


class SavedActivations:
    """with SavedActivations(model) as meter: forward + backward; then meter.peak (bytes)."""

    def __init__(self, model: torch.nn.Module):
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._uses, self._size = {}, {}
        self.now = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key in self._params:
            return None, t
        if key not in self._uses:
            self._uses[key], self._size[key] = 0, t.untyped_storage().nbytes()
            self.now += self._size[key]
            self.peak = max(self.peak, self.now)
        self._uses[key] += 1
        return key, t

    def _unpack(self, saved):
        key, t = saved
        if key is not None:
            self._uses[key] -= 1
            if not self._uses[key]:
                del self._uses[key]
                self.now -= self._size.pop(key)
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)
