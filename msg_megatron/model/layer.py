"""Transformer layers with hidden, head, FFN and depth masks: GPT's pre-LN, BERT's post-LN.

Pre-LN (MaskedTransformerLayer):

    x1 = x  + m_h * Attn(LN(x;  m_h))
    x2 = x1 + m_h * MLP(LN(x1; m_h))
    out = m_l * x2 + (1 - m_l) * x          (eq. 20; m_l = 1 for layers that are not new)

Masking every sublayer output by m_h keeps new residual features exactly 0 while m_h is 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from .masks import Mask


@dataclass
class MaskedLayerSubmodules:
    input_norm: Union[ModuleSpec, type] = None
    self_attention: Union[ModuleSpec, type] = None
    pre_mlp_norm: Union[ModuleSpec, type] = None
    mlp: Union[ModuleSpec, type] = None


class MaskedTransformerLayer(MegatronModule):
    def __init__(self, config, submodules: MaskedLayerSubmodules, layer_number: int = 1):
        super().__init__(config=config)
        self.layer_number = layer_number
        eps = config.layernorm_epsilon
        self.input_norm = build_module(submodules.input_norm, config, config.hidden_size, eps)
        self.self_attention = build_module(submodules.self_attention, config=config, layer_number=layer_number)
        self.pre_mlp_norm = build_module(submodules.pre_mlp_norm, config, config.hidden_size, eps)
        self.mlp = build_module(submodules.mlp, config=config, layer_number=layer_number)
        self.mask_depth = Mask(self, "depth", 1)

    def forward(self, x: torch.Tensor, hidden_mask: Optional[torch.Tensor] = None,
                rope: Optional[tuple] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        attn = self.self_attention(self.input_norm(x, hidden_mask), rope, attn_mask)
        if hidden_mask is not None:
            attn = attn * hidden_mask
        h = x + attn
        mlp = self.mlp(self.pre_mlp_norm(h, hidden_mask))
        if hidden_mask is not None:
            mlp = mlp * hidden_mask
        out = h + mlp
        depth = self.mask_depth.output()
        if depth is not None:  # eq. 20: a new layer is skipped while its mask is 0
            depth = depth.to(out.dtype)
            out = depth * out + (1.0 - depth) * x
        return out


@dataclass
class MaskedPostLNLayerSubmodules:
    self_attention: Union[ModuleSpec, type] = None
    post_attention_norm: Union[ModuleSpec, type] = None
    mlp: Union[ModuleSpec, type] = None
    post_mlp_norm: Union[ModuleSpec, type] = None


class MaskedPostLNLayer(MegatronModule):
    """BERT's post-LN layer with the same masks (paper 3.1.2: the LN dilemma is post-LN's):

        h   = LN(x + m_h * Attn(x); m_h)
        y   = LN(h + m_h * MLP(h);  m_h)
        out = m_l * y + (1 - m_l) * x          (eq. 20)

    LN(.; m_h) takes its mean and variance over the unmasked features and re-masks its output
    (eq. 16-19), so while m_h is 0 on new features the statistics and every output are the old
    model's; a new layer (m_l = 0) passes its input through."""

    def __init__(self, config, submodules: MaskedPostLNLayerSubmodules, layer_number: int = 1):
        super().__init__(config=config)
        self.layer_number = layer_number
        eps = config.layernorm_epsilon
        self.self_attention = build_module(submodules.self_attention, config=config, layer_number=layer_number)
        self.post_attention_norm = build_module(submodules.post_attention_norm, config, config.hidden_size, eps)
        self.mlp = build_module(submodules.mlp, config=config, layer_number=layer_number)
        self.post_mlp_norm = build_module(submodules.post_mlp_norm, config, config.hidden_size, eps)
        self.mask_depth = Mask(self, "depth", 1)

    def forward(self, x: torch.Tensor, hidden_mask: Optional[torch.Tensor] = None, rope: Optional[tuple] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        attn = self.self_attention(x, rope, attn_mask)
        if hidden_mask is not None:
            attn = attn * hidden_mask
        h = self.post_attention_norm(x + attn, hidden_mask)
        mlp = self.mlp(h)
        if hidden_mask is not None:
            mlp = mlp * hidden_mask
        out = self.post_mlp_norm(h + mlp, hidden_mask)
        depth = self.mask_depth.output()
        if depth is not None:  # eq. 20
            depth = depth.to(out.dtype)
            out = depth * out + (1.0 - depth) * x
        return out
