"""The pre-training rate and its noise (msg-gridsearch, growth.schedule=auto).

The paper's gamma = alpha x tau (eq. 21) is the training loss's drop per unit of cost (a second, or
a FLOP). Over a window of logged steps it is the least-squares slope of the loss against the cost,
and the step-to-step noise of the loss (batch to batch) makes it uncertain by the slope's standard
error. Two models trained on the same batches over the same steps (the run and a probe of a grown
copy) share that batch noise; their difference is then measured on the paired losses, whose noise
is much smaller than either rate's (`grown_gain`).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> Tuple[float, float]:
    """Least-squares slope of ys on xs and its standard error (the residuals' variance over n - 2
    degrees of freedom, divided by the spread of xs): how much of a rate is noise."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    if var <= 0:
        return 0.0, float("inf")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
    resid = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys))
    return slope, ((resid / (n - 2)) / var) ** 0.5 if n > 2 else float("inf")


def rate(losses: List[float], cost_per_step: float) -> Tuple[float, float]:
    """(gamma, its standard error): the loss drop per unit of cost over consecutive steps that each
    cost `cost_per_step` (the slope per step over the cost: a stage's steps all cost the same)."""
    slope, se = fit_slope(list(range(len(losses))), losses)
    return -slope / cost_per_step, se / cost_per_step


def grown_gain(run_slope: Tuple[float, float], cost: float, current: List[float], grown: List[float],
               grown_cost: float) -> dict:
    """How much faster per unit of cost a grown copy learns than the run, from the run's loss slope per
    step over its latest window (`run_slope`: slope, s.e.) and both models' losses on the same batches
    at the same steps (`current`, `grown`).

    The grown model's slope is the run's plus the slope of the paired differences d_i = grown_i -
    current_i, in which the batch-to-batch noise both share cancels, so it is measured to a small
    error even over a short probe. Then gamma = -slope / cost for each (eq. 21 per unit of cost), and
        gain = gamma_grown - gamma_run = -(b + delta) / c_g + b / c,   with b the run's slope,
    whose standard error combines delta's and b's (scaled by 1/c - 1/c_g: a run's rate uncertain by
    se_b matters only as far as the two costs differ). A grown model that diverged has gain -inf."""
    b, se_b = run_slope
    if len(current) != len(grown):
        raise ValueError(f"paired losses of {len(current)} and {len(grown)} steps")
    if not all(math.isfinite(x) for x in grown):
        return {"gamma": float("-inf"), "gain": float("-inf"), "gain_se": 0.0, "sigma": float("-inf"),
                "delta": float("nan"), "delta_se": float("nan")}
    delta, se_d = fit_slope(list(range(len(grown))), [g - c for c, g in zip(current, grown)])
    gain = -(b + delta) / grown_cost + b / cost
    se = math.hypot(se_d / grown_cost, se_b * (1 / cost - 1 / grown_cost))
    sigma = gain / se if se > 0 else (math.inf if gain > 0 else -math.inf if gain < 0 else 0.0)
    return {"gamma": -(b + delta) / grown_cost, "gain": gain, "gain_se": se, "sigma": sigma,
            "delta": delta, "delta_se": se_d}


def gap_profile(current: List[float], grown: List[float]) -> dict:
    """Where a probe's paired gap g_i = grown_i - current_i stands over its steps: its mean over each
    quarter of the probe (`gap_quarters`, in order) and its slope per step over the probe's second half
    with the standard error (`late_delta`, `late_delta_se`). A grown copy first falls behind the run (its
    new parts' masks ramp in from 0, their AdamW moments start at 0, an LR reset lifts the rate) and
    gains later: on the BERT demo (docs/benchmarks.md, 2026-12-04) the gap stayed positive for 24-32 steps
    of a 40-step ramp, then fell ~0.001 per step, as fast as the run's own loss. The profile shows whether
    a probe ended inside that transient, which `grown_gain`'s slope over the whole probe cannot tell.
    NaN where the grown copy diverged or the half is under 3 steps."""
    n, nan = len(grown), float("nan")
    if len(current) != n:
        raise ValueError(f"paired losses of {len(current)} and {n} steps")
    gaps = [g - c for c, g in zip(current, grown)]
    if not all(math.isfinite(x) for x in gaps):
        return {"gap_quarters": [nan] * min(4, n), "late_delta": nan, "late_delta_se": nan}
    bounds = sorted({round(k * n / 4) for k in range(5)})
    quarters = [sum(gaps[a:b]) / (b - a) for a, b in zip(bounds, bounds[1:])]
    half = list(range(n // 2, n))
    slope, se = fit_slope(half, gaps[n // 2:]) if len(half) >= 3 else (nan, nan)
    return {"gap_quarters": quarters, "late_delta": slope, "late_delta_se": se}
