"""How a run's first model comes to be: built fresh, resumed from a checkpoint, or started from a
checkpoint's weights (checkpoint.init_from). The model is built once, by the path that fills it:
a resume never holds a fresh model besides the loaded one."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
from dataclasses import dataclass, field

import torch.distributed as dist

from ..checkpoint.dist import META, CheckpointError, load_checkpoint, read_meta
from ..checkpoint.megatron_lm import MegatronCheckpoint, fill_model, is_megatron_lm_dir
from ..config import Config, ModelConfig, Shape, StageConfig
from ..config.loading import config_from_dict
from ..data.gpt_data import data_identity
from ..model import build_model
from ..model.masks import ramping
from ..optim.optimizer import build_optimizer, cast_keeping_masters, cast_params, param_dtype
from ..parallel.agree import first_error, on_rank0
from .resume_checks import check_resume


@dataclass
class Start:
    model: object
    optimizer: object
    # step, stage, consumed_samples, train_time, train_flops (wall time spent training and model
    # FLOPs so far: the x-axes of the paper's speed-up comparisons, carried across resumes)
    state: dict = field(default_factory=lambda: {"step": 0, "stage": 0, "consumed_samples": 0,
                                                  "train_time": 0.0, "train_flops": 0.0})
    resumed_from: str = ""  # the step checkpoint a resume loaded ("" for a new run)


def start_run(cfg: Config, schedule: list, log) -> Start:
    """checkpoint.load (a path, or `auto`: the save directory's newest if any), else
    checkpoint.init_from, else a fresh model of the first stage's shape. A save directory that
    already holds checkpoints is resumed even without checkpoint.load (as Megatron-LM resumes with
    --load = --save): starting over there would overwrite and prune the earlier run's checkpoints."""
    ck = cfg.checkpoint
    # (global rank 0 looks, for all: see agreed_meta)
    if ck.load in ("auto", "") and ck.save and on_rank0(
            lambda: os.path.isdir(ck.save) and any(d.startswith("step_") for d in os.listdir(ck.save))):
        if not ck.load:
            log(f"[resume] checkpoint.save `{ck.save}` already holds checkpoints: resuming from its newest, as "
                "checkpoint.load=auto would (a new run there would overwrite them); to start a new run, choose "
                "another checkpoint.save")
        return resume(cfg, schedule, ck.save, log, fallback=True)
    if ck.load and ck.load != "auto":
        return resume(cfg, schedule, ck.load, log)
    if ck.init_from:
        return init_from(cfg, schedule, ck.init_from, log)
    if ck.load == "auto":
        log(f"[resume] checkpoint.load=auto: no checkpoint in `{ck.save}` yet, starting fresh")
    model = build_model(cfg.model, schedule[0][1], seed=cfg.train.seed)  # fp32 init: exact masters
    masters = cast_keeping_masters(model, param_dtype(cfg.train))
    return Start(model, build_optimizer(model, cfg.train, cfg.parallel, masters=masters))


def _resume_meta(cfg: Config):
    """The msg_meta.json of the step checkpoint a run will resume (None for a new run, or one that
    cannot be read: start_run then names the problem)."""
    ck = cfg.checkpoint
    path = ck.load
    if ck.load in ("", "auto"):
        has = ck.save and os.path.isdir(ck.save) and any(d.startswith("step_") for d in os.listdir(ck.save))
        path = ck.save if has else ""
    if not path:
        return None
    try:
        step_dir = path
        if not os.path.exists(os.path.join(path, META)):
            with open(os.path.join(path, "latest")) as f:
                step_dir = os.path.join(path, f.read().strip())
        with open(os.path.join(step_dir, META)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def adopt_auto_stages(cfg: Config) -> None:
    """growth.schedule=auto: a resume continues the schedule its run decided. The checkpoint's stages
    beyond this config's are appended to growth.stages (those both have are compared by check_resume:
    a decided past cannot change)."""
    if cfg.growth.schedule != "auto":
        return
    meta = _resume_meta(cfg)
    try:
        saved = meta["config"]["growth"]["stages"] if meta else []
    except (KeyError, TypeError):
        return
    for st in saved[len(cfg.growth.stages):]:
        cfg.growth.stages.append(StageConfig(step=int(st["step"]), shape=list(st["shape"])))


def stage_to_resume(cfg: Config) -> int:
    """The growth stage the run will resume (0 for a new run), read from the checkpoint's
    msg_meta.json by each process before the world exists, to pick the stage's declared layout
    (growth.stages[].tensor/.pipeline). Only that one small file is read (every rank of a large job
    does this: no manifest check here, start_run verifies the checkpoint it loads); a checkpoint
    that cannot be read gives 0, and start_run names the problem."""
    meta = _resume_meta(cfg)
    try:
        return int(meta["state"]["stage"]) if meta else 0
    except (KeyError, ValueError, TypeError):
        return 0


def model_diff(cfg: Config, saved: dict, ignore=()) -> list:
    """model.* fields in which a checkpoint's config differs from this run's."""
    mine = dataclasses.asdict(cfg.model)
    return sorted(k for k in mine if k not in ignore and saved.get(k) != mine[k])


def agreed_meta(path: str, full: bool = False, fallback: bool = False) -> dict:
    """read_meta of the step every rank will load. Which step (`latest`, or with `fallback` the
    newest complete one) is decided on global rank 0 and broadcast: on several nodes each host sees
    the shared filesystem through its own caches, and ranks resolving `latest` on their own could
    load different steps. Then every rank reads that step's metadata and checks its files' sizes
    itself; a rank that cannot (a node without the shared directory, a view that lags) fails every
    rank, naming itself, instead of leaving the others waiting in the load."""
    def resolve():
        meta = read_meta(path, full=full, fallback=fallback)
        return meta["path"], meta["notes"]

    step_dir, notes = on_rank0(resolve)
    meta, err = None, None
    try:
        meta = read_meta(step_dir)
    except CheckpointError as e:
        err = str(e)
        if dist.is_initialized() and dist.get_rank():
            err += (f" (seen from rank {dist.get_rank()} on host {socket.gethostname()}, though global rank 0 "
                    "found it: every node must see the checkpoint directory at the same path, on a shared "
                    "filesystem)")
    err = first_error(err)
    if err:
        raise CheckpointError(err)
    meta["notes"] = notes
    return meta


def resume(cfg: Config, schedule: list, path: str, log, fallback: bool = False) -> Start:
    full = cfg.checkpoint.verify == "full"
    meta = agreed_meta(path, full=full, fallback=fallback)
    for note in meta["notes"]:
        log(f"[resume] {note}")
    diff = model_diff(cfg, meta["config"]["model"])
    if diff:
        raise CheckpointError(
            f"checkpoint `{meta['path']}` was trained with another model config (differs in "
            f"{', '.join(f'model.{k}' for k in diff)}); use the same model section or a matching checkpoint")
    _check_data(cfg, meta, log)
    st = meta["state"]
    if st["step"] > cfg.train.steps:
        raise CheckpointError(
            f"checkpoint `{meta['path']}` is at step {st['step']}, past train.steps={cfg.train.steps}: "
            f"resuming would overwrite later checkpoints with nothing trained; set train.steps above "
            f"{st['step']} to continue, or choose a new checkpoint.save to start another run")
    state = {"step": st["step"], "stage": st["stage"], "consumed_samples": st["consumed_samples"],
             "train_time": st.get("train_time", 0.0), "train_flops": st.get("train_flops", 0.0)}
    if "auto" in st:  # growth.schedule=auto's decisions and its check in progress
        state["auto"] = st["auto"]
    check_resume(cfg, config_from_dict(meta["config"], check=False), state, meta["path"], log)
    shape = Shape(*meta["shape"])
    if shape != schedule[state["stage"]][1]:
        raise CheckpointError(f"checkpoint `{meta['path']}` has shape {shape} but stage {state['stage']} of the "
                              f"schedule is {schedule[state['stage']][1]}; fix growth.stages or the checkpoint")
    model, optimizer = load_model_and_optimizer(cfg, shape, meta["path"], full)
    log(f"[resume] {meta['path']}: step {state['step']}, stage {state['stage']}, shape {shape}")
    return Start(model, optimizer, state, meta["path"])


def load_model_and_optimizer(cfg: Config, shape: Shape, path: str, full: bool = False):
    """The model and AdamW state of step checkpoint `path` (of `shape`), with this process's RNG as
    saved: exactly the state the run had when it saved (a resume; growth.schedule=auto's return from
    a probe). Weights and masters both come from the checkpoint: no masters to carry over."""
    model = cast_params(build_model(cfg.model, shape, perform_init=False), param_dtype(cfg.train))
    optimizer = build_optimizer(model, cfg.train, cfg.parallel)
    load_checkpoint(path, model, optimizer, full=full)  # fp32 weights -> masters
    return model, optimizer


def _check_data(cfg: Config, meta: dict, log) -> None:
    """The data decides which sample each consumed-sample number is: resuming on other data would
    silently train on another order. Refused unless data.allow_blend_change, then logged."""
    saved, mine = data_identity(meta["config"]), data_identity(cfg.to_dict())
    diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
    if not diff:
        return
    what = ", ".join(f"{k}: {saved.get(k)!r} -> {mine.get(k)!r}" for k in diff)
    if not cfg.data.allow_blend_change:
        raise CheckpointError(
            f"checkpoint `{meta['path']}` was trained on other data ({what}); resuming would read another sample "
            "order. Use the checkpoint's data settings, or set data.allow_blend_change=true to continue on the new "
            "data from this step on")
    log(f"[resume] data changed ({what}): data.allow_blend_change=true, the samples from step "
        f"{meta['state']['step']} on follow the new data")


def init_from(cfg: Config, schedule: list, path: str, log) -> Start:
    """A checkpoint's weights at step 0 (checkpoint.init_from): the first stage's model is that
    checkpoint; optimizer, step, data position and RNG start fresh. `path` may also be a Megatron-LM
    checkpoint (checkpoint/megatron_lm.py: its save directory or an iter_* directory)."""
    if is_megatron_lm_dir(path):
        ck = MegatronCheckpoint(path)
        _check_init_model(cfg, schedule, vars(ck.mcfg), ck.shape, ck.path)
        ck.check_layers()
        model = build_model(cfg.model, ck.shape, perform_init=False)
        fill_model(model, ck)  # (one layer at a time, this rank's shard)
        masters = cast_keeping_masters(model, param_dtype(cfg.train))
        log(f"[init] weights of the Megatron-LM checkpoint {ck.path} (iteration {ck.iteration}, shape {ck.shape}) "
            "at step 0")
        return Start(model, build_optimizer(model, cfg.train, cfg.parallel, masters=masters))
    meta = agreed_meta(path, full=cfg.checkpoint.verify == "full")
    shape = Shape(*meta["shape"])
    _check_init_model(cfg, schedule, meta["config"]["model"], shape, meta["path"])
    model = build_model(cfg.model, shape, perform_init=False)
    load_checkpoint(meta["path"], model, None, full=cfg.checkpoint.verify == "full", restore_rng=False)
    if ramping(model):
        raise CheckpointError(f"checkpoint.init_from `{meta['path']}` is mid-ramp (masks below 1); start from a "
                              "checkpoint taken after growth.ramp_steps more steps")
    masters = cast_keeping_masters(model, param_dtype(cfg.train))
    log(f"[init] weights of {meta['path']} (shape {shape}) at step 0")
    return Start(model, build_optimizer(model, cfg.train, cfg.parallel, masters=masters))


def _check_init_model(cfg: Config, schedule: list, model_section: dict, shape: Shape, where: str) -> None:
    """The checkpoint's model must be this config's architecture and the schedule's first stage."""
    saved = ModelConfig(**model_section)
    # the final sizes may differ (the imported model is the first stage); kv_channels as the head dim
    diff = model_diff(cfg, model_section, ignore=("hidden_size", "ffn_hidden_size", "num_attention_heads",
                                                  "num_layers", "init_method_std", "kv_channels",
                                                  "num_query_groups"))
    if saved.head_dim != cfg.model.head_dim:
        diff.append("kv_channels")
    if saved.heads_per_group != cfg.model.heads_per_group:  # the groups may grow, the grouping may not
        raise CheckpointError(
            f"checkpoint.init_from `{where}` has {saved.heads_per_group} query heads per key/value head "
            f"({saved.num_attention_heads} heads, {saved.num_query_groups or saved.num_attention_heads} groups), "
            f"this config {cfg.model.heads_per_group} (model.num_attention_heads={cfg.model.num_attention_heads}, "
            f"model.num_query_groups={cfg.model.num_query_groups}); heads grow by whole groups of a fixed size: "
            f"set model.num_query_groups to {cfg.model.num_attention_heads // saved.heads_per_group}")
    if diff:
        raise CheckpointError(
            f"checkpoint.init_from `{where}` has another architecture: "
            + ", ".join(f"model.{k}={getattr(saved, k) if k != 'kv_channels' else saved.head_dim}" for k in diff)
            + "; set these in the config")
    if shape != schedule[0][1]:
        raise CheckpointError(f"checkpoint.init_from `{where}` has shape {shape}, but growth.stages[0] is "
                              f"{schedule[0][1]}; start the schedule at {list(shape.as_tuple())}")
