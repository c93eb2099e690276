"""The shapes a schedule may grow to next (msg-gridsearch --schedule; growth.schedule=auto's
candidates): from the current shape toward the model section's, each dimension not yet at its final
size grown (to its final size, or by `factor` capped there), alone or, with `combine` > 1, together
with others in one stage (combinations of dimensions in one growth: the paper grows one at a time and
names several at once as unexplored). Or, with growth.auto.shapes, the listed shapes.
"""
from __future__ import annotations

import itertools
from typing import List

from .schema import Shape


def next_shapes(current: Shape, final: Shape, combine: int = 1, factor: float = 0.0) -> List[Shape]:
    """Every shape that grows 1..`combine` of the dimensions where `current` is below `final` (to their
    final sizes, or x `factor` rounded and capped at them), the others kept: single dimensions first
    (hidden, ffn, heads, layers order), then pairs, and so on. Empty when `current` is `final`."""
    if combine < 1:
        raise ValueError(f"combine={combine}: grow at least one dimension per stage (1: one at a time)")
    if factor and factor <= 1:
        raise ValueError(f"factor={factor}: a growth factor must be > 1 (0: grow to the final size)")
    cur, fin = current.as_tuple(), final.as_tuple()
    if any(c > f for c, f in zip(cur, fin)):
        raise ValueError(f"{current} is larger than the final shape {final} in some dimension: growth only adds")
    grown = [min(f, max(c + 1, round(c * factor))) if factor else f for c, f in zip(cur, fin)]
    todo = [i for i in range(4) if cur[i] != fin[i]]
    out = []
    for k in range(1, min(combine, len(todo)) + 1):
        for dims in itertools.combinations(todo, k):
            out.append(Shape(*(grown[i] if i in dims else cur[i] for i in range(4))))
    return out


def auto_candidates(auto, current: Shape, final: Shape) -> List[Shape]:
    """growth.auto's candidates from `current`: its listed shapes that only add to `current`, else
    next_shapes with its combine and factor."""
    if auto.shapes:
        cur = current.as_tuple()
        return [Shape(*s) for s in auto.shapes
                if tuple(s) != cur and all(a >= b for a, b in zip(s, cur))]
    return next_shapes(current, final, auto.combine, auto.factor)


def reachable_shapes(auto, start: Shape, final: Shape, limit: int = 4096) -> List[Shape]:
    """Every shape an auto schedule from `start` could grow into (each checked against the layout
    before any compute), in the order found."""
    seen, todo, out = {start}, [start], []
    while todo:
        for s in auto_candidates(auto, todo.pop(0), final):
            if s not in seen:
                seen.add(s)
                out.append(s)
                todo.append(s)
                if len(seen) > limit:
                    raise ValueError(f"more than {limit} reachable shapes: lower growth.auto.combine or raise "
                                     "growth.auto.factor")
    return out


def first_check(cfg) -> int:
    """The first step at which growth.schedule=auto may check: a multiple of growth.auto.check_interval,
    once the masks of the last stage's growth are all 1 (growth.ramp_steps after it; from the start when
    no stage grew yet)."""
    stages, every = cfg.growth.stages, cfg.growth.auto.check_interval
    ready = stages[-1].step + cfg.growth.ramp_steps if len(stages) > 1 else 1
    return -(-ready // every) * every


def probe_budget(auto, shape: Shape, final: Shape, step: int, steps: int, train_flops: float, probe_flops: float,
                 fpt, tokens: int, candidates=None) -> dict:
    """Whether probing `candidates` (default: the cheapest of this check's) from `shape` at `step` fits
    growth.auto.max_probe_share: their probes (probe_steps each at the candidate's FLOPs per token `fpt(shape)`,
    `tokens` per step) plus what the earlier checks cost (`probe_flops`) within that share of the run's FLOPs
    if it never grew after this (`train_flops` so far, probes included, + the remaining steps at `shape` +
    these probes). Model FLOPs, not seconds: every rank and every rerun probes the same."""
    if candidates is None:
        candidates = sorted(auto_candidates(auto, shape, final), key=fpt)[:1]
    check = auto.probe_steps * tokens * sum(fpt(c) for c in candidates)
    total = train_flops + (steps - step) * tokens * fpt(shape) + check
    return {"fits": probe_flops + check <= auto.max_probe_share * total, "check_flops": check,
            "share": (probe_flops + check) / total if total else 0.0}


def probe_warnings(cfg) -> List[str]:
    """What makes a growth.schedule=auto config's probes unable to show a growth's payoff, said at the
    run's start and by msg-plan (a warning, not a refusal: such a run is valid, its checks just decide
    on the growth's transient). A probe shorter than growth.ramp_steps ends with the new parts' masks
    below 1; on the BERT demo the grown copies' loss stayed above the run's for 24-32 steps of a 40-step
    ramp and gained only after (training/rates.py gap_profile; docs/benchmarks.md)."""
    a, ramp = cfg.growth.auto, cfg.growth.ramp_steps
    if cfg.growth.schedule != "auto" or a.probe_steps >= ramp:
        return []
    return [f"growth.auto.probe_steps={a.probe_steps} is shorter than growth.ramp_steps={ramp}: each probe ends "
            f"with the new parts' masks at {a.probe_steps / ramp:.2f}, inside the growth's transient (the grown copy "
            "behind the run before it gains), so a check measures the growth's cost more than its payoff; set "
            f"probe_steps >= {ramp} or shorten the ramp (each decision logs the gap by quarter and its late slope)"]
