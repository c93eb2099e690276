"""Growth masks as model state (paper eq. 10, 16, 20, 23).

Every mask is a pair of buffers: `<name>_mask` (the value used in forward) and `<name>_birth`
(the step at which each entry was added; -inf for entries that existed from the start). The value
at step s is clamp((s - birth) / ramp_steps, 0, 1): 0 right after growth (strict function
preservation), 1 after `ramp_steps` (paper section 3.2.1, "mask strength" phi). Keeping the birth
per entry lets a growth start while an earlier ramp still runs, and makes the mask a pure function
of the step (exact on resume). When every entry is 1 the mask is *folded*: `Mask.active` is False
and forward takes the ordinary, unmasked path.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch import nn


class Mask:
    """One growth mask of a module (hidden features, heads, FFN units, or a layer's depth mask).

    The state is two buffers of the owning module, `<name>_mask` (the value forward uses) and
    `<name>_birth`, so checkpoints, `.to()` and sharded state dicts treat them as any buffer; this
    object reads them through the owner's buffer table (which `.to()` and loads update) and
    keeps what is not state: whether the mask still matters (`active`; folded when every entry
    is 1) and the latest birth step, cached as a host float.
    """

    def __init__(self, owner: nn.Module, name: str, size: int):
        owner.register_buffer(f"{name}_mask", torch.ones(size))
        owner.register_buffer(f"{name}_birth", torch.full((size,), -math.inf))
        self.name = name
        self._buffers = owner._buffers
        self._value_key, self._birth_key = f"{name}_mask", f"{name}_birth"
        self.active = False
        self._youngest: Optional[tuple] = None  # ((id, version) of the birth buffer, its max as a float)
        # the owner's masks, for iter_masks (per step: no scan of every module's attributes)
        owner.__dict__["_growth_masks"] = owner.__dict__.get("_growth_masks", ()) + (self,)

    @property
    def value(self) -> torch.Tensor:
        return self._buffers[self._value_key]

    @property
    def birth(self) -> torch.Tensor:
        return self._buffers[self._birth_key]

    def output(self) -> Optional[torch.Tensor]:
        """The mask tensor if it still matters, else None (folded: forward takes the unmasked path)."""
        return self.value if self.active else None

    def youngest(self) -> float:
        """The latest birth step (-inf: no entry was grown), read from the device only when the
        birth buffer was replaced or written in place (growth, load), not every step."""
        birth = self.birth
        key = (id(birth), birth._version)
        if self._youngest is None or self._youngest[0] != key:
            self._youngest = (key, float(birth.max()) if birth.numel() else -math.inf)
        return self._youngest[1]

    @torch.no_grad()
    def set_step(self, step: int, ramp_steps: int) -> float:
        """Set the values for `step` (eq. 10 ramped: clamp((step - birth) / ramp, 0, 1)); fold the
        mask once every entry is 1. Returns its smallest value, known on the host without a sync."""
        youngest = self.youngest()
        low = 1.0 if ramp_steps <= 0 or youngest == -math.inf else min(max((step - youngest) / ramp_steps, 0.0), 1.0)
        if low < 1.0 or self.active:  # ramping, or folding now: write the values
            self.value.copy_(mask_values(self.birth, step, ramp_steps))
        self.active = low < 1.0
        return low

    @torch.no_grad()
    def open(self) -> None:
        """All entries 1 and born at -inf (the No Mask / Net2Net baselines)."""
        self.value.fill_(1.0)
        self.birth.fill_(-math.inf)
        self.active = False

    def refresh(self) -> None:
        """Recompute `active` from the values (after a state dict was loaded into the buffers)."""
        value = self.value
        self.active = bool(value.numel()) and float(value.min()) < 1.0


def register_unit_ids(module: nn.Module, name: str, ids: torch.Tensor) -> None:
    """`<name>_ids`: for each local unit (head or FFN unit) of a tensor-parallel shard, its position
    in the canonical single-rank order (old units first, each growth's new units appended).

    Under TP each rank appends its share of new units locally, so the rank-concatenated order
    differs from the single-rank one; growth draws new weights by canonical position, so a grown
    TP run computes the same function as a TP=1 run grown from the same weights, and export or
    reshard can restore the canonical order.
    """
    module.register_buffer(f"{name}_ids", ids.to(torch.long).clone())


def tp_rank_size():
    """(tensor-parallel rank, size); (0, 1) before megatron's parallel state exists."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def sharded_state_dict_tp_buffers(module, prefix: str, sharded_offsets, metadata, axis_map: dict):
    """megatron's default MegatronModule.sharded_state_dict, but with this module's own TP-sharded
    buffers (per-head / per-FFN-unit masks, births, unit ids) declared sharded along `axis_map`."""
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import (
        ensure_metadata_has_dp_cp_group,
        make_sharded_tensors_for_checkpoint,
        sharded_state_dict_default,
    )

    own = {}
    module._save_to_state_dict(own, "", keep_vars=True)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    out = make_sharded_tensors_for_checkpoint(own, prefix, axis_map, sharded_offsets=sharded_offsets,
                                              tp_group=tp_group, dp_cp_group=metadata["dp_cp_group"])
    for name, child in module.named_children():
        out.update(sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata,
                                              tp_group=tp_group))
    return out


def iter_masks(model: nn.Module) -> Iterator[Mask]:
    for mod in model.modules():
        yield from mod.__dict__.get("_growth_masks", ())


def mask_values(birth: torch.Tensor, step: int, ramp_steps: int) -> torch.Tensor:
    if ramp_steps <= 0:
        return torch.ones_like(birth)
    return ((step - birth) / ramp_steps).clamp_(0.0, 1.0)


def update_masks(model: nn.Module, step: int, ramp_steps: int) -> float:
    """Set every mask to its value at `step`; fold the ones that reached 1. Returns the smallest
    mask value in the model (1.0 when nothing ramps), for logging; no host sync per step."""
    return min((m.set_step(step, ramp_steps) for m in iter_masks(model)), default=1.0)


def open_masks(model: nn.Module) -> None:
    for m in iter_masks(model):
        m.open()


def refresh_active(model: nn.Module) -> None:
    for m in iter_masks(model):
        m.refresh()


def ramping(model: nn.Module) -> bool:
    return any(m.active for m in iter_masks(model))
