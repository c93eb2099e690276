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

from ..config import Shape, growth_refusal
from ..model.gpt import MaskedGPT, Piece, pp_rank_size
from ..model.masks import open_masks, refresh_active
from ..model.params import param
from ..model.recompute import copy_recompute
from ..parallel import setup
from .axes import AxisPlan, GrowthPlan

InitFn = Callable[[str, Tuple[int, ...], torch.Generator], torch.Tensor]


def named_init(kind: str, std: float) -> Optional[InitFn]:
    """The init of new weight entries for a named kind; None for `copy` (replicate units)."""
    if kind == "copy":
        return None

    def init(name: str, shape, gen: torch.Generator) -> torch.Tensor:
        kind = param(name).kind
        if kind == "norm":
            return torch.ones(shape)
        if kind == "bias":
            return torch.zeros(shape)
        if kind == "zeros":
            return torch.zeros(shape)
        return torch.randn(shape, generator=gen) * std

    return init


def growth_seed(train_seed: int, stage: int) -> int:
    """The seed of the new weights drawn when growing into `stage` (each tensor's generators also
    take the step and the tensor's name: `_generators`). One rule for online growth
    (`Trainer.grow`) and `msg-grow`, so growing the checkpoint saved just before stage k offline
    draws exactly the weights that training through the growth would have drawn."""
    return train_seed + stage


def _generators(seed: int, step: int, name: str) -> Callable[[int], torch.Generator]:
    """chunk -> a generator for that chunk of the canonical tensor `name` at this growth step: the
    values depend on neither iteration order nor the tensor-parallel layout."""
    base = seed * 1_000_003 + step * 7919 + zlib.crc32(name.encode())

    def gen_for(chunk: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((base + chunk * 104_729) % (2**63))
        return g

    return gen_for


DRAW_CHUNK = 1024  # canonical rows drawn per generator: bounded memory for any tensor size


def draw_new(name: str, plans: List[Optional[AxisPlan]], local_shape: Tuple[int, ...], init: InitFn,
             gen_for: Callable[[int], torch.Generator]) -> torch.Tensor:
    """This rank's part of the canonical (single-rank) tensor of initial values.

    The canonical tensor is drawn in chunks of DRAW_CHUNK rows along axis 0, chunk c from its own
    generator `gen_for(c)`; only the chunks holding this rank's rows are drawn. Every TP layout (and
    a single rank) therefore gets the same values for the same canonical entries.
    """
    canon_shape = [p.canon_size if p is not None else local_shape[i] for i, p in enumerate(plans)]
    index = [p.canon if p is not None else torch.arange(local_shape[i]) for i, p in enumerate(plans)]
    out = torch.empty(local_shape)
    if out.numel() == 0:
        return out
    rows = index[0]
    chunk_of = rows // DRAW_CHUNK
    for c in torch.unique(chunk_of).tolist():
        where = (chunk_of == c).nonzero().squeeze(1)
        n = min(DRAW_CHUNK, canon_shape[0] - c * DRAW_CHUNK)
        block = init(name, tuple([n] + canon_shape[1:]), gen_for(c))
        block = block[rows[where] - c * DRAW_CHUNK]
        if len(index) > 1:
            block = block[:, index[1]]
        out[where] = block
    return out


def _outgoing_axis(name: str, dim: int) -> bool:
    """Axis `dim` of `name` holds a unit's outgoing weights: the input axis of a linear layer."""
    return dim == 1 and param(name).kind == "linear"


# New entries of the tensors that are mask state (eq. 10): 0 (masked) and born at this step.
_NEW_STATE = {"mask": lambda shape, old, step: torch.zeros(shape, dtype=old.dtype, device=old.device),
              "birth": lambda shape, old, step: torch.full(shape, float(step), dtype=old.dtype, device=old.device)}


def grow_tensor(name: str, old: torch.Tensor, plans: List[Optional[AxisPlan]], init: Optional[InitFn],
                gen_for: Optional[Callable[[int], torch.Generator]], step: int,
                split_copies: bool = False) -> torch.Tensor:
    """Grow one (local) tensor along every axis whose role grows; old entries copied bit-exactly.
    By kind (model/params.py): unit ids come from the plan, mask state is 0 / born now, weights
    are drawn (`init`) or replicate their source units (init=copy)."""
    new_shape = tuple(p.new_local if p is not None else old.shape[i] for i, p in enumerate(plans))
    if new_shape == tuple(old.shape):
        return old.clone()
    kind = param(name).kind
    if kind == "ids":
        return plans[0].new_ids.to(old.device)
    if kind in _NEW_STATE:
        new = _NEW_STATE[kind](new_shape, old, step)
    elif init is None:
        return _replicate_units(name, old, plans, split_copies)
    else:  # new values are drawn on the CPU (layout-independent streams), then moved
        new = draw_new(name, plans, new_shape, init, gen_for).to(device=old.device, dtype=old.dtype)
    index = [(p.old_pos if p is not None else torch.arange(old.shape[i])).to(old.device) for i, p in enumerate(plans)]
    if len(index) == 1:
        new[index[0]] = old
    else:
        new[index[0][:, None], index[1][None, :]] = old
    return new


def _replicate_units(name: str, old: torch.Tensor, plans: List[Optional[AxisPlan]], split_copies: bool):
    """init=copy: every new entry replicates its source unit (Net2Net's map). `split_copies`
    (Net2Net, eq. 6): a unit's outgoing weights are divided by the number of its replicas, so the
    next layer's input sum is unchanged."""
    new = old
    for dim, p in enumerate(plans):
        if p is not None:
            src = p.source.to(old.device)
            new = new.index_select(dim, src)
            if split_copies and _outgoing_axis(name, dim):
                count = torch.bincount(src, minlength=old.shape[dim]).to(new.dtype)[src]
                new = new / count.view(*([1] * dim), -1, *([1] * (new.dim() - dim - 1)))
    return new.clone()


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


def chunk_depth_plan(old_local: int, new_local: int, chunks: int, depth_init: str) -> List[Optional[int]]:
    """plan_depth per chunk of a stage's layers (local indices), the chunks side by side."""
    if chunks != 1 and depth_init != "interpolate" and new_local != old_local:
        raise ValueError(f"growth.depth_init={depth_init} under an interleaved pipeline: new layers would move "
                         "between chunks; use growth.depth_init=interpolate")
    o, n = old_local // chunks, new_local // chunks
    return [None if j is None else c * o + j for c in range(chunks) for j in plan_depth(o, n, depth_init)]


def check_growth(old: Shape, new: Shape, init: str, depth_init: str, tp: int, pp: int) -> None:
    """config.growth_refusal as a ValueError: grow_model checks it; msg-grow before loading anything."""
    why = growth_refusal(old, new, init, depth_init, tp, pp)
    if why:
        raise ValueError(why)


def grow_model(model: MaskedGPT, new_shape: Shape, *, step: int, init: Union[str, InitFn] = "normal",
               init_std: float = 0.02, depth_init: str = "interpolate", seed: int = 1234,
               plan: Optional[GrowthPlan] = None, operator: str = "msg", into: Optional[Piece] = None,
               sources: Optional[List[Optional[int]]] = None, device: Optional[torch.device] = None
               ) -> Tuple[MaskedGPT, Dict[str, Optional[str]]]:
    """Return (grown model, name map). The name map gives, for each new tensor, the old tensor it
    grew from (None for tensors of randomly initialised new layers); optimizer-state growth uses it.

    Streaming (msg-grow) grows a model piece by piece: `model` is then a piece of the old stage,
    `into` the piece of the new stage to build and `sources[j]` the local index in `model` of the
    layer new layer j grows from (None: a random new layer); the first new layer from a source is
    the grown original, later ones its copies, as in `plan_depth`. The values are those the whole
    stage would get (generators are named by global layer numbers).

    `operator`: `msg` (masked); `nomask` (the same new weights, every mask opened at once: the
    paper's No Mask ablation); `net2net` (bert2BERT, appendix C: new units replicate existing ones
    with outgoing weights split between replicas (eq. 5-6), new layers are copies, no masks; exact
    for FFN and head growth, not for hidden growth under LayerNorm (eq. 7) nor for copied layers).
    """
    if operator not in ("msg", "nomask", "net2net"):
        raise ValueError(f"unknown growth operator {operator!r}; use msg, nomask or net2net")
    split_copies = operator == "net2net"
    if split_copies:
        init = "copy"
    old_shape = model.shape
    init_fn = named_init(init, init_std) if isinstance(init, str) else init
    mcfg = model.mcfg
    plan = plan or GrowthPlan(model, new_shape)  # callers growing the optimizer too pass theirs
    check_growth(old_shape, new_shape, "copy" if init_fn is None else "normal", depth_init, plan.tp,
                 pp_rank_size()[1] if sources is None else 1)  # (pieces: their sources are the stage's plan)
    old_sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}

    new_model = MaskedGPT(mcfg, new_shape, perform_init=False, piece=into).to(device or setup.device())
    copy_recompute(model.config, new_model.config)  # (train.recompute carries over)
    if sources is None:
        # Per stage, and under an interleaved pipeline per chunk: interpolation of the chunk's own
        # layers equals the global plan restricted to it, so each new layer is built in its
        # source's chunk, on its source's rank.
        sources = chunk_depth_plan(model.local_layers, new_model.local_layers, model.chunks, depth_init)
    depth_plan = sources

    def rng_name(name: str, of: MaskedGPT) -> str:
        """Generator names use global layer numbers (and the embedding's name for the tied output
        copy), so every pipeline layout (and every piece) draws the same values as a single rank."""
        if name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            return f"layers.{of.global_layers[int(idx)]}.{rest}"
        if name == "output_layer.weight" and model.shared_output_copy():
            return "embedding.weight"
        return name

    seen = set()
    name_map: Dict[str, Optional[str]] = {}
    filled = set()
    # each grown tensor goes straight into its place: old model + new model + one tensor at a time
    for name, target in new_model.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        src_name, is_copy, fresh = name, False, False
        if name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            src_layer = depth_plan[int(idx)]
            if src_layer is None:
                fresh = True
            else:
                src_name = f"layers.{src_layer}.{rest}"
                key = (src_layer, rest)
                is_copy = key in seen
                seen.add(key)
        # a copied layer is an exact copy of its grown source: same generators
        gen_for = _generators(seed, step, rng_name(name, new_model) if fresh else rng_name(src_name, model))
        if fresh:
            value = _fresh_layer_tensor(name, tuple(target.shape), plan.axes(name, fresh=True), init_fn,
                                        init_std, gen_for, step)
            name_map[name] = None
        else:
            value = grow_tensor(src_name, old_sd[src_name], plan.axes(src_name), init_fn, gen_for, step,
                                split_copies)
            name_map[name] = None if is_copy else src_name
            if is_copy and name.endswith("depth_mask"):
                value = torch.zeros_like(value)  # eq. 20: a new layer starts skipped
            elif is_copy and name.endswith("depth_birth"):
                value = torch.full_like(value, float(step))
        if tuple(value.shape) != tuple(target.shape):
            raise RuntimeError(f"grown `{name}` has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value)
        filled.add(name)
        del value
    missing = set(k for k in new_model.state_dict() if not k.endswith("_extra_state")) - filled
    if missing:
        raise RuntimeError(f"growth left tensors unset: {sorted(missing)}")
    if operator != "msg":
        open_masks(new_model)
    refresh_active(new_model)
    return new_model, name_map


def _fresh_layer_tensor(name, shape, plans, init_fn, std, gen_for, step) -> torch.Tensor:
    """A tensor of a randomly initialised new layer (depth_init=random)."""
    kind, depth = param(name).kind, name.endswith("depth_mask") or name.endswith("depth_birth")
    if kind == "mask":  # eq. 20: the new layer starts skipped; inside it, its own units need no mask
        return torch.zeros(shape) if depth else torch.ones(shape)
    if kind == "birth":
        return torch.full(shape, float(step) if depth else -math.inf)
    if kind == "ids":
        return plans[0].new_ids.clone()
    return draw_new(name, plans, shape, init_fn or named_init("normal", std), gen_for)
