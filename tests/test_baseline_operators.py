"""The paper's baseline growth operators (growth.operator), asserted where the paper says they
preserve the function and where they do not.

Net2Net (eq. 5-6, bert2BERT appendix C): FFN units and heads replicated with their outgoing
weights split between replicas preserve the function exactly (no LayerNorm sits after them):
<= 1e-5 relative in float32, as the MSG tests. Hidden growth under LayerNorm changes the mean and
variance the norm sees (eq. 7): the function changes (> 1e-3 relative). No Mask: the MSG weights
with every mask opened at once: the function changes; no mask remains.
"""
import pytest
import torch
from conftest import rel_err, tiny_model_cfg

from msg_megatron.config import Shape
from msg_megatron.growth.operators import grow_model
from msg_megatron.model import build_model
from msg_megatron.model.masks import iter_masks, ramping

OLD = Shape(32, 64, 4, 2)
TOKENS = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(TOKENS)


def all_open(model) -> bool:
    return not ramping(model) and all(bool((m.value == 1).all()) for m in iter_masks(model))


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("new", [Shape(32, 100, 4, 2), Shape(32, 64, 7, 2), Shape(32, 128, 8, 2)])
def test_net2net_preserves_ffn_and_head_growth(norm, act, new):
    model = build_model(tiny_model_cfg(norm=norm, activation=act, tie_embeddings=False), OLD)
    before = logits(model)
    grown, _ = grow_model(model, new, step=5, operator="net2net")
    assert grown.shape == new and all_open(grown)
    assert rel_err(before, logits(grown)) <= 1e-5
    # the new units are replicas (not fresh draws): unit 64 of fc1 copies unit 0
    if new.ffn > OLD.ffn and act == "gelu":
        w = grown.layers[0].mlp.linear_fc1.weight
        assert torch.equal(w[OLD.ffn], w[0])


@pytest.mark.parametrize("tie", [True, False])
def test_net2net_hidden_growth_under_layernorm_breaks_the_function(tie):
    """Eq. 7: x' = (x1, x2, x3, x2, x1) has another mean/variance, so LN(x') != LN(x)."""
    model = build_model(tiny_model_cfg(norm="layernorm", tie_embeddings=tie), OLD)
    before = logits(model)
    grown, _ = grow_model(model, Shape(48, 64, 4, 2), step=5, operator="net2net")
    assert rel_err(before, logits(grown)) > 1e-3
    msg, _ = grow_model(model, Shape(48, 64, 4, 2), step=5, operator="msg")  # MSG on the same growth: exact
    assert rel_err(before, logits(msg)) <= 1e-5


def test_net2net_copied_layers_change_the_function():
    model = build_model(tiny_model_cfg(), OLD)
    before = logits(model)
    grown, _ = grow_model(model, Shape(32, 64, 4, 4), step=5, operator="net2net")
    assert all_open(grown) and rel_err(before, logits(grown)) > 1e-3


def test_nomask_uses_msg_weights_without_masks():
    model = build_model(tiny_model_cfg(), OLD)
    before = logits(model)
    new = Shape(48, 96, 6, 3)
    masked, _ = grow_model(model, new, step=5, init="normal", init_std=0.2, seed=3)
    nomask, _ = grow_model(model, new, step=5, init="normal", init_std=0.2, seed=3, operator="nomask")
    assert all_open(nomask) and ramping(masked)
    for (name, a), (_, b) in zip(masked.named_parameters(), nomask.named_parameters()):
        assert torch.equal(a, b), name  # the same weights; only the masks differ
    assert rel_err(before, logits(masked)) <= 1e-5
    assert rel_err(before, logits(nomask)) > 1e-3


def test_net2net_config_errors():
    from msg_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="net2net with parallel.tensor=2"):
        load_config(None, ["growth.operator=net2net", "parallel.tensor=2"])
    with pytest.raises(ConfigError, match="growth.operator"):
        load_config(None, ["growth.operator=bert2bert"])
