"""Megatron-LM's `args` (the argparse Namespace in a checkpoint's common.pt) <-> this project's model section.

Reading: `model_from_args(args)` gives the ModelConfig fields and Shape of a dense GPT as
Megatron-LM builds it (`pretrain_gpt.py` / `gpt_builders.py`): normalization, activation (`--swiglu`:
SwiGLU; default: F.gelu, the exact erf form; `--openai-gelu`: the tanh form), position embedding,
grouped-query attention, tied or untied output, biases, the padded vocabulary. Whatever this
project's model cannot express is refused by name before anything is written (`NOT_EXPRESSIBLE`).

Writing: `args_for_export` builds the Namespace Megatron-LM's `check_checkpoint_args` compares
(`num_layers`, `hidden_size`, `num_attention_heads`, `add_position_embedding`,
`max_position_embeddings`, `make_vocab_size_divisible_by`, TP/PP sizes, ...) and the GPT builder reads.

`common.pt` is read with torch's weights-only unpickler, `argparse.Namespace` allowed; the enum
classes Megatron-LM keeps in `args` (e.g. `AttnBackend`) become inert `Opaque` values: a name and its
arguments, no code of theirs runs. Any other class is refused by name.
"""
from __future__ import annotations

import argparse
import contextlib
import pathlib
import re
import types
from typing import Optional, Tuple

import torch

from ..config import ModelConfig, Shape
from .safe_pickle import UnsafeCheckpoint


class NotExpressible(ValueError):
    """A Megatron-LM model feature this project's model does not have."""


class Opaque:
    """An object of a class outside the allow-list (an enum of megatron's), kept as its name and arguments."""

    def __init__(self, *args):
        self.args = args
        self.name = type(self).__name__

    def __repr__(self):
        return f"{self.name}{self.args}"


def _opaque(qualname: str):
    return type(qualname, (Opaque,), {})


def load_common(path: str) -> dict:
    """common.pt's contents, unpickled with torch's weights-only loader (see module doc)."""
    allowed = [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath]
    for _ in range(64):
        try:
            with _allowing(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch reports an unknown class as an UnpicklingError naming it
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            if found is None:
                said = re.search(r"WeightsUnpickler error: (.*)", str(e))
                raise UnsafeCheckpoint(f"`{path}` cannot be read as a Megatron-LM checkpoint's common state "
                                       f"without running its code: {said.group(1) if said else e}") from None
            name = found.group(1)
            if not name.startswith(("megatron.", "transformer_engine.")):
                raise UnsafeCheckpoint(f"`{path}` refers to `{name}`, which is not part of a Megatron-LM checkpoint's "
                                       "common state; refusing to unpickle it (the file may be crafted)") from None
            allowed.append((_opaque(name), name))
    raise UnsafeCheckpoint(f"`{path}` refers to too many classes outside the allow-list")


@contextlib.contextmanager
def _allowing(classes):
    """torch's weights-only allow-list plus `classes` during the block, then exactly the list before
    (torch's own `safe_globals` context drops, on exit, classes that were already allowed: megatron.core
    allows Namespace process-wide)."""
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals(classes)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def _get(args, name, default=None):
    return getattr(args, name, default)


# argument -> (value this project's model has, why not). Checked only when `args` has the argument.
NOT_EXPRESSIBLE = [
    ("num_experts", lambda v: not v, "mixture of experts"),
    ("moe_layer_freq", lambda v: v in (None, 1), "mixture of experts"),
    ("qk_layernorm", lambda v: not v, "layer norms on queries and keys"),
    ("qk_l2_norm", lambda v: not v, "L2 norms on queries and keys"),
    ("multi_latent_attention", lambda v: not v, "multi-latent attention"),
    ("mtp_num_layers", lambda v: not v, "multi-token prediction layers"),
    ("apply_residual_connection_post_layernorm", lambda v: not v, "post-layernorm residuals"),
    ("apply_layernorm_1p", lambda v: not v, "zero-centred (1 + gamma) layer norms"),
    ("layernorm_zero_centered_gamma", lambda v: not v, "zero-centred (1 + gamma) layer norms"),
    ("rotary_percent", lambda v: v in (None, 1.0), "rotary embeddings on part of the head (rotary_percent < 1)"),
    ("rotary_interleaved", lambda v: not v, "interleaved rotary embeddings"),
    ("use_rope_scaling", lambda v: not v, "Llama-3 rope scaling"),
    ("rotary_seq_len_interpolation_factor", lambda v: v in (None, 1), "rope sequence-length interpolation"),
    ("no_rope_freq", lambda v: v is None, "layers without RoPE"),
    ("window_size", lambda v: v is None, "sliding-window attention"),
    ("squared_relu", lambda v: not v, "the squared-ReLU activation"),
    ("quick_geglu", lambda v: not v, "the quick-GeGLU activation"),
    ("softmax_scale", lambda v: v is None, "a custom attention softmax scale"),
    ("attention_output_gate", lambda v: not v, "gated attention output"),
    ("heterogeneous_layers_config_path", lambda v: v is None, "heterogeneous layers"),
    ("heterogeneous_layers_config_encoded_json", lambda v: v is None, "heterogeneous layers"),
    ("hybrid_layer_pattern", lambda v: not v, "hybrid (Mamba) layers"),
    ("hybrid_override_pattern", lambda v: not v, "hybrid (Mamba) layers"),
    ("experimental_attention_variant", lambda v: v is None, "an experimental attention variant"),
    ("embedding_multiplier", lambda v: v in (None, 1.0), "a scaled embedding"),
    ("decoder_first_pipeline_num_layers", lambda v: v is None, None),  # (a layout only: fine)
]


def refusals(args) -> list:
    """`--name=value (what it is)` for every argument this project's model cannot express."""
    out = []
    for name, fine, what in NOT_EXPRESSIBLE:
        if what is None or not hasattr(args, name):
            continue
        value = getattr(args, name)
        if not fine(value):
            out.append(f"{name}={value!r} ({what})")
    pos = _get(args, "position_embedding_type", "learned_absolute")
    if _get(args, "use_rotary_position_embeddings"):
        pos = "rope"
    if pos not in ("learned_absolute", "rope"):
        out.append(f"position_embedding_type={pos!r} (only learned_absolute and rope)")
    if _get(args, "normalization", "LayerNorm") not in ("LayerNorm", "RMSNorm"):
        out.append(f"normalization={args.normalization!r} (only LayerNorm and RMSNorm)")
    if bool(_get(args, "add_qkv_bias", False)) and not bool(_get(args, "add_bias_linear", True)):
        out.append("add_qkv_bias=True with add_bias_linear=False (this project has one flag for every linear bias)")
    return out


def model_from_args(args, tokenizer_vocab: Optional[int] = None) -> Tuple[ModelConfig, Shape]:
    """ModelConfig and Shape of the GPT in a Megatron-LM checkpoint; NotExpressible names what is not."""
    refused = refusals(args)
    if refused:
        raise NotExpressible("this Megatron-LM model has what msg-megatron's model cannot express: "
                             + "; ".join(refused))
    for need in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size"):
        if _get(args, need) is None:
            raise NotExpressible(f"the checkpoint's args have no `{need}` (not a Megatron-LM GPT checkpoint?)")
    hidden, heads, layers = args.hidden_size, args.num_attention_heads, args.num_layers
    ffn = _get(args, "ffn_hidden_size") or 4 * hidden
    groups = _get(args, "num_query_groups") if _get(args, "group_query_attention") else None
    swiglu = bool(_get(args, "swiglu", False))
    activation = "swiglu" if swiglu else ("gelu" if _get(args, "openai_gelu", False) else "gelu_erf")
    pos = "rope" if (_get(args, "position_embedding_type") == "rope" or _get(args, "use_rotary_position_embeddings")) \
        else "learned"
    seq = _get(args, "max_position_embeddings") or _get(args, "seq_length")
    padded = int(args.padded_vocab_size)
    vocab = tokenizer_vocab or _get(args, "vocab_size") or padded
    if vocab > padded:
        raise NotExpressible(f"the tokenizer has {vocab} tokens but the checkpoint only {padded} embedding rows")
    divisible = next((m for m in (128, 64, 32, 16, 8, 4, 2, 1) if -(-vocab // m) * m == padded), padded)
    mcfg = ModelConfig(
        family="gpt", vocab_size=vocab, make_vocab_size_divisible_by=divisible, hidden_size=hidden,
        ffn_hidden_size=ffn, num_attention_heads=heads, num_layers=layers,
        num_query_groups=None if groups in (None, heads) else int(groups),
        kv_channels=_get(args, "kv_channels") or hidden // heads, seq_length=int(seq),
        norm="rmsnorm" if _get(args, "normalization", "LayerNorm") == "RMSNorm" else "layernorm",
        norm_epsilon=float(_get(args, "norm_epsilon", 1e-5)), activation=activation, position_embedding=pos,
        rotary_base=int(_get(args, "rotary_base", 10000)),
        tie_embeddings=not bool(_get(args, "untie_embeddings_and_output_weights", False)),
        add_bias_linear=bool(_get(args, "add_bias_linear", True)),
        init_method_std=float(_get(args, "init_method_std", 0.02)))
    return mcfg, Shape(hidden, ffn, heads, layers)


def megatron_padded_vocab(vocab: int, divisible: int, tp: int) -> int:
    """Megatron-LM's `_vocab_size_with_padding`: a multiple of make_vocab_size_divisible_by x TP."""
    multiple = divisible * tp
    return -(-vocab // multiple) * multiple


def args_for_export(mcfg: ModelConfig, shape: Shape, padded_vocab: int, divisible: int, tp: int, pp: int,
                    iteration: int, consumed_samples: int, train: dict, optimizer: bool) -> argparse.Namespace:
    """The args a Megatron-LM run of this model would hold (see module doc). `train`: this run's
    train section (learning rates, batch, seed), recorded as Megatron-LM's names."""
    groups = mcfg.groups(shape)
    return argparse.Namespace(
        num_layers=shape.layers, hidden_size=shape.hidden, ffn_hidden_size=shape.ffn,
        num_attention_heads=shape.heads, group_query_attention=groups != shape.heads, num_query_groups=groups,
        kv_channels=mcfg.head_dim, seq_length=mcfg.seq_length, max_position_embeddings=mcfg.seq_length,
        normalization="RMSNorm" if mcfg.norm == "rmsnorm" else "LayerNorm", norm_epsilon=mcfg.norm_epsilon,
        swiglu=mcfg.activation == "swiglu", openai_gelu=mcfg.activation == "gelu", squared_relu=False,
        position_embedding_type="rope" if mcfg.position_embedding == "rope" else "learned_absolute",
        add_position_embedding=True, rotary_base=mcfg.rotary_base, rotary_percent=1.0, rotary_interleaved=False,
        use_rope_scaling=False, untie_embeddings_and_output_weights=not mcfg.tie_embeddings,
        add_bias_linear=mcfg.add_bias_linear, add_qkv_bias=mcfg.add_bias_linear, qk_layernorm=False,
        apply_residual_connection_post_layernorm=False, apply_layernorm_1p=False, num_experts=None,
        multi_latent_attention=False, mtp_num_layers=None, hidden_dropout=0.0, attention_dropout=0.0,
        vocab_size=mcfg.vocab_size, padded_vocab_size=padded_vocab, make_vocab_size_divisible_by=divisible,
        init_method_std=mcfg.init_method_std, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        use_dist_ckpt=True, ckpt_format="torch_dist", use_distributed_optimizer=True,
        dist_ckpt_optim_fully_reshardable=True, iteration=iteration, consumed_train_samples=consumed_samples,
        consumed_valid_samples=0, skipped_train_samples=0,
        # the RNG state is this project's (one torch generator per rank), not Megatron-LM's: not saved
        no_save_rng=True, no_save_optim=not optimizer,
        lr=train.get("lr"), min_lr=train.get("min_lr"), weight_decay=train.get("weight_decay"),
        adam_beta1=train.get("adam_beta1"), adam_beta2=train.get("adam_beta2"), adam_eps=train.get("adam_eps"),
        clip_grad=train.get("clip_grad"), seed=train.get("seed"), micro_batch_size=train.get("micro_batch_size"),
        global_batch_size=train.get("global_batch_size"), bf16=train.get("precision") == "bf16", fp16=False,
        exported_by="msg-export-megatron")
