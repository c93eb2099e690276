"""What a resume may not change silently: the schedule's past, the masks at the resume step, and the
learning rate from the resume step on.

A checkpoint at step s of stage k was trained on its own config's schedule. Resuming it under a config
whose stages 0..k start at other steps or shapes would make the log and the config disagree about the
run's history (and the LR resets tied to those stages move); a different `growth.ramp_steps` would set
the masks of units grown before s to other values (paper eq. 10: clamp((s - birth) / ramp, 0, 1)),
so the resumed model computes another function; and a different LR schedule (a larger `train.steps`
stretches the decay when `train.decay_steps` is unset) changes the rate at the resume step. The past
is refused outright; the ramp and the LR only with an explicit override, which is then logged
(Megatron-LM's `--override-opt_param-scheduler` is the same choice). Future stages may change freely.
"""
from __future__ import annotations

import math
from typing import Callable, List

from ..checkpoint.dist import CheckpointError
from ..config import Config
from .schedule import lr_schedule


def _mask_at(step: int, birth: int, ramp: int) -> float:
    return 1.0 if ramp <= 0 else min(max((step - birth) / ramp, 0.0), 1.0)


def check_resume(cfg: Config, saved: Config, state: dict, where: str, log: Callable[[str], None]) -> None:
    """Raise CheckpointError if resuming checkpoint `where` (saved with config `saved`, at `state`)
    under `cfg` changes its past or, without the override, its masks or learning rate."""
    step, stage = state["step"], state["stage"]
    _check_past_stages(cfg, saved, step, stage, where)
    _check_ramp(cfg, saved, step, stage, where, log)
    _check_lr(cfg, saved, step, where, log)


def _check_past_stages(cfg: Config, saved: Config, step: int, stage: int, where: str) -> None:
    mine, theirs = cfg.schedule(), saved.schedule()
    for i in range(1, min(stage, len(theirs) - 1) + 1):  # stage 0 starts at 0; its shape is checked by the load
        if i >= len(mine) or mine[i] != theirs[i]:
            now = (f"step {mine[i][0]}, shape {list(mine[i][1].as_tuple())}" if i < len(mine) else "no such stage")
            raise CheckpointError(
                f"checkpoint `{where}` (step {step}) grew to stage {i} at step {theirs[i][0]} (shape "
                f"{list(theirs[i][1].as_tuple())}), but growth.stages[{i}] now says {now}; a stage the checkpoint "
                f"has already reached cannot move or change. Restore growth.stages[{i}] to step {theirs[i][0]}, "
                f"shape {list(theirs[i][1].as_tuple())} (later stages may change), or resume an earlier checkpoint")
    if stage + 1 < len(mine) and mine[stage + 1][0] < step:
        raise CheckpointError(
            f"checkpoint `{where}` is at step {step} in stage {stage}, but growth.stages[{stage + 1}] now starts at "
            f"step {mine[stage + 1][0]}, before it: the growth would happen at step {step}, not where the config "
            f"says. Set growth.stages[{stage + 1}].step to {step} or later, or resume a checkpoint from before step "
            f"{mine[stage + 1][0]}")


def _check_ramp(cfg: Config, saved: Config, step: int, stage: int, where: str, log) -> None:
    old, new = saved.growth.ramp_steps, cfg.growth.ramp_steps
    if old == new or cfg.growth.operator != "msg":
        return
    births = [s for s, _ in saved.schedule()[1:stage + 1]]
    changed = [(i + 1, b) for i, b in enumerate(births) if _mask_at(step, b, old) != _mask_at(step, b, new)]
    if not changed:  # every grown unit is past both ramps (or none grew yet): only later stages use the new one
        return
    i, b = changed[0]
    what = (f"the masks of stage {i} (grown at step {b}) would go from {_mask_at(step, b, old):.3g} to "
            f"{_mask_at(step, b, new):.3g} at step {step}")
    if not cfg.growth.allow_ramp_change:
        raise CheckpointError(
            f"checkpoint `{where}` was trained with growth.ramp_steps={old}, this config has {new}: {what}, so the "
            f"resumed model would compute another function. Set growth.ramp_steps={old}, or "
            f"growth.allow_ramp_change=true to re-ramp from here")
    log(f"[resume] growth.ramp_steps {old} -> {new} (growth.allow_ramp_change=true): {what}")


_LR_FIELDS = ("train.lr", "train.min_lr", "train.warmup_steps", "train.decay_style", "train.decay_steps",
              "growth.lr_reset_stages")


def _lr_fields(cfg: Config) -> dict:
    out = {f: getattr(getattr(cfg, f.split(".")[0]), f.split(".")[1]) for f in _LR_FIELDS}
    if not cfg.train.decay_steps:  # the decay then spans train.steps
        out["train.steps"] = cfg.train.steps
    return out


def _check_lr(cfg: Config, saved: Config, step: int, where: str, log) -> None:
    old_fields, new_fields = _lr_fields(saved), _lr_fields(cfg)
    names: List[str] = sorted(k for k in set(old_fields) | set(new_fields) if old_fields.get(k) != new_fields.get(k))
    if not names:
        return
    old, new = lr_schedule(saved), lr_schedule(cfg)
    first = next((s for s in range(step, cfg.train.steps)
                  if not math.isclose(old(s), new(s), rel_tol=1e-12, abs_tol=0.0)), None)
    if first is None:  # e.g. a longer run whose decay_steps is set: the rate of every remaining step is the same
        return
    what = (f"{', '.join(f'{k} {old_fields.get(k)!r} -> {new_fields.get(k)!r}' for k in names)}: the learning rate "
            f"at step {first} would be {new(first):.4g} instead of {old(first):.4g}")
    if not cfg.train.allow_lr_schedule_change:
        fix = (f"set train.decay_steps={saved.train.steps} to keep the decay while training longer, or "
               if "train.steps" in names and len(names) == 1 else "restore them, or ")
        raise CheckpointError(
            f"checkpoint `{where}` was trained with another learning-rate schedule ({what}). To continue its "
            f"schedule {fix}set train.allow_lr_schedule_change=true to follow this config's from step {step} on")
    log(f"[resume] learning-rate schedule changed (train.allow_lr_schedule_change=true): {what}")
