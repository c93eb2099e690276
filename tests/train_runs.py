"""Short training runs that several tests read, each trained once per pytest session.

`trained(layout, extra, stages, *args)` writes the 8-step config of `TRAIN + extra` growing through
`stages`, trains it at `layout` = (tensor, pipeline[, data]) (one process: in this one; more: on the
gloo pool) with `args` appended, and returns its directory: `run/metrics.jsonl`, `stdout.txt` (rank
0's output last), and with `save_at=N` the checkpoints of every N steps in `ck/`. The same call again returns the same directory: a reference run that several cases
compare against, or a checkpoint that several cases resume, is trained once. Tests only read it.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

TRAIN = ["model.vocab_size=512", "model.seq_length=32", "model.kv_channels=8", "growth.ramp_steps=3",
         "train.steps=8", "train.global_batch_size=8", "train.micro_batch_size=2", "train.lr=3e-3",
         "train.warmup_steps=2", "train.log_interval=1", "train.eval_interval=0", "data.corpus_mb=0.3",
         "data.valid_fraction=0.05", "logging.wandb=disabled"]
LLAMA = ["model.norm=rmsnorm", "model.activation=swiglu", "model.position_embedding=rope"]
BERT = ["model.family=bert"]
DISTOPT = ["parallel.distributed_optimizer=true"]
VPP_SP = ["parallel.virtual_pipeline=2", "parallel.sequence_parallel=true"]

_DIR = None
_DONE = {}


def write_config(path, extra, stages) -> None:
    """The config of TRAIN + `extra`, the model section the last of `stages`, a growth at step 4."""
    from msg_megatron.config import load_config

    over = TRAIN + list(extra) + [
        f"model.hidden_size={stages[-1][0]}", f"model.ffn_hidden_size={stages[-1][1]}",
        f"model.num_attention_heads={stages[-1][2]}", f"model.num_layers={stages[-1][3]}",
        "growth.stages=[{step: 0, shape: %s}, {step: 4, shape: %s}]" % (stages[0], stages[1])]
    Path(path).write_text(yaml.safe_dump(load_config(None, over).to_dict()))


def losses(run_dir):
    """{step: loss} and the growth records of a run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}, [r for r in recs if r.get("event") == "growth"]


def pretrain(world, cfg, *args, env=None):
    """msg-pretrain CONFIG ARGS: in this process for one rank, else on the gloo pool of `world`."""
    from conftest import launch, run_cli

    argv = ["msg_megatron.pretrain", str(cfg), *map(str, args)]
    return run_cli(argv, env=env) if world == 1 else launch(world, argv, env=env)


def layout_args(layout) -> tuple:
    tp, pp = layout[0], layout[1]
    return tp * pp * (layout[2] if len(layout) > 2 else 1), [f"parallel.tensor={tp}", f"parallel.pipeline={pp}"]


def trained(layout, extra, stages, *args, save_at=None) -> Path:
    global _DIR
    key = hashlib.sha1(json.dumps([list(layout), list(extra), stages, list(args), save_at]).encode()).hexdigest()[:16]
    if key in _DONE:
        return _DONE[key]
    if _DIR is None:
        _DIR = tempfile.mkdtemp(prefix="msg-runs-")
        atexit.register(shutil.rmtree, _DIR, True)
    out = Path(_DIR) / key
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    write_config(out / "cfg.yaml", extra, stages)
    world, par = layout_args(layout)
    if save_at:
        args += (f"train.save_interval={save_at}", f"checkpoint.save={out}/ck")
    r = pretrain(world, out / "cfg.yaml", *par, f"logging.run_dir={out}/run", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    (out / "stdout.txt").write_text(r.stdout)
    _DONE[key] = out
    return out

