"""msg-plot RUN_DIR [--out PNG]: a run's loss, validation loss, learning rate and lowest mask against
step and against training wall time, growth stages marked, from its metrics.jsonl.

A resumed run appends to the same metrics.jsonl: the steps after a resume (`"event": "resume"`)
were trained again from its checkpoint, so their later lines replace the earlier ones (as
torchtitan's and Megatron-LM's logs are read after a requeue). So do the steps of a probe that
growth.schedule=auto kept (`"event": "auto_kept"` at its check's step: the run's own window is replaced).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .cli import run_cli


def read_run(run_dir: str) -> dict:
    """{"steps": [...], "evals": [...], "growths": [...], "resumes": [...]} of a run's metrics.jsonl,
    each list in step order, the lines a resume replayed dropped."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"`{path}` does not exist: RUN_DIR is a run's logging.run_dir (it holds metrics.jsonl)")
    steps, evals, growths, resumes = {}, {}, {}, []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if line.strip():  # (a run killed mid-write leaves a partial last line)
                    print(f"msg-plot: skipping line {n} of {path}: not JSON", file=sys.stderr)
                continue
            event, step = rec.get("event"), rec.get("step")
            if event in ("resume", "auto_kept"):  # the state of step s holds steps < s: later lines replace s on
                if event == "resume":
                    resumes.append(rec)
                steps = {k: v for k, v in steps.items() if k < step}
                evals = {k: v for k, v in evals.items() if k <= step}
                growths = {k: v for k, v in growths.items() if k < step}
            elif event == "growth":
                growths[step] = rec
            elif "val_loss" in rec:
                evals[step] = rec
            elif "loss" in rec:
                steps[step] = rec
    order = lambda d: [d[k] for k in sorted(d)]  # noqa: E731
    return {"steps": order(steps), "evals": order(evals), "growths": order(growths), "resumes": resumes}


def plot_run(run: dict, out: str, title: str = "") -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("msg-plot needs matplotlib: pip install matplotlib (or the project's .[plot] extra)") from None
    steps = run["steps"]
    if not steps:
        raise ValueError("the run has no logged training step yet; nothing to plot")
    at_step = {r["step"]: r for r in steps}
    fig, axes = plt.subplots(3, 2, figsize=(12, 9), sharex="col")
    for col, key, label in ((0, "step", "step"), (1, "train_time", "training wall time (s)")):
        x = [r[key] for r in steps]
        ax = axes[0][col]
        ax.plot(x, [r["loss"] for r in steps], lw=0.8, label="loss")
        ev = [(at_step.get(r["step"] - 1, {}).get(key) if key != "step" else r["step"], r["val_loss"])
              for r in run["evals"]]
        ev = [(a, b) for a, b in ev if a is not None]
        if ev:
            ax.plot(*zip(*ev), "o-", ms=3, label="validation loss")
        ax.set_ylabel("loss")
        ax.legend()
        axes[1][col].plot(x, [r["lr"] for r in steps], lw=0.8)
        axes[1][col].set_ylabel("learning rate")
        axes[2][col].plot(x, [r.get("mask", 1.0) for r in steps], lw=0.8)
        axes[2][col].set_ylabel("lowest mask")
        axes[2][col].set_xlabel(label)
        for g in run["growths"]:  # the growth happens before its step trains
            gx = g["step"] if key == "step" else at_step.get(g["step"], {}).get(key)
            if gx is None:
                continue
            for row in axes:
                row[col].axvline(gx, color="gray", ls="--", lw=0.7)
            axes[0][col].annotate(f"stage {g['stage']}", (gx, 1), xycoords=("data", "axes fraction"),
                                  fontsize=7, rotation=90, va="top", ha="right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="msg-plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a run's logging.run_dir (it holds metrics.jsonl)")
    ap.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/metrics.png)")
    args = ap.parse_args(argv)
    run = read_run(args.run_dir)
    out = plot_run(run, args.out or os.path.join(args.run_dir, "metrics.png"), os.path.abspath(args.run_dir))
    last = run["steps"][-1]
    print(f"{out}: {len(run['steps'])} steps (to step {last['step']}), {len(run['evals'])} evaluations, "
          f"{len(run['growths'])} growths, {len(run['resumes'])} resumes")
    return 0


def main(argv=None) -> None:
    sys.exit(run_cli("msg-plot", _main, argv))


if __name__ == "__main__":
    main()
