"""Tensor-parallel shards <-> the canonical (single-rank) layout, derived from model/params.py.

Under TP each rank holds whole heads, FFN units and a block of vocabulary rows; growth appends each
rank's new units locally, so concatenating the ranks' shards gives a rank-interleaved order. The
`<head|ffn>_ids` buffers say where each local unit sits in the canonical order, so a checkpoint's
global tensors (or gathered shards) can be put back into exactly the layout a TP=1 run would have.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .params import ROLES, param, unit_layout


def sharded_axis(name: str) -> Optional[Tuple[int, str]]:
    """(axis, role) of tensor `name`'s tensor-parallel axis, or None for a replicated tensor."""
    row = param(name)
    axis = row.tp_axis
    return None if axis is None else (axis, row.roles[axis])


def unit_axis(name: str) -> Optional[Tuple[int, str]]:
    """(axis, role) of the tensor-parallel unit axis of `name` (heads, FFN units), or None."""
    found = sharded_axis(name)
    return found if found is not None and ROLES[found[1]].units else None


def canonical_units(t: torch.Tensor, axis: int, order: torch.Tensor, unit: int, blocks: int = 1) -> torch.Tensor:
    """Permute the units (heads or FFN units) of `t` along `axis` into canonical order.

    `t`'s axis holds `blocks` consecutive blocks (2 for SwiGLU's [gate; up]), each of len(order)
    units of `unit` entries; canonical unit u is the unit at position order[u] of each block.
    """
    x = t.movedim(axis, 0)
    x = x.reshape(blocks, order.numel(), unit, *x.shape[1:])[:, order]
    return x.reshape(-1, *x.shape[3:]).movedim(0, axis).contiguous()


def tp_shard(name: str, full: torch.Tensor, rank: int, tp: int, head_dim: int, gated: bool) -> torch.Tensor:
    """TP rank `rank`'s shard of a canonical tensor: a block of vocabulary rows, or the rank's block
    of units in each unit block (SwiGLU's fc1 -> [gate_r; up_r]); replicated tensors whole."""
    found = sharded_axis(name) if tp > 1 else None
    if found is None:
        return full
    axis, role = found
    blocks = unit_layout(role, head_dim, gated)[1]
    x = full.movedim(axis, 0)
    x = x.reshape(blocks, tp, x.shape[0] // (blocks * tp), *x.shape[1:])[:, rank]
    return x.reshape(-1, *x.shape[2:]).movedim(0, axis).contiguous()


def rank_major(name: str, full: torch.Tensor, tp: int, head_dim: int, gated: bool) -> torch.Tensor:
    """A canonical tensor reordered so that its contiguous TP blocks are the ranks' shards
    ([gate_0; up_0; gate_1; up_1; ...] for SwiGLU's fc1): what megatron's CPU initialisation,
    which hands rank r the r-th contiguous block of a master weight, must draw."""
    found = sharded_axis(name) if tp > 1 else None
    if found is None:
        return full
    return torch.cat([tp_shard(name, full, r, tp, head_dim, gated) for r in range(tp)], found[0])
