"""Self-attention with per-head masks (paper appendix A, eq. 22-26), on megatron's TP linears.

The fused QKV weight uses megatron's per-group interleaved layout: for each query group the rows
[q_g,0; ...; q_g,q-1; k_g; v_g], each head_dim long, where the q query heads of a group share its
key/value head (grouped-query attention, model.num_query_groups; q = 1 is multi-head attention).
New heads are appended as whole groups, so the existing ones stay a prefix, and the head mask has
one entry per group: a new group's output is masked (eq. 23-24 per group). Head dim is fixed while
heads grow. Under tensor parallelism each rank holds whole groups (megatron splits the fused QKV
rows contiguously), and the head mask and unit ids are sharded with them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from ..ops import fused
from . import recompute
from .masks import Mask, register_unit_ids, sharded_state_dict_tp_buffers, tp_rank_size
from .params import tp_axes


@dataclass
class MaskedAttentionSubmodules:
    linear_qkv: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None


def rope_cos_sin(seq_len: int, head_dim: int, base: int, dtype=torch.float32):
    """cos/sin tables [s, 1, 1, head_dim] in the rotate-half (Llama/HF) convention."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None, None, :], emb.sin().to(dtype)[:, None, None, :]


class MaskedSelfAttention(MegatronModule):
    PARAMS = "layers.{i}.self_attention."  # this module's rows in model/params.py

    def __init__(self, config, submodules: MaskedAttentionSubmodules, layer_number: int = 1, causal: bool = True):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.causal = causal
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_query_groups or self.num_heads
        self.per_group = self.num_heads // self.num_groups  # query heads per key/value head
        self.head_dim = config.kv_channels
        proj_in = self.num_heads * self.head_dim
        self.linear_qkv = build_module(
            submodules.linear_qkv, config.hidden_size, (self.num_heads + 2 * self.num_groups) * self.head_dim,
            config=config,
            init_method=config.init_method, gather_output=False, bias=config.add_bias_linear,
            skip_bias_add=False, is_expert=False)
        self.linear_proj = build_module(
            submodules.linear_proj, proj_in, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=config.add_bias_linear,
            input_is_parallel=True, skip_bias_add=False, is_expert=False)
        rank, tp = tp_rank_size()
        local = self.num_groups // tp  # the config check guarantees divisibility
        self.mask_head = Mask(self, "head", local)  # one entry per query group (a head under MHA)
        register_unit_ids(self, "head", rank * local + torch.arange(local))

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return sharded_state_dict_tp_buffers(self, prefix, sharded_offsets, metadata,
                                             tp_axes(self.PARAMS))

    def _core_attention(self, q, k, v, head_mask, attn_mask=None):
        """softmax(QK^T / sqrt(d)) V per query head, q [b, G*q, s, d] against k, v [b, G, s, d] (query
        head j of group g uses key/value head g), the heads of a masked group zeroed (eq. 23-24).
        Causal (GPT), or bidirectional (BERT: `causal=False`) over the keys `attn_mask` [b, 1, 1, s]
        keeps (the non-padding tokens)."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if self.causal else attn_mask,
                                             is_causal=self.causal, scale=1.0 / math.sqrt(self.head_dim),
                                             enable_gqa=self.per_group > 1)
        if head_mask is not None:  # a masked group contributes an all-zero output
            if self.per_group > 1:
                head_mask = head_mask.repeat_interleave(self.per_group)
            out = out * head_mask.to(out.dtype)[None, :, None, None]
        return out

    def forward(self, x: torch.Tensor, rope: Optional[tuple] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        qkv, _ = self.linear_qkv(x)  # [s, b, ...]: under sequence parallelism x is [s/TP, b, h], gathered here
        s, b = qkv.shape[:2]
        d, per = self.head_dim, self.per_group
        groups = qkv.shape[-1] // ((per + 2) * d)  # local groups (a TP rank holds a share)
        heads = groups * per
        q, k, v = qkv.view(s, b, groups, (per + 2) * d).split([per * d, d, d], dim=-1)
        q = q.reshape(s, b, heads, d)
        if rope is not None:
            cos, sin = rope  # [s, 1, 1, d] in the activations' dtype (MaskedGPT.rope)
            q, k = fused.rope_qk(q, k, cos, sin)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        head_mask = self.mask_head.output()
        if recompute.selective(self.config) and self.training:  # train.recompute=selective
            out = recompute.checkpoint(self._core_attention, q, k, v, head_mask, attn_mask)
        else:
            out = self._core_attention(q, k, v, head_mask, attn_mask)
        out = out.permute(2, 0, 1, 3).reshape(s, b, heads * self.head_dim)
        out, _ = self.linear_proj(out)
        return out
