"""Shared command-line plumbing: known user errors become one clear line and exit status 2."""
from __future__ import annotations

import os
import sys

from .checkpoint.dist import SAVE_FAILED_EXIT, CheckpointError, SaveFailed
from .config import ConfigError
from .data.prepare import DataError
from .parallel import destroy_parallel
from .training.runs import RunFailed

# RunFailed: a child training run of msg-gridsearch failed; its message carries the run's last output
USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError, ValueError, RunFailed)


def _says_it(e: Exception) -> bool:
    """Whether this process prints error `e`. Under torchrun every rank fails alike on a bad input
    found before the process group exists (the config, the arguments: the same files on one host),
    so only each host's local rank 0 says it, not every rank; later errors are printed by every
    rank that has them (a rank's own view of a file, a host's memory)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True
    return os.environ.get("LOCAL_RANK", "0") == "0"


def run_cli(prog: str, fn, argv=None) -> int:
    try:
        return fn(sys.argv[1:] if argv is None else argv) or 0
    except SaveFailed as e:  # the disk filled during a save: its own status, for wrappers not to requeue blindly
        print(f"{prog}: error: {e}", file=sys.stderr)
        return SAVE_FAILED_EXIT
    except USER_ERRORS as e:
        if _says_it(e):
            print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_parallel()
