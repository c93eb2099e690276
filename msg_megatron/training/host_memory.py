"""Refuse a CPU run whose model state cannot fit in this machine's memory, before anything is built.

On a GPU an over-large model ends in a CUDA out-of-memory exception that names itself. On a CPU the
kernel's OOM killer ends the process with a bare SIGKILL (no traceback, no message), after the data
is prepared and possibly hours in, at the growth step that makes the model big enough. So a CPU run
checks, at start, every stage it will train at its layout against the memory the machine has.

What is counted is a lower bound: the persistent state of the trainer per parameter element,
  weights (4 B fp32 / 2 B bf16) + fp32 main gradients in megatron's DDP buffer (4 B)
  + AdamW's two fp32 moments (8 B) + fp32 master weights for bf16 parameters (4 B),
the optimizer part divided by DP with the distributed optimizer (bf16 parameters save no host
memory here: their fp32 masters live on the same machine). Activations, temporaries and the
checkpoint writer come on top (measured on this project's CPU machine: ~21 B/param in total for a
110M-parameter GPT at micro-batch 2), so a run refused here could never have finished; one that
passes may still be tight, and the message of the check says the numbers either way.
"""
from __future__ import annotations

import socket
from typing import Optional

from ..config import ConfigError
from ..model.gpt import padded_vocab_size
from ..parallel import hosts
from ..parallel.agree import first_error
from .phase_memory import phase_peaks
from .sizes import largest_tensor, params_per_gpu

GIB = 1024 ** 3


def state_bytes_per_param(precision: str, dp: int, distributed_optimizer: bool) -> float:
    """Bytes of persistent trainer state per local parameter element (see the module docstring;
    phase_memory's `train` phase without activations)."""
    return phase_peaks(precision, dp, distributed_optimizer, 1, 0)["train"]


def local_params(mcfg, shape, tp: int, pp: int) -> float:
    """Parameters one process holds at `shape` on the most loaded pipeline stage (plan.params_per_gpu)."""
    return params_per_gpu(mcfg, shape, padded_vocab_size(mcfg), tp, pp)


def processes_on_this_host() -> int:
    """Training processes sharing this machine's memory: the ranks of the default process group
    that report this host's name (exact under torchrun, srun or any other launcher)."""
    return hosts().count(socket.gethostname())


def _this_machine() -> str:
    return f"host {socket.gethostname()}" if len(set(hosts())) > 1 else "this machine"


def available_bytes() -> int:
    """Memory a new allocation can get without the OOM killer: available RAM plus free swap."""
    import psutil

    return psutil.virtual_memory().available + psutil.swap_memory().free


def require_host_memory(what: str, params: float, bytes_per_param: float, holds: str, fix: str,
                        processes: Optional[int] = None, available: Optional[int] = None) -> Optional[dict]:
    """The one check: `params` elements per process x `bytes_per_param` x the processes on this host
    must fit in the available memory, else ConfigError("`what` cannot fit ... `holds` ... `fix`").
    Only without CUDA (on a GPU, out-of-memory is an exception that names itself: returns None).
    A collective when `processes` is not given (every rank must call it)."""
    import torch

    if torch.cuda.is_available():
        return None
    agree = processes is None  # counted from the world: every rank gets the first host's refusal
    processes = processes or processes_on_this_host()
    available = available_bytes() if available is None else available
    per_process = params * bytes_per_param
    need = per_process * processes
    err = None
    if need > available:
        err = (f"{what} cannot fit in {_this_machine()}'s memory: {int(params):,} parameters per process; {holds} "
               f"alone take {bytes_per_param:g} bytes each = {per_process / GIB:.1f} GiB x {processes} process(es) "
               f"on this machine = {need / GIB:.1f} GiB, and {available / GIB:.1f} GiB is available (RAM + free "
               f"swap). Without this check the kernel would kill it without a message. {fix}")
    if agree:
        # multi-node: the hosts differ (other jobs, other memory); a rank refusing alone would leave
        # the others waiting in their next collective, so the outcome is agreed (one all_gather)
        err = first_error(err)
    if err:
        raise ConfigError(err)
    return {"params": int(params), "bytes_per_param": bytes_per_param, "per_process": per_process,
            "processes": processes, "available": available}


def check_host_memory(cfg, layout: tuple, dp: int, processes: Optional[int] = None,
                      available: Optional[int] = None) -> Optional[dict]:
    """Raise ConfigError when the stages trained at `layout` (TP, PP), or the online growth into one
    of them, need more memory than this machine has. Returns the largest peak's figures (None on a
    GPU, where nothing is checked)."""
    tp, pp = layout
    t, par = cfg.train, cfg.parallel
    distributed = bool(par.distributed_optimizer)
    sched = cfg.schedule()
    if cfg.growth.schedule == "auto":  # the stages it decides are not known yet: the largest it may reach
        sched = sched + [(cfg.train.steps, cfg.model.shape)]
    # (peak bytes, local parameters, stage, phase) of each stage this job trains; the others run in a
    # later job (offline relayout), which checks itself
    peaks = []
    for i, (_, shape) in enumerate(sched):
        if cfg.layout(i) != layout:
            continue
        params = local_params(cfg.model, shape, tp, pp)
        online = i and cfg.layout(i - 1) == layout  # grown online: the old and the new model meet
        phases = phase_peaks(t.precision, dp, distributed, params, largest_local_tensor(cfg.model, shape, tp),
                             local_params(cfg.model, sched[i - 1][1], tp, pp) if online else None)
        peaks += [(phases[ph], params, i, ph) for ph in ("train", "grow") if ph in phases]
    if not peaks:
        return None
    peak, params, stage, phase = max(peaks)
    shape = sched[stage][1].as_tuple()
    dist = " with the distributed optimizer" if distributed else ""
    holds = (f"its weights, gradients and AdamW state in train.precision={t.precision}{dist}" if phase == "train" else
             f"the growth into it (the old model and AdamW state while the new ones are built, "
             f"train.precision={t.precision}{dist})")
    fit = require_host_memory(
        f"this run (stage {stage}, shape {shape}, at TP={tp}, PP={pp}, DP={dp})", params, peak / params, holds,
        "Shrink the model or its growth stages, spread it over more machines (tensor/pipeline parallelism, or "
        "data parallelism with parallel.distributed_optimizer=true), or run on GPUs.", processes, available)
    return fit and dict(fit, stage=stage, shape=shape, phase=phase)


def largest_local_tensor(mcfg, shape, tp: int) -> float:
    return largest_tensor(mcfg, shape, padded_vocab_size(mcfg), tp)
