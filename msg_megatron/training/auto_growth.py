"""growth.schedule=auto: the run decides when to grow and to what, from its own pre-training rate.

The paper's rule for a schedule is hindsight: grow "once the current gamma goes lower than the [grown]
structure given the same wall time" (section 3.2.1, eq. 21: gamma = alpha x tau, the loss drop per unit
of cost). MSG makes it a measurement: a growth preserves the function, so a grown copy starts at
exactly the run's loss, and a probe of it trains on equal terms with the run itself.

A check at step s (every growth.auto.check_interval steps, once the last growth's masks are all 1, while
a probe still fits before train.steps), with n = growth.auto.probe_steps:
  1. the run saves its checkpoint at s (a normal checkpoint of checkpoint.save) and trains its next n
     steps itself: real steps, logged, evaluated and saved as always (its window);
  2. at s + n it saves again (the window's end, where the run goes on unless a probe is kept; the
     checkpoint of s is kept from checkpoint.keep's pruning until the check ends) and probes the
     candidate shapes (config/candidates.py) cheapest first: each is loaded from the checkpoint of s,
     grown with the same `Trainer.grow` a fixed schedule uses (its stage's seed, masks at 0 ramping over
     growth.ramp_steps, AdamW state grown, growth.lr_reset_stages as that stage has them) and trained
     the same n steps on the same batches (no second copy of the model is ever held);
  3. each probe is compared with the run's window as it ends (training/rates.py grown_gain: the batch
     noise both share cancels). The first whose gain exceeds growth.auto.margin_sigma standard errors is
     KEPT: its state at s + n becomes the run's, a stage at step s is added to growth.stages, and its n
     steps replace the window's in metrics.jsonl (event auto_kept): exactly the run a fixed schedule
     with that stage at s makes. Else the run loads the window's end back and trains on.
Cheapest first because a probe that loses is pure cost: a growing check costs the run's window and the
cheaper candidates that lost; one that does not grow, every probe it ran. Each probe runs only within
growth.auto.max_probe_share (model FLOPs, counted as the run counts them: every rank and rerun alike).
The cost axis is growth.auto.cost: model FLOPs per step (the default: the same decisions in every rerun
and at every layout) or measured seconds per step. All the probes' time and FLOPs count in the run's
(train_time, train_flops); the share lost to checks is logged. The decisions, the check in progress and
the running rate estimate are part of the checkpoint's state: a resume anywhere, inside a probe too
(from the window's end: the probes are replayed), continues identically.
"""
from __future__ import annotations

import copy
import gc
import os
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from ..checkpoint.dist import CheckpointError
from ..config import Config, ConfigError, Shape, StageConfig
from ..config.candidates import auto_candidates, first_check, probe_budget
from ..model import update_masks
from ..model.gpt import padded_vocab_size
from ..model.recompute import configure_recompute
from ..parallel import device
from .flops import flops_per_token
from .rates import fit_slope, gap_profile, grown_gain, rate
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
            f"growth.auto.max_probe_share={a.max_probe_share:g} leaves no room for a check: the first one's "
            f"(step {first}) cheapest probe alone would bring the probes to {b['share']:.1%} of the run's FLOPs; raise "
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
        # the check in progress: {"step", "from" (its checkpoint's directory name), "consumed" (its data
        # position), "current": {step: loss} (the run's window), "t0", "flops0" (train_time/flops at s)}
        self.check: Optional[dict] = st.get("check")
        if self.check is not None and "from" not in self.check:  # (a check of the earlier probe-first design)
            self.check = None
        self.decisions: List[dict] = st.get("decisions", [])
        self.probe_time: float = st.get("probe_time", 0.0)  # (what the checks cost the run: see finish)
        self.probe_flops: float = st.get("probe_flops", 0.0)
        self.window: List[list] = st.get("window", [])  # [[step, loss]] of the run's latest steps (this stage)
        self.last_save_s = 0.0  # (the latest check's save, for the log)

    def state(self) -> dict:
        return {"check": self.check, "decisions": self.decisions, "probe_time": self.probe_time,
                "probe_flops": self.probe_flops, "window": self.window}

    def protected(self) -> List[str]:
        """Checkpoint directories a save must not prune: the check's start, which its probes load."""
        return [self.check["from"]] if self.check else []

    # ---- when ----------------------------------------------------------------------------
    def due(self, tr) -> bool:
        """A check at this step: a multiple of check_interval, the last growth's masks all 1, a stage left,
        the window ending before train.steps, a candidate, and its cheapest probe within max_probe_share
        (else the skip is logged and the run trains on)."""
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
            tr.metrics.print(f"[auto] step {step}: no check: its cheapest probe would bring the probes to "
                             f"{budget['share']:.1%} of the run's FLOPs (growth.auto.max_probe_share="
                             f"{a.max_probe_share:g})")
        return budget["fits"]

    def fpt(self, tr, shape: Shape) -> float:
        return flops_per_token(self.cfg.model, shape, tr.model.vocab_padded)

    def budget(self, tr, candidates: Optional[List[Shape]] = None) -> dict:
        """probe_budget (config/candidates.py) of probing `candidates` (default: the cheapest) at this step."""
        cfg = self.cfg
        return probe_budget(self.a, tr.model.shape, cfg.model.shape, tr.step, cfg.train.steps, tr.train_flops,
                            self.probe_flops, lambda s: self.fpt(tr, s),
                            cfg.batch_size(tr.stage) * cfg.model.seq_length, candidates)

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

    # ---- 1: the check starts -----------------------------------------------------------------
    def start_check(self, tr) -> dict:
        """Save the run at this step (the probes' start) and open the check; the run then trains its window."""
        s = tr.step
        tr.sync_steps()
        t_save = time.perf_counter()
        path = tr.save() if tr._last_saved != s else tr._last_saved_path
        self.last_save_s = time.perf_counter() - t_save  # (a save of the check's own: counted as its cost)
        self.probe_time += self.last_save_s
        tr.train_time += self.last_save_s
        self.check = {"step": s, "from": os.path.basename(path), "consumed": tr.consumed_samples, "current": {},
                      "t0": tr.train_time, "flops0": tr.train_flops}
        n = len(auto_candidates(self.a, tr.model.shape, self.cfg.model.shape))
        tr.metrics.print(f"[auto] step {s}: check: the run trains steps {s}-{s + self.a.probe_steps - 1}, then "
                         f"probes up to {n} grown copies from here over the same steps, cheapest first")
        return {"event": "auto_check", "step": s, "save_s": self.last_save_s, "candidates": n}

    # ---- 2-3: the probes and the decision ------------------------------------------------------
    def finish_check(self, tr) -> Optional[dict]:
        """At the window's end: save, probe the candidates cheapest first from the check's checkpoint,
        keep the first that wins or load the window's end back. The decision record ("choice": the shape
        kept, grown at the check's step, or None; "kept": what the trainer logs for the kept probe's
        steps), or None when a preemption signal came during the probes (the window end's checkpoint is
        then the resume point, and the probes are replayed from it)."""
        a, ck, cfg = self.a, self.check, self.cfg
        s, n, end = ck["step"], self.a.probe_steps, tr.step
        tr.sync_steps()  # (the window's last losses)
        current = [ck["current"][str(s + i)] for i in range(n)]
        shape, tokens = tr.model.shape, cfg.batch_size(tr.stage) * cfg.model.seq_length
        window_s, window_flops = tr.train_time - ck["t0"], tr.train_flops - ck["flops0"]
        t_start = tr.train_time
        t_save = time.perf_counter()
        end_path = tr.save() if tr._last_saved != end else tr._last_saved_path
        self.last_save_s = time.perf_counter() - t_save
        self.probe_time += self.last_save_s
        tr.train_time += self.last_save_s
        # the run's slope per step over its latest window (ending with the check's steps), and its cost per step
        run_slope = fit_slope([st for st, _ in self.window], [loss for _, loss in self.window])
        cost = (self.fpt(tr, shape) * tokens if a.cost == "flops"
                else agreed_max([window_s / n])[0])  # (seconds: the slowest rank's, so every rank decides alike)
        window, rows, kept, skipped, parts = list(self.window), [], None, [], {"grow_s": 0.0, "train_s": 0.0,
                                                                             "load_s": 0.0}
        cands = sorted(auto_candidates(a, shape, cfg.model.shape), key=lambda c: self.fpt(tr, c))
        start_path = self._start_path(tr)
        for k, cand in enumerate(cands):
            if not self.budget(tr, [cand])["fits"]:
                skipped = [list(c.as_tuple()) for c in cands[k:]]  # (the later ones cost more)
                break
            base_time, base_flops = tr.train_time, tr.train_flops
            p = self._probe(tr, cand, start_path, shape)
            if p is None:
                return None
            for key in parts:
                parts[key] += p[key]
            tr.train_time += p["load_s"] + p["grow_s"] + p["train_s"]
            tr.train_flops += p["flops_per_step"] * n
            c = p["flops_per_step"] if a.cost == "flops" else agreed_max([p["train_s"] / n])[0]
            g = grown_gain(run_slope, cost, current, p["losses"], c)
            row = {"shape": list(cand.as_tuple()), "gamma": g["gamma"] * self.unit, "gain": g["gain"] * self.unit,
                   "gain_se": g["gain_se"] * self.unit, "sigma": g["sigma"], "delta_per_step": g["delta"],
                   "delta_se": g["delta_se"], "cost_ratio": c / cost,
                   "loss_start": p["losses"][0], "loss_end": p["losses"][-1]} | gap_profile(current, p["losses"])
            rows.append(row)
            tr.metrics.print(f"[auto] probe {cand}: loss {row['loss_start']:.4f} -> {row['loss_end']:.4f}, "
                             f"{row['sigma']:+.1f} sigma against the run "
                             f"({p['load_s'] + p['grow_s'] + p['train_s']:.1f} s); its loss minus the run's by "
                             f"quarter {' '.join(f'{q:+.4f}' for q in row['gap_quarters'])}, over the second half "
                             f"{row['late_delta']:+.5f} +- {row['late_delta_se']:.5f} per step")
            if row["sigma"] > a.margin_sigma:
                # kept: its steps are the run's; the run's own window and the load are what the check cost
                self.probe_time += window_s + p["load_s"]
                self.probe_flops += window_flops
                kept = {"stage_step": s, "shape": row["shape"], "growth": p["growth"], "rows": p["rows"],
                        "masks": p["masks"], "lrs": p["lrs"], "tokens": p["tokens"],
                        "time0": base_time + p["load_s"] + p["grow_s"], "seconds_per_step": p["train_s"] / n,
                        "flops0": base_flops, "flops_per_step": p["flops_per_step"]}
                break
            self.probe_time += p["load_s"] + p["grow_s"] + p["train_s"]
            self.probe_flops += p["flops_per_step"] * n
        if kept is None:
            t_load = time.perf_counter()
            self._load(tr, shape, end_path)
            self.window = window
            spent = time.perf_counter() - t_load
            parts["load_s"] += spent
            self.probe_time += spent
            tr.train_time += spent
        record = {"event": "auto_decision", "step": end, "check_step": s, "shape": list(shape.as_tuple()),
                  "cost": a.cost, "unit": "loss per PFLOP" if a.cost == "flops" else "loss per second",
                  "gamma": -run_slope[0] / cost * self.unit, "gamma_se": run_slope[1] / cost * self.unit,
                  "window_steps": len(window), "margin_sigma": a.margin_sigma, "candidates": rows,
                  "not_probed": skipped, "choice": kept["shape"] if kept else None, "grown_at": s if kept else None,
                  "probe_time_s": self.probe_time, "probe_flops": self.probe_flops,
                  "probe_share": self.probe_time / tr.train_time if tr.train_time else 0.0, "kept": kept,
                  "probes": {"step": end, "check_step": s, "train_time_start": t_start,
                             "train_time_end": tr.train_time, "save_s": self.last_save_s,
                             "window_s": window_s if kept else 0.0, **parts}}
        self.decisions.append({k: record[k] for k in ("step", "check_step", "shape", "gamma", "choice")}
                              | {"candidates": [{k: r[k] for k in ("shape", "gamma", "gain", "sigma")} for r in rows]})
        self.check = None
        return record

    def _start_path(self, tr) -> str:
        """The check's checkpoint: in checkpoint.save, or beside the checkpoint this run resumed from (a resume
        from another directory, inside a check's window)."""
        name, save = self.check["from"], self.cfg.checkpoint.save
        places = [save] + ([os.path.dirname(tr.resumed_from.rstrip("/"))] if tr.resumed_from else [])
        for d in places:
            if os.path.isdir(os.path.join(d, name)):
                return os.path.join(d, name)
        raise CheckpointError(f"the check of step {self.check['step']} probes from its checkpoint `{name}`, which is "
                              f"in none of {places}: resume from a checkpoint before step {self.check['step']}, or "
                              f"copy `{name}` into checkpoint.save")

    def _load(self, tr, shape: Shape, path: str) -> None:
        # (the probed model goes before a checkpoint's is built: the trainer's parameter count caches the model
        # object it counted, so that reference goes too)
        tr.model = tr.optimizer = tr._params_of = None
        gc.collect()  # (megatron's DDP and optimizer hold reference cycles: freed now, not beside the next model)
        tr.model, tr.optimizer = load_model_and_optimizer(self.cfg, shape, path)
        configure_recompute(tr.model, self.cfg.train.recompute, self.cfg.train.recompute_num_layers)

    def _probe(self, tr, cand: Shape, path: str, shape: Shape) -> Optional[dict]:
        """Load the check's start (of the run's `shape`), grow it to `cand` as a fixed stage at the check's
        step would be, and train the window's steps on its batches. The trainer's step, stage, data position
        and schedule are the run's again afterwards; its model is the probe's (kept, or replaced by the next
        load). None when a preemption signal came."""
        ck, cfg, n = self.check, self.cfg, self.a.probe_steps
        s, end, stage = ck["step"], tr.step, tr.stage
        consumed, schedule, lr_sched, window = tr.consumed_samples, tr.schedule, tr.lr_schedule, self.window
        tr.metrics.print(f"[auto] probing {cand} from step {s}")
        t0 = time.perf_counter()
        self._load(tr, shape, path)
        t1 = time.perf_counter()
        run_cfg, probe_cfg = tr.cfg, with_stage(cfg, s, cand)
        try:
            tr.cfg, tr.schedule, tr.lr_schedule = probe_cfg, probe_cfg.schedule(), lr_schedule(probe_cfg)
            tr.step, tr.consumed_samples = s, ck["consumed"]
            growth = tr.grow(stage + 1, log=False)
            t2 = time.perf_counter()
            masks, lrs = [], []
            for i in range(n):
                tr.step = s + i
                masks.append(update_masks(tr.model, tr.step, cfg.growth.ramp_steps))
                out = tr.train_step()
                lrs.append(out.lr)
            rows, signalled = tr._pending.flush(tr._signal is not None)
            t3 = time.perf_counter()
            tr._host_time = 0.0
        finally:
            tr.cfg, tr.schedule, tr.lr_schedule, self.window = run_cfg, schedule, lr_sched, window
            tr.step, tr.stage, tr.consumed_samples = end, stage, consumed
        if tr.world == 1 and tr._signal is not None or tr.world > 1 and signalled:
            tr._agreed_signal = True
            return None
        return {"losses": [loss for _, loss, _ in rows], "rows": rows, "masks": masks, "lrs": lrs,
                "tokens": out.tokens, "growth": growth, "flops_per_step": self.fpt(tr, cand) * out.tokens,
                "load_s": t1 - t0, "grow_s": t2 - t1, "train_s": t3 - t2}
