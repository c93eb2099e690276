"""msg-import-hf --hf DIR --save CKPT [--tensor T --pipeline P]: a local `transformers` model as a checkpoint.

Supported: LlamaForCausalLM (multi-head or grouped-query attention: num_key_value_heads becomes
model.num_query_groups; default RoPE, SiLU), GPT2LMHeadModel (tanh or erf GELU) and BERT
(BertForMaskedLM: the encoder and MLM head, model.family=bert; BertForPreTraining: also its pooler and
next-sentence classifier, as model.binary_head's sentence-order head), stored as safetensors. Every rank reads only
the tensors its shards need, one at a time from the memory-mapped files, so under torchrun with
T x P processes no rank holds more than its shards plus one full tensor. Run in one process, the
model is built unsharded: a dist checkpoint reloads under any layout, and --tensor/--pipeline are
checked against the shapes and recorded as the checkpoint's layout.

The result is a step-0 checkpoint with all masks open and no optimizer state, ready for
`msg-grow` (offline growth) or `msg-pretrain CONFIG checkpoint.init_from=CKPT` (a growth run
whose first stage is this model). Unless --no-verify (or under torchrun), the imported model's
logits are compared with transformers' own on random tokens and the difference is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from ..checkpoint.dist import save_checkpoint
from ..checkpoint.run_lock import hold_save_dir
from ..cli import run_cli
from ..config import ModelConfig, Shape, config_from_dict
from ..data.tokenizer import find_tokenizer, load_tokenizer
from ..model import build_model, count_parameters
from ..model.gpt import padded_vocab_size
from ..model.masks import tp_rank_size
from ..model.tp_layout import tp_shard
from ..parallel import initialize_parallel, is_logging_rank
from ..training.host_memory import local_params, require_host_memory
from .layout import BERT, GPT2, LLAMA, UnsupportedArchitecture, check_absent_are_zero, dims, from_hf


class HFWeights:
    """Lazy access to a folder's safetensors weights by name (no unpickling)."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(folder, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(
                f"`{folder}` has no model.safetensors(.index.json); pytorch_model.bin is not read (it needs "
                "unpickling): convert it with `AutoModelForCausalLM.from_pretrained(d).save_pretrained(d)`")
        self.where, self.handles = {}, []
        for name in files:
            h = safe_open(os.path.join(folder, name), framework="pt")
            self.handles.append(h)
            for key in h.keys():
                self.where[key] = h
        self.folder = folder

    def __call__(self, name: str) -> torch.Tensor:
        for prefix in ("transformer.", "bert."):  # saved from GPT2Model / BertModel: no prefix
            if name not in self.where and name.startswith(prefix):
                name = name[len(prefix):]
        if name not in self.where:
            raise UnsupportedArchitecture(f"`{self.folder}` has no weight `{name}`")
        return self.where[name].get_tensor(name).to(torch.float32)


def _vocab_fields(hf_vocab: int, tokenizer_vocab) -> dict:
    """model.vocab_size (the tokenizer's) and a make_vocab_size_divisible_by that pads it to the HF
    embedding's rows exactly: the imported model keeps every row, so its softmax is unchanged."""
    vocab = tokenizer_vocab or hf_vocab
    if vocab > hf_vocab:
        raise UnsupportedArchitecture(f"the tokenizer has {vocab} pieces but the model only {hf_vocab} embedding rows")
    for m in (128, 64, 32, 16, 8, 4, 2, 1):
        if -(-vocab // m) * m == hf_vocab:
            return {"vocab_size": vocab, "make_vocab_size_divisible_by": m}
    return {"vocab_size": vocab, "make_vocab_size_divisible_by": hf_vocab}


def model_config_from_hf(hf: dict, tokenizer_vocab=None, seq_length=None):
    """(architecture, ModelConfig, Shape) from a config.json dict; errors name the unsupported field."""
    mtype = hf.get("model_type")
    if "msg_megatron" in hf:  # our own export: the exact config (vocabulary before padding, init std, ...)
        mine = hf["msg_megatron"]
        mcfg = ModelConfig(**mine["model"])
        return {"llama": LLAMA, "bert": BERT}.get(mtype, GPT2), mcfg, Shape(*mine["shape"])
    if mtype == "llama":
        heads = hf["num_attention_heads"]
        kv = hf.get("num_key_value_heads") or heads
        if heads % kv:
            raise UnsupportedArchitecture(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise UnsupportedArchitecture(f"rope scaling `{rope.get('rope_type', rope.get('type'))}` is not supported "
                                          "(only default RoPE)")
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedArchitecture(f"hidden_act={hf['hidden_act']}: only silu (SwiGLU) is supported")
        if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
            raise UnsupportedArchitecture("attention_bias and mlp_bias differ; msg-megatron has one flag for both "
                                          "(model.add_bias_linear)")
        hidden = hf["hidden_size"]
        head_dim = hf.get("head_dim") or hidden // heads
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if float(theta) != int(theta):
            raise UnsupportedArchitecture(f"rope_theta={theta} is not an integer (model.rotary_base is)")
        shape = Shape(hidden, hf["intermediate_size"], heads, hf["num_hidden_layers"])
        fields = dict(norm="rmsnorm", activation="swiglu", position_embedding="rope", rotary_base=int(theta),
                      norm_epsilon=hf.get("rms_norm_eps", 1e-6), add_bias_linear=bool(hf.get("attention_bias", False)),
                      seq_length=seq_length or min(hf.get("max_position_embeddings", 2048), 4096),
                      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), kv_channels=head_dim,
                      num_query_groups=None if kv == heads else kv)
        arch = LLAMA
    elif mtype == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in TANH_GELU + ("gelu",):
            raise UnsupportedArchitecture(f"activation_function={act}: only GELU (gelu_new: tanh; gelu: erf) is "
                                          "supported")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise UnsupportedArchitecture("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
        hidden, heads = hf["n_embd"], hf["n_head"]
        n_pos = hf.get("n_positions", 1024)
        if seq_length not in (None, n_pos):
            raise UnsupportedArchitecture(f"GPT-2 has {n_pos} learned positions; --seq-length must be {n_pos}")
        shape = Shape(hidden, hf.get("n_inner") or 4 * hidden, heads, hf["n_layer"])
        fields = dict(norm="layernorm", activation="gelu", position_embedding="learned", seq_length=n_pos,
                      norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), add_bias_linear=True,
                      tie_embeddings=bool(hf.get("tie_word_embeddings", True)), kv_channels=hidden // heads)
        if act == "gelu":
            fields["activation"] = "gelu_erf"
        arch = GPT2
    elif mtype == "bert":
        fields, shape = _bert_fields(hf, seq_length), Shape(hf["hidden_size"], hf["intermediate_size"],
                                                            hf["num_attention_heads"], hf["num_hidden_layers"])
        arch = BERT
    else:
        raise UnsupportedArchitecture(f"model_type `{mtype}` is not supported; msg-import-hf reads llama "
                                      "(LlamaForCausalLM), gpt2 (GPT2LMHeadModel) and bert (BertForMaskedLM)")
    fields.update(_vocab_fields(hf["vocab_size"], tokenizer_vocab))
    mcfg = ModelConfig(hidden_size=shape.hidden, ffn_hidden_size=shape.ffn, num_attention_heads=shape.heads,
                       num_layers=shape.layers, init_method_std=hf.get("initializer_range", 0.02), **fields)
    return arch, mcfg, shape


TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # transformers' names of the tanh form


def _bert_fields(hf: dict, seq_length) -> dict:
    """ModelConfig fields of a BERT config.json, or an error naming what has no counterpart."""
    act = hf.get("hidden_act", "gelu")
    if act not in TANH_GELU + ("gelu",):
        raise UnsupportedArchitecture(f"hidden_act={act}: only GELU (gelu: erf; gelu_new: tanh) is supported")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedArchitecture(f"position_embedding_type={hf['position_embedding_type']}: only absolute "
                                      "(learned) positions are supported")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise UnsupportedArchitecture("a BERT decoder (is_decoder / add_cross_attention) is not supported: "
                                      "model.family=bert is the bidirectional encoder")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hidden % heads:
        raise UnsupportedArchitecture(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    n_pos = hf.get("max_position_embeddings", 512)
    if seq_length not in (None, n_pos):
        raise UnsupportedArchitecture(f"this BERT has {n_pos} learned positions; --seq-length must be {n_pos} "
                                      "(shorter samples are padded: data.seq_length need not be the maximum)")
    return dict(family="bert", norm="layernorm", activation="gelu_erf" if act == "gelu" else "gelu",
                position_embedding="learned", seq_length=n_pos, norm_epsilon=hf.get("layer_norm_eps", 1e-12),
                add_bias_linear=True, tie_embeddings=True, kv_channels=hidden // heads,
                type_vocab_size=hf.get("type_vocab_size", 2),
                binary_head="BertForPreTraining" in (hf.get("architectures") or []))


def fill_model(model, arch: str, get) -> None:
    """Copy HF weights into a freshly built (possibly TP/PP-sharded) model, one tensor at a time."""
    mcfg, shape = model.mcfg, model.shape
    rank, tp = tp_rank_size()
    gated = mcfg.activation == "swiglu"
    d = dims(mcfg, shape)
    present = set()
    for local, p in model.named_parameters():
        if local.startswith("layers."):
            _, idx, rest = local.split(".", 2)
            canonical = f"layers.{model.global_layers[int(idx)]}.{rest}"
        elif local == "output_layer.weight" and model.shared_output_copy():
            canonical = "embedding.weight"  # tied embedding, last stage of PP > 1: its copy of the embedding
        else:
            canonical = local
        present.add(canonical)
        shard = tp_shard(canonical, from_hf(arch, get, canonical, d), rank, tp, mcfg.head_dim, gated)
        if shard.shape != p.shape:
            raise UnsupportedArchitecture(f"`{local}`: the HF weight gives {tuple(shard.shape)}, the model expects "
                                          f"{tuple(p.shape)} (config.json does not match the weights)")
        with torch.no_grad():
            p.copy_(shard)
    for g in model.global_layers:
        check_absent_are_zero(arch, get, present, g)


def _tokenizer(folder: str):
    """The folder's tokenizer (tokenizer.json, else tokenizer.model) and its vocabulary size."""
    path = find_tokenizer(folder)
    if path is None:
        return "", None
    return path, load_tokenizer(path).vocab_size


def import_hf(folder: str, save: str, tensor: int = 1, pipeline: int = 1, seq_length=None, verify: bool = True) -> dict:
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"`{folder}` has no config.json: not a transformers model folder")
    with open(cfg_path) as f:
        hf = json.load(f)
    if os.path.exists(save) and any(not e.startswith(".msg-") for e in os.listdir(save)):
        raise ValueError(f"--save `{save}` exists and is not empty; choose a new folder so nothing is overwritten")
    tok_path, tok_vocab = _tokenizer(folder)
    arch, mcfg, shape = model_config_from_hf(hf, tok_vocab, seq_length)
    # the config's own validation (heads/ffn/vocab by TP, layers by PP) with the messages users know
    cfg = config_from_dict({"model": vars(mcfg), "parallel": {"tensor": tensor, "pipeline": pipeline},
                            "growth": {"stages": [{"step": 0, "shape": list(shape.as_tuple())}]}})
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sharded = world > 1
    tp, pp = (tensor, pipeline) if sharded else (1, 1)
    initialize_parallel(tp, pp, cfg.train.seed)
    # before any weight is read: on a CPU an import that cannot fit would end in a bare SIGKILL
    compare = verify and not sharded
    require_host_memory(
        f"importing `{folder}` ({shape})", local_params(cfg.model, shape, tp, pp), 8 if compare else 4,
        "the fp32 weights" + (" and transformers' fp32 copy for the logits comparison" if compare else ""),
        ("--no-verify halves it; " if compare else "") + "import under torchrun with --tensor/--pipeline "
        "over several machines (each rank then holds only its shards), or on GPUs.")
    lock = hold_save_dir(save, "msg-import-hf")  # one writer per save directory
    model = build_model(cfg.model, shape, perform_init=False)
    get = HFWeights(folder)
    fill_model(model, arch, get)
    state = {"step": 0, "stage": 0, "consumed_samples": 0, "imported_from": os.path.abspath(folder)}
    path = save_checkpoint(save, model, None, state, cfg.to_dict(), tok_path)
    if lock is not None:
        lock.release()
    out = {"saved": path, "architecture": hf.get("architectures", [arch])[0], "shape": list(shape.as_tuple()),
           "params": count_parameters(model), "vocab_size": cfg.model.vocab_size,
           "vocab_padded": padded_vocab_size(cfg.model), "layout": {"tensor": tensor, "pipeline": pipeline},
           "tokenizer": find_tokenizer(path) or ""}
    if verify and not sharded and is_logging_rank():
        out["max_abs_logit_diff"] = _compare_logits(folder, model)
    return out


@torch.no_grad()
def _compare_logits(folder: str, model) -> float:
    """Max abs difference of the logits on random tokens (BERT: two segments, the second sample
    padded; with the sentence-order head, BertForPreTraining's two outputs)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForPreTraining

    model.eval()
    bert, pairs = model.mcfg.family == "bert", model.mcfg.binary_head
    auto = AutoModelForPreTraining if pairs else AutoModelForMaskedLM if bert else AutoModelForCausalLM
    ref = auto.from_pretrained(folder, dtype=torch.float32)
    ref.eval()
    gen = torch.Generator().manual_seed(0)
    seq = min(model.mcfg.seq_length, 64)
    tokens = torch.randint(0, model.mcfg.vocab_size, (2, seq), generator=gen)
    if not bert:
        return float((model(tokens) - ref(tokens).logits).abs().max())
    types = torch.zeros_like(tokens)
    types[:, seq // 2:] = 1
    keep = torch.ones_like(tokens)
    keep[1, 3 * seq // 4:] = 0
    ours = model(tokens, types=types, padding_mask=keep)
    theirs = ref(input_ids=tokens, token_type_ids=types, attention_mask=keep)
    # (logits at padded positions are not a function either model promises: compare the real tokens)
    if not pairs:
        return float((ours - theirs.logits).abs()[keep.bool()].max())
    return max(float((ours[0] - theirs.prediction_logits).abs()[keep.bool()].max()),
               float((ours[1] - theirs.seq_relationship_logits).abs().max()))


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="msg-import-hf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="local transformers model folder (config.json + safetensors)")
    ap.add_argument("--save", required=True, help="save directory for the checkpoint (must be new or empty)")
    ap.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree the checkpoint is for")
    ap.add_argument("--pipeline", type=int, default=1, help="pipeline degree the checkpoint is for")
    ap.add_argument("--seq-length", type=int, default=None,
                    help="model.seq_length (Llama: default min(max_position_embeddings, 4096); GPT-2: n_positions)")
    ap.add_argument("--no-verify", action="store_true", help="skip the logits comparison with transformers")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    res = import_hf(args.hf, args.save, args.tensor, args.pipeline, args.seq_length, not args.no_verify)
    if not is_logging_rank():
        return 0
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"imported {res['architecture']} {tuple(res['shape'])}, {res['params']:,} params -> {res['saved']}")
    if "max_abs_logit_diff" in res:
        print(f"logits vs transformers: max abs difference {res['max_abs_logit_diff']:.2e}")
    tok = (f" data.tokenizer_model={res['tokenizer']} (with data.paths: data.tokenizer={res['tokenizer']})"
           if res["tokenizer"] else " (no tokenizer.model or tokenizer.json in the folder: set data.tokenizer_model, "
           "or data.tokenizer with data.paths, to one with the same ids)")
    print(f"grow it offline: msg-grow --load {res['saved']} --shape H,F,A,L --save NEW_DIR\n"
          f"or start a growth run from it (growth.stages[0] = {res['shape']}): msg-pretrain CONFIG "
          f"checkpoint.init_from={res['saved']}{tok}")
    return 0


def main(argv=None) -> None:
    sys.exit(run_cli("msg-import-hf", _main, argv))


if __name__ == "__main__":
    main()
