"""Grow AdamW's state with the model (paper 3.2.2).

Old entries of exp_avg / exp_avg_sq are copied bit-exactly into their slice; new entries are 0
("start from scratch for new weights"). Bias correction: torch's AdamW keeps one `step` per tensor.
A tensor that grew in width keeps its step, so its new entries are corrected as if they had seen
that many steps: their first update is at most (1-beta1)/sqrt(1-beta2) x lr in size (3.2x for
betas (0.9, 0.95)) instead of 1x lr; the ramping mask keeps those entries' influence small meanwhile.
Tensors of new layers (copies or random) start at step 0: exact Adam from scratch.

Under megatron's distributed optimizer each DP rank holds a slice of every moment: `state_of`
assembles a parameter's whole moment from the slices, it grows, and the new optimizer keeps this
rank's slice of the grown tensor (the slices of old and new model differ, the values do not).
One parameter's whole moments exist at a time, and each old slice is freed after its last use, so
growth holds about what the grown model's training step holds.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, Optional

import torch

from ..config import ParallelConfig, TrainConfig
from ..optim.optimizer import MOMENTS, TrainOptimizer, build_optimizer, cast_keeping_masters
from .axes import GrowthPlan
from .operators import grow_tensor


def grow_optimizer(old_opt: TrainOptimizer, old_model: torch.nn.Module, new_model: torch.nn.Module,
                   name_map: Dict[str, Optional[str]], plan: GrowthPlan, tcfg: TrainConfig,
                   pcfg: Optional[ParallelConfig] = None) -> TrainOptimizer:
    """The optimizer of `new_model`, its state grown from `old_opt`'s (a collective under the
    distributed optimizer: every DP rank calls it)."""
    old_params = dict(old_model.named_parameters())
    if any(p.dtype != torch.float32 for p in old_model.parameters()):
        raise RuntimeError("grow_optimizer needs the old model in fp32: call the old optimizer's "
                           "release_for_growth() before grow_model (bf16 masters would be lost)")
    # the old weights were copied into the grown model: free them before its buffers are allocated
    old_opt.release_weights()
    # the grown model holds fp32 weights (under bf16 the old masters: see release_for_growth)
    masters = cast_keeping_masters(new_model, torch.bfloat16 if old_opt.bf16 else torch.float32)
    new_opt = build_optimizer(new_model, tcfg, pcfg, masters=masters)
    grow_states(old_opt, old_params, new_model, name_map, plan, new_opt)
    return new_opt


def grow_states(old_opt, old_params: Dict[str, torch.nn.Parameter], new_model: torch.nn.Module,
                name_map: Dict[str, Optional[str]], plan: GrowthPlan, new_opt) -> None:
    """Set each new parameter's state in `new_opt` from its source's in `old_opt` (any objects with
    state_of / set_local_state / set_state: TrainOptimizer, or msg-grow's per-piece PieceState)."""
    uses = Counter(src for src in name_map.values() if src is not None)
    for name, p in new_model.named_parameters():  # the same order on every rank
        src = name_map.get(name)
        if src is None:
            continue
        old_p = old_params[src]
        st = old_opt.state_of(old_p)  # (whole tensors: one parameter's at a time)
        uses[src] -= 1
        if uses[src] == 0:
            old_opt.set_local_state(old_p, None)  # the old slice is not needed any more: free it
        if st is None:
            continue
        new_st = {"step": st["step"].clone()}
        for key in MOMENTS:
            new_st[key] = grow_tensor(src, st[key], plan.axes(src), _zeros, _no_rng, 0).to(p.device)
        del st
        new_opt.set_state(p, new_st)


def _zeros(name, shape, gen):  # new moments start from scratch (paper 3.2.2)
    return torch.zeros(shape)


def _no_rng(chunk):
    return None


class PieceState:
    """AdamW state of a model piece, by parameter: the part of TrainOptimizer's interface that
    checkpoint loading, saving and state growth use (no gradients, no update step)."""

    distributed, bf16 = False, False

    def __init__(self):
        self.state: Dict[torch.nn.Parameter, dict] = {}

    def local_range(self, p):
        return 0, p.numel()

    def local_master(self, p):
        return p.detach().view(-1)

    def local_state(self, p) -> Optional[dict]:
        return self.state.get(p)

    def set_local_state(self, p, state: Optional[dict]) -> None:
        if state is None:
            self.state.pop(p, None)
            return
        step = torch.as_tensor(state["step"], dtype=torch.float32).reshape(())
        self.state[p] = {"step": step, **{k: state[k].reshape(-1) for k in MOMENTS}}

    def state_of(self, p) -> Optional[dict]:
        st = self.state.get(p)
        return None if st is None else {"step": st["step"], **{k: st[k].view_as(p) for k in MOMENTS}}

    set_state = set_local_state  # (the whole parameter is this piece's local range)

    def params_from_masters(self) -> None:
        pass
