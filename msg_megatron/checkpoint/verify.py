"""The offline tools' check of a checkpoint's contents before they use it.

Training resumes check every file's size against the manifest (`checkpoint.verify=full` adds the
CRC-32s); msg-eval, msg-export-hf and msg-grow check the CRC-32s by default: they run once per
checkpoint, and a flipped bit they do not catch becomes a wrong score, or a corrupt export or grown
checkpoint that looks like a good one. Under torchrun the ranks share the reading (file i by rank
i % world) and agree on the verdict, so every rank stops together.
"""
from __future__ import annotations

import torch.distributed as dist

from ..parallel.agree import first_error
from .dist import CheckpointError
from .manifest import IncompleteCheckpoint, verify_manifest


def verify_checksums(step_dir: str, skip_flag: str = "--no-verify") -> None:
    """Raise CheckpointError naming the first file whose size or CRC-32 differs from the manifest
    (every rank must call it when a process group exists)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    err = None
    try:
        verify_manifest(step_dir, full=True, rank=rank, world=world)
    except IncompleteCheckpoint as e:
        err = str(e)
    err = first_error(err)
    if err:
        raise CheckpointError(f"checkpoint `{step_dir}` is damaged: {err}; use another step or a good copy "
                              f"({skip_flag} skips this check and uses it as it is)")
