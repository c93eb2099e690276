"""Progress to the terminal, to `metrics.jsonl`, and to wandb (offline unless an API key is set).

wandb never blocks training on the network: `auto` is online only when WANDB_API_KEY is set,
and any failure to start wandb degrades to jsonl-only logging with a warning.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional


def resolve_wandb_mode(mode: str) -> str:
    if mode == "auto":
        if os.environ.get("WANDB_MODE") in ("offline", "online", "disabled"):
            return os.environ["WANDB_MODE"]
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class MetricsLogger:
    def __init__(self, run_dir: str, wandb_mode: str = "auto", project: str = "msg-megatron",
                 name: str = "", config: Optional[dict] = None, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._wandb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        mode = resolve_wandb_mode(wandb_mode)
        if mode != "disabled":
            try:
                import wandb

                os.environ.setdefault("WANDB_SILENT", "true")
                self._wandb = wandb.init(project=project, name=name or None, dir=run_dir, mode=mode,
                                         config=config, reinit="finish_previous")
            except Exception as e:  # noqa: BLE001 - logging must never stop training
                self.print(f"[wandb] disabled: could not start ({type(e).__name__}: {e})")

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def log(self, record: dict) -> None:
        """Append one JSON object to metrics.jsonl and send its numbers to wandb."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            nums = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self._wandb.log(nums, step=record.get("step"))

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
