"""Activation recomputation (train.recompute, model/recompute.py) against no recomputation: the
same gradients, bitwise, in fp32, for every variant and during a mask ramp (the masks are buffers
that do not change within a step, so the rerun computes the same values)."""
import itertools

import pytest
import torch
from conftest import assert_refused, tiny_model_cfg

from msg_megatron.config import Shape
from msg_megatron.growth.operators import grow_model
from msg_megatron.model import build_model, update_masks
from msg_megatron.model.recompute import configure_recompute
from msg_megatron.training.activation_memory import SavedActivations

MODES = [("selective", 0), ("full", 0), ("full", 2)]


def _grads(model, tokens, mode, layers):
    configure_recompute(model, mode, layers)
    model.zero_grad(set_to_none=True)
    model.train()
    loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("norm, act, pos", list(itertools.product(["layernorm", "rmsnorm"], ["gelu", "swiglu"],
                                                                  ["learned", "rope"])))
def test_gradients_are_bitwise_those_without_recompute_mid_ramp(norm, act, pos, monkeypatch):
    cfg = tiny_model_cfg(norm=norm, activation=act, position_embedding=pos)
    small = Shape(32, 64, 4, 2)
    model, _ = grow_model(build_model(cfg, small, seed=5), Shape(48, 96, 6, 4), step=10, init_std=0.2, seed=3)
    update_masks(model, 13, 6)  # every new unit half-way through its ramp
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1), generator=torch.Generator().manual_seed(1))
    from msg_megatron.model import recompute

    calls = []
    real = recompute.tensor_parallel.checkpoint
    monkeypatch.setattr(recompute.tensor_parallel, "checkpoint", lambda *a: calls.append(1) or real(*a))
    loss, want = _grads(model, tokens, "none", 0)
    assert not calls
    for mode, layers in MODES:
        calls.clear()
        got_loss, got = _grads(model, tokens, mode, layers)
        assert len(calls) == (layers or 4), (mode, layers)  # megatron's checkpoint ran per layer / attention
        assert torch.equal(got_loss, loss), mode
        for name in want:
            assert torch.equal(got[name], want[name]), (mode, layers, name)


def test_the_setting_survives_growth_and_is_megatrons():
    cfg = tiny_model_cfg()
    model = build_model(cfg, Shape(32, 64, 4, 2))
    configure_recompute(model, "full", 1)
    assert (model.config.recompute_granularity, model.config.recompute_method,
            model.config.recompute_num_layers) == ("full", "block", 1)
    grown, _ = grow_model(model, Shape(48, 96, 6, 4), step=0)
    assert grown.config.recompute_granularity == "full" and grown.config.recompute_num_layers == 1


@pytest.mark.parametrize("overrides, words", [
    (["train.recompute=some"], ["train.recompute", "none, selective, full"]),
    (["train.recompute=selective", "train.recompute_num_layers=2"], ["recompute_num_layers=2", "recompute=full"]),
    (["train.recompute=full", "train.recompute_num_layers=-1"], ["train.recompute_num_layers", ">= 0"]),
])
def test_bad_recompute_settings_are_refused(overrides, words):
    assert_refused(overrides, words)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_training_through_growth_has_the_same_losses(tmp_path, tiny_run, mode):
    """A growth run (two growths, ramps) with recomputation logs bitwise the losses of one without
    (the session's tiny_run)."""
    from test_train import read_metrics, tiny_cfg

    from msg_megatron.training.trainer import Trainer

    Trainer(tiny_cfg(tmp_path / mode, "checkpoint.save=", f"train.recompute={mode}")).run()
    plain, rec = (
        {r["step"]: r["loss"] for r in read_metrics(d / "run" / "metrics.jsonl") if "loss" in r}
        for d in (tiny_run, tmp_path / mode))
    assert len(plain) == 40 and rec == plain


def _peak_saved_bytes(model, tokens) -> int:
    with SavedActivations(model) as meter:
        model(tokens[:, :-1], tokens[:, 1:]).mean().backward()
    return meter.peak


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_activation_memory_falls_as_the_formula_says(act):
    """training/sizes.activation_bytes (msg-plan's activations) against the activations autograd
    really holds, fp32: within 20% for none / full / the first half of the layers, and so is the
    fall from none to each recompute setting."""
    from msg_megatron.model.gpt import padded_vocab_size
    from msg_megatron.training.sizes import activation_bytes

    cfg = tiny_model_cfg(activation=act, seq_length=128, kv_channels=32, norm="rmsnorm", position_embedding="rope")
    shape, b = Shape(256, 1024, 8, 6), 4
    model = build_model(cfg, shape)
    model.train()
    tokens = torch.randint(0, cfg.vocab_size, (b, cfg.seq_length + 1), generator=torch.Generator().manual_seed(2))
    got, want = {}, {}
    for mode, k in [("none", 0), ("full", 0), ("full", 3)]:
        configure_recompute(model, mode, k)
        got[mode, k] = _peak_saved_bytes(model, tokens)
        want[mode, k] = activation_bytes(cfg, shape, padded_vocab_size(cfg), 1, 1, b, mode, k, elem=4)
        assert abs(got[mode, k] / want[mode, k] - 1) <= 0.2, (mode, k, got[mode, k], want[mode, k])
    for key in [("full", 0), ("full", 3)]:
        fall, predicted = got["none", 0] - got[key], want["none", 0] - want[key]
        assert abs(fall / predicted - 1) <= 0.2, (key, fall, predicted)
    assert got["full", 0] < 0.3 * got["none", 0]  # what recomputation is for
