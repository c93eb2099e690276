"""Initialise torch.distributed and megatron-core's parallel state.

Single process (no torchrun/srun environment): a world of one on gloo over a loopback TCP store,
so megatron's tensor-parallel layers and dist_checkpointing run unchanged on a laptop.
Under torchrun the usual RANK/WORLD_SIZE/MASTER_ADDR variables are used.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..patches import apply_cpu_patches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SEQUENCE_PARALLEL = False  # parallel.sequence_parallel of this process's run (see sequence_parallel())
# Whether initialize_parallel created the default process group (then destroy_parallel destroys it).
# A process whose world someone else set up (a program embedding the trainer, the test suite's worker
# pool that runs many jobs in one world) keeps it: destroy_parallel tears down only what was built here,
# including megatron's groups (_GROUPS), which megatron's destroy_model_parallel forgets without
# destroying: each gloo group keeps threads and sockets, and a process that sets up its parallel state
# many times piled them up (hundreds of busy gloo threads).
_OWNS_WORLD = False
_GROUPS: list = []


def initialize_parallel(tensor: int = 1, pipeline: int = 1, seed: int = 1234,
                        sequence_parallel: bool = False, virtual_pipeline: int = 1) -> None:
    """Idempotent: set up the default process group and megatron's TP/PP/DP groups (with
    `virtual_pipeline` > 1: megatron's virtual pipeline size, models built from now on hold that
    many chunks per pipeline rank), and record whether models built from now on split activations
    along the sequence between TP regions."""
    from megatron.core import parallel_state, tensor_parallel

    global _SEQUENCE_PARALLEL, _OWNS_WORLD
    if sequence_parallel and tensor <= 1:
        raise ConfigError(f"parallel.sequence_parallel=true needs parallel.tensor > 1 (it is {tensor}): it splits "
                          "the activations between tensor-parallel regions over the TP ranks; set "
                          "parallel.tensor >= 2 or parallel.sequence_parallel=false.")
    _SEQUENCE_PARALLEL = bool(sequence_parallel)
    if virtual_pipeline > 1 and pipeline <= 1:
        raise ConfigError(f"parallel.virtual_pipeline={virtual_pipeline} needs parallel.pipeline > 1 (it is "
                          f"{pipeline}); set parallel.pipeline >= 2 or parallel.virtual_pipeline=1.")

    apply_cpu_patches()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend)
        else:
            store = dist.TCPStore("127.0.0.1", _free_port(), 1, is_master=True)
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
        _OWNS_WORLD = True
    if not parallel_state.model_parallel_is_initialized():
        world = dist.get_world_size()
        if world % (tensor * pipeline):
            raise ConfigError(
                f"world size {world} is not a multiple of parallel.tensor x parallel.pipeline = {tensor} x "
                f"{pipeline} = {tensor * pipeline}; launch a multiple of {tensor * pipeline} processes "
                f"(the rest is data parallelism) or change the layout.")
        before = set(_all_groups())
        parallel_state.initialize_model_parallel(
            tensor, pipeline, virtual_pipeline_model_parallel_size=virtual_pipeline if virtual_pipeline > 1 else None)
        _GROUPS.extend(g for g in _all_groups() if g not in before)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def sequence_parallel() -> bool:
    """Whether models built now use megatron's sequence parallelism (ModelParallelConfig.
    sequence_parallel): set by initialize_parallel, like megatron's own TP/PP state, because the
    TP linears read it when they are built (a model built before parallel state exists: False)."""
    return _SEQUENCE_PARALLEL


def device() -> torch.device:
    """Where model, data and collective buffers live: this process's GPU (NCCL), else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def is_logging_rank() -> bool:
    """The one rank that writes logs and metrics (global rank 0: TP rank 0, DP rank 0; with PP=1
    it is also on the last pipeline stage, where the loss is)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


_HOSTS = None  # hostnames of the default group's ranks, gathered once (see hosts())


def hosts() -> list:
    """The hostname of every rank of the default process group, in rank order: one all_gather at
    the first call (every rank must make it), then cached. What the per-host checks count, and what
    the run prints as its placement (multi-node: which ranks share a machine's memory)."""
    global _HOSTS
    if _HOSTS is None:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            _HOSTS = [socket.gethostname()]
        else:
            names = [None] * dist.get_world_size()
            dist.all_gather_object(names, socket.gethostname())
            _HOSTS = names
    return _HOSTS


def placement() -> str:
    """`4 processes on 2 hosts: nodea (ranks 0-1), nodeb (ranks 2-3)`, from hosts()."""
    names = hosts()
    ranks = {}
    for r, h in enumerate(names):
        ranks.setdefault(h, []).append(r)

    def spans(rs):
        out, start = [], rs[0]
        for a, b in zip(rs, rs[1:] + [None]):
            if b != a + 1:
                out.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        return ",".join(out)

    return (f"{len(names)} process(es) on {len(ranks)} host(s): "
            + ", ".join(f"{h} (rank{'s' if len(rs) > 1 else ''} {spans(rs)})" for h, rs in ranks.items()))


def destroy_parallel() -> None:
    """Undo initialize_parallel: megatron's parallel state always; the default process group only
    if initialize_parallel created it (a world set up by the caller stays, for its next job)."""
    from megatron.core import parallel_state

    global _SEQUENCE_PARALLEL, _HOSTS, _OWNS_WORLD
    _SEQUENCE_PARALLEL, _HOSTS = False, None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized() and _OWNS_WORLD:
        dist.destroy_process_group()  # (every group with it)
    elif dist.is_initialized():
        alive = _all_groups()
        for group in _GROUPS:
            if group in alive:
                dist.destroy_process_group(group)
    _GROUPS.clear()
    _OWNS_WORLD = False


def _all_groups() -> list:
    """Every process group of this process but the world (torch keeps them in its group map)."""
    from torch.distributed import distributed_c10d as c10d

    return [g for g in c10d._world.pg_map if g is not c10d.GroupMember.WORLD]
