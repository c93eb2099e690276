"""Every change this project makes to upstream code (megatron-core 0.16.1, torch), in one place.

Each entry names what it replaces, the upstream behaviour and why. The CPU patches (`cpu.py`)
are applied once, at parallel set-up, and only without CUDA; every other patch is a context
manager that puts the upstream object back when its block ends, so nothing outside a save or
a load sees it. The replacements themselves live with the code that needs them (named below).

| upstream object | upstream behaviour | replaced by, during | why |
|---|---|---|---|
| `torch.cuda.current_device`, `synchronize`, TP RNG tracker, `torch` in megatron's schedules and optimizers, `Tensor.type` in the optimizers (`cpu.py`) | assume CUDA | CPU equivalents, always without CUDA | megatron-core runs on CPU/gloo (tests, laptops) |
| `open` in `dist_checkpointing.strategies.filesystem_async` | the writer processes open data files with builtins.open | `checkpoint/crc_writer.crc_open`, one save | the manifest's CRC-32s are computed as the bytes are written, not by reading the checkpoint back |
| `pickle` in `torch.distributed.checkpoint.filesystem` | `.metadata` read with plain `pickle.load` (runs any code) | `checkpoint/safe_pickle`'s restricted unpickler, one load | a crafted checkpoint cannot run code |
| `FileSystemWriterAsync` in `dist_checkpointing.strategies.torch` | resolves every tensor of the save before writing | `checkpoint/stream_writer.StreamingWriter`, one msg-grow save | a grown stage is written tensor by tensor, never whole in memory |
| `torch.serialization` CRC-32 option (`set_crc32_options`) | torch.save checksums every record | off, one save | the manifest already checksums the same bytes; a second pass costs a save's time |
| `torch.distributed.new_group`, `torch.cuda.current_device` (`meta_world`) | megatron makes gloo groups for the distributed optimizer and allocates buffers on the current device | groups on the default (fake) backend, buffers on `meta`, one msg-plan --dry-run rank | a 192-rank layout is built on a laptop: torch's fake process group has no gloo, and no real memory is used |
| `helpers.build_mapping` in `megatron.core.datasets` (`one_epoch_mapping`) | a masked (BERT) dataset built for one epoch (`num_samples=None`) passes None as the sample limit, which the C++ helper refuses | None read as no limit, one masked dataset's index build | `data/mlm_data.py` builds corpora one epoch at a time, so sample k never depends on the run's length |
| `_results_queue` of `dist_checkpointing.strategies.filesystem_async` (`writer_queue.py`) | served by a Manager process started at the first save with default signal actions, in the trainer's process group | the same queue from a Manager that ignores SIGTERM/SIGUSR1/SIGINT, set once before a process's first save | torchrun signals the whole process group: the server died with the SIGTERM that asked for the preemption save, which then failed (BrokenPipeError) |
| warning filters (`quiet_upstream_warnings`, at import; `cpu.py`) | megatron announces its fallbacks on import; torch's DCP calls its deprecated `load_state_dict`; megatron's TP linears advise `CUDA_DEVICE_MAX_CONNECTIONS=1` | ignored by message (the last only without CUDA) | expected on CPU; not the user's problem |
"""
from __future__ import annotations

import contextlib
import warnings

from .cpu import apply_cpu_patches  # noqa: F401


def quiet_upstream_warnings() -> None:
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed. Falling back to Torch Norm.*")  # own norms
    # megatron's torch_dist loader calls torch's deprecated `load_state_dict` on every checkpoint load
    warnings.filterwarnings("ignore", message=".*`load_state_dict` is deprecated.*", category=FutureWarning)


@contextlib.contextmanager
def _replaced(module, name: str, value):
    """`module.name = value` for the block; the previous attribute (or its absence) restored after."""
    had = name in vars(module)
    previous = vars(module).get(name)
    setattr(module, name, value)
    try:
        yield
    finally:
        if had:
            setattr(module, name, previous)
        else:
            delattr(module, name)


def writer_open(opener):
    """megatron's checkpoint writer processes (forked inside the save) open their files with `opener`."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    return _replaced(filesystem_async, "open", opener)


def metadata_pickle(safe_pickle_module):
    """torch's DCP filesystem reader unpickles `.metadata` through `safe_pickle_module`."""
    import torch.distributed.checkpoint.filesystem as fs

    return _replaced(fs, "pickle", safe_pickle_module)


def async_writer_class(writer_class):
    """megatron's torch_dist save strategy writes through `writer_class`."""
    from megatron.core.dist_checkpointing.strategies import torch as torch_strategy

    return _replaced(torch_strategy, "FileSystemWriterAsync", writer_class)


@contextlib.contextmanager
def torch_save_crc32(enabled: bool):
    """torch.save's per-record CRC-32 on or off for the block (processes forked in it inherit it)."""
    import torch
    from torch.utils.serialization import config as serialization_config

    previous = serialization_config.save.compute_crc32
    torch.serialization.set_crc32_options(enabled)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


@contextlib.contextmanager
def meta_world():
    """For msg-plan --dry-run: process groups megatron asks to be gloo are made on the default
    backend (torch's fake one, which has no gloo), and the buffers megatron puts on
    `torch.cuda.current_device()` (DDP's gradient buffers, the optimizer's) go to `meta`."""
    import torch
    import torch.distributed as dist

    real_new_group = dist.new_group

    def new_group(*args, **kwargs):
        if kwargs.get("backend") == "gloo":
            kwargs["backend"] = None
        return real_new_group(*args, **kwargs)

    with _replaced(dist, "new_group", new_group), _replaced(torch.cuda, "current_device", lambda: "meta"):
        yield


def one_epoch_mapping():
    """megatron's masked datasets (BERT) can be built for one epoch: num_samples=None is passed on
    to `helpers.build_mapping` as "no limit" (its loop then stops after the one epoch it is given)."""
    from megatron.core.datasets import helpers

    real = helpers.build_mapping

    def build_mapping(docs, sizes, num_epochs, max_num_samples, *rest):
        return real(docs, sizes, num_epochs, (1 << 63) - 1 if max_num_samples is None else max_num_samples, *rest)

    return _replaced(helpers, "build_mapping", build_mapping)
