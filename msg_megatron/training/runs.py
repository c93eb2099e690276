"""Run `msg-pretrain` as a child process and read back its metrics: the building block of the
schedule tools (msg-gridsearch, tools/bench_growth.py), which compare whole runs side by side.
A child process per run keeps the runs independent (fresh process group, memory, RNG)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable, List, Optional


class RunFailed(RuntimeError):
    pass


def read_metrics(run_dir: str) -> List[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise RunFailed(f"`{path}` does not exist: the run did not start")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_pretrain(config: str, overrides: List[str], run_dir: str, timeout: Optional[float] = None,
                 stop: Optional[Callable[[List[dict]], bool]] = None) -> List[dict]:
    """Train `config` with `overrides` into a fresh `run_dir`; return its metrics records. `stop`:
    called with the records so far whenever the run logs more (polled each second); when it returns
    True the run is killed and the records up to then are returned (a run that reached a target)."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        os.remove(path)
    cmd = [sys.executable, "-m", "msg_megatron.pretrain", config, *overrides, f"logging.run_dir={run_dir}",
           "logging.wandb=disabled"]
    env = dict(os.environ, WANDB_MODE="disabled")
    log_path = os.path.join(run_dir, "stdout.log")
    with open(log_path, "w") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        start, seen = time.time(), 0
        try:
            while child.poll() is None:
                if timeout is not None and time.time() - start > timeout:
                    raise RunFailed(f"run `{run_dir}` exceeded {timeout:.0f} s; see {log_path}")
                time.sleep(1.0)
                if stop is not None and os.path.exists(path) and os.path.getsize(path) > seen:
                    seen = os.path.getsize(path)
                    with open(path) as f:  # (complete lines only: the child may be mid-write)
                        recs = [json.loads(line) for line in f.read().splitlines(True) if line.endswith("\n")]
                    if stop(recs):
                        return recs
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    if child.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        raise RunFailed(f"run `{run_dir}` failed with status {child.returncode}; last output:\n{tail}")
    return read_metrics(run_dir)


AUTO_EVENTS = ("auto_check", "auto_probes", "auto_decision", "auto_skipped")


def current(records: List[dict]) -> List[dict]:
    """The records a run stands by: the lines of steps trained again after a resume, or replaced by a
    probe growth.schedule=auto kept (event auto_kept: its check's records stay), dropped, as msg-plot
    reads them. The state of step s holds the steps before s: training steps and growths from s on,
    evaluations (made after a step) beyond s, go."""
    out: List[dict] = []
    for r in records:
        event = r.get("event")
        if event in ("resume", "auto_kept"):
            s = r["step"]

            def stale(x):
                if "step" not in x or x.get("event") in ("resume", "auto_kept") or (
                        event == "auto_kept" and x.get("event") in AUTO_EVENTS):
                    return False
                after = "val_loss" in x or any(k.startswith("tasks/") for k in x)
                return x["step"] > s if after else x["step"] >= s

            out = [x for x in out if not stale(x)]
        out.append(r)
    return out


def steps(records: List[dict]) -> List[dict]:
    return [r for r in records if "loss" in r and "event" not in r]


def evals(records: List[dict]) -> List[dict]:
    return [r for r in records if "val_loss" in r]


def growths(records: List[dict]) -> List[dict]:
    return [r for r in records if r.get("event") == "growth"]
