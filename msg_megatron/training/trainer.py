"""The training loop. A growth event is one explicit method (`grow`) called between steps.

    for step in range(start, steps):
        if a stage starts at this step: grow()          # MSG operators, masks at 0, AdamW state grown
        update masks to this step's ramp value          # fold the ones that reached 1
        train_step()                                    # forward/backward over micro-batches, AdamW
        log / evaluate / save at their intervals
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
from typing import Optional

import torch

from ..checkpoint.dist import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from ..checkpoint.run_lock import hold_save_dir
from ..config import Config, ConfigError, ModelConfig, Shape
from ..data import DataError, SyntheticWindows, TokenWindows, resolve_data_dir_all_ranks, validation_problem
from ..growth.apply import grow
from ..model import build_model, count_parameters, update_masks
from ..model.masks import ramping
from ..ops import fused
from ..optim.optimizer import build_optimizer, cast_keeping_masters, cast_params, param_dtype
from ..parallel import device, initialize_parallel, is_logging_rank
from .evaluate import validation_loss
from .flops import device_peak_tflops, flops_per_token
from .host_memory import check_host_memory
from .metrics import MetricsLogger
from .microbatches import run_microbatches
from .schedule import LRSchedule
from .step_stats import PendingSteps

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: saved on SIGTERM/SIGUSR1, resume to continue (launchers requeue on it)
RELAYOUT_EXIT = 76  # saved before a stage that runs at another TP/PP layout: msg-grow reshards, then resume
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Trainer:
    def __init__(self, cfg: Config, log_enabled: bool = True):
        self.cfg = cfg
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.autocast = t.precision == "bf16-autocast"
        if self.autocast and not torch.cuda.is_available():
            # megatron's TP linears run their backward under CUDA autocast only
            raise ConfigError("train.precision=bf16-autocast needs a GPU (bf16 autocast of megatron's linears is "
                              "CUDA-only); use train.precision=bf16 (bf16 parameters) or fp32 on CPU.")
        initialize_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, t.seed)
        self.fusion = fused.configure(t.fusion)
        self.layout = (cfg.parallel.tensor, cfg.parallel.pipeline)
        from megatron.core import parallel_state as ps

        self.dp_rank, self.dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.world = torch.distributed.get_world_size()
        # on a CPU, before data or model exist: an over-large run would otherwise die by SIGKILL
        check_host_memory(cfg, self.layout, self.dp)
        # one run per save directory, and a target that takes files, checked before any compute
        self.lock = hold_save_dir(cfg.checkpoint.save, "msg-pretrain") if cfg.checkpoint.save else None
        for i in range(len(cfg.schedule())):
            gbs = cfg.batch_size(i)
            n_micro = gbs // t.micro_batch_size
            if n_micro % self.dp and cfg.layout(i) == self.layout:
                raise ConfigError(
                    f"the global batch size {gbs} (train.global_batch_size or growth.stages[{i}]) is {n_micro} "
                    f"micro-batches of {t.micro_batch_size}, which do not split over {self.dp} data-parallel "
                    f"ranks; make it a multiple of micro_batch_size x {self.dp} = {t.micro_batch_size * self.dp}.")
        self.metrics = MetricsLogger(cfg.logging.run_dir, cfg.logging.wandb, cfg.logging.project,
                                     cfg.logging.name, cfg.to_dict(), enabled=log_enabled and is_logging_rank())
        if self.lock is not None and self.lock.note:
            self.metrics.print(f"[lock] {cfg.checkpoint.save}: {self.lock.note}")
        seq, no_split = cfg.model.seq_length, None
        if cfg.data.corpus == "synthetic":
            self.data_dir = ""
            self.train_data = SyntheticWindows(cfg.model.vocab_size, seq, t.seed)
            self.valid_data = SyntheticWindows(cfg.model.vocab_size, seq, t.seed)
        else:
            self.data_dir, _ = resolve_data_dir_all_ranks(cfg.data, cfg.model.vocab_size, self.metrics.print)
            self.train_data = TokenWindows(os.path.join(self.data_dir, "train"), seq, t.seed)
            try:
                self.valid_data = TokenWindows(os.path.join(self.data_dir, "valid"), seq, t.seed)
            except DataError as e:  # empty, or shorter than one window: named below
                self.valid_data, no_split = None, str(e)
        self.no_validation = no_split or validation_problem(self.valid_data, t.micro_batch_size, t.eval_iters)
        if self.no_validation:  # said once at start, and in the final result, instead of a silent null
            self.metrics.print(f"[eval] no validation loss will be reported: {self.no_validation}")
        self.schedule = cfg.schedule()
        reset_steps = [self.schedule[i][0] for i in cfg.growth.lr_reset_stages]
        self.lr_schedule = LRSchedule(t.lr, t.min_lr, t.warmup_steps, t.decay_steps or t.steps, t.decay_style,
                                      reset_steps)
        self.step, self.stage, self.consumed_samples = 0, 0, 0
        # wall time spent training (steps + growth, not evaluation) and model FLOPs so far: the x-axes
        # of the paper's speed-up comparisons, carried across resumes
        self.train_time, self.train_flops = 0.0, 0.0
        # the model is built once, by the path that fills it (a resume never holds a fresh model besides)
        ck = cfg.checkpoint
        if ck.load == "auto" and os.path.isdir(ck.save) and any(d.startswith("step_") for d in os.listdir(ck.save)):
            self.resume(ck.save, fallback=True)
        elif ck.load and ck.load != "auto":
            self.resume(ck.load)
        elif ck.init_from:
            self.init_from(ck.init_from)
        else:
            if ck.load == "auto":
                self.metrics.print(f"[resume] checkpoint.load=auto: no checkpoint in `{ck.save}` yet, starting fresh")
            self.model = build_model(cfg.model, self.schedule[0][1], seed=t.seed)  # fp32 init: exact masters
            self.optimizer = build_optimizer(self.model, t, cfg.parallel,
                                             masters=cast_keeping_masters(self.model, param_dtype(t)))
        self._pending, self._host_time = PendingSteps(device()), 0.0
        self._signal, self._agreed_signal = None, False
        self.metrics.print(self.optimizer.describe() + f", fusion {self.fusion}")
        self._probe = self._probe_batch()
        self.peak_tflops = device_peak_tflops()

    # ---- growth --------------------------------------------------------------------------
    def grow(self, stage: int) -> dict:
        """Grow to `stage`'s shape before training step `self.step` (paper section 3.1)."""
        old_shape, new_shape = self.model.shape, self.schedule[stage][1]
        loss_before = self.probe_loss()
        self.model, self.optimizer = grow(self.model, self.optimizer, new_shape, self.cfg, self.step, stage)
        self.stage = stage
        # the masks as before the growth (new ones 0): the same function; the loop then sets them for this step
        loss_after = self.probe_loss()
        record = {"event": "growth", "step": self.step, "stage": stage, "from": list(old_shape.as_tuple()),
                  "to": list(new_shape.as_tuple()), "params": self.num_params(),
                  "probe_loss_before": loss_before, "probe_loss_after": loss_after}
        self.metrics.print(f"[grow] step {self.step}: stage {stage} {old_shape} -> {new_shape}, "
                           f"params {record['params']:,}, probe loss {loss_before:.6f} -> {loss_after:.6f}")
        self.metrics.log(record)
        return record

    # ---- steps ---------------------------------------------------------------------------
    def train_step(self, sync: bool = True) -> dict:
        """One step. Its loss and gradient norm stay on the device (no host sync, no collective
        beyond the step's own) until `sync`: then every pending step is read at once
        (`sync_steps`) and this step's loss, gradient norm and throughput are in the record."""
        t = self.cfg.train
        self.model.train()
        lr = self.lr_schedule(self.step)
        gbs = self.cfg.batch_size(self.stage)
        n_micro = gbs // t.micro_batch_size
        local = n_micro // self.dp  # this DP rank's micro-batches: a contiguous block of the batch
        start = time.perf_counter()
        batches = [self.train_data.batch(self.consumed_samples + (self.dp_rank * local + i) * t.micro_batch_size,
                                         t.micro_batch_size) for i in range(local)]
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
        fpt = flops_per_token(self.cfg.model, self.model.shape, self.model.vocab_padded)
        rec = {"lr": lr, "tokens": gbs * self.cfg.model.seq_length, "flops_per_token": fpt}
        if sync:
            rec.update(self.sync_steps())
            rec["tokens_per_s"] = rec["tokens"] / rec["step_time"]
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
        return {"step": self.step, "stage": self.stage, "consumed_samples": self.consumed_samples,
                "train_time": self.train_time, "train_flops": self.train_flops}

    def save(self) -> Optional[str]:
        ck = self.cfg.checkpoint
        if not ck.save:
            return None
        self.sync_steps()  # no checkpoint of a model whose pending losses were not finite
        path = save_checkpoint(ck.save, self.model, self.optimizer, self.state(), self.cfg.to_dict(),
                               os.path.join(self.data_dir, "tokenizer.model") if self.data_dir else "", ck.keep,
                               writers=ck.writers)
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

    def resume(self, path: str, fallback: bool = False) -> None:
        full = self.cfg.checkpoint.verify == "full"
        meta = read_meta(path, full=full, fallback=fallback)
        for note in meta["notes"]:
            self.metrics.print(f"[resume] {note}")
        diff = self._model_diff(meta["config"]["model"])
        if diff:
            raise CheckpointError(
                f"checkpoint `{meta['path']}` was trained with another model config (differs in "
                f"{', '.join(f'model.{k}' for k in diff)}); use the same model section or a matching checkpoint")
        st = meta["state"]
        if st["step"] > self.cfg.train.steps:
            raise CheckpointError(
                f"checkpoint `{meta['path']}` is at step {st['step']}, past train.steps={self.cfg.train.steps}: "
                f"resuming would overwrite later checkpoints with nothing trained; set train.steps above "
                f"{st['step']} to continue, or choose a new checkpoint.save to start another run")
        self.step, self.stage, self.consumed_samples = st["step"], st["stage"], st["consumed_samples"]
        self.train_time, self.train_flops = st.get("train_time", 0.0), st.get("train_flops", 0.0)
        shape = Shape(*meta["shape"])
        if shape != self.schedule[self.stage][1]:
            raise CheckpointError(f"checkpoint `{meta['path']}` has shape {shape} but stage {self.stage} of the "
                                  f"schedule is {self.schedule[self.stage][1]}; fix growth.stages or the checkpoint")
        # weights and masters both come from the checkpoint: no masters to carry over from the build
        self.model = cast_params(build_model(self.cfg.model, shape, perform_init=False), param_dtype(self.cfg.train))
        self.optimizer = build_optimizer(self.model, self.cfg.train, self.cfg.parallel)
        load_checkpoint(meta["path"], self.model, self.optimizer, full=full)  # fp32 weights -> masters
        self.metrics.print(f"[resume] {meta['path']}: step {self.step}, stage {self.stage}, shape {shape}")

    def _model_diff(self, saved: dict, ignore=()) -> list:
        """model.* fields in which a checkpoint's config differs from this run's."""
        mine = dataclasses.asdict(self.cfg.model)
        return sorted(k for k in mine if k not in ignore and saved.get(k) != mine[k])

    def init_from(self, path: str) -> None:
        """Start from a checkpoint's weights at step 0 (checkpoint.init_from): the first stage's model
        is that checkpoint; optimizer, step, data position and RNG start fresh."""
        meta = read_meta(path, full=self.cfg.checkpoint.verify == "full")
        saved = ModelConfig(**meta["config"]["model"])
        # the final sizes may differ (the imported model is the first stage); kv_channels as the head dim
        diff = self._model_diff(meta["config"]["model"], ignore=("hidden_size", "ffn_hidden_size",
                                                                 "num_attention_heads", "num_layers",
                                                                 "init_method_std", "kv_channels"))
        if saved.head_dim != self.cfg.model.head_dim:
            diff.append("kv_channels")
        if diff:
            raise CheckpointError(
                f"checkpoint.init_from `{meta['path']}` has another architecture: "
                + ", ".join(f"model.{k}={getattr(saved, k) if k != 'kv_channels' else saved.head_dim}" for k in diff)
                + "; set these in the config")
        shape = Shape(*meta["shape"])
        if shape != self.schedule[0][1]:
            raise CheckpointError(f"checkpoint.init_from `{meta['path']}` has shape {shape}, but growth.stages[0] is "
                                  f"{self.schedule[0][1]}; start the schedule at {list(shape.as_tuple())}")
        self.model = build_model(self.cfg.model, shape, perform_init=False)
        load_checkpoint(meta["path"], self.model, None, full=self.cfg.checkpoint.verify == "full", restore_rng=False)
        masters = cast_keeping_masters(self.model, param_dtype(self.cfg.train))
        self.optimizer = build_optimizer(self.model, self.cfg.train, self.cfg.parallel, masters=masters)
        if ramping(self.model):
            raise CheckpointError(f"checkpoint.init_from `{meta['path']}` is mid-ramp (masks below 1); start from a "
                                  "checkpoint taken after growth.ramp_steps more steps")
        self.metrics.print(f"[init] weights of {meta['path']} (shape {shape}) at step 0")

    # ---- the loop ------------------------------------------------------------------------
    def run(self) -> dict:
        t, g = self.cfg.train, self.cfg.growth
        self._last_saved, self._last_saved_path = None, None
        previous = self._install_signal_handlers()
        try:
            return self._loop(t, g)
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
            if self.lock is not None:
                self.lock.release()

    def _loop(self, t, g) -> dict:
        last_eval = None
        if self.cfg.layout(self.stage) != self.layout:
            tp, pp = self.cfg.layout(self.stage)
            raise ConfigError(f"stage {self.stage} of growth.stages runs at tensor={tp} pipeline={pp}, but this job "
                              f"has parallel.tensor={self.layout[0]} parallel.pipeline={self.layout[1]}; launch it "
                              f"with parallel.tensor={tp} parallel.pipeline={pp}")
        self.metrics.print(f"[train] shape {self.model.shape}, params {self.num_params():,}, "
                           f"{len(self.schedule) - 1} growth stage(s), {t.steps} steps")
        while self.step < t.steps:
            start = time.perf_counter()
            while self.stage + 1 < len(self.schedule) and self.schedule[self.stage + 1][0] <= self.step:
                if self.cfg.layout(self.stage + 1) != self.layout:
                    return self._stop_for_relayout(self.stage + 1)
                self.grow(self.stage + 1)
            lowest_mask = update_masks(self.model, self.step, g.ramp_steps)
            log_now = self.step % t.log_interval == 0 or self.step == t.steps - 1
            rec = self.train_step(sync=log_now)
            self.train_time += time.perf_counter() - start
            self.train_flops += rec["flops_per_token"] * rec["tokens"]
            rec.update(step=self.step, stage=self.stage, shape=list(self.model.shape.as_tuple()),
                       params=self.num_params(), mask=lowest_mask, train_time=self.train_time,
                       train_flops=self.train_flops)
            if log_now:
                self.metrics.log(rec)
                self.metrics.print(
                    f"step {self.step:6d} | stage {self.stage} {self.model.shape} {rec['params'] / 1e6:.2f}M | "
                    f"loss {rec['loss']:.4f} | "
                    f"lr {rec['lr']:.2e} | {rec['tokens_per_s']:.0f} tok/s"
                    + (f" | MFU {rec['mfu']:.1%}" if "mfu" in rec else "")
                    + (f" | mask {lowest_mask:.2f}" if lowest_mask < 1 else ""))
            self.step += 1
            if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.steps:
                last_eval = self._log_eval()
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
        self.save()
        self.metrics.close()
        out = {"step": self.step, "val_loss": last_eval, "shape": list(self.model.shape.as_tuple())}
        if self.no_validation:
            out["no_validation"] = self.no_validation
        return out

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

    def _log_eval(self) -> Optional[float]:
        val = self.evaluate()
        if val is not None:
            self.metrics.log({"step": self.step, "val_loss": val, "stage": self.stage, "train_time": self.train_time,
                              "train_flops": self.train_flops})
            self.metrics.print(f"[eval] step {self.step} | val_loss {val:.4f}")
        return val

