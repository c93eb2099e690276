"""Decoder-only GPT with MSG masks, built from megatron-core parts.

Activations are [sequence, batch, hidden] as in megatron. The hidden mask m_h multiplies the
embedding output, every sublayer output and every norm output (DESIGN.md, paper eq. 12/19), so
while m_h is 0 on new features the grown model computes exactly the old function.
"""
from __future__ import annotations

import math

import torch
from megatron.core.tensor_parallel import (ColumnParallelLinear, VocabParallelEmbedding,
                                           gather_from_tensor_model_parallel_region,
                                           vocab_parallel_cross_entropy)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from torch import nn

from ..config import ModelConfig, Shape
from .attention import rope_cos_sin
from .masks import active_mask, register_mask
from .norms import norm_class
from .spec import masked_layer_spec


def padded_vocab_size(mcfg: ModelConfig) -> int:
    """Embedding rows: the vocabulary padded to `make_vocab_size_divisible_by`. Unlike megatron
    (which pads to a multiple of divisible_by x TP), the padding does not depend on the TP degree,
    so a checkpoint keeps its shapes when it is resumed under another layout; the config check
    requires the padded size to divide by parallel.tensor."""
    multiple = mcfg.make_vocab_size_divisible_by
    return int(math.ceil(mcfg.vocab_size / multiple) * multiple)


def transformer_config(mcfg: ModelConfig, shape: Shape, perform_init: bool = True) -> TransformerConfig:
    """megatron's TransformerConfig for one stage's shape (head dim fixed at model.kv_channels)."""
    std = mcfg.init_method_std
    return TransformerConfig(
        num_layers=shape.layers, hidden_size=shape.hidden, ffn_hidden_size=shape.ffn,
        num_attention_heads=shape.heads, kv_channels=mcfg.head_dim,
        normalization="RMSNorm" if mcfg.norm == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=mcfg.norm_epsilon, gated_linear_unit=mcfg.activation == "swiglu",
        add_bias_linear=mcfg.add_bias_linear, init_method_std=std,
        init_method=lambda w: nn.init.normal_(w, 0.0, std),
        # GPT-2 style scaled init of the residual-output projections (megatron's default)
        output_layer_init_method=lambda w: nn.init.normal_(w, 0.0, std / math.sqrt(2.0 * shape.layers)),
        use_cpu_initialization=not torch.cuda.is_available(), perform_initialization=perform_init,
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32,
    )


class MaskedGPT(MegatronModule):
    def __init__(self, mcfg: ModelConfig, shape: Shape, perform_init: bool = True):
        config = transformer_config(mcfg, shape, perform_init)
        super().__init__(config=config)
        self.mcfg, self.shape = mcfg, shape
        self.vocab_padded = padded_vocab_size(mcfg)
        self.embedding = VocabParallelEmbedding(self.vocab_padded, shape.hidden, init_method=config.init_method,
                                                config=config)
        if mcfg.position_embedding == "learned":
            self.position_embeddings = nn.Embedding(mcfg.seq_length, shape.hidden)
            if perform_init:
                config.init_method(self.position_embeddings.weight)
        spec = masked_layer_spec(mcfg.norm)
        self.layers = nn.ModuleList(
            [build_module(spec, config=config, layer_number=i + 1) for i in range(shape.layers)])
        self.final_norm = norm_class(mcfg.norm)(config, shape.hidden, mcfg.norm_epsilon)
        self.output_layer = ColumnParallelLinear(
            shape.hidden, self.vocab_padded, config=config, init_method=config.init_method, bias=False,
            gather_output=False, skip_weight_param_allocation=mcfg.tie_embeddings)
        register_mask(self, "hidden", shape.hidden)
        self._rope = None

    def rope(self, seq_len: int):
        if self.mcfg.position_embedding != "rope":
            return None
        if self._rope is None or self._rope[0].shape[0] < seq_len:
            self._rope = rope_cos_sin(max(seq_len, self.mcfg.seq_length), self.mcfg.head_dim, self.mcfg.rotary_base)
        return self._rope

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor = None) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, vocab_padded], or per-token losses [b, s] given labels."""
        b, s = tokens.shape
        if s > self.mcfg.seq_length and self.mcfg.position_embedding == "learned":
            raise ValueError(f"sequence of {s} tokens is longer than model.seq_length={self.mcfg.seq_length}")
        hmask = active_mask(self, "hidden")
        x = self.embedding(tokens).transpose(0, 1)  # [s, b, h]
        if self.mcfg.position_embedding == "learned":
            x = x + self.position_embeddings(torch.arange(s, device=tokens.device))[:, None, :]
        if hmask is not None:
            x = x * hmask
        rope = self.rope(s)
        for layer in self.layers:
            x = layer(x, hmask, rope)
        x = self.final_norm(x, hmask)
        weight = self.embedding.weight if self.mcfg.tie_embeddings else None
        logits, _ = self.output_layer(x, weight=weight)  # [s, b, v]
        if labels is None:  # full-vocabulary logits on every TP rank
            return gather_from_tensor_model_parallel_region(logits).transpose(0, 1)
        loss = vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous())
        return loss.transpose(0, 1)


def build_model(mcfg: ModelConfig, shape: Shape, seed: int = 1234, perform_init: bool = True) -> MaskedGPT:
    torch.manual_seed(seed)
    return MaskedGPT(mcfg, shape, perform_init)


def count_parameters(model: nn.Module) -> int:
    """Parameters of the whole model: TP-sharded ones summed over the tensor-parallel ranks,
    replicated ones counted once (a collective under TP: call it on every rank)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() == 1:
        return sum(p.numel() for p in model.parameters())
    n = torch.tensor(sum(p.numel() for p in model.parameters() if param_is_not_tensor_parallel_duplicate(p)),
                     dtype=torch.float64)
    torch.distributed.all_reduce(n, group=ps.get_tensor_model_parallel_group())
    return int(n)
