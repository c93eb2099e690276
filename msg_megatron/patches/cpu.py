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
- The optimizers (optimizer/optimizer.py, distrib_optimizer.py, clip_grads.py, and the local
  multi-tensor L2 norm in core/utils.py that they fall back to without apex) allocate small
  status tensors with `device='cuda'`: the same view of torch. They also sort parameters by
  `param.type() == 'torch.cuda.FloatTensor'` (or Half/BFloat16) and assert that gradients are CUDA
  floats: the functions that do so run with `Tensor.type()` reporting a CPU tensor's type under
  its CUDA name (only the no-argument form; only while those functions run).
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
    import warnings

    # (megatron's TP linears advise CUDA_DEVICE_MAX_CONNECTIONS=1, a CUDA stream setting: nothing on a CPU)
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")

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

    from megatron.core import utils as core_utils
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer as optimizer_mod

    for mod in (optimizer_mod, distrib_optimizer, clip_grads, core_utils):
        mod.torch = _TorchOnCpu(torch)
    distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups = staticmethod(
        _cuda_type_names(distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups))
    distrib_optimizer.DistributedOptimizer.__init__ = _cuda_type_names(distrib_optimizer.DistributedOptimizer.__init__)
    optimizer_mod.Float16OptimizerWithFloat16Params.__init__ = _cuda_type_names(
        optimizer_mod.Float16OptimizerWithFloat16Params.__init__)
    clip_grads.clip_grad_by_total_norm_fp32 = _cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    optimizer_mod.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32
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


_CUDA_NAMES = {f"torch.{where}{kind}Tensor": f"torch.cuda.{kind}Tensor"
               for where in ("", "meta.") for kind in ("Float", "Half", "BFloat16")}  # (meta: msg-plan --dry-run)


def _cuda_type_names(fn):
    """Run `fn` with `tensor.type()` (no arguments) naming CPU float tensors as their CUDA types."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        original = torch.Tensor.type

        def type_(self, *a, **k):
            name = original(self, *a, **k)
            return _CUDA_NAMES.get(name, name) if not a and not k else name

        torch.Tensor.type = type_
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = original

    return wrapper
