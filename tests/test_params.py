"""The parameter table (model/params.py) against independent references: the tensors the model
really has, the TP attributes megatron itself sets, and the names and shapes transformers uses."""
import itertools

import pytest
import torch
from conftest import tiny_model_cfg

from msg_megatron.hf.layout import architecture, dims, hf_config, to_hf
from msg_megatron.model import build_model, gpt as gpt_module
from msg_megatron.model.gpt import padded_vocab_size
from msg_megatron.model.params import TABLE, param
from msg_megatron.model.spec import masked_layer_spec

VARIANTS = list(itertools.product(["layernorm", "rmsnorm"], ["gelu", "swiglu"], ["learned", "rope"],
                                  [True, False], [True, False]))


@pytest.mark.parametrize("norm, act, pos, tie, bias", VARIANTS)
def test_every_tensor_is_described_with_one_role_per_axis(norm, act, pos, tie, bias):
    cfg = tiny_model_cfg(norm=norm, activation=act, position_embedding=pos, tie_embeddings=tie, add_bias_linear=bias)
    sd = build_model(cfg, cfg.shape).state_dict()
    for name, t in sd.items():
        if not name.endswith("_extra_state"):
            assert len(param(name).roles) == t.dim(), name


def test_the_tp_axis_is_megatrons_partition_dim(monkeypatch):
    """megatron marks what it initialises (tensor_model_parallel, partition_dim); the table must say
    the same for every parameter, and nothing more (our own marking switched off here)."""
    monkeypatch.setattr(gpt_module, "_mark_tensor_parallel_weights", lambda model: None)
    for act, tie, groups in itertools.product(["gelu", "swiglu"], [True, False], [None, 3]):
        cfg = tiny_model_cfg(activation=act, tie_embeddings=tie, add_bias_linear=True, num_query_groups=groups)
        for name, p in build_model(cfg, cfg.shape).named_parameters():
            theirs = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
            assert param(name).tp_axis == theirs, name


@pytest.mark.parametrize("family", ["llama", "llama_gqa", "gpt2"])
@pytest.mark.parametrize("bias, tie", [(False, True), (True, False)])
def test_hf_names_and_shapes_are_transformers_own(family, bias, tie):
    transformers = pytest.importorskip("transformers")
    flags = (dict(norm="rmsnorm", activation="swiglu", position_embedding="rope") if family.startswith("llama")
             else dict(norm="layernorm", activation="gelu", position_embedding="learned", kv_channels=8))
    if family == "llama_gqa":  # 6 heads in 2 groups: smaller k/v projections
        flags["num_query_groups"] = 2
    cfg = tiny_model_cfg(add_bias_linear=bias, tie_embeddings=tie, **flags)
    model = build_model(cfg, cfg.shape)
    arch = architecture(cfg, model.shape)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    d = dims(cfg, model.shape)
    ours = to_hf(arch, {k: v for k, v in sd.items() if not k.startswith("layers.")}, d)
    for i in range(model.shape.layers):
        ours.update(to_hf(arch, {k: v for k, v in sd.items() if k.startswith(f"layers.{i}.")}, d, layer=i))
    hf_cfg = transformers.AutoConfig.for_model(**hf_config(arch, cfg, model.shape, padded_vocab_size(cfg), "float32"))
    theirs = {k: v.shape for k, v in transformers.AutoModelForCausalLM.from_config(hf_cfg).state_dict().items()
              if not k.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))}
    if tie:
        theirs.pop("lm_head.weight", None)  # tied: the embedding itself
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v) for k, v in theirs.items()}


def test_rows_are_unique_and_kinds_known():
    names = [p.name for p in TABLE]
    assert len(names) == len(set(names))
    assert {p.kind for p in TABLE} <= {"linear", "bias", "norm", "embedding", "mask", "birth", "ids"}


def test_the_layer_spec_is_selectable():
    """build_model(layer_spec=...) builds the layers from the given spec (a drop-in linear here)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    calls = []

    class CountingColumn(ColumnParallelLinear):
        def forward(self, x, *args, **kw):
            calls.append(x.shape)
            return super().forward(x, *args, **kw)

    cfg = tiny_model_cfg()
    plain = build_model(cfg, cfg.shape, seed=3)
    counted = build_model(cfg, cfg.shape, seed=3, layer_spec=masked_layer_spec(cfg.norm, column_linear=CountingColumn))
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    assert torch.equal(plain(tokens), counted(tokens))  # same weights, same function
    assert len(calls) == 2 * cfg.num_layers  # qkv and fc1 of every layer
