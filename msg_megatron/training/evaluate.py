"""Validation loss over the first batches of the held-out split (deterministic, file order)."""
from __future__ import annotations

from typing import Optional

import torch


@torch.no_grad()
def validation_loss(model, windows, micro_batch_size: int, iters: int) -> Optional[float]:
    if windows is None:
        return None
    was_training = model.training
    model.eval()
    losses = [float(model(b[:, :-1], b[:, 1:]).mean()) for b in windows.sequential(micro_batch_size, iters)]
    model.train(was_training)
    return sum(losses) / len(losses) if losses else None
