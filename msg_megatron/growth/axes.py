"""Which structural dimension each axis of each model tensor belongs to.

This one table drives growth (here), and is the map later resharding and HF export read: every
parameter and mask buffer of MaskedGPT is listed by name pattern with one role per axis.

Roles: `hidden`, `ffn` (FFN units), `ffn_in` (fc1 rows: FFN units, or [gate; up] blocks with
SwiGLU), `qkv` (per-head groups of 3*head_dim rows), `heads_hd` (per-head groups of head_dim),
`heads` (one entry per head), `fixed` (never grows: vocabulary, positions, the depth scalar).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from ..config import Shape

_TABLE = [
    (r"hidden_(mask|birth)", ("hidden",)),
    (r"embedding\.weight", ("fixed", "hidden")),
    (r"position_embeddings\.weight", ("fixed", "hidden")),
    (r"output_layer\.weight", ("fixed", "hidden")),
    (r"(final_norm|layers\.\d+\.(input_norm|pre_mlp_norm))\.(weight|bias)", ("hidden",)),
    (r"layers\.\d+\.depth_(mask|birth)", ("fixed",)),
    (r"layers\.\d+\.self_attention\.head_(mask|birth)", ("heads",)),
    (r"layers\.\d+\.self_attention\.linear_qkv\.weight", ("qkv", "hidden")),
    (r"layers\.\d+\.self_attention\.linear_qkv\.bias", ("qkv",)),
    (r"layers\.\d+\.self_attention\.linear_proj\.weight", ("hidden", "heads_hd")),
    (r"layers\.\d+\.self_attention\.linear_proj\.bias", ("hidden",)),
    (r"layers\.\d+\.mlp\.ffn_(mask|birth)", ("ffn",)),
    (r"layers\.\d+\.mlp\.linear_fc1\.weight", ("ffn_in", "hidden")),
    (r"layers\.\d+\.mlp\.linear_fc1\.bias", ("ffn_in",)),
    (r"layers\.\d+\.mlp\.linear_fc2\.weight", ("hidden", "ffn")),
    (r"layers\.\d+\.mlp\.linear_fc2\.bias", ("hidden",)),
]
_COMPILED = [(re.compile(p + r"$"), roles) for p, roles in _TABLE]


def axis_roles(name: str) -> Tuple[str, ...]:
    for pattern, roles in _COMPILED:
        if pattern.match(name):
            return roles
    raise KeyError(f"no growth axis roles for tensor `{name}`; add it to msg_megatron/growth/axes.py")


@dataclass(frozen=True)
class AxisMap:
    """How one axis maps from the old size to the new size.

    `old_pos[i]`: position in the new axis of old entry i (old entries keep their values).
    `source[j]`: for every new position j, the old entry it would replicate (used by init=copy).
    `new_size`: length of the new axis.
    """

    old_pos: torch.Tensor
    source: torch.Tensor
    new_size: int


def _blocked_map(n_old: int, n_new: int, unit: int, blocks: int) -> AxisMap:
    """Units of `unit` entries, in `blocks` consecutive blocks (SwiGLU fc1 has 2: gate and up).

    New units are appended at the end of each block; new unit u replicates old unit (u - n_old) % n_old.
    """
    old_pos, source = [], []
    for b in range(blocks):
        base_new, base_old = b * n_new * unit, b * n_old * unit
        for u in range(n_new):
            src_u = u if u < n_old else (u - n_old) % n_old
            src = base_old + src_u * unit + torch.arange(unit)
            source.append(src)
            if u < n_old:
                old_pos.append(base_new + u * unit + torch.arange(unit))
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
    return AxisMap(cat(old_pos), cat(source), blocks * n_new * unit)


def axis_maps(old: Shape, new: Shape, head_dim: int, gated: bool) -> Dict[str, AxisMap]:
    return {
        "hidden": _blocked_map(old.hidden, new.hidden, 1, 1),
        "ffn": _blocked_map(old.ffn, new.ffn, 1, 1),
        "ffn_in": _blocked_map(old.ffn, new.ffn, 1, 2 if gated else 1),
        "qkv": _blocked_map(old.heads, new.heads, 3 * head_dim, 1),
        "heads_hd": _blocked_map(old.heads, new.heads, head_dim, 1),
        "heads": _blocked_map(old.heads, new.heads, 1, 1),
    }
