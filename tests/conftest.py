"""Shared fixtures: one single-process gloo world for in-process tests, a tiny prepared corpus, and
the ways a test runs a tool: in this process (`run_cli`), as the ranks of a persistent gloo pool
(`launch`, `pooled`), or, where the process itself is what is tested, in a new one (`process=True`)."""
import os
import sys

import pytest
import torch

from gloo_pool import pool
from in_process import Result, run_tool
from msg_megatron.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def parallel_world():
    """A gloo world of one that this session owns: the tools run in process (run_cli) set up and tear
    down megatron's parallel state in it, and never destroy it (parallel/setup.py: not theirs)."""
    import torch.distributed as dist
    from msg_megatron.parallel import initialize_parallel
    from msg_megatron.parallel.setup import _free_port

    if not dist.is_initialized():
        store = dist.TCPStore("127.0.0.1", _free_port(), 1, is_master=True)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    initialize_parallel(1, 1)
    yield


@pytest.fixture(autouse=True)
def megatron_state():
    """Every test starts with megatron's parallel state at (1, 1), whatever the previous one left."""
    from megatron.core import parallel_state as ps
    from msg_megatron.parallel import initialize_parallel

    if not ps.model_parallel_is_initialized():
        initialize_parallel(1, 1)
    yield


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("msg-cache"))
    os.environ["MSG_CACHE_DIR"] = path
    return path


@pytest.fixture(scope="session")
def tiny_data(cache_dir):
    """A prepared embedded corpus of 0.3 MB with a 512-piece vocabulary."""
    from msg_megatron.data.prepare import prepare_embedded

    return prepare_embedded(cache_dir, 0.3, 512, 0.05, log=lambda *_: None)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data):
    """test_train's TINY run (40 steps, growths at steps 12 and 24, every step logged) trained once
    in this process in fp32, saving every 8 steps (keep 5: steps 8-40): the run that test_train,
    test_checkpoint, test_bf16, test_step_sync and test_recompute compare against and resume.
    Returns its directory (run/metrics.jsonl, ck/); tests only read it (or copy it)."""
    from msg_megatron.training.trainer import Trainer
    from test_train import tiny_cfg

    tmp = tmp_path_factory.mktemp("tiny-run")
    Trainer(tiny_cfg(tmp, "train.save_interval=8", "checkpoint.keep=5")).run()
    return tmp


def tiny_model_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=48, ffn_hidden_size=96, num_attention_heads=6, num_layers=5,
                kv_channels=8, seq_length=16)
    base.update(kw)
    return ModelConfig(**base)


def run_cli(args, timeout=300, env=None, process=False):
    """`python -m <args>`: in this process (the same main, exit status and output), or with
    `process=True` in a new interpreter with a timeout (a signal, the process's RSS, its own world)."""
    import subprocess

    if not process:
        return run_tool(args, env)
    full_env = dict(os.environ, WANDB_MODE="disabled", **(env or {}))
    return subprocess.run([sys.executable, "-m"] + args, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=full_env)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, args, timeout=300, env=None):
    """A real `torchrun --nproc_per_node nproc ARGS`: for what the launch itself is (its agent,
    its signals, a world of a size no pool has); everything else runs on the pool (`launch`)."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port())] + args
    full_env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=full_env)


def launch(nproc, args, timeout=300, env=None):
    """What `torchrun --nproc_per_node nproc -m <args>` does, on the session's gloo pool of `nproc`
    ranks: one Result whose status is the first failing rank's (else 0), stdout every rank's output
    with rank 0's last (where a tool's JSON line is), stderr every rank's."""
    ranks = pool(nproc).run(run_tool, args, env, timeout=timeout)
    results = [value for value, _, _ in ranks]
    code = next((r.returncode for r in results if r.returncode), 0)
    stdout = "".join(r.stdout for r in results[1:]) + results[0].stdout
    return Result(code, stdout, "".join(r.stderr for r in results))


def pooled(nproc, fn, *args, layout=None, timeout=300, **kwargs):
    """`fn(*args, **kwargs)` on each of `nproc` pooled ranks (inside initialize_parallel(*layout)
    when given); its return values by rank."""
    return [value for value, _, _ in pool(nproc).run(fn, *args, layout=layout, timeout=timeout, **kwargs)]


def tiny_checkpoint(tmp_path):
    """A checkpoint to load (tmp_path/ck): a tiny GPT trained 2 steps on synthetic data (seconds)."""
    r = run_cli(["msg_megatron.pretrain", "configs/demo_cpu.yaml", "data.corpus=synthetic", "train.steps=2",
                 "train.save_interval=2", "train.global_batch_size=2", "train.micro_batch_size=2",
                 "train.eval_interval=0", "growth.stages=[]", "model.hidden_size=32", "model.ffn_hidden_size=64",
                 "model.num_attention_heads=2", "model.kv_channels=16", "model.num_layers=2", "model.vocab_size=256",
                 f"checkpoint.save={tmp_path}/ck", f"logging.run_dir={tmp_path}/run"], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp_path / "ck"


def off_schedule(ck, shape_text: str) -> list:
    """msg-grow's overrides to grow checkpoint `ck` to a shape off its schedule: its stages so far,
    then that shape from its step (growth/off_schedule.py; what the refusal without them suggests)."""
    from msg_megatron.checkpoint.dist import read_meta
    from msg_megatron.grow import parse_shape
    from msg_megatron.growth.off_schedule import continuing_overrides

    meta = read_meta(str(ck))
    return continuing_overrides(meta["config"], meta["state"]["stage"], meta["state"]["step"], parse_shape(shape_text))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def ulps(got: torch.Tensor, want: torch.Tensor, dtype) -> torch.Tensor:
    """|got - want| in units of `dtype`'s spacing at `want` (a float64 reference): one rounding of
    an exactly computed result to `dtype` is at most 0.5."""
    w = want.abs().to(dtype)
    spacing = torch.nextafter(w, torch.full_like(w, float("inf"))).double() - w.double()
    return (got.double() - want.double()).abs() / spacing


def assert_refused(overrides, words, make=None):
    """Loading the config with `overrides` (or `make(*overrides)`) raises a ConfigError whose
    message contains every one of `words` (the field, the numbers, the fix)."""
    from msg_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        (make or (lambda *o: load_config(None, list(o))))(*overrides)
    for w in words:
        assert w in str(e.value), str(e.value)
