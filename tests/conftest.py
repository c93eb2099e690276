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
