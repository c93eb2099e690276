"""growth.schedule=auto: the run decides when to grow and to what, from its own pre-training rate.

The paper's rule for a schedule is hindsight: grow "once the current gamma goes lower than the [grown]
structure given the same wall time" (section 3.2.1, eq. 21: gamma = alpha x tau, the loss drop per unit
of cost). MSG makes it a measurement: a growth preserves the function, so a grown copy starts at
exactly the run's loss, and a short probe of it trains on equal terms with the run itself.

A check at step s (every growth.auto.check_interval steps, once the last growth's masks are all 1, while
a probe still fits before train.steps):
  1. the run saves its checkpoint at s (a normal checkpoint of checkpoint.save: a kill from here on
     resumes at s and replays the check, so the decisions are the same);
  2. for each candidate shape (config/candidates.py), the model is grown with the same `grow()` a fixed
     schedule uses (its stage's seed, masks at 0 ramping over growth.ramp_steps, AdamW state grown,
     growth.lr_reset_stages as that stage would have them) and trained probe_steps steps on the batches
     the run sees next; its losses are kept, then the checkpoint of s is loaded back (weights, AdamW
     state, RNG: no second copy of the model is ever held, only the candidate in its place);
  3. the run trains those same steps itself (the real steps: logged, evaluated, saved as always);
  4. at s + probe_steps each candidate's rate is compared with the run's over the same steps on the
     same batches (training/rates.py paired_gain: the batch noise both share cancels), and the best
     candidate whose gain exceeds growth.auto.margin_sigma standard errors is added to growth.stages
     at this step and grown into, exactly as a fixed stage there would be.
The cost axis is growth.auto.cost: model FLOPs per step (the default: the same decisions in every
rerun and at every layout) or measured seconds per step. The probes' time and FLOPs count in the run's
(train_time, train_flops) and their share is logged. The decisions, the check in progress and the
running rate estimate are part of the checkpoint's state, so a resume anywhere continues identically.
"""
from __future__ import annotations

import copy
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from ..config import Config, ConfigError, Shape, StageConfig
from ..growth.apply import grow
from ..config.candidates import auto_candidates, first_check, probe_budget
from ..model import update_masks
from ..model.gpt import padded_vocab_size
from ..model.recompute import configure_recompute
from ..parallel import device
from .flops import flops_per_token
from .rates import fit_slope, grown_gain, rate
from .schedule import lr_schedule
from .starts import load_model_and_optimizer


def check_probe_share(cfg: Config) -> None:
    """growth.auto.max_probe_share leaves room for the first check (the one the run reaches before any
    skip), counted as the run counts it (config/candidates.py probe_budget); refused before any data
    or model is built (run_setup), naming the share the check needs. (The share's range is checked at
    config load; this needs the FLOPs formula, which sits above the config layer.)"""
    a, m = cfg.growth.auto, cfg.model
    vocab = padded_vocab_size(m)

    def fpt(s):
        return flops_per_token(m, s, vocab)

    first, sched = first_check(cfg), cfg.schedule()
    spent = sum(max(0, min(nxt, first) - st) * cfg.batch_size(i) * m.seq_length * fpt(sh)
                for i, ((st, sh), nxt) in enumerate(zip(sched, [s for s, _ in sched[1:]] + [first])))
    b = probe_budget(a, sched[-1][1], m.shape, first, cfg.train.steps, spent, 0.0, fpt,
                     cfg.batch_size(len(sched) - 1) * m.seq_length)
    if not b["fits"]:
        raise ConfigError(
            f"growth.auto.max_probe_share={a.max_probe_share:g} leaves no room for a check: the first one "
            f"(step {first}) alone would bring the probes to {b['share']:.1%} of the run's FLOPs; raise "
            "max_probe_share above that, or lower growth.auto.probe_steps, or narrow the candidates "
            "(growth.auto.shapes), or raise train.steps.")


def agreed_max(values: List[float]) -> List[float]:
    """Each value's largest over the ranks (one all-reduce, at a decision, never per step): measured
    seconds differ from rank to rank, and every rank must take the same decision."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def with_stage(cfg: Config, step: int, shape: Shape) -> Config:
    """A copy of `cfg` whose growth.stages end with `shape` at `step`."""
    out = copy.copy(cfg)
    out.growth = copy.copy(cfg.growth)
    out.growth.stages = list(cfg.growth.stages) + [StageConfig(step=step, shape=list(shape.as_tuple()))]
    return out


class AutoSchedule:
    """The decisions of growth.schedule=auto and the check in progress (Trainer drives it)."""

    def __init__(self, cfg: Config, state: Optional[dict] = None):
        self.cfg, self.a = cfg, cfg.growth.auto
        st = state or {}
        self.check: Optional[dict] = st.get("check")  # {"step", "probes": [...], "current": {step: loss}, "t0"}
        self.decisions: List[dict] = st.get("decisions", [])
        self.probe_time: float = st.get("probe_time", 0.0)
        self.probe_flops: float = st.get("probe_flops", 0.0)
        self.window: List[list] = st.get("window", [])  # [[step, loss]] of the run's latest steps (this stage)
        self.last_save_s = 0.0  # (the latest check's save, for the log)

    def state(self) -> dict:
        return {"check": self.check, "decisions": self.decisions, "probe_time": self.probe_time,
                "probe_flops": self.probe_flops, "window": self.window}

    # ---- when ----------------------------------------------------------------------------
    def due(self, tr) -> bool:
        """A check at this step: a multiple of check_interval, the last growth's masks all 1, a stage left,
        a probe ending before train.steps, a candidate, and the probes within max_probe_share (else the
        skip is logged and the run trains on)."""
        a, ramp, step, schedule, shape = self.a, self.cfg.growth.ramp_steps, tr.step, tr.schedule, tr.model.shape
        if not (self.check is None and step > 0 and step % a.check_interval == 0
                and len(schedule) - 1 < a.max_stages
                and (len(schedule) == 1 or step >= schedule[-1][0] + ramp)  # (the last growth's masks all 1)
                and step + a.probe_steps < self.cfg.train.steps
                and bool(auto_candidates(a, shape, self.cfg.model.shape))):
            return False
        budget = self.budget(tr)
        if not budget["fits"]:
            tr.metrics.log({"event": "auto_skipped", "step": step, "probe_share_if_checked": budget["share"],
                            "max_probe_share": a.max_probe_share})
            tr.metrics.print(f"[auto] step {step}: no check: its probes would bring the probes to "
                             f"{budget['share']:.1%} of the run's FLOPs (growth.auto.max_probe_share="
                             f"{a.max_probe_share:g})")
        return budget["fits"]

    def budget(self, tr) -> dict:
        """probe_budget (config/candidates.py) of a check at the trainer's step."""
        cfg = self.cfg
        return probe_budget(self.a, tr.model.shape, cfg.model.shape, tr.step, cfg.train.steps, tr.train_flops,
                            self.probe_flops, lambda s: flops_per_token(cfg.model, s, tr.model.vocab_padded),
                            cfg.batch_size(tr.stage) * cfg.model.seq_length)

    def deciding(self, step: int) -> bool:
        return self.check is not None and step >= self.check["step"] + self.a.probe_steps

    # ---- the run's own losses --------------------------------------------------------------
    def observe(self, rows) -> None:
        """The run's (step, loss, grad norm) rows as they are read: the check's window, and the running
        window of the current stage."""
        for step, loss, _ in rows:
            if self.check is not None and self.check["step"] <= step < self.check["step"] + self.a.probe_steps:
                self.check["current"][str(step)] = loss
            self.window.append([step, loss])
        del self.window[:-self.a.window]

    def stage_started(self) -> None:
        self.window = []

    def running_rate(self, cost_per_step: float) -> dict:
        """The run's gamma over its latest growth.auto.window steps of this stage, with its standard error."""
        if len(self.window) < 3:
            return {}
        g, se = rate([loss for _, loss in self.window], cost_per_step)
        return {"gamma": g * self.unit, "gamma_se": se * self.unit}

    @property
    def unit(self) -> float:
        """Rates are logged per PFLOP (cost=flops) or per second (cost=time)."""
        return 1e15 if self.a.cost == "flops" else 1.0

    # ---- 1-2: the probes -------------------------------------------------------------------
    def run_probes(self, tr) -> bool:
        """Save the run at this step, probe every candidate from it, and return to it. False when a
        preemption signal came (the check's checkpoint is then the resume point: nothing is lost)."""
        s, stage, cfg = tr.step, tr.stage, tr.cfg
        tr.sync_steps()
        t_save = time.perf_counter()
        path = tr.save() if tr._last_saved != s else tr._last_saved_path
        self.last_save_s = time.perf_counter() - t_save  # (a save of the check's own: counted as the probes')
        self.probe_time += self.last_save_s
        tr.train_time += self.last_save_s
        shape = tr.model.shape
        consumed, lr_sched, schedule = tr.consumed_samples, tr.lr_schedule, tr.schedule
        probes = []
        tr.metrics.print(f"[auto] step {s}: checking {len(auto_candidates(self.a, shape, cfg.model.shape))} "
                         f"candidate(s) from {shape} over the next {self.a.probe_steps} steps")
        for cand in auto_candidates(self.a, shape, cfg.model.shape):
            t0 = time.perf_counter()
            probe_cfg = with_stage(cfg, s, cand)
            try:
                tr.cfg, tr.schedule, tr.lr_schedule = probe_cfg, probe_cfg.schedule(), lr_schedule(probe_cfg)
                tr.model, tr.optimizer = grow(tr.model, tr.optimizer, cand, probe_cfg, s, stage + 1)
                tr.stage = stage + 1
                t1 = time.perf_counter()
                for i in range(self.a.probe_steps):
                    tr.step = s + i
                    update_masks(tr.model, tr.step, cfg.growth.ramp_steps)
                    out = tr.train_step()
                rows, signalled = tr._pending.flush(tr._signal is not None)
                seconds = (time.perf_counter() - t1) / self.a.probe_steps
                tr._host_time = 0.0
            finally:
                tr.cfg, tr.schedule, tr.lr_schedule = cfg, schedule, lr_sched
                tr.step, tr.stage, tr.consumed_samples = s, stage, consumed
            flops = flops_per_token(cfg.model, cand, tr.model.vocab_padded) * out.tokens
            t_load = time.perf_counter()
            tr.model = tr.optimizer = None  # (the candidate goes before the run's state is loaded back)
            tr.model, tr.optimizer = load_model_and_optimizer(cfg, shape, path)
            configure_recompute(tr.model, cfg.train.recompute, cfg.train.recompute_num_layers)
            spent = time.perf_counter() - t0
            # (where a probe's time goes: growing, its steps, loading the check back)
            probes.append({"shape": list(cand.as_tuple()), "losses": [loss for _, loss, _ in rows],
                           "flops_per_step": flops, "seconds_per_step": seconds, "grow_s": t1 - t0,
                           "train_s": seconds * self.a.probe_steps, "load_s": time.perf_counter() - t_load})
            self.probe_time += spent
            self.probe_flops += flops * self.a.probe_steps
            tr.train_time += spent
            tr.train_flops += flops * self.a.probe_steps
            tr.metrics.print(f"[auto] probe {cand}: loss {probes[-1]['losses'][0]:.4f} -> "
                             f"{probes[-1]['losses'][-1]:.4f} in {self.a.probe_steps} steps, {spent:.1f} s")
            if tr.world == 1 and tr._signal is not None or tr.world > 1 and signalled:
                tr._agreed_signal = True
                return False
        self.check = {"step": s, "probes": probes, "current": {}, "t0": tr.train_time}
        return True

    # ---- 4: the decision -------------------------------------------------------------------
    def decide(self, tr) -> dict:
        """Compare each probe with the run over the check's steps; the decision record (its `choice`
        is the shape grown into at this step, or None)."""
        a, ck = self.a, self.check
        s, n = ck["step"], a.probe_steps
        current = [ck["current"][str(s + i)] for i in range(n)]
        shape = tr.model.shape
        tokens = tr.cfg.batch_size(tr.stage) * tr.cfg.model.seq_length
        if a.cost == "flops":
            cost = flops_per_token(tr.cfg.model, shape, tr.model.vocab_padded) * tokens
        else:  # (seconds: the slowest rank's, so that every rank decides alike)
            cost, *times = agreed_max([(tr.train_time - ck["t0"]) / n] + [p["seconds_per_step"] for p in ck["probes"]])
            for p, sec in zip(ck["probes"], times):
                p["seconds_per_step"] = sec
        # the run's slope per step over its latest window (ending with the check's steps)
        run_slope = fit_slope([st for st, _ in self.window], [loss for _, loss in self.window])
        rows, best = [], None
        for p in ck["probes"]:
            c = p["flops_per_step"] if a.cost == "flops" else p["seconds_per_step"]
            g = grown_gain(run_slope, cost, current, p["losses"], c)
            row = {"shape": p["shape"], "gamma": g["gamma"] * self.unit, "gain": g["gain"] * self.unit,
                   "gain_se": g["gain_se"] * self.unit, "sigma": g["sigma"], "delta_per_step": g["delta"],
                   "delta_se": g["delta_se"], "cost_ratio": c / cost,
                   "loss_start": p["losses"][0], "loss_end": p["losses"][-1]}
            rows.append(row)
            if row["sigma"] > a.margin_sigma and (best is None or row["gamma"] > best["gamma"]):
                best = row
        record = {"event": "auto_decision", "step": tr.step, "check_step": s, "shape": list(shape.as_tuple()),
                  "cost": a.cost, "unit": "loss per PFLOP" if a.cost == "flops" else "loss per second",
                  "gamma": -run_slope[0] / cost * self.unit, "gamma_se": run_slope[1] / cost * self.unit,
                  "window_steps": len(self.window), "margin_sigma": a.margin_sigma,
                  "candidates": rows, "choice": best["shape"] if best else None,
                  "probe_time_s": self.probe_time, "probe_flops": self.probe_flops,
                  "probe_share": self.probe_time / tr.train_time if tr.train_time else 0.0}
        self.decisions.append({k: record[k] for k in ("step", "check_step", "shape", "gamma", "choice")}
                              | {"candidates": [{k: r[k] for k in ("shape", "gamma", "gain", "sigma")} for r in rows]})
        self.check = None
        return record
