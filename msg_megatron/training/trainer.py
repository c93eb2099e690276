"""The training loop. A growth event is one explicit method (`grow`) called between steps.

    for step in range(start, steps):
        if a stage starts at this step: grow()          # MSG operators, masks at 0, AdamW state grown
        update masks to this step's ramp value          # fold the ones that reached 1
        train_step()                                    # forward/backward over micro-batches, AdamW
        log / evaluate / save at their intervals
"""
from __future__ import annotations

import copy
import dataclasses
import math
import signal
import threading
import time
from typing import NamedTuple, Optional

import torch

from ..checkpoint.dist import save_checkpoint
from ..config import Config, ConfigError, Shape, StageConfig
from ..data.tokenizer import load_tokenizer
from ..growth.apply import grow
from ..model import count_parameters, update_masks
from ..model.recompute import configure_recompute
from ..parallel import device
from ..patches.writer_queue import install_writer_queue
from .auto_growth import AutoSchedule
from .evaluate import validation_loss
from .flops import device_peak_tflops, flops_per_token
from .harness import run_tasks
from .microbatches import run_microbatches
from .run_setup import build_run
from .schedule import lr_schedule
from .scoring import masked_lm_accuracy
from .starts import adopt_auto_stages, start_run
from .step_stats import PendingSteps


def micro_batch_samples(consumed: int, global_batch: int, micro_batch: int, dp_rank: int, dp: int) -> list:
    """The first sample number of each of this DP rank's micro-batches in the step that starts at
    sample `consumed`: a contiguous block of the global batch per rank, so the ranks read disjoint
    samples and together every sample of the batch once."""
    local = global_batch // micro_batch // dp
    return [consumed + (dp_rank * local + i) * micro_batch for i in range(local)]


def _clock(seconds: float) -> str:
    """h:mm:ss (days as hours)."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class StepOut(NamedTuple):
    loss: torch.Tensor  # the sum of the micro-batch mean losses (on the last pipeline stage; 0 elsewhere)
    grad_norm: torch.Tensor
    micro_batches: int
    lr: float
    tokens: int


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: saved on SIGTERM/SIGUSR1, resume to continue (launchers requeue on it)
RELAYOUT_EXIT = 76  # saved before a stage that runs at another TP/PP layout: msg-grow reshards, then resume
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Trainer:
    def __init__(self, cfg: Config, log_enabled: bool = True):
        auto = cfg.growth.schedule == "auto"
        if auto:  # (its stages grow as the run decides them: the caller's config is left as given)
            cfg = copy.deepcopy(cfg)
            given = len(cfg.growth.stages)
            adopt_auto_stages(cfg)  # a resume continues the stages its run decided
        self.cfg = cfg
        parts = build_run(cfg, log_enabled)  # checks, parallel state, lock, metrics, data, schedules
        for f in dataclasses.fields(parts):
            setattr(self, f.name, getattr(parts, f.name))
        start = start_run(cfg, self.schedule, self.metrics.print)
        self.model, self.optimizer = start.model, start.optimizer
        configure_recompute(self.model, cfg.train.recompute, cfg.train.recompute_num_layers)  # (growth keeps it)
        st = start.state
        self.step, self.stage, self.consumed_samples = st["step"], st["stage"], st["consumed_samples"]
        self.train_time, self.train_flops = st["train_time"], st["train_flops"]
        self.auto = None
        if auto:
            if len(cfg.growth.stages) > max(given, self.stage + 1):  # decided after the step resumed from
                del cfg.growth.stages[max(given, self.stage + 1):]
                self.schedule, self.lr_schedule = cfg.schedule(), lr_schedule(cfg)
            self.auto = AutoSchedule(cfg, st.get("auto"))
            # (the writers' queue server starts here, with the run's setup, not in the first check's save: that
            # save is timed as probe time, and the server's spawn is a once-per-process start, not a check's cost)
            install_writer_queue()
        self.resumed_from = start.resumed_from
        if self.resumed_from:  # readers of metrics.jsonl drop the earlier lines of the steps replayed from here
            self.metrics.log({"event": "resume", "step": self.step, "stage": self.stage,
                              "checkpoint": self.resumed_from})
        self._pending, self._host_time = PendingSteps(device()), 0.0
        self._signal, self._agreed_signal = None, False
        self.metrics.print(self.optimizer.describe() + f", fusion {self.fusion}")
        self._probe = self._probe_batch()
        self._tokenizer = None  # (train.eval_tasks: loaded at their first run)
        self.peak_tflops = device_peak_tflops()

    # ---- growth --------------------------------------------------------------------------
    def grow(self, stage: int, log: bool = True) -> dict:
        """Grow to `stage`'s shape before training step `self.step` (paper section 3.1). `log`=False:
        the record is returned only (growth.schedule=auto's probes: logged if the probe is kept)."""
        old_shape, new_shape = self.model.shape, self.schedule[stage][1]
        loss_before = self.probe_loss()
        self.model, self.optimizer = grow(self.model, self.optimizer, new_shape, self.cfg, self.step, stage)
        self.stage = stage
        if self.auto:
            self.auto.stage_started()
        # the masks as before the growth (new ones 0): the same function; the loop then sets them for this step
        loss_after = self.probe_loss()
        record = {"event": "growth", "step": self.step, "stage": stage, "from": list(old_shape.as_tuple()),
                  "to": list(new_shape.as_tuple()), "params": self.num_params(),
                  "probe_loss_before": loss_before, "probe_loss_after": loss_after}
        if log:
            self.log_growth(record)
        return record

    def log_growth(self, record: dict) -> None:
        self.metrics.print(f"[grow] step {record['step']}: stage {record['stage']} {Shape(*record['from'])} -> "
                           f"{Shape(*record['to'])}, params {record['params']:,}, probe loss "
                           f"{record['probe_loss_before']:.6f} -> {record['probe_loss_after']:.6f}")
        self.metrics.log(record)

    # ---- steps ---------------------------------------------------------------------------
    def train_step(self) -> StepOut:
        """One step: forward/backward over this rank's micro-batches and the AdamW update. Its loss
        and gradient norm are device tensors (no host sync, no collective beyond the step's own);
        `_record` reads them, many steps at once, when the loop logs."""
        t = self.cfg.train
        self.model.train()
        lr = self.lr_schedule(self.step)
        gbs = self.cfg.batch_size(self.stage)
        n_micro = gbs // t.micro_batch_size
        local = n_micro // self.dp
        start = time.perf_counter()
        batches = [self.train_data.batch(first, t.micro_batch_size)
                   for first in micro_batch_samples(self.consumed_samples, gbs, t.micro_batch_size, self.dp_rank, self.dp)]
        # each micro-batch's loss x local/n_micro sums to the batch mean over DP ranks; megatron's DDP
        # averages the DP gradients (x 1/DP), hence the factor DP
        total = run_microbatches(self.optimizer.ddp, batches, forward_only=False,
                                 loss_scale=local * self.dp / n_micro, autocast_bf16=self.autocast, on_device=True)
        self.optimizer.finish_grad_sync()
        grad_norm = self.optimizer.step(lr)
        self.optimizer.zero_grad()
        self._pending.add(self.step, n_micro, total, grad_norm)
        self._host_time += time.perf_counter() - start
        self.consumed_samples += gbs
        return StepOut(total, grad_norm, n_micro, lr, gbs * self.cfg.model.seq_length)

    def _record(self, out: StepOut, sync: bool) -> dict:
        """The step's metrics; with `sync`, every pending step is read at once (`sync_steps`) and
        this step's loss, gradient norm and throughput are in the record."""
        fpt = flops_per_token(self.cfg.model, self.model.shape, self.model.vocab_padded)
        rec = {"lr": out.lr, "tokens": out.tokens, "flops_per_token": fpt}
        if sync:
            rec.update(self.sync_steps())
            rec["tokens_per_s"] = rec["tokens"] / rec["step_time"]
            if self.auto:  # the run's own gamma over its latest steps (growth.auto.cost's unit)
                per_step = fpt * out.tokens if self.auto.a.cost == "flops" else rec["step_time"]
                rec.update(self.auto.running_rate(per_step))
            rec["tflops_per_gpu"] = rec["tokens_per_s"] * fpt / self.world / 1e12  # achieved model TFLOP/s per process
            if self.peak_tflops:
                rec["mfu"] = rec["tflops_per_gpu"] / self.peak_tflops
        return rec

    def sync_steps(self) -> dict:
        """Read the pending steps' losses and gradient norms (one collective, one host copy, the
        preemption flag agreed with them), stop on a non-finite loss, and return the newest
        step's loss and gradient norm and the mean time per step read."""
        if not len(self._pending):
            return {}
        start = time.perf_counter()
        rows, self._agreed_signal = self._pending.flush(self._signal is not None)
        elapsed = (self._host_time + time.perf_counter() - start) / len(rows)  # per step, device work included
        self._host_time = 0.0
        if self.auto:
            self.auto.observe(rows)
        for step, loss, _ in rows:
            if not math.isfinite(loss):
                span = f"steps {rows[0][0]}-{rows[-1][0]}" if len(rows) > 1 else f"step {step}"
                raise FloatingPointError(
                    f"loss is {loss} at step {step} (read with {span}: losses are read every train.log_interval="
                    f"{self.cfg.train.log_interval} steps); lower train.lr or raise train.clip_grad")
        _, loss, grad_norm = rows[-1]
        return {"loss": loss, "grad_norm": grad_norm, "step_time": elapsed}

    def evaluate(self) -> Optional[float]:
        return validation_loss(self.model, self.valid_data, self.cfg.train.micro_batch_size,
                               self.cfg.train.eval_iters, autocast_bf16=self.autocast)

    def _probe_batch(self) -> torch.Tensor:
        data = self.valid_data or self.train_data
        return data.batch(0, min(4, self.cfg.train.micro_batch_size))

    @torch.no_grad()
    def probe_loss(self) -> float:
        """Loss on one fixed batch; equal before and after an MSG growth (function preservation)."""
        self.model.eval()
        loss = run_microbatches(self.model, [self._probe], forward_only=True, autocast_bf16=self.autocast)
        self.model.train()
        return loss

    # ---- checkpoints ---------------------------------------------------------------------
    def state(self) -> dict:
        st = {"step": self.step, "stage": self.stage, "consumed_samples": self.consumed_samples,
              "train_time": self.train_time, "train_flops": self.train_flops}
        if self.auto:
            st["auto"] = self.auto.state()
        return st

    def save(self) -> Optional[str]:
        ck = self.cfg.checkpoint
        if not ck.save:
            return None
        self.sync_steps()  # no checkpoint of a model whose pending losses were not finite
        path = save_checkpoint(ck.save, self.model, self.optimizer, self.state(), self.cfg.to_dict(),
                               self.tokenizer_path, ck.keep, writers=ck.writers,
                               protect=self.auto.protected() if self.auto else ())
        self.metrics.print(f"[save] step {self.step} -> {path}")
        self._last_saved, self._last_saved_path = self.step, path
        return path

    def num_params(self) -> int:
        """The whole model's parameter count (a collective under TP/PP), recounted only when the
        model object changes (growth, resume), not every step."""
        if getattr(self, "_params_of", None) is not self.model:
            self._params_of, self._params = self.model, count_parameters(self.model)
        return self._params

    # ---- preemption ----------------------------------------------------------------------
    def _install_signal_handlers(self):
        """SIGTERM / SIGUSR1 (what SLURM sends before a time limit or preemption) only set a flag:
        the current step finishes, every rank agrees at the step boundary, a checkpoint is saved and
        the run ends with PREEMPTED_EXIT."""
        self._signal = None
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):  # noqa: ARG001
            self._signal = signum

        return {s: signal.signal(s, handler) for s in PREEMPT_SIGNALS}

    def _preempt_requested(self) -> bool:
        """One process: its own flag, every step. Several: the flag all ranks agreed on when the
        losses were last read (`sync_steps`, every train.log_interval steps and before a save), so
        all stop at the same step, at most log_interval steps after the signal, with no collective
        per step for it."""
        if self.world == 1:
            return self._signal is not None
        return self._agreed_signal

    # ---- the loop ------------------------------------------------------------------------
    def run(self) -> dict:
        t, g = self.cfg.train, self.cfg.growth
        # a resumed run's step is saved already: no second save of it (a preemption right after the
        # resume, or a re-run of a finished run)
        self._last_saved, self._last_saved_path = ((self.step, self.resumed_from) if self.resumed_from
                                                   else (None, None))
        previous = self._install_signal_handlers()
        try:
            return self._loop(t, g)
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
            if self.lock is not None:
                self.lock.release()

    def _layout_text(self) -> str:
        """The layout and the megatron features the model really runs with (read from its config)."""
        from megatron.core import parallel_state as ps

        c = self.model.config
        parts = [f"tensor={self.layout[0]} pipeline={self.layout[1]} data={ps.get_data_parallel_world_size()}"]
        if c.virtual_pipeline_model_parallel_size:
            parts.append(f"virtual pipeline {c.virtual_pipeline_model_parallel_size} (interleaved 1F1B)")
        if c.sequence_parallel:
            parts.append("sequence parallel")
        if c.recompute_granularity:
            parts.append(f"recompute {c.recompute_granularity}")
        return ", ".join(parts)

    def _loop(self, t, g) -> dict:
        last_eval = None
        if self.cfg.layout(self.stage) != self.layout:
            tp, pp = self.cfg.layout(self.stage)
            raise ConfigError(f"stage {self.stage} of growth.stages runs at tensor={tp} pipeline={pp}, but this job "
                              f"has parallel.tensor={self.layout[0]} parallel.pipeline={self.layout[1]}; launch it "
                              f"with parallel.tensor={tp} parallel.pipeline={pp}")
        self.metrics.print(f"[train] shape {self.model.shape}, params {self.num_params():,}, "
                           f"{len(self.schedule) - 1} growth stage(s), {t.steps} steps; {self._layout_text()}")
        if self.step >= t.steps:
            self.metrics.print(f"[train] the checkpoint is at train.steps={t.steps}: nothing to train (raise "
                               "train.steps to continue)")
        while self.step < t.steps:
            if self.auto and not self._auto_check():
                return self._stop_in_probe()
            start = time.perf_counter()
            while self.stage + 1 < len(self.schedule) and self.schedule[self.stage + 1][0] <= self.step:
                if self.cfg.layout(self.stage + 1) != self.layout:
                    return self._stop_for_relayout(self.stage + 1)
                self.grow(self.stage + 1)
            lowest_mask = update_masks(self.model, self.step, g.ramp_steps)
            log_now = self.step % t.log_interval == 0 or self.step == t.steps - 1
            rec = self._record(self.train_step(), sync=log_now)
            self.train_time += time.perf_counter() - start
            self.train_flops += rec["flops_per_token"] * rec["tokens"]
            rec.update(step=self.step, stage=self.stage, shape=list(self.model.shape.as_tuple()),
                       params=self.num_params(), mask=lowest_mask, train_time=self.train_time,
                       train_flops=self.train_flops)
            if log_now:
                # (the mean step time of the steps just read, over the steps left: growth makes later
                # steps slower, so this is a lower bound that rises stage by stage)
                rec["eta_s"] = rec["step_time"] * (t.steps - self.step - 1)
                self.metrics.log(rec)
                self.metrics.print(
                    f"step {self.step:6d} | stage {self.stage} {self.model.shape} {rec['params'] / 1e6:.2f}M | "
                    f"loss {rec['loss']:.4f} | "
                    f"lr {rec['lr']:.2e} | {rec['tokens_per_s']:.0f} tok/s"
                    + (f" | MFU {rec['mfu']:.1%}" if "mfu" in rec else "")
                    + (f" | mask {lowest_mask:.2f}" if lowest_mask < 1 else "")
                    + f" | {_clock(self.train_time)} trained, ETA {_clock(rec['eta_s'])} | {time.strftime('%H:%M:%S')}")
            self.step += 1
            if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.steps:
                last_eval = self._log_eval()
            if t.eval_tasks and self.step < t.steps and self._tasks_due(t, g):
                self._log_tasks()
            if t.save_interval and self.step % t.save_interval == 0 and self.step < t.steps:
                self.save()
            if self.step < t.steps and self._preempt_requested():
                name = signal.Signals(self._signal).name if self._signal else "a signal on another rank"
                self.metrics.print(f"[preempt] {name}: stopping after step {self.step - 1}")
                if self._last_saved != self.step:
                    if self.save() is None:
                        self.metrics.print("[preempt] checkpoint.save is empty: nothing saved")
                self.metrics.close()
                return {"step": self.step, "preempted": True, "shape": list(self.model.shape.as_tuple())}
        last_eval = self._log_eval()
        if t.eval_tasks:
            self._log_tasks()
        if self._last_saved != self.step:
            self.save()
        self.metrics.close()
        out = {"step": self.step, "val_loss": last_eval, "shape": list(self.model.shape.as_tuple())}
        if self.no_validation:
            out["no_validation"] = self.no_validation
        return out

    # ---- growth.schedule=auto ----------------------------------------------------------------
    def _auto_check(self) -> bool:
        """Where a check's window ends, probe and decide (auto_growth.py; a kept probe becomes the run); at
        a check step, start one. False when a preemption signal stopped the probes."""
        if self.auto.deciding(self.step):
            rec = self.auto.finish_check(self)
            if rec is None:
                return False
            kept, probes = rec.pop("kept"), rec.pop("probes")
            self.metrics.log({"event": "auto_probes", **probes, "probe_share": rec["probe_share"]})
            self.metrics.log(rec)
            cands = ", ".join(f"{tuple(r['shape'])} {r['gamma']:.4g} ({r['sigma']:+.1f} sigma)"
                              for r in rec["candidates"])
            self.metrics.print(f"[auto] step {self.step}: gamma {rec['gamma']:.4g} +- {rec['gamma_se']:.2g} "
                               f"{rec['unit']}; probed {cands}"
                               + (f"; not probed (growth.auto.max_probe_share) {rec['not_probed']}"
                                  if rec["not_probed"] else "") + "; "
                               + (f"kept {tuple(rec['choice'])}, grown at step {rec['grown_at']}" if rec["choice"]
                                  else f"none beats it by {rec['margin_sigma']:g} sigma: not growing")
                               + f" (checks {rec['probe_share']:.1%} of the training time)")
            if kept:
                self._adopt_probe(kept)
        if self.auto.due(self):
            self.metrics.log(self.auto.start_check(self))
        return True

    def _adopt_probe(self, kept: dict) -> None:
        """A kept probe is the run: its stage joins growth.stages at the check's step, and its steps replace
        the window's in metrics.jsonl (readers drop the window's lines at event auto_kept, as at a resume),
        logged as the loop logs them; the evaluation due at this step is made again, on the kept model."""
        t, s = self.cfg.train, kept["stage_step"]
        self.cfg.growth.stages.append(StageConfig(step=s, shape=list(kept["shape"])))
        self.schedule, self.lr_schedule = self.cfg.schedule(), lr_schedule(self.cfg)
        self.stage += 1
        self.auto.stage_started()
        self.auto.observe(kept["rows"])
        self.metrics.log({"event": "auto_kept", "step": s, "until": self.step, "shape": kept["shape"]})
        self.log_growth(kept["growth"])
        fpt = kept["flops_per_step"] / kept["tokens"]
        for i, ((step, loss, grad_norm), mask, lr) in enumerate(zip(kept["rows"], kept["masks"], kept["lrs"])):
            if step % t.log_interval == 0 or step == t.steps - 1:
                self.metrics.log({"lr": lr, "tokens": kept["tokens"], "flops_per_token": fpt, "loss": loss,
                                  "grad_norm": grad_norm, "step_time": kept["seconds_per_step"], "step": step,
                                  "stage": self.stage, "shape": list(kept["shape"]), "params": self.num_params(),
                                  "mask": mask, "train_time": kept["time0"] + (i + 1) * kept["seconds_per_step"],
                                  "train_flops": kept["flops0"] + (i + 1) * kept["flops_per_step"], "probe": True})
        if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.steps:
            self._log_eval()

    def _stop_in_probe(self) -> dict:
        """A preemption signal during the probes: the check's checkpoint (saved before them) is where a
        resume replays the check from; the probed state is not saved."""
        self.metrics.print(f"[preempt] stopping in the probes of step {self.step}; the resume point is the window "
                           f"end's checkpoint {self._last_saved_path}, from which the probes are replayed")
        self.metrics.close()
        return {"step": self.step, "preempted": True, "shape": list(self.model.shape.as_tuple())}

    def _stop_for_relayout(self, stage: int) -> dict:
        """The next stage runs at another TP/PP layout: save here (before the growth) and stop, so
        `msg-grow --tensor T --pipeline P` can grow and reshard the checkpoint for the next job."""
        tp, pp = self.cfg.layout(stage)
        shape = self.schedule[stage][1]
        self.metrics.print(f"[relayout] step {self.step}: stage {stage} {shape} runs at tensor={tp} pipeline={pp} "
                           f"(this job: {self.layout[0]} x {self.layout[1]}); saving and stopping. Next: msg-grow "
                           f"--load CKPT --shape {','.join(map(str, shape.as_tuple()))} --tensor {tp} --pipeline {pp} "
                           "--save NEW_DIR, then resume from NEW_DIR at that layout")
        self._log_eval()
        path = self.save() if self._last_saved != self.step else self._last_saved_path
        self.metrics.close()
        return {"step": self.step, "relayout": {"stage": stage, "shape": list(shape.as_tuple()), "tensor": tp,
                                                 "pipeline": pp, "checkpoint": path},
                "shape": list(self.model.shape.as_tuple())}

    def _tasks_due(self, t, g) -> bool:
        """train.eval_tasks at its interval and steps, and where a growth ramp has just ended (the grown
        model at full strength, the masks all 1)."""
        if (t.eval_tasks_interval and self.step % t.eval_tasks_interval == 0) or self.step in t.eval_tasks_steps:
            return True
        return t.eval_tasks_at_ramp_end and any(step > 0 and step + g.ramp_steps == self.step
                                                for step, _ in self.schedule[1:self.stage + 1])

    def _log_tasks(self) -> dict:
        """train.eval_tasks on the model as it is (every rank; DP replicas split the requests)."""
        t = self.cfg.train
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        start = time.perf_counter()
        res = run_tasks(self.model, self._tokenizer, t.eval_tasks, seq_length=self.cfg.model.seq_length,
                        vocab_size=self._tokenizer.vocab_size, batch_size=t.micro_batch_size,
                        limit=t.eval_tasks_limit or None, seed=t.seed, manager=self.task_manager)
        flat = {f"tasks/{task}/{k}": v for task, row in res["scores"].items() for k, v in row.items()
                if k != "sample_len"}
        self.metrics.log({"step": self.step, "stage": self.stage, "train_time": self.train_time,
                          "train_flops": self.train_flops, "eval_tasks_s": time.perf_counter() - start, **flat})
        self.metrics.print(f"[tasks] step {self.step} | " + " | ".join(f"{k[6:]} {v:.4g}" for k, v in flat.items()))
        return flat

    def _log_eval(self) -> Optional[float]:
        val = self.evaluate()
        if val is not None:
            rec = {"step": self.step, "val_loss": val, "stage": self.stage, "train_time": self.train_time,
                   "train_flops": self.train_flops}
            if self.cfg.model.family == "bert":  # its downstream-style score: masked-LM accuracy, same batches
                rec["mlm_accuracy"] = masked_lm_accuracy(self.model, self.valid_data, self.cfg.train.micro_batch_size,
                                                         self.cfg.train.eval_iters)
            self.metrics.log(rec)
            self.metrics.print(f"[eval] step {self.step} | val_loss {val:.4f}"
                               + (f" | mlm_accuracy {rec['mlm_accuracy']:.4f}" if "mlm_accuracy" in rec else ""))
        return val

