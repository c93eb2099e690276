"""MSG growth operators: hidden, ffn, heads and layers, alone or together, at any size.

`grow_model(model, new_shape, ...)` builds the new-shape model and fills every tensor:
- old entries are copied exactly into their slice (eq. 11, 14, 22, 25);
- new entries get the configured init (`normal` N(0, std) as paper 3.2.2, `zeros`, or `copy` which
  replicates an existing unit), norm weights 1 and biases 0 for normal/zeros;
- new mask entries are 0 with birth = `step`, so the function is preserved exactly for ANY finite
  new weights (eq. 12, 19, 23, 20) and ramps in over `ramp_steps`;
- new layers (eq. 20) are copies of grown layers (`interpolate`: each copy right above its source;
  `stack`: the stack repeated on top) or freshly initialised (`random`, on top).
Width growth is applied to every old layer first, so copied layers are copies of grown layers.
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from ..config import Shape
from ..model.gpt import MaskedGPT
from ..model.masks import refresh_active
from .axes import AxisMap, axis_maps, axis_roles

InitFn = Callable[[str, Tuple[int, ...], torch.Generator], torch.Tensor]


def named_init(kind: str, std: float) -> Optional[InitFn]:
    """The init of new weight entries for a named kind; None for `copy` (replicate units)."""
    if kind == "copy":
        return None

    def init(name: str, shape, gen: torch.Generator) -> torch.Tensor:
        if _is_norm_weight(name):
            return torch.ones(shape)
        if name.endswith(".bias"):
            return torch.zeros(shape)
        if kind == "zeros":
            return torch.zeros(shape)
        return torch.randn(shape, generator=gen) * std

    return init


def _is_norm_weight(name: str) -> bool:
    return name.endswith("norm.weight")


def _is_mask(name: str) -> bool:
    return name.endswith("_mask") or name.endswith("_birth")


def _generator(seed: int, step: int, name: str) -> torch.Generator:
    # A stream per (seed, growth step, tensor): the result does not depend on iteration order.
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7919 + zlib.crc32(name.encode())) % (2**63))
    return g


def grow_tensor(name: str, old: torch.Tensor, maps: Dict[str, AxisMap], init: Optional[InitFn],
                gen: torch.Generator, step: int) -> torch.Tensor:
    """Grow one tensor along every axis whose role grows; old entries copied bit-exactly."""
    roles = axis_roles(name)
    axes = [maps.get(r) for r in roles]  # None: the axis keeps its size
    new_shape = tuple(a.new_size if a is not None else old.shape[i] for i, a in enumerate(axes))
    if new_shape == tuple(old.shape):
        return old.clone()
    if name.endswith("_mask"):
        new = torch.zeros(new_shape, dtype=old.dtype)  # eq. 10: new entries start masked
    elif name.endswith("_birth"):
        new = torch.full(new_shape, float(step), dtype=old.dtype)
    elif init is None:  # copy: every new entry replicates its source unit (Net2Net's map, no split)
        new = old
        for dim, a in enumerate(axes):
            if a is not None:
                new = new.index_select(dim, a.source)
        return new.clone()
    else:
        new = init(name, new_shape, gen).to(old.dtype)
    index = [a.old_pos if a is not None else torch.arange(old.shape[i]) for i, a in enumerate(axes)]
    if len(index) == 1:
        new[index[0]] = old
    else:
        new[index[0][:, None], index[1][None, :]] = old
    return new


def plan_depth(old_layers: int, new_layers: int, depth_init: str) -> List[Optional[int]]:
    """For each new layer position: the old layer it comes from, or None for a random new layer.

    Old layers appear in order; the first occurrence of an index is the original layer, any later
    occurrence is a copy (interpolate puts each copy right above its source, stack on top).
    """
    n_add = new_layers - old_layers
    if n_add == 0:
        return list(range(old_layers))
    if depth_init == "interpolate":
        # copies spread evenly: old layer i gets floor((i+1)*n/L) - floor(i*n/L) copies above it
        out = []
        for i in range(old_layers):
            copies = (i + 1) * n_add // old_layers - i * n_add // old_layers
            out += [i] * (1 + copies)
        return out
    if depth_init == "stack":
        return list(range(old_layers)) + [k % old_layers for k in range(n_add)]
    if depth_init == "random":
        return list(range(old_layers)) + [None] * n_add
    raise ValueError(f"unknown depth_init {depth_init!r}; use interpolate, stack or random")


def grow_model(model: MaskedGPT, new_shape: Shape, *, step: int, init: Union[str, InitFn] = "normal",
               init_std: float = 0.02, depth_init: str = "interpolate", seed: int = 1234
               ) -> Tuple[MaskedGPT, Dict[str, Optional[str]]]:
    """Return (grown model, name map). The name map gives, for each new tensor, the old tensor it
    grew from (None for tensors of randomly initialised new layers); optimizer-state growth uses it.
    """
    old_shape = model.shape
    for dim, a, b in zip(("hidden", "ffn", "heads", "layers"), old_shape.as_tuple(), new_shape.as_tuple()):
        if b < a:
            raise ValueError(f"cannot shrink {dim} from {a} to {b}: growth only adds units")
    init_fn = named_init(init, init_std) if isinstance(init, str) else init
    mcfg = model.mcfg
    maps = axis_maps(old_shape, new_shape, mcfg.head_dim, mcfg.activation == "swiglu")
    old_sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}

    new_model = MaskedGPT(mcfg, new_shape, perform_init=False)
    plan = plan_depth(old_shape.layers, new_shape.layers, depth_init)
    seen = set()
    name_map: Dict[str, Optional[str]] = {}
    new_sd = {}
    for name, target in new_model.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        src_name, is_copy, fresh = name, False, False
        if name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            src_layer = plan[int(idx)]
            if src_layer is None:
                fresh = True
            else:
                src_name = f"layers.{src_layer}.{rest}"
                key = (src_layer, rest)
                is_copy = key in seen
                seen.add(key)
        gen = _generator(seed, step, src_name)  # a copied layer is an exact copy of its grown source
        if fresh:
            value = _fresh_layer_tensor(name, tuple(target.shape), init_fn, init_std, gen, step)
            name_map[name] = None
        else:
            value = grow_tensor(src_name, old_sd[src_name], maps, init_fn, gen, step)
            name_map[name] = None if is_copy else src_name
            if is_copy and name.endswith("depth_mask"):
                value = torch.zeros_like(value)  # eq. 20: a new layer starts skipped
            elif is_copy and name.endswith("depth_birth"):
                value = torch.full_like(value, float(step))
        if tuple(value.shape) != tuple(target.shape):
            raise RuntimeError(f"grown `{name}` has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        new_sd[name] = value
    new_model.load_state_dict(new_sd, strict=False)
    missing = set(k for k in new_model.state_dict() if not k.endswith("_extra_state")) - set(new_sd)
    if missing:
        raise RuntimeError(f"growth left tensors unset: {sorted(missing)}")
    refresh_active(new_model)
    return new_model, name_map


def _fresh_layer_tensor(name, shape, init_fn, std, gen, step) -> torch.Tensor:
    """A tensor of a randomly initialised new layer (depth_init=random)."""
    if name.endswith("depth_mask"):
        return torch.zeros(shape)
    if name.endswith("depth_birth"):
        return torch.full(shape, float(step))
    if name.endswith("_mask"):
        return torch.ones(shape)  # inside a skipped layer, its own units need no extra mask
    if name.endswith("_birth"):
        return torch.full(shape, -math.inf)
    fn = init_fn or named_init("normal", std)
    return fn(name, shape, gen)
