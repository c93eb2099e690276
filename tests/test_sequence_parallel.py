"""Sequence parallelism (parallel.sequence_parallel): the settings megatron cannot run are refused
before any compute with the numbers in the message. The training equivalence at TP2 and TP4
(losses within 1e-5 of one process, through a growth) is tests/test_parallel.py's `tp4_sp`
and `tp2pp2_vpp2_sp` (TP2) cases; the gradients of the norms summed over TP are what those
cases fail without (measured: 6e-4 relative at step 1 at TP4)."""
import pytest
from conftest import assert_refused

from msg_megatron.config import ConfigError
from msg_megatron.parallel import setup

STAGES = "growth.stages=[{step: 0, shape: [32, 64, 2, 2], tensor: 1}, {step: 4, shape: [32, 128, 4, 2]}]"


@pytest.mark.parametrize("overrides, words", [
    (["parallel.sequence_parallel=true"], ["parallel.sequence_parallel=true", "parallel.tensor=1", ">= 2"]),
    # one stage of a schedule at TP1 (the others at TP2)
    (["parallel.sequence_parallel=true", "parallel.tensor=2", "model.hidden_size=32", "model.ffn_hidden_size=128",
      "model.num_attention_heads=4", "model.num_layers=2", "train.steps=8", STAGES],
     ["growth.stages[0]", "parallel.tensor=1"]),
    (["parallel.sequence_parallel=true", "parallel.tensor=4", "model.seq_length=30"],
     ["model.seq_length=30", "parallel.tensor=4", "multiple of 4"]),
])
def test_bad_sequence_parallel_settings_are_refused(overrides, words):
    assert_refused(overrides, words)


def test_initialize_parallel_refuses_sequence_parallel_without_tp():
    """The same rule where the process groups are made (a caller that skips the config check)."""
    with pytest.raises(ConfigError, match="parallel.tensor > 1"):
        setup.initialize_parallel(1, 1, sequence_parallel=True)
    assert not setup.sequence_parallel()


def test_model_built_without_sequence_parallel_by_default():
    from msg_megatron.config import ModelConfig, Shape
    from msg_megatron.model.gpt import transformer_config

    cfg = transformer_config(ModelConfig(vocab_size=64, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2,
                                         num_layers=1, seq_length=8), Shape(16, 32, 2, 1))
    assert cfg.sequence_parallel is False and cfg.tensor_model_parallel_size == 1
