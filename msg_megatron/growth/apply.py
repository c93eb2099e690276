"""The one growth entry point: online (Trainer.grow) and offline (msg-grow, piece by piece).

`grow(model, optimizer, shape, cfg, step, stage)` grows a model and its AdamW state to `shape`
with the config's growth settings (paper section 3.1): it chooses the seed of the new weights
(`growth_seed`: online growth and msg-grow of the checkpoint saved just before the stage draw the
same values), builds the per-axis plan once for the weights and the moments, and keeps it inside.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..config import Config, Shape
from ..model.gpt import MaskedGPT, Piece
from ..optim.optimizer import TrainOptimizer
from .axes import GrowthPlan
from .operators import grow_model, growth_seed
from .optimizer_state import PieceState, grow_optimizer, grow_states


def grow(model: MaskedGPT, optimizer, shape: Shape, cfg: Config, step: int, stage: int, *,
         into: Optional[Piece] = None, sources: Optional[List[Optional[int]]] = None,
         device: Optional[torch.device] = None) -> Tuple[MaskedGPT, object]:
    """(grown model, its optimizer state) for growth stage `stage` before training step `step`.

    `optimizer`: the run's TrainOptimizer (bf16: its fp32 masters are grown, not their rounding;
    the old one is consumed), or a piece's PieceState (msg-grow), or None (weights only). `into`,
    `sources`, `device`: grow a piece of a stage (growth/stream.py; see grow_model)."""
    g = cfg.growth
    if isinstance(optimizer, TrainOptimizer):
        optimizer.release_for_growth()  # (also frees the gradient buffers before the new model exists)
    plan = GrowthPlan(model, shape)
    new_model, name_map = grow_model(model, shape, step=step, init=g.init, init_std=g.init_std,
                                     depth_init=g.depth_init, seed=growth_seed(cfg.train.seed, stage), plan=plan,
                                     operator=g.operator, into=into, sources=sources, device=device)
    if optimizer is None:
        return new_model, None
    if isinstance(optimizer, TrainOptimizer):
        return new_model, grow_optimizer(optimizer, model, new_model, name_map, plan, cfg.train, cfg.parallel)
    new_state = PieceState()
    grow_states(optimizer, dict(model.named_parameters()), new_model, name_map, plan, new_state)
    return new_model, new_state
