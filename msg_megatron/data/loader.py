"""Fixed-length training windows over a megatron indexed dataset, resumable by sample count.

The `.bin` file is the concatenation of all documents (each ending in EOD), so the token stream
is memory-mapped directly and cut into windows of seq_length + 1 tokens. Each epoch visits the
windows in a seeded permutation; the only state is the number of samples consumed.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from .errors import DataError


class TokenWindows:
    def __init__(self, prefix: str, seq_length: int, seed: int = 1234):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if not (os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")):
            raise DataError(f"indexed dataset `{prefix}.bin/.idx` not found")
        if os.path.getsize(prefix + ".bin") == 0:  # (numpy cannot map an empty file)
            raise DataError(f"`{prefix}.bin` holds no tokens (an empty split: the corpus has too few "
                            "documents to hold some out); use a larger corpus")
        ds = IndexedDataset(prefix, mmap=True)
        self.tokens = np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r")
        self.seq_length, self.seed = seq_length, seed
        self.num_samples = (len(self.tokens) - 1) // seq_length
        if self.num_samples < 1:
            raise DataError(f"`{prefix}` holds {len(self.tokens)} tokens, fewer than one window of "
                            f"{seq_length + 1}; use more data or a shorter model.seq_length")
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng(self.seed + 7919 * epoch)
            self._perm, self._perm_epoch = rng.permutation(self.num_samples), epoch
        return self._perm

    def window(self, sample: int) -> np.ndarray:
        epoch, i = divmod(sample, self.num_samples)
        start = int(self._order(epoch)[i]) * self.seq_length
        return np.asarray(self.tokens[start:start + self.seq_length + 1], dtype=np.int64)

    def batch(self, first_sample: int, size: int) -> torch.Tensor:
        """Samples first_sample .. first_sample+size-1 as a [size, seq_length + 1] tensor."""
        return torch.from_numpy(np.stack([self.window(first_sample + k) for k in range(size)]))

    def sequential(self, size: int, max_batches: int):
        """Validation batches in file order (no shuffling), at most `max_batches`."""
        n = min(self.num_samples // size, max_batches)
        for b in range(n):
            rows = [np.asarray(self.tokens[(b * size + k) * self.seq_length:
                                           (b * size + k + 1) * self.seq_length + 1], dtype=np.int64)
                    for k in range(size)]
            yield torch.from_numpy(np.stack(rows))


def validation_problem(windows, micro_batch_size: int, iters: int) -> Optional[str]:
    """Why a validation loss cannot be computed from `windows` (None: it can)."""
    if windows is None:
        return "there is no validation split"
    if iters < 1:
        return f"eval_iters={iters} asks for no batches"
    if windows.num_samples < micro_batch_size:
        return (f"the validation split holds {windows.num_samples} windows of {windows.seq_length} tokens, fewer "
                f"than one micro-batch (train.micro_batch_size={micro_batch_size}); use more validation data "
                "(data.valid_fraction) or a smaller micro-batch")
    return None


class SyntheticWindows:
    """Uniformly random tokens with the TokenWindows interface (`data.corpus=synthetic`): sample i
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
