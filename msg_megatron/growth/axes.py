"""How each axis of each model tensor grows, from the axis roles in model/params.py.

Heads and FFN units are split over the tensor-parallel ranks and grow rank by rank (each rank
appends its share of new units); `hidden` is replicated; `vocab` is split and never grows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..config import Shape
from ..model.masks import tp_rank_size
from ..model.params import ROLES, param, unit_layout


@dataclass(frozen=True)
class AxisPlan:
    """How one axis of one (local, possibly tensor-parallel-sharded) tensor grows.

    `new_local`: the axis' local size after growth.
    `old_pos[i]`: position in the new local axis of old local entry i (old entries keep their values).
    `canon[j]`: for every new local position j, its index in the canonical (single-rank) tensor of
        size `canon_size`; new weights are drawn there, so every TP layout draws the same values.
    `source[j]`: the old local entry that new position j replicates (init=copy, single rank only).
    `new_ids`: canonical unit ids of the new local units (the `<name>_ids` buffers), else None.
    """

    new_local: int
    old_pos: torch.Tensor
    canon: torch.Tensor
    canon_size: int
    source: torch.Tensor
    new_ids: Optional[torch.Tensor] = None


def unit_plan(n_old: int, n_new: int, unit: int, blocks: int, old_ids: torch.Tensor, rank: int, tp: int) -> AxisPlan:
    """Units of `unit` entries in `blocks` consecutive blocks (SwiGLU fc1 has 2: gate and up), split
    over `tp` ranks. Each rank appends its share of the new units (canonical ids n_old + rank *
    added/tp + k) at the end of each of its blocks; `old_ids` are its old units' canonical ids."""
    added = (n_new - n_old) // tp
    lo, ln = n_old // tp, n_new // tp
    new_ids = torch.cat([old_ids.to(torch.long), n_old + rank * added + torch.arange(added)])
    k = torch.arange(unit)
    u = torch.arange(ln)
    src_u = torch.where(u < lo, u, (u - lo) % max(lo, 1))
    old_pos, canon, source = [], [], []
    for b in range(blocks):  # vectorised over units: plans for 40k-unit FFNs are cheap
        canon.append((b * n_new * unit + new_ids[:, None] * unit + k).flatten())
        old_pos.append((b * ln * unit + torch.arange(lo)[:, None] * unit + k).flatten())
        source.append((b * lo * unit + src_u[:, None] * unit + k).flatten())
    return AxisPlan(blocks * ln * unit, torch.cat(old_pos), torch.cat(canon), blocks * n_new * unit,
                    torch.cat(source), new_ids)


class GrowthPlan:
    """Per-axis plans for every tensor of one model growing to `new_shape`, on this TP rank.

    The unit ids of each layer's heads and FFN units are read from the old model, so a layer that
    was already grown under TP (rank-interleaved order) keeps drawing by canonical position.
    """

    def __init__(self, model, new_shape: Shape):
        self.old, self.new = model.shape, new_shape
        self.rank, self.tp = tp_rank_size()
        self.head_dim = model.mcfg.head_dim
        self.per_group = model.mcfg.heads_per_group  # heads grow by whole query groups
        self.gated = model.mcfg.activation == "swiglu"
        self.vocab = model.vocab_padded
        sd = model.state_dict()
        self.ids = {i: (sd[f"layers.{i}.self_attention.head_ids"].cpu(), sd[f"layers.{i}.mlp.ffn_ids"].cpu())
                    for i in range(model.local_layers)}
        self._cache: Dict[tuple, Optional[AxisPlan]] = {}

    def axes(self, name: str, fresh: bool = False) -> list:
        """One plan per axis of tensor `name` (None: the axis neither grows nor is sharded).
        `fresh`: plans for a new, randomly initialised layer (no old units)."""
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        return [self._plan(role, None if fresh else layer, fresh) for role in param(name).roles]

    def _plan(self, role: str, layer: Optional[int], fresh: bool) -> Optional[AxisPlan]:
        key = (role, layer, fresh)
        if key not in self._cache:
            self._cache[key] = self._make(role, layer, fresh)
        return self._cache[key]

    def _make(self, role: str, layer: Optional[int], fresh: bool) -> Optional[AxisPlan]:
        o, n, r, tp = self.old, self.new, self.rank, self.tp
        empty = torch.zeros(0, dtype=torch.long)
        if role == "fixed":
            return None
        if role == "hidden":  # replicated on every TP rank
            return unit_plan(0 if fresh else o.hidden, n.hidden, 1, 1,
                             empty if fresh else torch.arange(o.hidden), 0, 1)
        if role == "vocab":  # sharded, never grows: rank r holds canonical rows [r*V/tp, (r+1)*V/tp)
            local = self.vocab // tp
            rows = r * local + torch.arange(local)
            return AxisPlan(local, torch.arange(local), rows, self.vocab, torch.arange(local))
        heads = ROLES[role].units == "heads"
        q = self.per_group
        n_old = 0 if fresh else (o.heads // q if heads else o.ffn)  # attention's unit: a query group
        n_new = n.heads // q if heads else n.ffn
        ids = empty if fresh else self.ids[layer][0 if heads else 1]
        unit, blocks = unit_layout(role, self.head_dim, self.gated, q)
        return unit_plan(n_old, n_new, unit, blocks, ids, r, tp)
