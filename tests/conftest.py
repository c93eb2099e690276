"""Shared fixtures: one single-process gloo world for in-process tests, a tiny prepared corpus."""
import os
import sys

import pytest
import torch

from msg_megatron.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def parallel_world():
    from msg_megatron.parallel import initialize_parallel

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


def tiny_model_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=48, ffn_hidden_size=96, num_attention_heads=6, num_layers=5,
                kv_channels=8, seq_length=16)
    base.update(kw)
    return ModelConfig(**base)


def run_cli(args, timeout=300, env=None):
    """Run `python -m msg_megatron.<tool> ...` in a subprocess with a timeout."""
    import subprocess

    full_env = dict(os.environ, WANDB_MODE="disabled", **(env or {}))
    return subprocess.run([sys.executable, "-m"] + args, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=full_env)


def tiny_checkpoint(tmp_path):
    """A checkpoint to load (tmp_path/ck): a tiny GPT trained 2 steps on synthetic data (seconds)."""
    r = run_cli(["msg_megatron.pretrain", "configs/demo_cpu.yaml", "data.corpus=synthetic", "train.steps=2",
                 "train.save_interval=2", "train.global_batch_size=2", "train.micro_batch_size=2",
                 "train.eval_interval=0", "growth.stages=[]", "model.hidden_size=32", "model.ffn_hidden_size=64",
                 "model.num_attention_heads=2", "model.kv_channels=16", "model.num_layers=2", "model.vocab_size=256",
                 f"checkpoint.save={tmp_path}/ck", f"logging.run_dir={tmp_path}/run"], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp_path / "ck"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def assert_refused(overrides, words, make=None):
    """Loading the config with `overrides` (or `make(*overrides)`) raises a ConfigError whose
    message contains every one of `words` (the field, the numbers, the fix)."""
    from msg_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        (make or (lambda *o: load_config(None, list(o))))(*overrides)
    for w in words:
        assert w in str(e.value), str(e.value)
