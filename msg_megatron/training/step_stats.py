"""Per-step loss and gradient norm kept on the device, read at the log interval.

Reading a loss on the host makes the host wait for the device, and reducing it over data-parallel
ranks is a collective; a training step needs neither. Each step leaves its loss (the last pipeline
stage's sum over micro-batches) and gradient norm on the device here. At a log step (and before a
save) `flush` reads all pending steps at once: one all-reduce over the whole world, in which the
first tensor-parallel rank of each last-stage replica contributes its loss, global rank 0 the
(already global) gradient norm, every rank its preemption flag and everyone else zeros, then one
copy to the host. Every rank gets every pending step's loss, so a non-finite loss stops all ranks
at the same check, naming its step, at most train.log_interval steps late.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist


class PendingSteps:
    def __init__(self, device: torch.device):
        from megatron.core import parallel_state as ps

        self.device = device
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.grad_norm_owner = not dist.is_initialized() or dist.get_rank() == 0
        self.loss_owner = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        self.pending: List[Tuple[int, int, torch.Tensor, torch.Tensor]] = []

    def add(self, step: int, n_micro: int, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """One step's loss (sum of its micro-batch means on this rank) and gradient norm, on the device."""
        self.pending.append((step, n_micro, loss_sum, grad_norm))

    def __len__(self) -> int:
        return len(self.pending)

    def flush(self, signalled: bool) -> Tuple[List[Tuple[int, float, float]], bool]:
        """[(step, loss, grad_norm)] of the pending steps, and whether any rank was signalled."""
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        parts = []
        for _, _, loss, norm in self.pending:
            parts += [loss.double() if self.loss_owner else zero, norm.double() if self.grad_norm_owner else zero]
        parts.append(torch.tensor(1.0 if signalled else 0.0, dtype=torch.float64, device=self.device))
        vec = torch.stack(parts)
        if self.world > 1:
            dist.all_reduce(vec)
        values = vec.tolist()  # the one host copy
        rows = [(step, values[2 * i] / n_micro, values[2 * i + 1])
                for i, (step, n_micro, _, _) in enumerate(self.pending)]
        self.pending = []
        return rows, values[-1] > 0
