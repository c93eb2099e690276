"""Which schedule a checkpoint grown offline (msg-grow) continues on.

A checkpoint at stage k records its config; the run that resumes it after msg-grow must find the
grown shape as stage k + 1 of that config's growth.stages, starting at the checkpoint's step (the
new units are born there: paper eq. 10's ramp counts from it). When --shape is that next stage, the
checkpoint's config stays as it is (the exit-76 re-layout of a staged run). Any other shape is off
the schedule: the user gives the schedule to continue on as config overrides (growth.stages=[...],
and train.steps when it must grow), whose stages 0..k are the checkpoint's and whose stage k + 1 is
--shape from the checkpoint's step; the grown checkpoint records that config, with the model
section set to its last stage, so it resumes (and, after the ramp, exports) like any checkpoint of
that schedule. Without them, refused: the result would be a checkpoint nothing can resume or export.
"""
from __future__ import annotations

import copy
from typing import List

from ..config import ConfigError, Shape, config_from_dict
from ..config.loading import apply_overrides


def _stage_text(step: int, shape: Shape) -> str:
    return f"{{step: {step}, shape: [{', '.join(map(str, shape.as_tuple()))}]}}"


def continuing_overrides(saved: dict, stage: int, step: int, shape: Shape) -> List[str]:
    """The simplest schedule to continue on after growing the checkpoint (`saved`: its config, at
    `stage` and `step`) to `shape`: its stages so far, then `shape` from `step` (later stages
    dropped), and train.steps past that step."""
    cfg = config_from_dict(saved, check=False)
    stages = ", ".join(_stage_text(s, sh) for s, sh in cfg.schedule()[:stage + 1] + [(step, shape)])
    out = [f"growth.stages=[{stages}]"]
    if cfg.train.steps <= step:
        out.append(f"train.steps={step + cfg.train.steps}")
    return out


def grown_config(saved: dict, stage: int, step: int, shape: Shape, overrides: List[str], parallel: dict) -> dict:
    """The config the grown checkpoint records (`saved`: the checkpoint's, at `stage` and `step`;
    `overrides`: the user's; `parallel`: the layout it is written at), or a ValueError naming the
    way out."""
    cfg = config_from_dict(saved, check=False)
    schedule = cfg.schedule()
    old = schedule[stage][1]
    if shape == old:
        raise ValueError(f"--shape {shape} is the checkpoint's own shape (stage {stage}): nothing to grow. Give the "
                         f"next stage's shape" + (f", {schedule[stage + 1][1]}" if stage + 1 < len(schedule) else ""))
    example = " ".join(f"'{o}'" for o in continuing_overrides(saved, stage, step, shape))
    if not overrides:
        if stage + 1 < len(schedule) and schedule[stage + 1] == (step, shape):
            return dict(saved, parallel=dict(saved["parallel"], **parallel))
        if stage + 1 < len(schedule):
            nxt = f"growth.stages[{stage + 1}] is {schedule[stage + 1][1]} from step {schedule[stage + 1][0]}"
        else:
            nxt = f"its schedule ends at stage {stage}, {old}"
        raise ValueError(
            f"--shape {shape} at step {step} is not the next stage of the checkpoint's schedule ({nxt}): the grown "
            f"checkpoint could be neither resumed nor exported. Grow to the scheduled stage, or give the schedule to "
            f"continue on as overrides after the flags (stages 0-{stage} as the checkpoint's, then this shape from "
            f"step {step}; the model section follows the last stage), e.g. {example}")
    bad = [o for o in overrides if o.split("=", 1)[0].strip().startswith("model.")]
    if bad:
        raise ValueError(f"override `{bad[0]}`: the grown checkpoint's model section is its schedule's last stage "
                         "(growth.stages); the rest of the model cannot change")
    data = copy.deepcopy(saved)
    try:
        apply_overrides(data, overrides)
        data["parallel"] = dict(data["parallel"], **parallel)
        last = data["growth"]["stages"][-1].get("shape") if data["growth"]["stages"] else None
        if last and len(last) == 4:  # the model section is the last stage's shape (groups: at the fixed grouping)
            data["model"].update(hidden_size=last[0], ffn_hidden_size=last[1], num_attention_heads=last[2],
                                 num_layers=last[3])
            if data["model"].get("num_query_groups"):
                data["model"]["num_query_groups"] = last[2] // cfg.model.heads_per_group
        new = config_from_dict(data)
    except ConfigError as e:
        raise ValueError(f"the schedule to continue on: {e}") from None
    mine = new.schedule()
    if mine[:stage + 1] != schedule[:stage + 1] or len(mine) <= stage + 1 or mine[stage + 1] != (step, shape):
        raise ValueError(f"the schedule to continue on must keep the checkpoint's stages 0-{stage} and make stage "
                         f"{stage + 1} --shape {shape} from the checkpoint's step {step}, e.g. {example}")
    return data
