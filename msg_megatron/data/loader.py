"""Synthetic token windows (`data.corpus=synthetic`) and the validation-data check. Real data goes
through megatron's datasets (gpt_data.py)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def validation_problem(windows, micro_batch_size: int, iters: int) -> Optional[str]:
    """Why a validation loss cannot be computed from `windows` (None: it can)."""
    if windows is None:
        return "there is no validation split"
    if iters < 1:
        return f"eval_iters={iters} asks for no batches"
    if windows.num_samples < micro_batch_size:
        return (f"the validation split holds {windows.num_samples} windows of {windows.seq_length} tokens, fewer "
                f"than one micro-batch (train.micro_batch_size={micro_batch_size}); use more validation data "
                "(data.valid_fraction, or data.split with data.paths) or a smaller micro-batch")
    return None


class SyntheticWindows:
    """Uniformly random tokens with gpt_data.Samples' interface (`data.corpus=synthetic`): sample i
    is drawn from its own seeded generator, so batches are reproducible and resumable. For
    throughput and MFU benchmarks (megatron's --mock-data); the loss cannot fall below ln(vocab)."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int = 1234, num_samples: int = 1 << 30):
        self.vocab_size, self.seq_length, self.seed, self.num_samples = vocab_size, seq_length, seed, num_samples

    def window(self, sample: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, sample))
        return rng.integers(0, self.vocab_size, self.seq_length + 1, dtype=np.int64)

    def batch(self, first_sample: int, size: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.window(first_sample + k) for k in range(size)]))

    def sequential(self, size: int, max_batches: int):
        for b in range(max_batches):
            yield self.batch(self.num_samples + b * size, size)  # disjoint from training samples
