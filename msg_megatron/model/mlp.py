"""Feed-forward block with an FFN mask after the activation (paper eq. 10-15)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from .masks import active_mask, register_mask


@dataclass
class MaskedMLPSubmodules:
    linear_fc1: Union[ModuleSpec, type] = None
    linear_fc2: Union[ModuleSpec, type] = None


class MaskedMLP(MegatronModule):
    """fc1 -> activation (GELU, or SwiGLU = silu(gate) * up) -> * ffn mask -> fc2.

    With SwiGLU, fc1's rows are [gate; up] (megatron's gated_linear_unit layout, per TP rank).
    """

    def __init__(self, config, submodules: MaskedMLPSubmodules, layer_number: int = 1):
        super().__init__(config=config)
        self.gated = config.gated_linear_unit
        ffn = config.ffn_hidden_size
        self.linear_fc1 = build_module(
            submodules.linear_fc1, config.hidden_size, 2 * ffn if self.gated else ffn, config=config,
            init_method=config.init_method, gather_output=False, bias=config.add_bias_linear,
            skip_bias_add=False, is_expert=False)
        self.linear_fc2 = build_module(
            submodules.linear_fc2, ffn, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=config.add_bias_linear,
            input_is_parallel=True, skip_bias_add=False, is_expert=False)
        register_mask(self, "ffn", ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.linear_fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        ffn_mask = active_mask(self, "ffn")
        if ffn_mask is not None:  # eq. 12: new neurons' outputs are masked to 0
            h = h * ffn_mask.to(h.dtype)
        out, _ = self.linear_fc2(h)
        return out
