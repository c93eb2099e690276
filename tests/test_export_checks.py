"""What msg-export-hf would refuse is known from the config: said when a run starts, and no
config.json is written that transformers itself refuses to load."""
import pytest

from msg_megatron.config import ModelConfig, Shape
from msg_megatron.hf.layout import LLAMA, UnsupportedArchitecture, architecture, export_warnings, hf_config

LLAMA_STYLE = dict(norm="rmsnorm", activation="swiglu", position_embedding="rope", kv_channels=8)


@pytest.mark.parametrize("hidden,heads", [(40, 3), (48, 5)])
def test_a_llama_config_that_transformers_refuses_is_never_written(hidden, heads):
    """transformers 5's LlamaConfig refuses hidden % heads != 0 even with head_dim given: we refuse
    first, and every shape we accept loads there (checked against transformers itself)."""
    transformers = pytest.importorskip("transformers")
    mcfg = ModelConfig(vocab_size=64, hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=64,
                       num_layers=1, **LLAMA_STYLE)
    shape = Shape(hidden, 64, heads, 1)
    with pytest.raises(UnsupportedArchitecture, match=f"hidden {hidden} and {heads} heads"):
        architecture(mcfg, shape)
    with pytest.raises(Exception, match="is not a multiple of the number of attention heads"):
        transformers.LlamaConfig(**hf_config(LLAMA, mcfg, shape, 64, "float32"))  # (what we no longer write)
    ok = Shape(48, 64, 4, 1)  # heads x head_dim (32) != hidden (48), heads divide hidden: exported with head_dim
    assert architecture(mcfg, ok) == LLAMA
    loaded = transformers.LlamaConfig(**hf_config(LLAMA, mcfg, ok, 64, "float32"))
    assert (loaded.hidden_size, loaded.num_attention_heads, loaded.head_dim) == (48, 4, 8)


def test_the_stages_that_cannot_be_exported_are_named_at_the_start():
    gpt2 = ModelConfig(kv_channels=16)  # GPT-2 style: heads x 16 must be hidden
    schedule = [(0, Shape(32, 64, 2, 2)), (10, Shape(48, 96, 2, 2)), (20, Shape(64, 128, 4, 2))]
    notes = export_warnings(gpt2, schedule)
    assert notes == ["stage 1 (48, 96, 2, 2) cannot be exported to transformers (msg-export-hf): GPT-2 needs heads "
                     "x head_dim == hidden, but this model has 2 x 16 != 48; export a stage where they match, or "
                     "train with model.norm=rmsnorm model.activation=swiglu model.position_embedding=rope (exported "
                     "as Llama, which has head_dim)"]
    none = export_warnings(ModelConfig(activation="swiglu"), schedule)
    assert len(none) == 1 and none[0].startswith("no stage of this model can be exported to transformers")
    assert export_warnings(gpt2, schedule[:1]) == []


@pytest.mark.slow
def test_a_run_warns_at_its_start(tmp_path, tiny_data, capsys):
    from msg_megatron.training.trainer import Trainer
    from test_train import tiny_cfg

    Trainer(tiny_cfg(tmp_path, "model.kv_channels=24"))  # heads x 24 != hidden at every TINY stage
    out = capsys.readouterr().out
    for stage in ("stage 0 (32, 64, 2, 1)", "stage 1 (48, 96, 3, 2)", "stage 2 (64, 128, 4, 3)"):
        assert f"[export] warning: {stage} cannot be exported to transformers" in out, out
