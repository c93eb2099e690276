"""Global gradient norm and clipping without a host sync.

megatron-core 0.16.1's `clip_grad_norm` (`get_grad_norm_fp32` + `clip_grad_by_total_norm_fp32`)
turns the all-reduced squared norm into a Python float (`.item()`: the host waits for the device
every step) and decides on the host whether to scale. This is the same arithmetic kept on the
device: megatron's gradients for the norm (duplicates under TP and the tied embedding's copy
counted once, the distributed optimizer's slices), its L2 kernel (apex's, or the local fallback),
the sum of squares over its gradient-statistics group, the square root in float64 (as Python's
float would), coefficient `max_norm / (norm + 1e-6)`, and the gradients scaled by
`min(coefficient, 1)` in float32 (megatron skips the scaling at >= 1; scaling by exactly 1 changes
nothing). The norm stays a device tensor until the trainer logs it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..parallel import device


def clip_grad_norm_on_device(opt, max_norm: float) -> torch.Tensor:
    """Clip `opt`'s (a megatron optimizer's) main gradients to `max_norm` by their global L2 norm;
    returns the norm before clipping, a float64 device tensor. max_norm <= 0: no clipping, and as
    in megatron no norm either (0; no collective)."""
    from megatron.core.optimizer.clip_grads import l2_norm_impl, multi_tensor_applier

    dev = device()
    if max_norm <= 0:
        return torch.zeros((), dtype=torch.float64, device=dev)
    params = opt.get_parameters()
    grads_for_norm = opt.get_main_grads_for_grad_norm() if params else []
    if grads_for_norm:
        norm, _ = multi_tensor_applier(l2_norm_impl, torch.zeros(1, dtype=torch.int, device=dev),
                                       [grads_for_norm], False)
    else:
        norm = torch.zeros(1, dtype=torch.float, device=dev)
    total = norm ** 2
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=opt.get_grad_stats_parallel_group())
    total_norm = total.double().reshape(()) ** 0.5
    if params:
        grads = [p.grad.detach() for p in params if p.grad is not None]
        scale = torch.clamp(max_norm / (total_norm + 1.0e-6), max=1.0).float()
        torch._foreach_mul_(grads, scale)
    return total_norm
