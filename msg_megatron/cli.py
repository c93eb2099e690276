"""Shared command-line plumbing: known user errors become one clear line and exit status 2."""
from __future__ import annotations

import sys

from .checkpoint.dist import SAVE_FAILED_EXIT, CheckpointError, SaveFailed
from .config import ConfigError
from .data.prepare import DataError
from .parallel import destroy_parallel
from .training.runs import RunFailed

# RunFailed: a child training run of msg-gridsearch failed; its message carries the run's last output
USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError, ValueError, RunFailed)


def run_cli(prog: str, fn, argv=None) -> int:
    try:
        return fn(sys.argv[1:] if argv is None else argv) or 0
    except SaveFailed as e:  # the disk filled during a save: its own status, for wrappers not to requeue blindly
        print(f"{prog}: error: {e}", file=sys.stderr)
        return SAVE_FAILED_EXIT
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_parallel()
