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

_UNIT_ROLES = ("qkv", "heads_hd", "heads", "ffn", "ffn_in")  # heads / FFN units: sharded and permuted by ids


def sharded_axis(name: str):
    """(axis, role) of tensor `name`'s tensor-parallel axis (vocabulary rows, heads, FFN units), or
    None for a replicated tensor."""
    roles = axis_roles(name)
    return next(((i, r) for i, r in enumerate(roles) if r == "vocab" or r in _UNIT_ROLES), None)


def unit_layout(role: str, head_dim: int, gated: bool):
    """(entries per unit, blocks) along a unit axis: 3 x head_dim rows per fused-QKV head, head_dim
    projection columns per head, 1 per FFN unit; SwiGLU's fc1 holds 2 blocks ([gate; up])."""
    unit = {"qkv": 3 * head_dim, "heads_hd": head_dim}.get(role, 1)
    return unit, (2 if (role == "ffn_in" and gated) else 1)


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
    found = sharded_axis(name)
    return found if found is not None and found[1] in _UNIT_ROLES else None


def ids_name(name: str, role: str) -> str:
    """The `<head|ffn>_ids` buffer that orders the units of layer tensor `name`."""
    layer = name.split(".")[1]
    return f"layers.{layer}." + ("mlp.ffn_ids" if role in ("ffn", "ffn_in") else "self_attention.head_ids")


def tp_shard(name: str, full: torch.Tensor, rank: int, tp: int, head_dim: int, gated: bool) -> torch.Tensor:
    """TP rank `rank`'s shard of a canonical (single-rank) tensor: a block of vocabulary rows, or the
    rank's block of units in each unit block (SwiGLU's fc1 -> [gate_r; up_r]); replicated tensors whole."""
    found = sharded_axis(name) if tp > 1 else None
    if found is None:
        return full
    axis, role = found
    blocks = unit_layout(role, head_dim, gated)[1] if role != "vocab" else 1
    x = full.movedim(axis, 0)
    x = x.reshape(blocks, tp, x.shape[0] // (blocks * tp), *x.shape[1:])[:, rank]
    return x.reshape(-1, *x.shape[2:]).movedim(0, axis).contiguous()


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
        found = sharded_axis(name)
        if found is None:
            out[name] = local.clone()
            continue
        axis, role = found
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local.contiguous(), group=group)
        if role == "vocab":
            out[name] = torch.cat(parts, axis)
            continue
        ids = sd[ids_name(name, role)]
        id_parts = [torch.empty_like(ids) for _ in range(tp)]
        dist.all_gather(id_parts, ids, group=group)
        order = torch.argsort(torch.cat(id_parts))  # canonical unit u comes from gathered unit order[u]
        unit, blocks = unit_layout(role, head_dim, gated)
        # each rank's shard is [block 0 units; block 1 units]: lay them out as the checkpoint's global
        # tensor does ([block 0 of every rank; block 1 of every rank]), then sort the units
        split = [p.chunk(blocks, axis) for p in parts]
        full = torch.cat([s[b] for b in range(blocks) for s in split], axis)
        out[name] = canonical_units(full, axis, order, unit, blocks)
    rank = dist.get_rank()
    return out if dst is None or rank == dst else None
