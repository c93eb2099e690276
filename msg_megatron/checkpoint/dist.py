"""Checkpoints on megatron-core `dist_checkpointing` (global shapes + offsets, reloadable under
another layout), written atomically.

A save directory holds step directories and a `latest` marker:
    SAVE/step_000120/          dist_checkpointing files + msg_meta.json + the tokenizer + manifest.json
    SAVE/latest                "step_000120"
Each step directory is written under `.tmp-step_...`; when every rank has finished, the files'
sizes and CRC-32s (computed in parallel, file i by rank i) go into `manifest.json`, the directory is
renamed, and `latest` is replaced by an atomic rename. Loading verifies the manifest (sizes always,
checksums with `full`); `checkpoint.load=auto` falls back to the newest complete step and says so. `msg_meta.json` (plain JSON: shape, step, config, version)
is read first so the loader can build a model of the right shape before loading tensors.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from .. import __version__, patches
from ..patches.writer_queue import install_writer_queue
from ..config import Shape
from ..data.tokenizer import copy_tokenizer
from ..model.masks import refresh_active
from ..optim.optimizer import MOMENTS
from .crc_writer import checksummed_writes
from .manifest import (
    IncompleteCheckpoint,
    checksum_files,
    list_files,
    newest_complete,
    step_dirs,
    verify_manifest,
    write_manifest,
)
from .safe_pickle import UnsafeCheckpoint, restricted_metadata_loading
from .slices import slice_pieces
from .stream_writer import streamed_save

META = "msg_meta.json"

try:  # torch.distributed.checkpoint reports every rank's failure as one BaseException
    from torch.distributed.checkpoint.api import CheckpointException as _DcpFailure
except ImportError:  # pragma: no cover
    _DcpFailure = Exception
CHECKPOINT_FAILURES = (Exception, _DcpFailure)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the request."""


class SaveFailed(CheckpointError):
    """A save that could not be written (the disk is full); the previous checkpoint is intact."""


SAVE_FAILED_EXIT = 74  # EX_IOERR: msg-pretrain / msg-grow exit status when a save found the disk full


def resolve_checkpoint(path: str, full: bool = False, fallback: bool = False, notes: list = None) -> str:
    """A verified step directory from either itself or a save directory (its `latest` marker).

    `fallback`: if the marked step is incomplete or corrupt (or the marker is missing), use the
    newest step that verifies and append what was skipped to `notes`; otherwise such a checkpoint
    is an error that names the bad file.
    """
    notes = notes if notes is not None else []
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"checkpoint `{path}` is a file; name a checkpoint directory (a step_* directory or "
                              "a save directory holding them)")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint `{path}` does not exist")
    if os.path.exists(os.path.join(path, META)) or os.path.basename(os.path.normpath(path)).startswith("step_"):
        try:
            verify_manifest(path, full)
        except IncompleteCheckpoint as e:
            raise CheckpointError(f"checkpoint `{path}` is not usable: {e}; use another step (msg-pretrain: or "
                                  "checkpoint.load=auto, which falls back to the newest complete one)") from None
        return path
    marker = os.path.join(path, "latest")
    has_steps = any(d.startswith("step_") for d in os.listdir(path))
    if not os.path.exists(marker) and not has_steps:
        raise CheckpointError(f"`{path}` is neither a checkpoint (no {META}) nor a save directory (no `latest`, "
                              "no step_* directories)")
    problem, step_dir = None, None
    if os.path.exists(marker):
        with open(marker) as f:
            step_dir = os.path.join(path, f.read().strip())
        try:
            verify_manifest(step_dir, full)
            return step_dir
        except IncompleteCheckpoint as e:
            problem = f"`{marker}` points to `{step_dir}`, which is not usable: {e}"
    else:
        problem = f"`{path}` has no `latest` marker (a save was interrupted before updating it)"
    if not fallback:
        raise CheckpointError(problem + "; name a complete step_* directory (msg-pretrain: or checkpoint.load=auto, "
                              "which falls back to the newest complete one)")
    found, rejected = newest_complete(path, full, skip=step_dir)
    notes.append(problem)
    notes += [f"skipped `{d}`: {why}" for d, why in rejected]
    if found is None:
        raise CheckpointError(problem + f"; and no other step in `{path}` is complete")
    notes.append(f"falling back to `{found}`, the newest complete checkpoint")
    return found


def read_meta(path: str, full: bool = False, fallback: bool = False) -> dict:
    notes = []
    step_dir = resolve_checkpoint(path, full, fallback, notes)
    try:
        with open(os.path.join(step_dir, META)) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"`{os.path.join(step_dir, META)}` is corrupt ({e}); use another checkpoint") from None
    meta["path"] = step_dir
    meta["notes"] = notes
    return meta


def _sharded(model, optimizer, saved: Optional[dict] = None, moments: bool = True):
    """The sharded state dict of model and AdamW state, and (loading) the tensors to fill.

    Weights are saved in fp32 (bf16 parameters as their fp32 masters, loaded into the masters);
    the moments mirror their parameter's shards in model space, whatever the optimizer's own
    sharding. Under the distributed optimizer each DP rank writes only its slice of the weights
    and reads and writes only its slice of the masters and moments (`slices.py`: boxes of the same
    global tensors, views of the optimizer's own tensors: no gather, no copy); fp32 weights are
    read whole, as every DP rank holds them. Each parameter's step count (bias correction) is a
    one-element tensor under the parameter's checkpoint key, written by one rank.

    `saved`: the checkpoint's tensor index when loading; the load targets are then allocated here
    (this rank's slice only) and optimizer tensors the checkpoint lacks are left out (layers copied
    by an offline msg-grow start with fresh moments). `moments`: include the AdamW state.
    Returns (sharded state dict, {param name: {key: flat target}} of the optimizer state to set
    after loading)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    loading = saved is not None
    sd = model.sharded_state_dict(prefix="model.")
    sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    sliced = optimizer is not None and optimizer.distributed
    tp_rank, dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
    targets = {}
    for name, p in model.named_parameters():
        model_sh = sd[f"model.{name}"]
        rng = optimizer.local_range(p) if optimizer is not None else None
        dp_main = (*model_sh.replica_id[:2], 0)  # this rank's slice is the one copy of those elements
        if sliced and (p.dtype != torch.float32 or not loading):
            # this rank's range of the fp32 weights: bf16 masters written and read, fp32 weights
            # written (and read whole, as every DP rank holds them)
            del sd[f"model.{name}"]
            if rng is not None:
                sd[f"slices.model.{name}"] = slice_pieces(model_sh, model_sh.key, optimizer.local_master(p), *rng,
                                                          dp_main)
        elif p.dtype != torch.float32:  # bf16 without slices: the fp32 masters (the master itself when there is one)
            model_sh.data = (optimizer.local_master(p).view_as(p) if optimizer is not None
                             else torch.zeros_like(p, dtype=torch.float32) if loading else p.detach().float())
            model_sh.dtype = torch.float32
        if optimizer is None or rng is None or not moments:
            continue
        if loading:
            if f"optimizer.exp_avg.{model_sh.key}" not in saved:
                continue
            n = rng[1] - rng[0]
            st = {"step": torch.zeros(1, dtype=torch.float64),
                  **{k: torch.empty(n, dtype=torch.float32, device=p.device) for k in MOMENTS}}
            targets[name] = st
        else:
            st = optimizer.local_state(p)
            if st is None:
                continue
        for key in MOMENTS:
            prefix = f"optimizer.{key}"
            sd[f"{prefix}.{name}"] = (slice_pieces(model_sh, f"{prefix}.{model_sh.key}", st[key], *rng, dp_main)
                                      if sliced else make_sharded_optimizer_tensor(model_sh, st[key].view_as(p), prefix))
        step = st["step"] if loading else torch.as_tensor(st["step"]).detach().reshape(1).to(torch.float64)
        main = rng[0] == 0 if sliced else dp_rank == 0  # one writer: the rank holding element 0
        sd[f"optimizer.step.{name}"] = ShardedTensor.from_rank_offsets(
            "optimizer.step." + model_sh.key, step, replica_id=(model_sh.replica_id[0], tp_rank, 0 if main else 1))
    return sd, targets


def _fill(loaded, target) -> None:
    """Copy loaded values into their target tensors where megatron returned other tensors."""
    pairs = zip(loaded, target) if isinstance(target, list) else [(loaded, target)]
    for got, want in pairs:
        if got.data_ptr() != want.data_ptr():
            want.copy_(got.view_as(want))


def tensor_index(path: str) -> dict:
    """The checkpoint's tensor index (key -> global shape and dtype), read without arbitrary unpickling."""
    from megatron.core import dist_checkpointing

    try:
        with restricted_metadata_loading():
            return dist_checkpointing.load_tensors_metadata(path)
    except UnsafeCheckpoint as e:
        raise CheckpointError(f"checkpoint `{path}` is unsafe to load: {e}") from None
    except CHECKPOINT_FAILURES as e:  # name the checkpoint that cannot be read
        raise CheckpointError(f"cannot read the tensor index of `{path}`: {type(e).__name__}: {e}") from e


def _rng_sharded(state: torch.Tensor):
    """Every rank's torch RNG state as row `rank` of a [world, state] tensor (ranks' generators differ:
    each pipeline stage seeds its own modules)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return ShardedTensor.from_rank_offsets("rng_state", state.reshape(1, -1).clone(), (0, rank, world), replica_id=0)


def save_checkpoint(save_dir: str, model, optimizer, state: dict, config: dict, tokenizer_path: str = "",
                    keep: int = 3, writers: int = 4, streamed: Optional[tuple] = None, protect=()) -> str:
    """Write SAVE/step_<step, 6 digits> atomically; `state` is a JSON-able dict (step, stage, data position...).
    `keep`: the newest step directories kept, besides those named in `protect` (a check's start, which
    growth.schedule=auto's probes still load).
    `writers`: files this rank writes in parallel. `streamed`: (state dict of placeholders, source,
    has optimizer state) for a save whose tensors are made as they are written (msg-grow:
    stream_writer.py); `model` then only gives the shape."""
    step = int(state["step"])
    name = f"step_{step:06d}"
    final = os.path.join(save_dir, name)
    tmp = os.path.join(save_dir, f".tmp-{name}")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    try:
        return _write_step(save_dir, name, final, tmp, rank0, model, optimizer, state, config, tokenizer_path,
                           keep, writers, streamed, protect)
    except CHECKPOINT_FAILURES as e:  # a full disk is one line, not a traceback
        if not _no_space(e):
            raise
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)  # (frees what the failed save wrote)
        prev = step_dirs(save_dir) if os.path.isdir(save_dir) else []
        kept = f"the previous checkpoint `{os.path.join(save_dir, prev[-1])}` is intact" if prev else "nothing was saved"
        raise SaveFailed(f"saving step {step} to `{save_dir}` failed: no space left on device; {kept}. Free space "
                         "(or move checkpoint.save) and resume with checkpoint.load=auto") from None


def _no_space(e: BaseException) -> bool:
    """Whether ENOSPC is anywhere in the exception's chain (megatron wraps its writers' errors)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _write_step(save_dir, name, final, tmp, rank0, model, optimizer, state, config, tokenizer_path, keep, writers,
                streamed, protect=()) -> str:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    if rank0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    install_writer_queue()  # (before the first save: its server must outlive a SIGTERM to the process group)
    if streamed is None:
        sd, _ = _sharded(model, optimizer)
        sd["rng_state"] = _rng_sharded(torch.get_rng_state())
        writing, has_optimizer = contextlib.nullcontext(), optimizer is not None
    else:
        sd, source, has_optimizer = streamed
        writing, writers = streamed_save(source), 1
    # torch.save (in megatron's writer processes, forked from here) checksums every record; the
    # manifest's CRC-32 of each whole file below covers the same bytes, so skip that first pass
    with patches.torch_save_crc32(False), checksummed_writes(), writing:  # (manifest CRCs as the data is written)
        dist_checkpointing.save(sd, tmp, TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=writers))
    if rank0:
        meta = {"version": __version__, "shape": list(model.shape.as_tuple()), "state": state,
                "optimizer": has_optimizer, "config": config}
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1)
        if tokenizer_path:  # (its standard name: tokenizer.model, or tokenizer.json with its config)
            copy_tokenizer(tokenizer_path, tmp)
    # every rank's files are on disk: checksum them in parallel, rank 0 writes the manifest
    if dist.is_initialized():
        dist.barrier()
    files = list_files(tmp)
    world = dist.get_world_size() if dist.is_initialized() else 1
    mine = checksum_files(tmp, files, dist.get_rank() if dist.is_initialized() else 0, world)
    parts = [None] * world
    if world > 1:
        dist.all_gather_object(parts, mine)
    else:
        parts = [mine]
    if rank0:
        write_manifest(tmp, {k: v for p in parts for k, v in p.items()})
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        marker_tmp = os.path.join(save_dir, ".latest.tmp")
        with open(marker_tmp, "w") as f:
            f.write(name)
        os.replace(marker_tmp, os.path.join(save_dir, "latest"))
        _prune(save_dir, keep, protect)
        _remove_leftovers(save_dir)
    if dist.is_initialized():
        dist.barrier()
    return final


def _remove_leftovers(save_dir: str) -> None:
    """`.tmp-step_*` directories of saves that were killed: the run lock makes this run the only
    writer of `save_dir`, so after one of its saves completed they are nobody's work in progress."""
    for d in os.listdir(save_dir):
        if d.startswith(".tmp-step_"):
            shutil.rmtree(os.path.join(save_dir, d), ignore_errors=True)


def _prune(save_dir: str, keep: int, protect=()) -> None:
    steps = step_dirs(save_dir)  # by step number
    for d in steps[:-keep]:
        if d in protect:
            continue
        shutil.rmtree(os.path.join(save_dir, d), ignore_errors=True)


def load_checkpoint(path: str, model, optimizer=None, full: bool = False,
                    restore_rng: bool = True, whole_model: bool = True, read: Optional[tuple] = None) -> dict:
    """Load tensors into `model` (built at the checkpoint's shape) and `optimizer`; return the meta.
    `restore_rng`: also set this process's torch RNG to the saved state (exact resume).
    `whole_model=False`: the ranks load pieces of the model (msg-grow streaming), so megatron's check
    that the ranks together read every tensor exactly once does not apply. `read`: the checkpoint's
    (meta, tensor index) when the caller already has them (a piece-by-piece reader verifies and
    parses them once, not per piece)."""
    from megatron.core import dist_checkpointing

    meta, saved = read if read is not None else (read_meta(path, full=full), None)
    shape = Shape(*meta["shape"])
    if shape != model.shape:
        raise CheckpointError(f"checkpoint `{meta['path']}` has shape {shape}, but the model to load into is "
                              f"{model.shape}; grow it with msg-grow or pick the matching stage")
    has_opt = bool(meta.get("optimizer")) and optimizer is not None
    saved = saved if saved is not None else tensor_index(meta["path"])
    # each rank's own slice only; bf16: the masters are loaded, the parameters rounded from them below
    sd, states = _sharded(model, optimizer, saved, moments=has_opt)
    masters = {f"model.{n}" for n, p in model.named_parameters() if p.dtype != torch.float32}
    views = {k: [sh.data for sh in v] if isinstance(v, list) else v.data
             for k, v in sd.items() if k.startswith(("optimizer.", "slices.")) or k in masters}
    rng_md = saved.get("rng_state")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rng_md is not None and rng_md.global_shape[0] == world:  # same world: each rank gets its own generator back
        sd["rng_state"] = _rng_sharded(torch.get_rng_state())
    try:
        with restricted_metadata_loading():
            loaded = dist_checkpointing.load(sd, meta["path"], validate_access_integrity=whole_model)
    except UnsafeCheckpoint as e:
        raise CheckpointError(f"checkpoint `{meta['path']}` is unsafe to load: {e}") from None
    except CHECKPOINT_FAILURES as e:  # report which checkpoint failed and why
        raise CheckpointError(f"cannot load checkpoint `{meta['path']}`: {type(e).__name__}: {e}") from e
    rng = loaded.pop("rng_state", None)
    if restore_rng and rng is not None:  # (another world size: the states do not map; keep ours)
        torch.set_rng_state(rng.reshape(-1).to(torch.uint8))
    for k, target in views.items():  # (megatron may return new tensors instead of filling the targets)
        _fill(loaded[k], target)
    model_sd = {k[len("model."):]: v for k, v in loaded.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(model_sd, strict=False)
    # bf16 under the distributed optimizer: the weights came as master slices (set from them below)
    sliced = {k[len("model."):] for k in masters} if optimizer is not None and optimizer.distributed else set()
    missing = [k for k in missing if not k.endswith("_extra_state") and k not in sliced]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint `{meta['path']}` does not fit the model: missing {missing}, "
                              f"unexpected {unexpected}")
    refresh_active(model)
    if has_opt:
        for name, p in model.named_parameters():
            # a parameter without saved state starts fresh (AdamW initialises it at its next step)
            st = states.get(name)
            optimizer.set_local_state(p, None if st is None else dict(st, step=float(st["step"][0])))
    if optimizer is not None:
        optimizer.params_from_masters()  # bf16 under the distributed optimizer: slices -> parameters
    return meta
