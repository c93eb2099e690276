"""Masked LayerNorm / RMSNorm modules: the norm weights plus a call into msg_megatron.ops."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import masked_layer_norm, masked_rms_norm


class MaskedLayerNorm(nn.Module):
    """LayerNorm whose statistics and output are weighted by the hidden mask (eq. 17-19)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        _mark_sequence_parallel(self, config)

    def forward(self, x, mask=None):
        return masked_layer_norm(x, mask, self.weight, self.bias, self.eps)


class MaskedRMSNorm(nn.Module):
    """RMSNorm with the mean square taken over unmasked features and the output re-masked."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        _mark_sequence_parallel(self, config)

    def forward(self, x, mask=None):
        return masked_rms_norm(x, mask, self.weight, self.eps)


def _mark_sequence_parallel(norm: nn.Module, config) -> None:
    """Under sequence parallelism each TP rank normalises its own tokens, so the norm's weight
    gradients are partial sums: megatron's finalize step sums the parameters marked
    `sequence_parallel` over the TP group (as its own norms and row-parallel biases are marked)."""
    for p in norm.parameters():
        p.sequence_parallel = bool(getattr(config, "sequence_parallel", False))


def norm_class(kind: str):
    return {"layernorm": MaskedLayerNorm, "rmsnorm": MaskedRMSNorm}[kind]
