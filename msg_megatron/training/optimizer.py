"""AdamW with the usual no-decay group (norm weights, biases); built by parameter name."""
from __future__ import annotations

import torch

from ..config import TrainConfig


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or name.endswith(".bias")


def build_optimizer(model: torch.nn.Module, tcfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: the same code path (and rounding) for any number of parameters
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.adam_beta1, tcfg.adam_beta2),
                             eps=tcfg.adam_eps, foreach=False)
