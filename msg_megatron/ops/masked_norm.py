"""Mask-weighted LayerNorm and RMSNorm in plain PyTorch (paper eq. 16-19).

With mask c over the features: mu = sum(c*x)/sum(c), var = sum(c*(x-mu)^2)/sum(c) (eq. 17),
RMSNorm: ms = sum(c*x^2)/sum(c); the normalised output is multiplied by c again (eq. 19), so
features with c = 0 neither influence the statistics nor leave the norm. Statistics are
computed in float32 at least, whatever the input dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def backend() -> str:
    """Which implementation runs: `torch` (pure PyTorch) in this build."""
    return "torch"


def masked_layer_norm(x: torch.Tensor, mask: Optional[torch.Tensor], weight: torch.Tensor,
                      bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    if mask is None:  # folded: an ordinary LayerNorm
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    dtype = x.dtype
    xf = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    m = mask.to(xf.dtype)
    denom = m.sum()
    mu = (xf * m).sum(-1, keepdim=True) / denom
    xc = xf - mu
    var = (xc * xc * m).sum(-1, keepdim=True) / denom
    y = xc * torch.rsqrt(var + eps) * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return (y * m).to(dtype)


def masked_rms_norm(x: torch.Tensor, mask: Optional[torch.Tensor], weight: torch.Tensor,
                    eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    if mask is None:
        ms = (xf * xf).mean(-1, keepdim=True)
        return (xf * torch.rsqrt(ms + eps) * weight.to(xf.dtype)).to(dtype)
    m = mask.to(xf.dtype)
    ms = (xf * xf * m).sum(-1, keepdim=True) / m.sum()
    return (xf * torch.rsqrt(ms + eps) * weight.to(xf.dtype) * m).to(dtype)
