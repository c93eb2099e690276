"""Gather a tensor-parallel model into the canonical single-rank layout.

Under TP each rank holds whole heads, FFN units and a block of vocabulary rows; growth appends each
rank's new units locally, so concatenating the ranks' shards gives a rank-interleaved order. The
`<head|ffn>_ids` buffers say where each local unit sits in the canonical (single-rank) order, so
the gathered tensors can be put back into exactly the layout a TP=1 run would have. Used by tests
(a TP=2 grown model equals a TP=1 model grown from the same weights) and by export/reshard tools.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist

from ..growth.axes import axis_roles

_SHARDED_ROLES = {"vocab", "qkv", "heads_hd", "heads", "ffn", "ffn_in"}


def _unit_size(role: str, head_dim: int) -> int:
    return {"qkv": 3 * head_dim, "heads_hd": head_dim}.get(role, 1)


def canonical_units(t: torch.Tensor, axis: int, order: torch.Tensor, unit: int, blocks: int = 1) -> torch.Tensor:
    """Permute the units (heads or FFN units) of `t` along `axis` into canonical order.

    `t`'s axis holds `blocks` consecutive blocks (2 for SwiGLU's [gate; up]), each of len(order)
    units of `unit` entries (3 x head_dim rows of a fused QKV head, head_dim columns of the output
    projection, 1 for FFN units); canonical unit u is the unit at position order[u] of each block.
    """
    x = t.movedim(axis, 0)
    x = x.reshape(blocks, order.numel(), unit, *x.shape[1:])[:, order]
    return x.reshape(-1, *x.shape[3:]).movedim(0, axis).contiguous()


def unit_roles(name: str):
    """(axis, role) of the tensor-parallel unit axis of tensor `name` (heads, FFN units), or None."""
    roles = axis_roles(name)
    return next(((i, r) for i, r in enumerate(roles) if r in ("qkv", "heads_hd", "heads", "ffn", "ffn_in")), None)


def canonical_state_dict(model, dst: Optional[int] = 0) -> Optional[Dict[str, torch.Tensor]]:
    """Full tensors in the canonical layout on global rank `dst` (None elsewhere); every TP rank
    must call it. Without TP this is the state dict itself (its units are already canonical)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    if tp == 1:
        return sd
    group = ps.get_tensor_model_parallel_group()
    head_dim, gated = model.mcfg.head_dim, model.mcfg.activation == "swiglu"
    out = {}
    for name, local in sd.items():
        roles = axis_roles(name)
        axis = next((i for i, r in enumerate(roles) if r in _SHARDED_ROLES), None)
        if axis is None:
            out[name] = local.clone()
            continue
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local.contiguous(), group=group)
        role = roles[axis]
        if role == "vocab":
            out[name] = torch.cat(parts, axis)
            continue
        layer = name.split(".")[1]
        ids_name = f"layers.{layer}." + ("self_attention.head_ids" if role in ("qkv", "heads_hd", "heads")
                                         else "mlp.ffn_ids")
        id_parts = [torch.empty_like(sd[ids_name]) for _ in range(tp)]
        dist.all_gather(id_parts, sd[ids_name], group=group)
        order = torch.argsort(torch.cat(id_parts))  # canonical unit u comes from gathered unit order[u]
        blocks = 2 if (role == "ffn_in" and gated) else 1
        # each rank's shard is [block 0 units; block 1 units]: lay them out as the checkpoint's global
        # tensor does ([block 0 of every rank; block 1 of every rank]), then sort the units
        split = [p.chunk(blocks, axis) for p in parts]
        full = torch.cat([s[b] for b in range(blocks) for s in split], axis)
        out[name] = canonical_units(full, axis, order, _unit_size(role, head_dim), blocks)
    rank = dist.get_rank()
    return out if dst is None or rank == dst else None
