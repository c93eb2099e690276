"""ModuleSpec of the masked layer (megatron's spec mechanism).

`MaskedGPT(layer_spec=...)` / `build_model(layer_spec=...)` take any spec of the same structure, so
another implementation of a submodule (e.g. Transformer Engine linears, or an instrumented linear
in a test) is swapped in without forking the classes; the default is `masked_layer_spec`.
"""
from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from .attention import MaskedAttentionSubmodules, MaskedSelfAttention
from .layer import MaskedLayerSubmodules, MaskedPostLNLayer, MaskedPostLNLayerSubmodules, MaskedTransformerLayer
from .mlp import MaskedMLP, MaskedMLPSubmodules
from .norms import norm_class


def masked_layer_spec(norm: str = "layernorm", column_linear=ColumnParallelLinear,
                      row_linear=RowParallelLinear) -> ModuleSpec:
    """The masked layer with `norm` and megatron's TP linears (or drop-in replacements)."""
    norm_cls = norm_class(norm)
    return ModuleSpec(
        module=MaskedTransformerLayer,
        submodules=MaskedLayerSubmodules(
            input_norm=norm_cls,
            self_attention=ModuleSpec(
                module=MaskedSelfAttention,
                submodules=MaskedAttentionSubmodules(linear_qkv=column_linear,
                                                     linear_proj=row_linear)),
            pre_mlp_norm=norm_cls,
            mlp=ModuleSpec(
                module=MaskedMLP,
                submodules=MaskedMLPSubmodules(linear_fc1=column_linear,
                                               linear_fc2=row_linear)),
        ),
    )


def masked_post_ln_layer_spec(column_linear=ColumnParallelLinear, row_linear=RowParallelLinear) -> ModuleSpec:
    """BERT's post-LN masked layer (LayerNorm), bidirectional attention, megatron's TP linears."""
    norm_cls = norm_class("layernorm")
    return ModuleSpec(
        module=MaskedPostLNLayer,
        submodules=MaskedPostLNLayerSubmodules(
            self_attention=ModuleSpec(
                module=MaskedSelfAttention, params={"causal": False},
                submodules=MaskedAttentionSubmodules(linear_qkv=column_linear, linear_proj=row_linear)),
            post_attention_norm=norm_cls,
            mlp=ModuleSpec(
                module=MaskedMLP,
                submodules=MaskedMLPSubmodules(linear_fc1=column_linear, linear_fc2=row_linear)),
            post_mlp_norm=norm_cls,
        ),
    )
