"""Validation loss over the first batches of the held-out split (deterministic, file order)."""
from __future__ import annotations

from typing import Optional

import torch

from .microbatches import run_microbatches


@torch.no_grad()
def validation_loss(model, windows, micro_batch_size: int, iters: int, autocast_bf16: bool = False) -> Optional[float]:
    if windows is None:
        return None

    was_training = model.training
    model.eval()
    batches = list(windows.sequential(micro_batch_size, iters))
    total = run_microbatches(model, batches, forward_only=True, autocast_bf16=autocast_bf16)  # every pipeline stage takes part
    model.train(was_training)
    return total / len(batches) if batches else None
