"""Read a distributed checkpoint of any TP/PP layout, piece by piece, in the canonical layout.

A dist checkpoint stores every tensor by its global shape, so one process can read any subset of
tensors whole, whatever layout wrote them, without building the model: `CheckpointReader.layer(i)`
loads one transformer layer (a few hundred MB at 100B scale), so a converter holds one layer at a
time, never the whole model. Heads and FFN units come back in the canonical single-rank order
(growth under TP appends each rank's new units locally; the saved `<head|ffn>_ids` say where each
unit belongs), as model/tp_layout.py derives from the parameter table.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List

import torch

from ..config import Shape, config_from_dict
from ..model.params import ids_name, unit_layout
from ..model.tp_layout import canonical_units, unit_axis
from ..parallel import initialize_parallel
from .dist import CHECKPOINT_FAILURES, CheckpointError, read_meta, tensor_index
from .safe_pickle import UnsafeCheckpoint, restricted_metadata_loading


class CheckpointReader:
    def __init__(self, path: str, full_verify: bool = False):
        self.meta = read_meta(path, full=full_verify)
        self.path = self.meta["path"]
        self.cfg = config_from_dict(self.meta["config"])
        self.mcfg = self.cfg.model
        self.shape = Shape(*self.meta["shape"])
        self.step = int(self.meta["state"]["step"])
        initialize_parallel(1, 1)  # dist_checkpointing reads through torch.distributed (a world of one)
        self._md = tensor_index(self.path)

    def has(self, name: str) -> bool:
        return f"model.{name}" in self._md

    def names(self) -> List[str]:
        return sorted(k[len("model."):] for k in self._md if k.startswith("model."))

    def has_state(self, name: str, state: str) -> bool:
        return f"optimizer.{state}.model.{name}" in self._md

    def load(self, names: Iterable[str], state: str = "") -> Dict[str, torch.Tensor]:
        """Whole tensors (global shape, saved order) of the model tensors `names`, or with `state`
        ('exp_avg', 'exp_avg_sq') their AdamW state (in model space: the same shape and order)."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor

        sd = {}
        for name in names:
            key = f"optimizer.{state}.model.{name}" if state else f"model.{name}"
            if key not in self._md:
                raise CheckpointError(f"checkpoint `{self.path}` has no tensor `{name}` (a missing shard or a "
                                      "checkpoint of another architecture)")
            md = self._md[key]
            sd[name] = ShardedTensor.from_rank_offsets(key, torch.empty(md.global_shape, dtype=md.dtype), replica_id=0)
        try:
            with restricted_metadata_loading():
                loaded = dist_checkpointing.load(sd, self.path)
        except UnsafeCheckpoint as e:
            raise CheckpointError(f"checkpoint `{self.path}` is unsafe to load: {e}") from None
        except CHECKPOINT_FAILURES as e:
            raise CheckpointError(f"cannot load {sorted(sd)[:3]}... from `{self.path}`: {type(e).__name__}: {e}") from e
        return {name: loaded[name] for name in sd}  # (load also returns the common, non-tensor state)

    def layer(self, i: int, state: str = "") -> Dict[str, torch.Tensor]:
        """Layer i's tensors (names relative to the layer: `mlp.linear_fc1.weight`, ...), canonical
        order; with `state`, the AdamW state of those parameters that have it (same order)."""
        prefix = f"layers.{i}."
        names = [n for n in self.names() if n.startswith(prefix)]
        raw = self.load(names)
        if state:
            ids = {n: t for n, t in raw.items() if n.endswith("_ids")}
            raw = dict(self.load([n for n in names if self.has_state(n, state)], state), **ids)
        gated = self.mcfg.activation == "swiglu"
        out = {}
        for name, t in raw.items():
            if state and name.endswith("_ids"):
                continue
            found = unit_axis(name)
            if found is not None:
                axis, role = found
                unit, blocks = unit_layout(role, self.mcfg.head_dim, gated, self.mcfg.heads_per_group)
                t = canonical_units(t, axis, torch.argsort(raw[ids_name(name, role)]), unit, blocks)
            out[name[len(prefix):]] = t
        return out

    def refuse_mid_ramp(self, tool: str) -> None:
        """A checkpoint whose masks are still ramping cannot leave this project: its function needs
        the masks. The error names the first step from which it can."""
        left = self.masks_left()
        if left:
            steps = max(left.values())
            raise CheckpointError(
                f"checkpoint `{self.path}` (step {self.step}) is mid-ramp: {len(left)} masks are not at 1 yet "
                f"(e.g. {sorted(left)[0]}); {tool} would change the model's function. Train {steps} more "
                f"step{'s' if steps != 1 else ''} (to step {self.step + steps}, the end of growth.ramp_steps="
                f"{self.cfg.growth.ramp_steps}) and export that checkpoint")

    def masks_left(self) -> Dict[str, int]:
        """For every mask not yet at 1: the training steps until its ramp ends (paper 3.2.1)."""
        ramp = self.cfg.growth.ramp_steps
        births = self.load([n for n in self.names() if n.endswith("_birth")])
        masks = self.load([n for n in self.names() if n.endswith("_mask")])
        left = {}
        for name, birth in births.items():
            mask = masks[name[: -len("_birth")] + "_mask"]
            if mask.numel() and float(mask.min()) < 1.0:
                # a mask born at b is 1 from step b + ramp on; the checkpoint of step s holds the values
                # set for step s - 1 (the last step run), so the first one with it at 1 is b + ramp + 1
                left[name[: -len("_birth")]] = max(1, math.ceil(float(birth.max()) + ramp + 1 - self.step))
        return left
