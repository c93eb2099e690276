"""Learning rate: linear warmup, then cosine/linear/constant decay to min_lr.

With `growth.lr_reset_stages`, the rate jumps back to its peak at those growth steps and decays
again from there over the remaining steps (paper appendix D: reset at the 1st and 2nd growth,
following Gu et al., 2021).
"""
from __future__ import annotations

import math
from typing import List


class LRSchedule:
    def __init__(self, lr: float, min_lr: float, warmup_steps: int, decay_steps: int, style: str = "cosine",
                 reset_steps: List[int] = ()):
        self.lr, self.min_lr, self.warmup, self.decay_steps, self.style = lr, min_lr, warmup_steps, decay_steps, style
        self.reset_steps = sorted(reset_steps)

    def __call__(self, step: int) -> float:
        start = 0
        for r in self.reset_steps:
            if step >= r:
                start = r
        if start == 0 and step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        begin = self.warmup if start == 0 else start
        span = max(1, self.decay_steps - begin)
        frac = min(1.0, max(0.0, (step - begin) / span))
        if self.style == "constant":
            return self.lr
        if self.style == "linear":
            coeff = 1.0 - frac
        else:
            coeff = 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.min_lr + (self.lr - self.min_lr) * coeff


def lr_schedule(cfg) -> LRSchedule:
    """The learning-rate schedule a config (msg_megatron.config.Config) trains with."""
    t, schedule = cfg.train, cfg.schedule()
    reset_steps = [schedule[i][0] for i in cfg.growth.lr_reset_stages if i < len(schedule)]
    return LRSchedule(t.lr, t.min_lr, t.warmup_steps, t.decay_steps or t.steps, t.decay_style, reset_steps)
