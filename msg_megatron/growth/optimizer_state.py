"""Grow AdamW's state with the model (paper 3.2.2).

Old entries of exp_avg / exp_avg_sq are copied bit-exactly into their slice; new entries are 0
("start from scratch for new weights"). Bias correction: torch's AdamW keeps one `step` per tensor.
A tensor that grew in width keeps its step, so its new entries are corrected as if they had seen
that many steps: their first update is at most (1-beta1)/sqrt(1-beta2) x lr in size (3.2x for
betas (0.9, 0.95)) instead of 1x lr; the ramping mask keeps those entries' influence small meanwhile.
Tensors of new layers (copies or random) start at step 0: exact Adam from scratch.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..config import TrainConfig
from ..training.optimizer import build_optimizer
from .axes import GrowthPlan
from .operators import grow_tensor


def grow_optimizer(old_opt: torch.optim.Optimizer, old_model: torch.nn.Module, new_model: torch.nn.Module,
                   name_map: Dict[str, Optional[str]], plan: GrowthPlan, tcfg: TrainConfig
                   ) -> torch.optim.Optimizer:
    old_params = dict(old_model.named_parameters())
    new_opt = build_optimizer(new_model, tcfg)
    for g_new, g_old in zip(new_opt.param_groups, old_opt.param_groups):
        g_new["lr"] = g_old["lr"]
    for name, p in new_model.named_parameters():
        src = name_map.get(name)
        if src is None or old_params[src] not in old_opt.state:
            continue
        st = old_opt.state[old_params[src]]
        new_st = {"step": st["step"].clone()}
        for key in ("exp_avg", "exp_avg_sq"):
            new_st[key] = grow_tensor(src, st[key], plan.axes(src), _zeros, _no_rng, 0)
        new_opt.state[p] = new_st
    return new_opt


def _zeros(name, shape, gen):  # new moments start from scratch (paper 3.2.2)
    return torch.zeros(shape)


def _no_rng(chunk):
    return None
