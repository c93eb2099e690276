"""Everything a run needs before its model exists, built and checked in order (Trainer's builder).

Each check runs before the work it protects: the precision before the parallel state, the host
memory before any data or model, the save directory's lock before any compute, the batch split
before the first step. The result is plain fields the Trainer reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state as ps

from ..checkpoint.run_lock import RunLock, hold_save_dir
from ..config import Config, ConfigError
from ..config.candidates import probe_warnings
from ..data import validation_problem
from ..data.sources import open_data
from ..model.hf_arch import export_warnings
from ..ops import fused
from ..parallel import initialize_parallel, is_logging_rank, placement
from .harness import EvalError, task_manager
from .auto_growth import check_probe_share
from .host_memory import check_host_memory
from .metrics import MetricsLogger
from .schedule import LRSchedule, lr_schedule
from .starts import stage_to_resume


@dataclass
class RunParts:
    autocast: bool  # train.precision=bf16-autocast (GPU only)
    fusion: str  # the fused ops in use (ops/fused.py)
    layout: tuple  # (tensor, pipeline) of this job
    dp_rank: int
    dp: int
    world: int
    lock: Optional[RunLock]  # the save directory's run lock (checkpoint/run_lock.py)
    metrics: MetricsLogger
    tokenizer_path: str  # the data's tokenizer, saved with checkpoints ("" for synthetic data)
    train_data: object
    valid_data: object  # None when the validation split is unusable
    no_validation: Optional[str]  # why no validation loss will be reported
    schedule: list  # [(step, Shape)] of growth.stages
    lr_schedule: LRSchedule
    task_manager: object = None  # lm-eval's, knowing train.eval_tasks (None without them)


def build_run(cfg: Config, log_enabled: bool = True) -> RunParts:
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    autocast = t.precision == "bf16-autocast"
    if autocast and not torch.cuda.is_available():
        # megatron's TP linears run their backward under CUDA autocast only
        raise ConfigError("train.precision=bf16-autocast needs a GPU (bf16 autocast of megatron's linears is "
                          "CUDA-only); use train.precision=bf16 (bf16 parameters) or fp32 on CPU.")
    layout_note = take_resume_layout(cfg)
    initialize_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, t.seed, cfg.parallel.sequence_parallel,
                        cfg.parallel.virtual_pipeline)
    fusion = fused.configure(t.fusion)
    layout = (cfg.parallel.tensor, cfg.parallel.pipeline)
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    # which ranks share a machine (one all_gather of hostnames, every rank): printed, and what the
    # host-memory check counts per host
    where = placement() if torch.distributed.get_world_size() > 1 else None
    # on a CPU, before data or model exist: an over-large run would otherwise die by SIGKILL
    check_host_memory(cfg, layout, dp)
    if cfg.growth.schedule == "auto":  # (the probes' FLOPs budget leaves room for a check)
        check_probe_share(cfg)
    # one run per save directory, and a target that takes files, checked before any compute
    lock = hold_save_dir(cfg.checkpoint.save, "msg-pretrain") if cfg.checkpoint.save else None
    check_batch_split(cfg, layout, dp)
    manager = None
    if t.eval_tasks:  # lm-eval installed and the task names known, before any data or compute
        try:
            manager = task_manager(t.eval_tasks)
        except EvalError as e:
            raise ConfigError(f"train.eval_tasks: {e}") from None
    metrics = MetricsLogger(cfg.logging.run_dir, cfg.logging.wandb, cfg.logging.project, cfg.logging.name,
                            cfg.to_dict(), enabled=log_enabled and is_logging_rank())
    if where:
        metrics.print(f"[launch] {where}")
    if layout_note:
        metrics.print(layout_note)
    for note in export_warnings(cfg.model, cfg.schedule()):
        metrics.print(f"[export] warning: {note}")
    for note in probe_warnings(cfg):
        metrics.print(f"[auto] warning: {note}")
    if lock is not None and lock.note:
        metrics.print(f"[lock] {cfg.checkpoint.save}: {lock.note}")
    data = open_data(cfg, metrics.print)
    train_data, valid_data = data.train, data.valid
    no_validation = data.no_valid or validation_problem(valid_data, t.micro_batch_size, t.eval_iters)
    if no_validation:  # said once at start, and in the final result, instead of a silent null
        metrics.print(f"[eval] no validation loss will be reported: {no_validation}")
    schedule = cfg.schedule()
    return RunParts(autocast, fusion, layout, dp_rank, dp, torch.distributed.get_world_size(), lock, metrics,
                    data.tokenizer_path, train_data, valid_data, no_validation, schedule, lr_schedule(cfg), manager)


def take_resume_layout(cfg: Config) -> str:
    """A resume runs at its stage's declared layout (growth.stages[].tensor/.pipeline) without the
    user saying it again: cfg.parallel is set to it. Returns the note to log ("" if unchanged)."""
    stage = stage_to_resume(cfg)
    declared, given = cfg.layout(stage), (cfg.parallel.tensor, cfg.parallel.pipeline)
    if declared == given:
        return ""
    cfg.parallel.tensor, cfg.parallel.pipeline = declared
    return (f"[layout] resuming stage {stage}, which growth.stages declares at tensor={declared[0]} "
            f"pipeline={declared[1]}: running at that layout (parallel.* says {given[0]} x {given[1]})")


def check_job(cfg: Config, world: int) -> str:
    """The checks a job of `world` processes makes before its process group exists (launch/local.sh
    runs them once, before torchrun): the layout it will run at divides the world, and the batch
    splits over its data-parallel ranks. Returns the layout note."""
    note = take_resume_layout(cfg)
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    if world % (tp * pp):
        raise ConfigError(f"{world} processes do not split into tensor={tp} x pipeline={pp} = {tp * pp} per model "
                          f"replica; launch a multiple of {tp * pp} processes, or change parallel.tensor/pipeline")
    check_batch_split(cfg, (tp, pp), world // (tp * pp))
    return note


def check_batch_split(cfg: Config, layout: tuple, dp: int) -> None:
    """The micro-batches of every stage run at `layout` split over `dp` ranks (and, interleaved,
    into megatron's groups of PP): a ConfigError naming the numbers otherwise."""
    mbs = cfg.train.micro_batch_size
    for i in range(len(cfg.schedule())):
        gbs = cfg.batch_size(i)
        n_micro = gbs // mbs
        if n_micro % dp and cfg.layout(i) == layout:
            raise ConfigError(
                f"the global batch size {gbs} (train.global_batch_size or growth.stages[{i}]) is {n_micro} "
                f"micro-batches of {mbs}, which do not split over {dp} data-parallel ranks; make it a "
                f"multiple of micro_batch_size x {dp} = {mbs * dp}.")
        pp, v = layout[1], cfg.parallel.virtual_pipeline
        if v > 1 and cfg.layout(i) == layout and (n_micro // dp) % pp:
            # megatron's interleaved schedule runs each chunk's micro-batches in groups of PP
            raise ConfigError(
                f"parallel.virtual_pipeline={v}: the global batch size {gbs} (train.global_batch_size or "
                f"growth.stages[{i}]) gives {n_micro // dp} micro-batches of {mbs} per data-parallel rank (DP={dp}), "
                f"not a multiple of parallel.pipeline={pp} as megatron's interleaved schedule needs; make the global "
                f"batch a multiple of micro_batch_size x DP x pipeline = {mbs * dp * pp}.")
