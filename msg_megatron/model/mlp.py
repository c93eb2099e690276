"""Feed-forward block with an FFN mask after the activation (paper eq. 10-15)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from ..ops import fused
from .masks import Mask, register_unit_ids, sharded_state_dict_tp_buffers, tp_rank_size
from .params import gated_blocks, tp_axes
from .tp_layout import rank_major


@dataclass
class MaskedMLPSubmodules:
    linear_fc1: Union[ModuleSpec, type] = None
    linear_fc2: Union[ModuleSpec, type] = None


_FC1 = "layers.{i}.mlp.linear_fc1.weight"


def _gated_master_init(base_init, ffn: int, tp: int):
    """SwiGLU fc1 init: megatron's CPU initialisation draws the full [gate; up] master weight and
    gives rank r the r-th contiguous row block, but each rank computes [gate_r; up_r] from its
    block. Reorder the master rows rank-major so that rank r's block is [gate_r; up_r]: every TP
    degree then starts from the same function as a single rank (GPU initialisation draws per-rank
    shards and passes local shapes, which are left as drawn)."""

    def init(w: torch.Tensor):
        base_init(w)
        if tp > 1 and w.shape[0] == 2 * ffn:  # (the master weight; a local shard is left as drawn)
            with torch.no_grad():
                w.copy_(rank_major(_FC1, w, tp, head_dim=1, gated=True))

    return init


class MaskedMLP(MegatronModule):
    """fc1 -> activation (GELU, or SwiGLU = silu(gate) * up) -> * ffn mask -> fc2.

    With SwiGLU, fc1's rows are [gate; up] (megatron's gated_linear_unit layout, per TP rank: the
    global fc1 under TP is [gate_0; up_0; gate_1; up_1; ...]).
    """

    PARAMS = "layers.{i}.mlp."  # this module's rows in model/params.py

    def __init__(self, config, submodules: MaskedMLPSubmodules, layer_number: int = 1):
        super().__init__(config=config)
        self.gated = config.gated_linear_unit
        self.exact_gelu = config.activation_func is F.gelu  # model.activation=gelu_erf (model/gpt.py)
        ffn = config.ffn_hidden_size
        rank, tp = tp_rank_size()
        fc1_init = _gated_master_init(config.init_method, ffn, tp) if self.gated else config.init_method
        self.linear_fc1 = build_module(
            submodules.linear_fc1, config.hidden_size, 2 * ffn if self.gated else ffn, config=config,
            init_method=fc1_init, gather_output=False, bias=config.add_bias_linear,
            skip_bias_add=False, is_expert=False)
        self.linear_fc2 = build_module(
            submodules.linear_fc2, ffn, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=config.add_bias_linear,
            input_is_parallel=True, skip_bias_add=False, is_expert=False)
        local = ffn // tp
        self.mask_ffn = Mask(self, "ffn", local)  # sharded with fc1's output / fc2's input
        register_unit_ids(self, "ffn", rank * local + torch.arange(local))

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sd = sharded_state_dict_tp_buffers(self, prefix, sharded_offsets, metadata, tp_axes(self.PARAMS))
        if self.gated:
            # each TP rank holds [gate_r; up_r]: save gate and up as two tensors, each sharded over TP,
            # so the checkpoint reloads under another TP degree (megatron's own SwiGLU factory)
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            for key in list(sd):
                rel = key[len(prefix):]
                if key.startswith(prefix) and not rel.endswith("_extra_state") and gated_blocks(self.PARAMS + rel):
                    sd[key] = apply_swiglu_sharded_factory(sd[key], sharded_offsets)
        return sd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.linear_fc1(x)
        ffn_mask = self.mask_ffn.output()  # eq. 12: new neurons' outputs are masked to 0
        if ffn_mask is not None:
            ffn_mask = ffn_mask.to(h.dtype)
        h = fused.swiglu_masked(h, ffn_mask) if self.gated else fused.gelu_masked(h, ffn_mask, self.exact_gelu)
        out, _ = self.linear_fc2(h)
        return out
