"""BERT (model.family=bert): the post-LN masked encoder and its growth (paper 3.1.2, eq. 16-20).

Function preservation as for GPT (tests/test_growth.py): MLM logits right after growth equal the
pre-growth logits to <= 1e-5 relative (max-abs error over max-abs logit) in float32, for every
dimension alone and all at once, any new-weight values (huge random ones included: the masks alone
must preserve the function), with token types and padding. Net2Net is exact for FFN and head
growth and breaks under post-LN hidden growth (eq. 7). The encoder is bidirectional and ignores
padding; the model is refused with a config BERT cannot have.
"""
import pytest
import torch
from conftest import rel_err

from msg_megatron.config import ConfigError, ModelConfig, Shape
from msg_megatron.growth.operators import grow_model
from msg_megatron.model import build_model

OLD = Shape(32, 64, 4, 2)
SEQ = 16
TOKENS = torch.randint(0, 97, (2, SEQ), generator=torch.Generator().manual_seed(0))
TYPES = torch.zeros_like(TOKENS)
TYPES[:, 9:] = 1  # [A; B]
PAD = torch.ones_like(TOKENS)
PAD[1, 12:] = 0  # the second sample is 12 tokens long


def bert_cfg(**kw) -> ModelConfig:
    base = dict(family="bert", vocab_size=97, hidden_size=48, ffn_hidden_size=96, num_attention_heads=6,
                num_layers=5, kv_channels=8, seq_length=SEQ)
    base.update(kw)
    return ModelConfig(**base)


def huge_init(name, shape, gen):
    return torch.randn(shape, generator=gen) * 100.0


def logits(model, tokens=TOKENS, types=TYPES, pad=PAD):
    model.eval()
    with torch.no_grad():
        return model(tokens, types=types, padding_mask=pad)


@pytest.mark.parametrize("activation", ["gelu", "gelu_erf"])
@pytest.mark.parametrize("init", ["normal", "zeros", "copy", huge_init])
def test_all_dimensions_at_once(init, activation):
    model = build_model(bert_cfg(activation=activation), OLD)
    before = logits(model)
    grown, _ = grow_model(model, Shape(48, 96, 6, 5), step=3, init=init)
    assert grown.shape == Shape(48, 96, 6, 5)
    assert rel_err(before, logits(grown)) <= 1e-5


@pytest.mark.parametrize("new", [Shape(40, 64, 4, 2), Shape(32, 100, 4, 2), Shape(32, 64, 7, 2), Shape(32, 64, 4, 3),
                                 Shape(32, 64, 4, 6), Shape(33, 65, 5, 3)])
@pytest.mark.parametrize("depth_init", ["interpolate", "stack", "random"])
def test_each_dimension_alone_any_size(new, depth_init):
    model = build_model(bert_cfg(), OLD)
    before = logits(model)
    grown, _ = grow_model(model, new, step=0, init=huge_init, depth_init=depth_init)
    assert rel_err(before, logits(grown)) <= 1e-5


def test_float64_and_the_masks_do_the_work():
    """In float64 the grown model equals the old one to 1e-12; opening the masks (the paper's No
    Mask) changes the function: the preservation is the masks', not an artefact of the new values."""
    model = build_model(bert_cfg(), OLD).double()
    before = logits(model)
    grown, _ = grow_model(model, Shape(48, 96, 6, 3), step=0, init=huge_init)
    assert rel_err(before, logits(grown.double())) <= 1e-12
    nomask, _ = grow_model(model, Shape(48, 96, 6, 3), step=0, init="normal", operator="nomask")
    assert rel_err(before, logits(nomask.double())) > 1e-3


def test_net2net_is_exact_for_ffn_and_heads_and_breaks_under_post_ln_hidden_growth():
    model = build_model(bert_cfg(), OLD)
    before = logits(model)
    for new in (Shape(32, 96, 4, 2), Shape(32, 64, 6, 2)):
        grown, _ = grow_model(model, new, step=5, operator="net2net")
        assert rel_err(before, logits(grown)) <= 1e-5, new
    grown, _ = grow_model(model, Shape(48, 64, 4, 2), step=5, operator="net2net")
    assert rel_err(before, logits(grown)) > 1e-3  # eq. 7: the copied features move LN's mean and variance


def test_the_encoder_is_bidirectional_and_ignores_padding():
    model = build_model(bert_cfg(), OLD)
    base = logits(model)
    later = TOKENS.clone()
    later[0, -1] = (later[0, -1] + 1) % 97
    assert not torch.allclose(logits(model, later)[0, 0], base[0, 0])  # position 0 sees the last token
    padded = TOKENS.clone()
    padded[1, 12:] = (padded[1, 12:] + 5) % 97  # other tokens under the padding
    assert torch.equal(logits(model, padded)[1, :12], base[1, :12])
    other_types = TYPES.clone()
    other_types[0] = 0
    assert not torch.allclose(logits(model, types=other_types)[0], base[0])  # token types count


def test_state_dict_names_are_in_the_table_with_berts_names():
    from msg_megatron.model.params import BERT, param

    model = build_model(bert_cfg(), OLD)
    names = [k for k in model.state_dict() if not k.endswith("_extra_state")]
    for required in ("token_type_embeddings.weight", "embedding_norm.weight", "lm_head.dense.weight",
                     "lm_head.norm.bias", "output_layer.bias", "layers.1.post_attention_norm.weight",
                     "layers.1.post_mlp_norm.bias"):
        assert required in names
    assert not any("final_norm" in k or "input_norm" in k for k in names)
    for k in names:  # every tensor is described, and every weight has its BertForMaskedLM name
        row = param(k)
        if not row.is_buffer and k != "output_layer.weight":
            assert BERT in row.hf, k


@pytest.mark.parametrize("bad, field", [({"norm": "rmsnorm"}, "rmsnorm"), ({"position_embedding": "rope"}, "rope"),
                                        ({"tie_embeddings": False}, "tie_embeddings=False")])
def test_a_config_bert_cannot_have_is_refused(bad, field):
    with pytest.raises(ConfigError, match=f"model.family=bert is BERT's encoder.*{field}"):
        build_model(bert_cfg(**bad), OLD)


def test_a_grown_model_after_its_ramp_equals_transformers_bert_for_masked_lm():
    """Our tensors under BertForMaskedLM's names (the table's rows, hf/layout.py): transformers'
    logits equal ours within 1e-4 (max abs), padding and token types included, for a model grown
    in every dimension whose masks have ramped to 1 (a model a run would export)."""
    from transformers import BertConfig, BertForMaskedLM

    from msg_megatron.hf.layout import architecture, dims, hf_config, to_hf
    from msg_megatron.model import refresh_active, update_masks

    cfg = bert_cfg(hidden_size=48, num_attention_heads=6, kv_channels=8)
    model = build_model(cfg, Shape(32, 64, 4, 2))
    grown, _ = grow_model(model, Shape(48, 96, 6, 3), step=10, init="normal", init_std=0.2)
    update_masks(grown, 30, 10)  # the ramp is over: every mask at 1, folded away
    refresh_active(grown)
    with torch.no_grad():  # norms and biases away from their init, so a swapped name would show
        for name, p in grown.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    shape = grown.shape
    arch = architecture(cfg, shape)
    conf = hf_config(arch, cfg, shape, grown.vocab_padded, "float32", None, None)
    hf = BertForMaskedLM(BertConfig(**{k: v for k, v in conf.items() if k not in ("model_type", "dtype")})).eval()
    ours = {k: v for k, v in grown.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = hf.load_state_dict(to_hf(arch, ours, dims(cfg, shape)), strict=False)
    assert set(missing) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"} and not unexpected
    with torch.no_grad():
        want = hf(input_ids=TOKENS, token_type_ids=TYPES, attention_mask=PAD).logits
    assert (logits(grown) - want).abs().max() <= 1e-4


def test_export_needs_berts_attention_shape():
    from msg_megatron.hf.layout import UnsupportedArchitecture, architecture

    with pytest.raises(UnsupportedArchitecture, match="BertForMaskedLM needs heads x head_dim == hidden"):
        architecture(bert_cfg(), Shape(48, 96, 5, 2))


def test_gelu_erf_is_the_exact_gelu_in_the_mlp_and_the_mlm_head():
    """model.activation=gelu_erf (Google's BERT, transformers' `gelu`) is F.gelu without the tanh
    approximation in both places a BERT applies a GELU; `gelu` is the tanh form (GPT-2's)."""
    import torch.nn.functional as F

    model = build_model(bert_cfg(activation="gelu_erf"), OLD).eval()
    x = torch.randn(5, 1, OLD.hidden) * 3
    assert torch.equal(model.lm_head(x), model.lm_head.norm(F.gelu(model.lm_head.dense(x))))
    mlp = model.layers[0].mlp
    h = F.linear(x, mlp.linear_fc1.weight, mlp.linear_fc1.bias)
    want = F.linear(F.gelu(h), mlp.linear_fc2.weight, mlp.linear_fc2.bias)
    torch.testing.assert_close(mlp(x), want, rtol=0, atol=1e-6)
    tanh = build_model(bert_cfg(), OLD).eval()
    assert not torch.equal(tanh.lm_head(x), tanh.lm_head.norm(F.gelu(tanh.lm_head.dense(x))))


# ---- the sentence-order head (model.binary_head): pooler + 2-way classifier -------------------------
ORDER = torch.tensor([0, 1])  # the second pair's segments swapped


@pytest.mark.parametrize("new", [Shape(48, 96, 6, 5), Shape(40, 64, 4, 2), Shape(32, 64, 4, 3)])
@pytest.mark.parametrize("init", ["normal", huge_init])
def test_sentence_order_head_growth_preserves_both_outputs(new, init):
    """MLM logits and order logits right after growth equal the old ones to <= 1e-5 relative, for
    any new-weight values (the pooled output's new features are masked); with the masks open (No
    Mask) the order logits change."""
    model = build_model(bert_cfg(binary_head=True), OLD)
    mlm, order = logits(model)
    assert order.shape == (2, 2)
    grown, _ = grow_model(model, new, step=3, init=init)
    mlm2, order2 = logits(grown)
    assert rel_err(mlm, mlm2) <= 1e-5 and rel_err(order, order2) <= 1e-5
    if new.hidden != OLD.hidden:
        nomask, _ = grow_model(model, new, step=3, init="normal", operator="nomask")
        assert rel_err(order, logits(nomask)[1]) > 1e-3


def test_sentence_order_head_equals_transformers_bert_for_pretraining():
    """A grown model with the head, masks ramped to 1, under BertForPreTraining's names: its MLM and
    order logits equal transformers' within 1e-4 (max abs), and our loss (data/batches.batch_loss:
    mean MLM loss over the masked positions + mean order loss) equals BertForPreTraining's loss with
    the same labels (unmasked positions -100) within 1e-5."""
    from transformers import BertConfig, BertForPreTraining

    from msg_megatron.data.batches import batch_loss
    from msg_megatron.hf.layout import architecture, dims, hf_config, to_hf
    from msg_megatron.model import refresh_active, update_masks

    cfg = bert_cfg(binary_head=True)
    grown, _ = grow_model(build_model(cfg, OLD), Shape(48, 96, 6, 3), step=10, init="normal", init_std=0.2)
    update_masks(grown, 30, 10)
    refresh_active(grown)
    with torch.no_grad():
        for name, p in grown.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    shape, arch = grown.shape, architecture(cfg, grown.shape)
    conf = hf_config(arch, cfg, shape, grown.vocab_padded, "float32", None, None)
    assert conf["architectures"] == ["BertForPreTraining"]
    hf = BertForPreTraining(BertConfig(**{k: v for k, v in conf.items() if k not in ("model_type", "dtype")})).eval()
    ours = {k: v for k, v in grown.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = hf.load_state_dict(to_hf(arch, ours, dims(cfg, shape)), strict=False)
    assert set(missing) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"} and not unexpected
    mlm, order = logits(grown)
    labels = torch.randint(0, 97, TOKENS.shape, generator=torch.Generator().manual_seed(1))
    chosen = torch.zeros_like(TOKENS)
    chosen[:, [2, 5, 10]] = 1
    with torch.no_grad():
        want = hf(input_ids=TOKENS, token_type_ids=TYPES, attention_mask=PAD,
                  labels=torch.where(chosen.bool(), labels, -100), next_sentence_label=ORDER)
        loss = batch_loss(grown(TOKENS, labels, types=TYPES, padding_mask=PAD, sentence_order=ORDER), chosen)
    assert (mlm - want.prediction_logits).abs().max() <= 1e-4
    assert (order - want.seq_relationship_logits).abs().max() <= 1e-4
    assert abs(float(loss) - float(want.loss)) <= 1e-5 * float(want.loss)


def test_sentence_order_head_needs_bert_and_its_labels():
    with pytest.raises(ConfigError, match="model.binary_head is BERT's sentence-order head"):
        build_model(ModelConfig(binary_head=True, vocab_size=97, hidden_size=32, ffn_hidden_size=64,
                                num_attention_heads=4, num_layers=2), OLD)
    model = build_model(bert_cfg(binary_head=True), OLD)
    with pytest.raises(ValueError, match="sentence-order labels"):
        model(TOKENS, TOKENS, types=TYPES, padding_mask=PAD)
