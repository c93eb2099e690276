"""Our canonical tensors <-> Hugging Face `transformers` tensors, per architecture.

Two families map without custom code:
- `llama` (LlamaForCausalLM): RMSNorm + SwiGLU + RoPE. MSG keeps the head dim fixed while hidden
  and heads grow, so `head_dim` is written explicitly (heads x head_dim need not equal hidden).
- `gpt2` (GPT2LMHeadModel): LayerNorm + tanh-GELU + learned positions, heads x head_dim == hidden.

Our fused QKV weight holds per head [q_h; k_h; v_h] (megatron's interleaved layout); SwiGLU's fc1
is [gate; up]; GPT-2's Conv1D weights are stored transposed ([in, out]) and its c_attn columns are
[q (all heads); k; v]. The embedding keeps its padded rows: the HF vocabulary is the padded size,
so the softmax runs over the same entries and the logits are the same function.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..config import ModelConfig, Shape

LLAMA = "llama"
GPT2 = "gpt2"


class UnsupportedArchitecture(ValueError):
    """A model that has no exact `transformers` counterpart (or an HF model we cannot import)."""


def architecture(mcfg: ModelConfig, shape: Shape) -> str:
    """`llama` or `gpt2`, or an error naming the flags that would make the model exportable."""
    flags = (mcfg.norm, mcfg.activation, mcfg.position_embedding)
    if flags == ("rmsnorm", "swiglu", "rope"):
        return LLAMA
    if flags == ("layernorm", "gelu", "learned"):
        if shape.heads * mcfg.head_dim != shape.hidden:
            raise UnsupportedArchitecture(
                f"GPT-2 needs heads x head_dim == hidden, but this model has {shape.heads} x {mcfg.head_dim} != "
                f"{shape.hidden}; export a stage where they match, or train with model.norm=rmsnorm "
                "model.activation=swiglu model.position_embedding=rope (exported as Llama, which has head_dim)")
        return GPT2
    raise UnsupportedArchitecture(
        f"model.norm={mcfg.norm} model.activation={mcfg.activation} model.position_embedding="
        f"{mcfg.position_embedding} has no transformers architecture; exportable are "
        "(rmsnorm, swiglu, rope) -> LlamaForCausalLM and (layernorm, gelu, learned) -> GPT2LMHeadModel")


def hf_config(arch: str, mcfg: ModelConfig, shape: Shape, vocab_padded: int, dtype: str) -> dict:
    """config.json contents (plain keys understood by transformers 4.4x and 5.x)."""
    common = {"vocab_size": vocab_padded, "tie_word_embeddings": mcfg.tie_embeddings, "torch_dtype": dtype,
              "dtype": dtype, "bos_token_id": 1, "eos_token_id": 2, "use_cache": True}
    if arch == LLAMA:
        return dict(common, architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=shape.hidden,
                    intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
                    num_attention_heads=shape.heads, num_key_value_heads=shape.heads, head_dim=mcfg.head_dim,
                    hidden_act="silu", max_position_embeddings=mcfg.seq_length, rms_norm_eps=mcfg.norm_epsilon,
                    rope_theta=float(mcfg.rotary_base),
                    rope_parameters={"rope_type": "default", "rope_theta": float(mcfg.rotary_base)},
                    attention_bias=mcfg.add_bias_linear, mlp_bias=mcfg.add_bias_linear,
                    attention_dropout=0.0, initializer_range=mcfg.init_method_std, pretraining_tp=1)
    return dict(common, architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=shape.hidden,
                n_inner=shape.ffn, n_layer=shape.layers, n_head=shape.heads, n_positions=mcfg.seq_length,
                n_ctx=mcfg.seq_length, activation_function="gelu_new", layer_norm_epsilon=mcfg.norm_epsilon,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_weights=True,
                initializer_range=mcfg.init_method_std)


# ---- export ------------------------------------------------------------------------------------
def layer_to_hf(arch: str, t: Dict[str, torch.Tensor], i: int, mcfg: ModelConfig, shape: Shape) -> Dict[str, torch.Tensor]:
    """Layer i's canonical tensors (names relative to the layer) -> HF names and layouts."""
    hd, heads, h = mcfg.head_dim, shape.heads, shape.hidden
    qkv = t["self_attention.linear_qkv.weight"].view(heads, 3, hd, h)
    q, k, v = (qkv[:, j].reshape(heads * hd, h) for j in range(3))
    bias = mcfg.add_bias_linear
    if bias:
        qb, kb, vb = (t["self_attention.linear_qkv.bias"].view(heads, 3, hd)[:, j].reshape(-1) for j in range(3))
    out = {}
    if arch == LLAMA:
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = t["input_norm.weight"]
        out[p + "post_attention_layernorm.weight"] = t["pre_mlp_norm.weight"]
        for name, w in (("q", q), ("k", k), ("v", v)):
            out[p + f"self_attn.{name}_proj.weight"] = w
        out[p + "self_attn.o_proj.weight"] = t["self_attention.linear_proj.weight"]
        gate, up = t["mlp.linear_fc1.weight"].chunk(2, 0)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = t["mlp.linear_fc2.weight"]
        if bias:
            out[p + "self_attn.q_proj.bias"], out[p + "self_attn.k_proj.bias"], out[p + "self_attn.v_proj.bias"] = qb, kb, vb
            out[p + "self_attn.o_proj.bias"] = t["self_attention.linear_proj.bias"]
            out[p + "mlp.gate_proj.bias"], out[p + "mlp.up_proj.bias"] = t["mlp.linear_fc1.bias"].chunk(2, 0)
            out[p + "mlp.down_proj.bias"] = t["mlp.linear_fc2.bias"]
        return {k: x.contiguous() for k, x in out.items()}
    p = f"transformer.h.{i}."
    zeros = lambda n: torch.zeros(n, dtype=q.dtype)  # noqa: E731 - GPT-2 always has biases: 0 is exact
    out[p + "ln_1.weight"], out[p + "ln_1.bias"] = t["input_norm.weight"], t["input_norm.bias"]
    out[p + "ln_2.weight"], out[p + "ln_2.bias"] = t["pre_mlp_norm.weight"], t["pre_mlp_norm.bias"]
    out[p + "attn.c_attn.weight"] = torch.cat([q, k, v], 0).t()
    out[p + "attn.c_attn.bias"] = torch.cat([qb, kb, vb]) if bias else zeros(3 * h)
    out[p + "attn.c_proj.weight"] = t["self_attention.linear_proj.weight"].t()
    out[p + "attn.c_proj.bias"] = t["self_attention.linear_proj.bias"] if bias else zeros(h)
    out[p + "mlp.c_fc.weight"] = t["mlp.linear_fc1.weight"].t()
    out[p + "mlp.c_fc.bias"] = t["mlp.linear_fc1.bias"] if bias else zeros(shape.ffn)
    out[p + "mlp.c_proj.weight"] = t["mlp.linear_fc2.weight"].t()
    out[p + "mlp.c_proj.bias"] = t["mlp.linear_fc2.bias"] if bias else zeros(h)
    return {k: x.contiguous() for k, x in out.items()}


def outer_to_hf(arch: str, t: Dict[str, torch.Tensor], mcfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Embeddings, final norm and (untied) output layer -> HF names."""
    if arch == LLAMA:
        out = {"model.embed_tokens.weight": t["embedding.weight"], "model.norm.weight": t["final_norm.weight"]}
    else:
        out = {"transformer.wte.weight": t["embedding.weight"], "transformer.wpe.weight": t["position_embeddings.weight"],
               "transformer.ln_f.weight": t["final_norm.weight"], "transformer.ln_f.bias": t["final_norm.bias"]}
    if not mcfg.tie_embeddings:
        out["lm_head.weight"] = t["output_layer.weight"]
    return {k: x.contiguous() for k, x in out.items()}


# ---- import ------------------------------------------------------------------------------------
def layer_from_hf(arch: str, get, i: int, mcfg: ModelConfig, shape: Shape) -> Dict[str, torch.Tensor]:
    """The inverse of layer_to_hf: `get(hf_name)` returns one HF tensor; our names relative to the layer."""
    hd, heads, h = mcfg.head_dim, shape.heads, shape.hidden
    bias = mcfg.add_bias_linear
    out = {}
    if arch == LLAMA:
        p = f"model.layers.{i}."
        q, k, v = (get(p + f"self_attn.{n}_proj.weight") for n in "qkv")
        out["input_norm.weight"] = get(p + "input_layernorm.weight")
        out["pre_mlp_norm.weight"] = get(p + "post_attention_layernorm.weight")
        out["self_attention.linear_proj.weight"] = get(p + "self_attn.o_proj.weight")
        out["mlp.linear_fc1.weight"] = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")], 0)
        out["mlp.linear_fc2.weight"] = get(p + "mlp.down_proj.weight")
        if bias:
            qb, kb, vb = (get(p + f"self_attn.{n}_proj.bias") for n in "qkv")
            out["self_attention.linear_proj.bias"] = get(p + "self_attn.o_proj.bias")
            out["mlp.linear_fc1.bias"] = torch.cat([get(p + "mlp.gate_proj.bias"), get(p + "mlp.up_proj.bias")], 0)
            out["mlp.linear_fc2.bias"] = get(p + "mlp.down_proj.bias")
    else:
        p = f"transformer.h.{i}."
        q, k, v = get(p + "attn.c_attn.weight").t().chunk(3, 0)
        qb, kb, vb = get(p + "attn.c_attn.bias").chunk(3, 0)
        out["input_norm.weight"], out["input_norm.bias"] = get(p + "ln_1.weight"), get(p + "ln_1.bias")
        out["pre_mlp_norm.weight"], out["pre_mlp_norm.bias"] = get(p + "ln_2.weight"), get(p + "ln_2.bias")
        out["self_attention.linear_proj.weight"] = get(p + "attn.c_proj.weight").t()
        out["mlp.linear_fc1.weight"] = get(p + "mlp.c_fc.weight").t()
        out["mlp.linear_fc2.weight"] = get(p + "mlp.c_proj.weight").t()
        out["self_attention.linear_proj.bias"] = get(p + "attn.c_proj.bias")
        out["mlp.linear_fc1.bias"] = get(p + "mlp.c_fc.bias")
        out["mlp.linear_fc2.bias"] = get(p + "mlp.c_proj.bias")
        if not bias:  # a model without biases was exported with zero biases: drop them again
            out["self_attention.linear_qkv.bias"] = torch.cat([qb, kb, vb])
            for n in [n for n in list(out) if n.endswith(".bias") and "norm" not in n]:
                if out.pop(n).abs().max() != 0:
                    raise UnsupportedArchitecture(f"layer {i}: `{n}` is not zero, but model.add_bias_linear is false")
    # per head [q_h; k_h; v_h] (megatron's interleaved fused QKV)
    out["self_attention.linear_qkv.weight"] = torch.stack(
        [x.reshape(heads, hd, h) for x in (q, k, v)], 1).reshape(3 * heads * hd, h)
    if bias:
        out["self_attention.linear_qkv.bias"] = torch.stack([x.reshape(heads, hd) for x in (qb, kb, vb)], 1).reshape(-1)
    return {k: x.contiguous() for k, x in out.items()}


def outer_from_hf(arch: str, get, mcfg: ModelConfig) -> Dict[str, torch.Tensor]:
    if arch == LLAMA:
        out = {"embedding.weight": get("model.embed_tokens.weight"), "final_norm.weight": get("model.norm.weight")}
    else:
        out = {"embedding.weight": get("transformer.wte.weight"),
               "position_embeddings.weight": get("transformer.wpe.weight"),
               "final_norm.weight": get("transformer.ln_f.weight"), "final_norm.bias": get("transformer.ln_f.bias")}
    if not mcfg.tie_embeddings:
        out["output_layer.weight"] = get("lm_head.weight")
    return out
