"""Model FLOPs per token (training/flops.py) against torch's FLOP counter on a real forward+backward.

torch's counter sees every matmul (QKV, projection, MLP, logits; forward and both backward
products) but not the fused CPU attention kernel, so the attention term 3 * 2 * 2*s*A*d per token
and layer is added by hand. Exact equality: both count 2 FLOPs per multiply-add.
"""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_model_cfg
from msg_megatron.config import Shape
from msg_megatron.model import build_model
from msg_megatron.training.flops import PEAK_TFLOPS, flops_per_token


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("shape", [Shape(48, 96, 6, 5), Shape(32, 64, 2, 2)])
def test_flops_per_token_matches_counted_matmuls(activation, shape):
    cfg = tiny_model_cfg(activation=activation)
    model = build_model(cfg, shape)
    b, s = 2, cfg.seq_length
    tokens = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(tokens[:, :-1], tokens[:, 1:]).mean().backward()
    attention = 3 * 2 * 2 * s * shape.heads * cfg.head_dim * shape.layers  # per token, fwd + bwd
    assert counter.get_total_flops() == (flops_per_token(cfg, shape, model.vocab_padded) - attention) * b * s


def test_peak_table_has_the_cluster_gpus():
    assert PEAK_TFLOPS["A100"] == PEAK_TFLOPS["A800"] == 312.0 and PEAK_TFLOPS["H100"] == 989.0


@pytest.mark.parametrize("shape", [Shape(48, 96, 6, 5), Shape(32, 64, 2, 2)])
@pytest.mark.parametrize("binary_head", [False, True])
def test_bert_flops_per_token_count_the_mlm_head(shape, binary_head):
    """BERT (bidirectional, padded keys, the MLM head's dense before the logits; the sentence-order
    head's pooler and classifier on [CLS]): the same count."""
    from msg_megatron.data.batches import batch_loss

    cfg = tiny_model_cfg(family="bert", binary_head=binary_head)
    model = build_model(cfg, shape)
    b, s = 2, cfg.seq_length
    tokens = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    keep = torch.ones_like(tokens)
    keep[1, s // 2:] = 0
    with FlopCounterMode(display=False) as counter:
        out = model(tokens, tokens, types=torch.zeros_like(tokens), padding_mask=keep,
                    sentence_order=torch.tensor([0, 1]))
        batch_loss(out, keep).backward()
    attention = 3 * 2 * 2 * s * shape.heads * cfg.head_dim * shape.layers  # per token, fwd + bwd
    assert counter.get_total_flops() == (flops_per_token(cfg, shape, model.vocab_padded) - attention) * b * s
