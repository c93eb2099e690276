"""The one place where megatron-core is patched to run without CUDA (gloo backend).

megatron-core 0.16.1 assumes CUDA in a few spots. Each patch below is applied only when
`torch.cuda.is_available()` is False, is idempotent, and names what it replaces and why.
On a GPU machine nothing here runs.

Measured needs on megatron-core 0.16.1 (see ../shared/DESIGN.md):
- `torch.cuda.current_device()` is used as `device=` of small status tensors that
  dist_checkpointing broadcasts after a save (strategies/state_dict_saver.py): return "cpu" so
  those tensors live where gloo can send them.
- `torch.cuda.synchronize()` in timers/checkpointing: a no-op on CPU.
- The tensor-parallel RNG tracker stores CUDA RNG states: keep CPU generator states instead.
- The pipeline schedules (pipeline_parallel/schedules.py) create a token counter with a hard-coded
  `device="cuda"`: their module-level `torch` is replaced by a view of torch whose tensor factories
  map a CUDA device to the CPU. (The p2p buffers use `torch.cuda.current_device()`, patched above.)
"""
from __future__ import annotations

import torch

_APPLIED = False


def apply_cpu_patches() -> bool:
    """Patch megatron-core for CPU/gloo. Returns True if patches are (now) active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None

    from megatron.core.tensor_parallel import random as tp_random

    # The CUDA RNG tracker forks CUDA generator states around dropout in TP regions. On CPU the
    # only generator is the CPU one, so fork that instead (same semantics: the region's draws
    # come from a named, separately seeded stream and the default stream is restored after).
    def _set_cuda_rng_state(new_state, device=-1, graph_safe=False):  # noqa: ARG001
        torch.set_rng_state(new_state)

    tp_random._set_cuda_rng_state = _set_cuda_rng_state
    if hasattr(tp_random, "_get_cuda_rng_state"):
        tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()

    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchOnCpu(torch)
    _APPLIED = True
    return True


class _TorchOnCpu:
    """`torch` for a module that hard-codes `device="cuda"` in tensor factories: same attributes,
    but zeros/ones/empty/full/tensor given a CUDA device allocate on the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor")

    def __init__(self, module):
        self._torch = module

    def __getattr__(self, name):
        attr = getattr(self._torch, name)
        if name not in self._FACTORIES:
            return attr

        def factory(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory
