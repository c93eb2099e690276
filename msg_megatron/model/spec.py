"""ModuleSpec of the masked layer: swap implementations here (e.g. TE linears) without forking classes."""
from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from .attention import MaskedAttentionSubmodules, MaskedSelfAttention
from .layer import MaskedLayerSubmodules, MaskedTransformerLayer
from .mlp import MaskedMLP, MaskedMLPSubmodules
from .norms import norm_class


def masked_layer_spec(norm: str = "layernorm") -> ModuleSpec:
    norm_cls = norm_class(norm)
    return ModuleSpec(
        module=MaskedTransformerLayer,
        submodules=MaskedLayerSubmodules(
            input_norm=norm_cls,
            self_attention=ModuleSpec(
                module=MaskedSelfAttention,
                submodules=MaskedAttentionSubmodules(linear_qkv=ColumnParallelLinear,
                                                     linear_proj=RowParallelLinear)),
            pre_mlp_norm=norm_cls,
            mlp=ModuleSpec(
                module=MaskedMLP,
                submodules=MaskedMLPSubmodules(linear_fc1=ColumnParallelLinear,
                                               linear_fc2=RowParallelLinear)),
        ),
    )
