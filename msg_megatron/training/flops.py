"""Model FLOPs per token and MFU (recomputed after every growth, since the shape changes).

Per token and layer, forward (multiply-adds count 2 FLOPs): QKV 2*h*(A + 2G)*d (G query groups,
G = A under multi-head attention), attention scores and
the weighted sum 2 * 2*s*A*d (full, non-causal count, as megatron's and PaLM's MFU formulas),
output projection 2*A*d*h, MLP 2*h*F*(3 if SwiGLU else 2); plus the logits 2*h*V (BERT: and its
MLM head's dense 2*h*h; both over every position, as megatron's BERT computes them; with the
sentence-order head, its pooler 2*h*h and classifier 2*h*2 once per sequence, /s per token). Training is
3x the forward (backward = 2x). A = heads, d = head dim (fixed while heads grow), F = ffn size.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import ModelConfig, Shape

# Dense bf16 peak TFLOP/s per GPU, by device-name fragment (first match wins).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A800": 312.0, "A100": 312.0}


def flops_per_token(mcfg: ModelConfig, shape: Shape, vocab_padded: int, seq: Optional[int] = None,
                    training: bool = True) -> float:
    h, f, a, layers = shape.hidden, shape.ffn, shape.heads, shape.layers
    d, s = mcfg.head_dim, seq or mcfg.seq_length
    mlp_mats = 3 if mcfg.activation == "swiglu" else 2
    per_layer = 2 * h * (a + 2 * mcfg.groups(shape)) * d + 2 * 2 * s * a * d + 2 * a * d * h + 2 * h * f * mlp_mats
    forward = layers * per_layer + 2 * h * vocab_padded + (2 * h * h if mcfg.family == "bert" else 0)
    if mcfg.binary_head:
        forward += (2 * h * h + 2 * h * 2) / s
    return 3.0 * forward if training else float(forward)


def device_peak_tflops() -> Optional[float]:
    """The current GPU's dense bf16 peak, or None (CPU, or a GPU not in the table)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
