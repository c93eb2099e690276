"""The test suite's persistent gloo worker pools: one per world size, started on first use and kept
for the pytest session, so a multi-process case costs its own work, not a new torchrun with new
imports on every rank (Megatron-LM's suite runs in one `torchrun -m pytest` world for the same reason).

    results = pool(4).run(fn, *args, layout=(2, 1), timeout=300)   # one result per rank

Each rank calls `fn(*args, **kwargs)` (a module-level function of a test module or helper, pickled by
reference) with the caller's environment and working directory, inside `initialize_parallel(*layout)`
when a layout is given; see tests/gloo_pool_worker.py for what is reset after each task.

Failures: an exception on any rank raises PoolTaskFailed with every failing rank's traceback and
output. A rank that does not answer within the timeout (a hang, a deadlock in a collective) or that
dies fails the call with its log's tail; the pool is then killed and the next call starts a new one,
so no test hangs the suite and no broken world is reused.
"""
from __future__ import annotations

import atexit
import os
import pickle
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Listener, wait
from typing import Dict, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
START_TIMEOUT = 180  # seconds for every rank to import and join the world (2 cores, 8 ranks: ~40 s)
GRACE = 30  # seconds the other ranks get to finish once one rank has failed


class PoolTaskFailed(AssertionError):
    """A task raised on some rank, timed out, or a rank died (an AssertionError: pytest shows it as a
    test failure with the message, which carries the ranks' tracebacks)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


class GlooPool:
    def __init__(self, world: int):
        self.world = world
        self.procs, self.conns, self.logs = [], [], []
        self.dir = tempfile.mkdtemp(prefix=f"gloo-pool-{world}-")
        self.tasks = 0
        self._start()

    def _start(self):
        key = secrets.token_bytes(16)
        listener = Listener(("127.0.0.1", 0), backlog=max(8, self.world), authkey=key)
        host, port = listener.address
        master = _free_port()
        env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        for rank in range(self.world):
            log = os.path.join(self.dir, f"rank{rank}.log")
            self.logs.append(log)
            with open(log, "w") as f:  # own session: killing the pool kills a rank's writer processes too
                self.procs.append(subprocess.Popen(
                    [sys.executable, os.path.join(HERE, "gloo_pool_worker.py"), host, str(port), key.hex(), str(rank),
                     str(self.world), str(master)], stdout=f, stderr=subprocess.STDOUT, env=env,
                    cwd=os.path.dirname(HERE), start_new_session=True))
        try:
            by_rank = {}
            listener._listener._socket.settimeout(START_TIMEOUT)
            for _ in range(self.world):
                conn = listener.accept()
                kind, rank = conn.recv()
                by_rank[rank] = conn
            self.conns = [by_rank[r] for r in range(self.world)]
            deadline = time.time() + START_TIMEOUT
            for rank, conn in enumerate(self.conns):
                if not conn.poll(max(0.0, deadline - time.time())):
                    raise PoolTaskFailed(f"gloo pool of {self.world}: rank {rank} did not join the world within "
                                         f"{START_TIMEOUT} s; its log:\n{_tail(self.logs[rank])}")
                conn.recv()
        except BaseException:
            self.kill()
            raise
        finally:
            listener.close()

    def alive(self) -> bool:
        return bool(self.conns) and all(p.poll() is None for p in self.procs)

    def run(self, fn, *args, layout: Optional[tuple] = None, timeout: float = 300, env: Optional[dict] = None,
            **kwargs) -> list:
        """`fn(*args, **kwargs)` on every rank; returns [(value, stdout, stderr)] by rank."""
        task = {"fn": fn, "args": args, "kwargs": kwargs, "layout": layout, "cwd": os.getcwd(),
                "env": dict(os.environ, WANDB_MODE="disabled", **(env or {}))}
        payload = pickle.dumps(task)
        self.tasks += 1
        try:
            for conn in self.conns:
                conn.send_bytes(payload)
            results = self._collect(timeout, getattr(fn, "__qualname__", str(fn)))
        except BaseException:  # a timeout, a dead rank, pytest-timeout's interrupt: this world is not reusable
            self.kill()
            raise
        failed = [(r, res) for r, res in enumerate(results) if not res[0]]
        if failed:
            self.kill()  # (a rank that raised may have left the others' collectives out of step)
            raise PoolTaskFailed("\n".join(
                f"--- rank {r} of {self.world} raised in {fn.__qualname__}:\n{res[1]}\n--- its stdout:\n{res[2][-2000:]}"
                f"\n--- its stderr:\n{res[3][-2000:]}" for r, res in failed))
        return [res[1:] for res in results]

    def _collect(self, timeout: float, what: str) -> list:
        results: Dict[int, tuple] = {}
        deadline = time.time() + timeout
        pending = {conn: r for r, conn in enumerate(self.conns)}
        while pending:
            ready = wait(list(pending), timeout=max(0.0, deadline - time.time()))
            if not ready:
                missing = sorted(pending.values())
                raise PoolTaskFailed(
                    f"{what}: rank(s) {missing} of the gloo pool of {self.world} did not finish within {timeout:.0f} s "
                    f"(a hang or a deadlock; the pool is restarted). Rank {missing[0]}'s log:\n"
                    f"{_tail(self.logs[missing[0]])}")
            for conn in ready:
                r = pending.pop(conn)
                try:
                    results[r] = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    try:
                        code = self.procs[r].wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        code = None
                    raise PoolTaskFailed(f"{what}: rank {r} of the gloo pool of {self.world} died (exit {code}); "
                                         f"its log:\n{_tail(self.logs[r])}") from None
                if not results[r][0]:  # one rank failed: the others get a short grace, not the whole timeout
                    deadline = min(deadline, time.time() + GRACE)
        return [results[r] for r in range(self.world)]

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for c in self.conns:
            c.close()
        self.conns = []

    def close(self):
        """Stop the ranks politely (they exit their loop), then make sure."""
        for c in self.conns:
            try:
                c.send_bytes(pickle.dumps("stop"))
            except OSError:
                pass
        deadline = time.time() + 10
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        self.kill()


_POOLS: Dict[int, GlooPool] = {}


def pool(world: int) -> GlooPool:
    """The session's pool of `world` ranks: started on first use, restarted after a failure."""
    p = _POOLS.get(world)
    if p is None or not p.alive():
        if p is not None:
            p.kill()
        p = _POOLS[world] = GlooPool(world)
    return p


@atexit.register
def close_pools():
    for p in list(_POOLS.values()):
        p.close()
    _POOLS.clear()
