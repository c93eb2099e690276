"""Growth masks as model state (paper eq. 10, 16, 20, 23).

Every mask is a pair of buffers: `<name>_mask` (the value used in forward) and `<name>_birth`
(the step at which each entry was added; -inf for entries that existed from the start). The value
at step s is clamp((s - birth) / ramp_steps, 0, 1): 0 right after growth (strict function
preservation), 1 after `ramp_steps` (paper section 3.2.1, "mask strength" phi). Keeping the birth
per entry lets a growth start while an earlier ramp still runs, and makes the mask a pure function
of the step (exact on resume). When every entry is 1 the mask is *folded*: `<name>_active` is False
and forward takes the ordinary, unmasked path.
"""
from __future__ import annotations

import math
from typing import Iterator, Tuple

import torch
from torch import nn


def register_mask(module: nn.Module, name: str, size: int) -> None:
    """Add a fully-open mask (all ones, born at -inf) of `size` entries to `module`."""
    module.register_buffer(f"{name}_mask", torch.ones(size))
    module.register_buffer(f"{name}_birth", torch.full((size,), -math.inf))
    setattr(module, f"{name}_active", False)
    names = list(getattr(module, "_mask_names", ()))
    module._mask_names = tuple(names + [name])


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


def active_mask(module: nn.Module, name: str):
    """The mask tensor if it still matters, else None (folded)."""
    return getattr(module, f"{name}_mask") if getattr(module, f"{name}_active") else None


def iter_masks(model: nn.Module) -> Iterator[Tuple[nn.Module, str]]:
    for mod in model.modules():
        for name in getattr(mod, "_mask_names", ()):
            yield mod, name


def mask_values(birth: torch.Tensor, step: int, ramp_steps: int) -> torch.Tensor:
    if ramp_steps <= 0:
        return torch.ones_like(birth)
    return ((step - birth) / ramp_steps).clamp_(0.0, 1.0)


def _youngest_birth(mod: nn.Module, name: str) -> float:
    """The latest birth step of a mask's entries, as a host float (-inf: none was grown), cached
    until the birth buffer is replaced or written in place (growth, load): the smallest mask value
    is clamp((step - youngest) / ramp) without reading the device every step."""
    birth = getattr(mod, f"{name}_birth")
    key = (id(birth), birth._version)
    cache = mod.__dict__.setdefault("_youngest_cache", {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = (key, float(birth.max()) if birth.numel() else -math.inf)
        cache[name] = hit
    return hit[1]


@torch.no_grad()
def update_masks(model: nn.Module, step: int, ramp_steps: int) -> float:
    """Set every mask to its value at `step`; fold the ones that reached 1.

    Returns the smallest mask value in the model (1.0 when nothing ramps), for logging. No host
    sync per step: which masks still ramp follows from their cached youngest birth, and folded
    masks are not touched.
    """
    lowest = 1.0
    for mod, name in iter_masks(model):
        youngest = _youngest_birth(mod, name)
        low = 1.0 if ramp_steps <= 0 or youngest == -math.inf else min(max((step - youngest) / ramp_steps, 0.0), 1.0)
        if low < 1.0 or getattr(mod, f"{name}_active"):  # ramping, or folding now: write the values
            getattr(mod, f"{name}_mask").copy_(mask_values(getattr(mod, f"{name}_birth"), step, ramp_steps))
        setattr(mod, f"{name}_active", low < 1.0)
        lowest = min(lowest, low)
    return lowest


@torch.no_grad()
def open_masks(model: nn.Module) -> None:
    """Remove every mask: all entries 1 and born at -inf (the No Mask / Net2Net baselines)."""
    for mod, name in iter_masks(model):
        getattr(mod, f"{name}_mask").fill_(1.0)
        getattr(mod, f"{name}_birth").fill_(-math.inf)
        setattr(mod, f"{name}_active", False)


def refresh_active(model: nn.Module) -> None:
    """Recompute the folded/active flags from the mask values (after loading a state dict)."""
    for mod, name in iter_masks(model):
        value = getattr(mod, f"{name}_mask")
        setattr(mod, f"{name}_active", bool(value.numel()) and float(value.min()) < 1.0)


def ramping(model: nn.Module) -> bool:
    return any(getattr(mod, f"{name}_active") for mod, name in iter_masks(model))
