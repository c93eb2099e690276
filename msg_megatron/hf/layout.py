"""Our canonical tensors <-> Hugging Face `transformers` tensors, per architecture.

Three families map without custom code:
- `llama` (LlamaForCausalLM): RMSNorm + SwiGLU + RoPE. MSG keeps the head dim fixed while hidden
  and heads grow, so `head_dim` is written explicitly (heads x head_dim need not equal hidden).
  Grouped-query attention is Llama's num_key_value_heads (= our query groups).
- `gpt2` (GPT2LMHeadModel): LayerNorm + tanh-GELU + learned positions, heads x head_dim == hidden,
  multi-head attention only.
- `bert` (BertForMaskedLM, model.family=bert): post-LN encoder with token types and the MLM head
  (tied decoder + its bias); heads x head_dim == hidden, multi-head attention.
GELU: our `gelu` is the tanh form (GPT-2's gelu_new, transformers' gelu_pytorch_tanh), `gelu_erf` the
exact one (transformers' `gelu`, Google's BERT).

The names and layout transforms of every tensor are rows of model/params.py (fused QKV per head
[q_g..; k_g; v_g] per query group -> q/k/v or GPT-2's c_attn, SwiGLU's [gate; up], GPT-2's transposed Conv1D). The embedding keeps its padded rows: the HF vocabulary is the padded size,
so the softmax runs over the same entries and the logits are the same function.
"""
from __future__ import annotations

import re
from typing import Dict, Optional

import torch

from ..config import ModelConfig, Shape
from ..model.hf_arch import UnsupportedArchitecture, architecture, export_warnings  # noqa: F401 (the exporter's API)
from ..model.params import BERT, GPT2, LLAMA, TABLE, Dims, param  # noqa: F401 (GPT2: the importer's)

_LAYER = re.compile(r"layers\.(\d+)\.")


def hf_config(arch: str, mcfg: ModelConfig, shape: Shape, vocab_padded: int, dtype: str, bos: Optional[int] = 1,
              eos: Optional[int] = 2, pad: Optional[int] = 0) -> dict:
    """config.json contents (plain keys understood by transformers 4.4x and 5.x); `bos`, `eos`, `pad`:
    the tokenizer's ids (our sentencepiece models': 1 and 2; BERT's WordPiece: [PAD] = 0)."""
    gelu = {"gelu": "gelu_pytorch_tanh", "gelu_erf": "gelu"}.get(mcfg.activation)  # (transformers' names)
    common = {"vocab_size": vocab_padded, "tie_word_embeddings": mcfg.tie_embeddings, "torch_dtype": dtype,
              "dtype": dtype, "bos_token_id": bos, "eos_token_id": eos, "use_cache": True}
    if arch == LLAMA:
        return dict(common, architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=shape.hidden,
                    intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
                    num_attention_heads=shape.heads, num_key_value_heads=mcfg.groups(shape), head_dim=mcfg.head_dim,
                    hidden_act="silu", max_position_embeddings=mcfg.seq_length, rms_norm_eps=mcfg.norm_epsilon,
                    rope_theta=float(mcfg.rotary_base),
                    rope_parameters={"rope_type": "default", "rope_theta": float(mcfg.rotary_base)},
                    attention_bias=mcfg.add_bias_linear, mlp_bias=mcfg.add_bias_linear,
                    attention_dropout=0.0, initializer_range=mcfg.init_method_std, pretraining_tp=1)
    if arch == BERT:  # (our MLP's and MLM head's GELU)
        # (with the sentence-order head, model.binary_head: BertForPreTraining, its pooler and NSP classifier)
        head = "BertForPreTraining" if mcfg.binary_head else "BertForMaskedLM"
        return dict(common, architectures=[head], model_type="bert", hidden_size=shape.hidden,
                    intermediate_size=shape.ffn, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                    hidden_act=gelu, max_position_embeddings=mcfg.seq_length,
                    type_vocab_size=mcfg.type_vocab_size, layer_norm_eps=mcfg.norm_epsilon,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, position_embedding_type="absolute",
                    initializer_range=mcfg.init_method_std, pad_token_id=pad, is_decoder=False, use_cache=False)
    return dict(common, architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=shape.hidden,
                n_inner=shape.ffn, n_layer=shape.layers, n_head=shape.heads, n_positions=mcfg.seq_length,
                n_ctx=mcfg.seq_length, activation_function="gelu_new" if gelu == "gelu_pytorch_tanh" else "gelu", layer_norm_epsilon=mcfg.norm_epsilon,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_weights=True,
                initializer_range=mcfg.init_method_std)


# ---- tensors: every name and transform comes from the parameter table (model/params.py) ----------
def dims(mcfg: ModelConfig, shape: Shape) -> Dims:
    return Dims(heads=shape.heads, head_dim=mcfg.head_dim, groups=mcfg.groups(shape))


def _counterpart(arch: str, name: str):
    row = param(name)
    hf = row.hf.get(arch)
    if hf is None:
        raise UnsupportedArchitecture(f"`{name}` has no counterpart in {arch}; add it to msg_megatron/model/params.py")
    found = _LAYER.match(name)
    return row, hf, (int(found.group(1)) if found else None)


def to_hf(arch: str, tensors: Dict[str, torch.Tensor], d: Dims, layer: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Canonical whole tensors (table names: `layers.{layer}.` for one layer's, or the embeddings,
    final norm and untied output) -> HF names and layouts. Mask buffers are not exported (a model
    is exported with its masks at 1). Tensors the architecture always has but our model lacks
    (GPT-2's biases without model.add_bias_linear) are written as zeros: the same function."""
    out = {}
    for name, t in tensors.items():
        if param(name).is_buffer:
            continue
        row, hf, i = _counterpart(arch, name)
        out.update((n.format(i=i), x.contiguous()) for n, x in zip(hf.names, hf.to_hf(t, d)))
    for row, name in _always_absent(arch, tensors, layer):
        weight = tensors[name[: -len("bias")] + "weight"]
        zeros = torch.zeros(weight.shape[0], dtype=weight.dtype)
        out.update((n.format(i=layer), x.contiguous()) for n, x in zip(row.hf[arch].names, row.hf[arch].to_hf(zeros, d)))
    return out


def from_hf(arch: str, get, name: str, d: Dims) -> torch.Tensor:
    """Our canonical tensor `name` from the HF tensors `get(hf_name)` (one at a time)."""
    _, hf, i = _counterpart(arch, name)
    return hf.from_hf(tuple(get(n.format(i=i)) for n in hf.names), d).contiguous()


def check_absent_are_zero(arch: str, get, present, layer: Optional[int]) -> None:
    """HF tensors our model has no place for (GPT-2 biases, model.add_bias_linear false) must be 0."""
    for row, name in _always_absent(arch, present, layer):
        for n in row.hf[arch].names:
            if get(n.format(i=layer)).abs().max() != 0:
                raise UnsupportedArchitecture(f"layer {layer}: `{n.format(i=layer)}` is not zero, but "
                                              "model.add_bias_linear is false")


def _always_absent(arch: str, present, layer: Optional[int]):
    rows = [r for r in TABLE if r.name.startswith("layers.{i}.") == (layer is not None)]
    for row in rows:
        name = row.name.format(i=layer)
        if arch in row.hf and row.hf[arch].always and name not in present:
            yield row, name
