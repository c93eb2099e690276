"""Offline growth one layer at a time (msg-grow): a process holds one old layer and what grows from
it, plus the embeddings, whatever the depth.

The work of a pipeline stage is cut into groups: the stage's ends (embeddings, final norm, output
layer, hidden mask), then one group per old layer with the new layers that grow from it (the
grown original and its copies, `plan_depth`), and one per randomly initialised new layer. Each
group is grown as a model *piece* (`MaskedGPT(piece=...)`) by the same `grow_model` and
`grow_states` as online growth, with generators named by global layer numbers, so every tensor
equals what growing the whole model at once gives (tested tensor by tensor).

The grown checkpoint is one dist_checkpointing save whose state dict holds placeholders built from
a model of the new shape on the `meta` device; `checkpoint/stream_writer.py` asks `GrowthSource`
for each tensor when it is written. Processes beyond T x P (the data-parallel ranks of this
layout) share the groups round-robin: DP rank d grows groups d, d + D, ... and writes them (their
tensors' main replica is set to d). Loading a group from the old checkpoint is a collective
(dist_checkpointing), so every rank runs the same rounds: in round r it loads its group r*D + d,
or, when it has none, only the hidden mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..checkpoint.dist import _sharded, load_checkpoint, read_meta, tensor_index
from ..checkpoint.stream_writer import placeholder
from ..config import Shape
from ..model.gpt import MaskedGPT, Piece, stage_piece
from ..optim.optimizer import MOMENTS
from .apply import grow
from .operators import plan_depth
from .optimizer_state import PieceState


@dataclass
class Group:
    """One unit of streamed work on a stage: old local layers -> new local layers (`sources[j]`:
    index into `old` of new layer j's source, None for a random layer)."""
    old: Piece
    new: Piece
    sources: List[Optional[int]]


def stage_groups(old: Shape, new: Shape, depth_init: str) -> List[Group]:
    """This rank's stage: [ends] + one group per old layer + one per random new layer."""
    o, n = stage_piece(old), stage_piece(new)
    plan = plan_depth(len(o.layers), len(n.layers), depth_init)
    groups = [Group(Piece((), o.pre_process, o.post_process), Piece((), n.pre_process, n.post_process), [])]
    for i in range(len(o.layers)):
        js = [j for j, src in enumerate(plan) if src == i]
        groups.append(Group(Piece((o.layers[i],), False, False),
                            Piece(tuple(n.layers[j] for j in js), False, False), [0] * len(js)))
    for j, src in enumerate(plan):
        if src is None:
            groups.append(Group(Piece((), False, False), Piece((n.layers[j],), False, False), [None]))
    return groups


def group_of_key(key: str, groups: List[Group]) -> int:
    """The index of the group whose new piece holds checkpoint key `key` (0: the ends)."""
    at = key.find("model.layers.")
    if at < 0:
        return 0
    layer = int(key[at + len("model.layers."):].split(".", 1)[0])
    for g, group in enumerate(groups):
        if layer in group.new.layers:
            return g
    raise KeyError(f"no group holds layer {layer} ({key})")


def _rounds(n_groups: int, dp: int) -> int:
    """Rounds of the round-robin over the layer groups (1..n-1; the ends are loaded beforehand)."""
    return math.ceil((n_groups - 1) / dp)


def read_once(path: str) -> tuple:
    """(meta, tensor index) of checkpoint `path`, verified and parsed once for all its pieces."""
    meta = read_meta(path)
    return meta, tensor_index(meta["path"])


def load_piece(read: tuple, cfg, shape: Shape, piece: Piece, device, restore_rng: bool = False,
               optimizer: bool = True):
    """A piece of a model of `shape` (this rank's stage, this layout) with its tensors (and AdamW
    state) from the checkpoint `read` = read_once(path): a collective, as every dist_checkpointing load."""
    import warnings

    model = MaskedGPT(cfg.model, shape, perform_init=False, piece=piece).to(device)
    state = PieceState() if optimizer else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_checkpoint(read[0]["path"], model, state, restore_rng=restore_rng, whole_model=False, read=read)
    return model, state


class GrowthSource:
    """Grows groups when the checkpoint writer asks for their tensors (see module doc)."""

    def __init__(self, path: str, cfg, old: Shape, new: Shape, groups: List[Group], step: int, stage: int,
                 device: torch.device, dp_rank: int, dp: int):
        """`cfg`: the checkpoint's config with the growth settings to apply; `step`, `stage`: the
        checkpoint's step and the growth stage being entered (growth/apply.py)."""
        self.read, self.cfg, self.old, self.new = read_once(path), cfg, old, new
        self.groups, self.step, self.stage, self.device = groups, step, stage, device
        self.dp_rank, self.dp = dp_rank, dp
        self.rounds = _rounds(len(groups), dp)
        self.done = -1  # rounds run so far
        self.current: Dict[tuple, torch.Tensor] = {}  # (key, global offset) -> tensor
        self.current_group: Optional[int] = None
        self.fixed: Dict[tuple, torch.Tensor] = {}
        self.rng: Optional[torch.Tensor] = None  # the saved RNG state of this rank (grow_ends)

    def owner(self, g: int) -> int:
        """The DP rank that grows and writes group g."""
        return 0 if g == 0 else (g - 1) % self.dp

    def load(self, piece: Piece, restore_rng: bool = False):
        out = load_piece(self.read, self.cfg, self.old, piece, self.device, restore_rng=restore_rng)
        if restore_rng:
            self.rng = torch.get_rng_state()  # (before building the grown piece reseeds torch)
        return out

    def grow_ends(self) -> torch.Tensor:
        """Before the save (every rank): DP rank 0 grows the stage's ends and keeps them until they
        are written. Returns this rank's torch RNG state saved with the old checkpoint (when it
        was saved by as many processes), which the grown checkpoint keeps."""
        if self.dp_rank == 0:
            self.fixed.update(self.grow(0, restore_rng=True))
        else:
            self.load(Piece((), False, False), restore_rng=True)
        return self.rng

    def grow(self, g: int, restore_rng: bool = False) -> Dict[tuple, torch.Tensor]:
        """Load group g, grow it; its tensors by checkpoint key (as the whole model's save has them)."""
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import apply_factories

        group = self.groups[g]
        old_model, old_state = self.load(group.old, restore_rng)
        new_model, new_state = grow(old_model, old_state, self.new, self.cfg, self.step, self.stage,
                                    into=group.new, sources=group.sources, device=self.device)
        del old_model, old_state
        sd, _ = _sharded(new_model, new_state)
        apply_factories(sd)  # (SwiGLU's fc1: its two halves, as the save builds them)
        return {(sh.key, tuple(sh.global_offset)): sh.data for sh in nested_values(sd)}

    def run_round(self, r: int) -> None:
        self.current, self.current_group = {}, None  # the previous group's tensors are written: free them
        g = 1 + r * self.dp + self.dp_rank
        if g < len(self.groups):
            self.current, self.current_group = self.grow(g), g
        else:  # nothing left for this rank: take part in the round's collective load
            self.load(Piece((), False, False))
        self.done = r

    def __call__(self, key: str, item) -> torch.Tensor:
        at = (key, tuple(item.index.offset))
        if at in self.fixed:  # the ends, the RNG state
            return self.fixed.pop(at)
        g = group_of_key(key, self.groups)
        if self.owner(g) != self.dp_rank:
            raise RuntimeError(f"msg-grow: `{key}` of group {g} is written by DP rank {self.owner(g)}, "
                               f"asked of DP rank {self.dp_rank}")
        if g != self.current_group:
            r = (g - 1) // self.dp
            if r <= self.done:
                raise RuntimeError(f"msg-grow: `{key}` (group {g}) asked for after its group was written")
            while self.done < r:
                self.run_round(self.done + 1)
        if at not in self.current:
            raise RuntimeError(f"msg-grow: group {g} did not make `{key}` at offset {at[1]}")
        return self.current.pop(at)

    def finish(self) -> None:
        """After this rank's last tensor: the rounds it has not run yet (the others run them too)."""
        while self.done < self.rounds - 1:
            self.run_round(self.done + 1)
        self.current, self.current_group = {}, None


def skeleton(cfg, new: Shape, saved: dict, groups: List[Group]) -> Tuple[MaskedGPT, dict]:
    """The new stage on the `meta` device and its checkpoint state dict of placeholders (`saved`:
    the old checkpoint's tensor index, which says which parameters have AdamW state)."""
    with torch.device("meta"):
        model = MaskedGPT(cfg.model, new, perform_init=False)
    stated = stated_params(saved, groups, model)
    state = PieceState()
    for name, p in model.named_parameters():
        if name in stated:
            state.set_local_state(p, {"step": torch.zeros((), device="meta"),
                                      **{k: placeholder(p).reshape(-1) for k in MOMENTS}})
    sd, _ = _sharded(model, state)
    return model, sd


def stated_params(saved: dict, groups: List[Group], meta_model: MaskedGPT) -> set:
    """Parameters of the new stage that grow from a parameter with saved AdamW state (copied and
    random layers start fresh, as after `grow_optimizer`)."""
    out = set()
    origin = {}  # new global layer -> old global layer, originals only
    for group in groups[1:]:
        for j, (layer, src) in enumerate(zip(group.new.layers, group.sources)):
            if src is not None and group.sources.index(src) == j:
                origin[layer] = group.old.layers[src]
    keys = {name: sh.key for name, sh in meta_model.sharded_state_dict(prefix="model.").items()}
    for name, _ in meta_model.named_parameters():
        key = keys[f"model.{name}"]
        if key.startswith("model.layers."):
            layer, rest = key[len("model.layers."):].split(".", 1)
            if int(layer) not in origin:
                continue
            key = f"model.layers.{origin[int(layer)]}.{rest}"
        if f"optimizer.exp_avg.{key}" in saved:
            out.add(name)
    return out


def set_writers(sd: dict, groups: List[Group], owner) -> dict:
    """The state dict in group order, each tensor's main replica on the DP rank that writes its group."""
    from megatron.core import parallel_state as ps

    dp_rank = ps.get_data_parallel_rank()
    order = sorted(sd.items(), key=lambda kv: group_of_key(kv[1].key, groups))
    out = {}
    for name, sh in order:
        rid = tuple(sh.replica_id) if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
        mine = owner(group_of_key(sh.key, groups)) == dp_rank
        sh.replica_id = rid[:-1] + (0 if mine else 1,)
        out[name] = sh
    return out
