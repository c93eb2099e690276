"""One run per save directory: a lock file held for the run's lifetime, and a probe of the target.

Two runs writing the same `checkpoint.save` mix their checkpoints (one's weights under the other's
metadata, or one's steps silently replacing the other's). So a run that writes checkpoints
(msg-pretrain, msg-grow, msg-import-hf) first takes `SAVE/.msg-run.lock`:

- created with O_CREAT | O_EXCL, which is atomic on local filesystems and on the shared ones
  SLURM clusters use (NFSv3+, Lustre, GPFS), unlike flock, which Lustre mounts without `-o flock`
  and some NFS setups do not support; it records host, pid, SLURM job id, program and start time;
- kept fresh by a heartbeat (its mtime, every HEARTBEAT_S) from a daemon thread;
- removed when the run ends (also on an error or exit 75/76).

A second run finds the lock and is refused, naming the holder, unless the holder is gone: its
pid no longer exists on this host, or it is an earlier run of this same SLURM job (a requeued job
never runs twice at once), or its heartbeat stopped more than STALE_S ago (the holder's host died
or was cut off). Then the lock is taken over and the takeover reported. When in doubt (a holder on
another host with a fresh heartbeat) it refuses: failing safe.

`probe_writable` checks, on every rank that writes, that the directory takes a file (create,
write, fsync, remove) before any compute, so a read-only or full target is found at start rather
than at the final save.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from typing import Optional

from ..parallel.agree import first_error
from .dist import CheckpointError

LOCK = ".msg-run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class SaveDirInUse(RuntimeError):
    """Another live run holds the save directory."""


def _me(prog: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
            "prog": prog, "started": time.time(), "token": uuid.uuid4().hex}


def _describe(h: dict) -> str:
    job = f", SLURM job {h['job']}" if h.get("job") else ""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("started", 0)))
    return f"{h.get('prog', '?')} on host {h.get('host', '?')}, pid {h.get('pid', '?')}{job}, since {started}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def stale_because(holder: dict, age_s: float, me: dict) -> Optional[str]:
    """Why the lock of `holder` (heartbeat `age_s` seconds ago) may be taken over, or None."""
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
        if holder["pid"] == me["pid"]:
            return "it was taken by this process (an earlier run in it that did not end)"
        if not _pid_alive(holder["pid"]):
            return "its process no longer exists"
    if holder.get("job") and holder.get("job") == me["job"] and holder.get("pid") != me["pid"]:
        return f"it is an earlier run of this SLURM job {me['job']} (requeued)"
    if age_s > STALE_S:
        return f"its heartbeat stopped {age_s:.0f} s ago (more than {STALE_S:.0f} s)"
    return None


class RunLock:
    def __init__(self, save_dir: str, prog: str):
        self.dir, self.path = save_dir, os.path.join(save_dir, LOCK)
        self.me = _me(prog)
        self.note: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _read(self, path: str):
        try:
            with open(path) as f:
                return json.load(f), time.time() - os.stat(path).st_mtime
        except FileNotFoundError:
            return None, 0.0
        except (OSError, ValueError):  # being written right now: treat as a live holder
            return {}, 0.0

    def acquire(self) -> "RunLock":
        os.makedirs(self.dir, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, age = self._read(self.path)
                if holder is None:
                    continue  # released meanwhile: try again
                why = stale_because(holder, age, self.me) if holder else None
                if why is None:
                    raise SaveDirInUse(
                        f"`{self.dir}` is in use by another run: {_describe(holder) if holder else 'a run starting now'}"
                        f" (lock file {self.path}, heartbeat {age:.0f} s ago). Wait for it to end or stop it, or "
                        "choose another save directory; a holder that died is taken over once its heartbeat is "
                        f"{STALE_S:.0f} s old (or delete the lock file if you are sure it is gone)") from None
                aside = f"{self.path}.stale-{self.me['token']}"
                try:
                    os.rename(self.path, aside)  # atomic: of two takers, one moves the stale lock
                except FileNotFoundError:
                    continue
                moved, _ = self._read(aside)
                if moved and moved.get("token") != holder.get("token"):
                    os.rename(aside, self.path)  # (another taker's fresh lock: put it back)
                    continue
                os.remove(aside)
                self.note = f"took over the lock of {_describe(holder)}: {why}"
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._beat, name="msg-run-lock", daemon=True)
            self._thread.start()
            return self
        raise SaveDirInUse(f"could not take the lock {self.path}: other runs keep taking it; retry")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def held(self) -> bool:
        holder, _ = self._read(self.path)
        return bool(holder) and holder.get("token") == self.me["token"]

    def release(self) -> None:
        self._stop.set()
        if self.held():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def probe_writable(save_dir: str, rank: int) -> None:
    """Create, write, fsync and remove a file in `save_dir` (made if missing); OSError -> a message
    naming the directory, the reason and the fix."""
    probe = os.path.join(save_dir, f".msg-probe-{rank}-{os.getpid()}")
    try:
        os.makedirs(save_dir, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        hint = ("the disk is full: free space or choose another directory" if e.errno == errno.ENOSPC else
                "make it writable by this user or choose another directory")
        raise SaveTargetError(f"checkpoint directory `{save_dir}` cannot be written (rank {rank}: "
                              f"{e.strerror or e}); {hint}") from None


class SaveTargetError(OSError):
    """The save directory cannot take a checkpoint (read-only, full, not a directory)."""


def hold_save_dir(save_dir: str, prog: str, log=None) -> Optional[RunLock]:
    """Every rank calls this before any compute: global rank 0 takes the run lock (returned there;
    None elsewhere), every rank probes the directory; when either fails every rank raises
    CheckpointError with the first failure (one all_gather of the outcomes)."""
    import atexit

    import torch.distributed as dist

    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise CheckpointError(f"checkpoint directory `{save_dir}` is a file; name a directory")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    lock, err = None, None
    if rank == 0:
        try:
            probe_writable(save_dir, 0)  # (makes the directory; names a read-only or full one)
            lock = RunLock(save_dir, prog).acquire()
        except (SaveDirInUse, SaveTargetError) as e:
            err = str(e)
    if world > 1:  # rank 0's outcome (it also made the directory) first
        flag = [err]
        dist.broadcast_object_list(flag, src=0)
        err = flag[0]
    if err is None:
        try:
            if rank != 0:  # (rank 0 probed before taking the lock)
                probe_writable(save_dir, rank)
        except SaveTargetError as e:
            err = str(e)
        err = first_error(err)
    if err:
        if lock is not None:
            lock.release()
        raise CheckpointError(err)
    if lock is not None:
        atexit.register(lock.release)
        if lock.note and log:
            log(f"[lock] {save_dir}: {lock.note}")
    return lock
