"""BERT's heads on the encoder's output (model.family=bert): the masked-LM transform before the tied
decoder, and the optional sentence-order head (model.binary_head). Both replicated on every TP
rank, as megatron's BertLMHead, Pooler and binary head are, and growth-ready: a new hidden feature
of their outputs is masked by m_h, so new weights of any value leave the function unchanged."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from torch import nn

from ..ops import fused
from .norms import MaskedLayerNorm, _mark_sequence_parallel


class MLMHead(nn.Module):
    """BERT's masked-LM transform before the (tied) decoder: LN(gelu(dense(x)); m_h), the dense
    replicated on every TP rank as megatron's BertLMHead has it. New hidden features: the dense's
    new rows are any value, LN(.; m_h) leaves them out of its statistics and re-masks them (eq. 16-19)."""

    def __init__(self, config, hidden: int, eps: float, perform_init: bool):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        if perform_init:
            config.init_method(self.dense.weight)
            nn.init.zeros_(self.dense.bias)
        _mark_sequence_parallel(self.dense, config)  # (it runs on this rank's tokens under SP)
        self.norm = MaskedLayerNorm(config, hidden, eps)
        self.exact_gelu = config.activation_func is F.gelu  # model.activation=gelu_erf

    def forward(self, x: torch.Tensor, hidden_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.norm(fused.gelu(self.dense(x), self.exact_gelu), hidden_mask)


class SentenceOrderHead(nn.Module):
    """Megatron-LM's Pooler and binary head: pooled = tanh(dense(h of [CLS])) * m_h, then a 2-way
    linear classifier (segment B swapped with A or not: sentence-order prediction). The [CLS] state
    is the first position; under sequence parallelism it is on the first TP rank's part: each rank's
    first position is gathered (megatron's Pooler gathers the whole sequence; one position per rank
    is all it reads) and the first of them taken; the backward keeps each rank's own part.
    New hidden features: the pooled output's are masked, so the dense's new rows and the
    classifier's new columns may be any value (eq. 12's masking applied to the pooler)."""

    def __init__(self, config, hidden: int, perform_init: bool):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, 2)
        if perform_init:
            for lin in (self.dense, self.classifier):
                config.init_method(lin.weight)
                nn.init.zeros_(lin.bias)
        self.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor, hidden_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [s (or s/TP under SP), b, h] -> logits [b, 2]."""
        first = x[:1]
        if self.sequence_parallel:
            first = gather_from_sequence_parallel_region(first, tensor_parallel_output_grad=False)
        pooled = torch.tanh(self.dense(first[0]))
        if hidden_mask is not None:
            pooled = pooled * hidden_mask
        return self.classifier(pooled)
