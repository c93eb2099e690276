"""Run a command-line tool (`python -m msg_megatron.X ARGS`) inside this process: the same `main`,
exit status and output, without a new interpreter's ~4 s of imports. Used by the suite's `run_cli`
(single process, in pytest's own world of one) and by `launch` (every rank of a gloo pool).

What a process-level contract needs (a signal, kill -9, the process's own RSS, a fresh
torch.distributed) still runs in a real process: `run_cli(..., process=True)`.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import signal
import sys
import traceback
import warnings
from typing import NamedTuple, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Result(NamedTuple):  # what subprocess.run returns, the parts the tests read
    returncode: int
    stdout: str
    stderr: str


def _layout():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    return ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()


def run_tool(args: list, env: Optional[dict] = None) -> Result:
    """`args` as after `python -m`: ["msg_megatron.pretrain", "cfg.yaml", "train.steps=2", ...]."""
    import torch

    from msg_megatron.parallel import initialize_parallel

    module, argv = args[0], [str(a) for a in args[1:]]
    saved_env, cwd, threads, layout = dict(os.environ), os.getcwd(), torch.get_num_threads(), _layout()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    os.environ.update({"WANDB_MODE": "disabled", **(env or {})})
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        os.chdir(REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()  # a fresh interpreter's filters, printed to the captured stderr
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.filterwarnings("ignore", category=UserWarning, module="megatron")  # (as pytest.ini)
            warnings.showwarning = _show_on_stderr
            try:
                importlib.import_module(module).main(argv)
            except SystemExit as e:  # main() always exits with run_cli's status; argparse exits 2
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except BaseException:  # noqa: BLE001 (what the interpreter would print before exiting 1)
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
        for s, h in handlers.items():
            signal.signal(s, h)
        if layout is not None and _layout() is None:  # the tool tore down the parallel state it found
            initialize_parallel(*layout)
    return Result(code, out.getvalue(), err.getvalue())


def _show_on_stderr(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
