"""megatron-core's own GPTModel, trained a step and saved as Megatron-LM saves it (the tests'
reference for msg-import-megatron / msg-export-megatron; no tensor here is written by hand).

Megatron-LM's `save_checkpoint` (megatron/training/checkpointing.py) writes
`{"args", "checkpoint_version", "iteration", "model", "optimizer", "opt_param_scheduler", ...}` with
`dist_checkpointing.save` into `iter_{:07d}/` and then the tracker file; the model's keys carry no
prefix, the optimizer's are megatron's `sharded_state_dict` under the metadata Megatron-LM passes
(`distrib_optim_sharding_type`). Only megatron.core is installed (no megatron.training), so that
call sequence is reproduced here with megatron.core's own pieces.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from functools import partial

import torch
import torch.nn.functional as F

STYLES = {
    # Llama: RMSNorm, SwiGLU, RoPE, grouped-query attention, untied output, no biases
    "llama": dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", group_query_attention=True,
                  num_query_groups=2, untie_embeddings_and_output_weights=True, add_bias_linear=False,
                  add_qkv_bias=False, rotary_base=10000, openai_gelu=False),
    # GPT-2: LayerNorm, GELU (erf: Megatron-LM's default), learned positions, tied, biases
    "gpt2": dict(normalization="LayerNorm", swiglu=False, position_embedding_type="learned_absolute",
                 group_query_attention=False, num_query_groups=None, untie_embeddings_and_output_weights=False,
                 add_bias_linear=True, add_qkv_bias=True, rotary_base=10000, openai_gelu=False),
}


@contextlib.contextmanager
def cpu_cuda():
    """megatron's distributed optimizer gathers its state with `.cuda()` (it assumes a GPU); on a
    CPU-only torch the test lets that call return the CPU tensor, for this block only."""
    real = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = real


def megatron_args(style: str, hidden=64, ffn=96, heads=4, layers=4, vocab=100, seq=32, tp=1, pp=1, **over):
    """The argparse Namespace Megatron-LM would hold for this model (the fields its GPT builder reads)."""
    from megatron.core.transformer.enums import AttnBackend

    divisible = 16
    padded = -(-vocab // (divisible * tp)) * divisible * tp
    fields = dict(
        num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
        kv_channels=hidden // heads, seq_length=seq, max_position_embeddings=seq, norm_epsilon=1e-5,
        make_vocab_size_divisible_by=divisible, padded_vocab_size=padded, vocab_size=vocab,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, rotary_percent=1.0,
        add_position_embedding=True, apply_residual_connection_post_layernorm=False, qk_layernorm=False,
        num_experts=None, multi_latent_attention=False, mtp_num_layers=None, use_rope_scaling=False,
        apply_layernorm_1p=False, squared_relu=False, init_method_std=0.02, bf16=False, fp16=False,
        params_dtype=torch.float32, attention_backend=AttnBackend.auto, tokenizer_type="NullTokenizer",
        use_distributed_optimizer=True, ckpt_format="torch_dist", lr=1e-3, min_lr=1e-4)
    fields.update(STYLES[style])
    fields.update(over)
    return argparse.Namespace(**fields)


def build_gpt(args, seed: int = 0, parallel_output: bool = True):
    """megatron's GPTModel (local spec) for `args` on this rank's TP/PP piece."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    # (model_parallel_cuda_manual_seed needs CUDA: the tracker gets a CPU generator's state)
    gen = torch.Generator().manual_seed(seed + 7 + ps.get_tensor_model_parallel_rank())
    tensor_parallel.get_cuda_rng_tracker().set_states({"model-parallel-rng": gen.get_state()})
    torch.manual_seed(seed)
    # Megatron-LM: --swiglu, --openai-gelu (the tanh form), else F.gelu (erf)
    act = F.silu if args.swiglu else (partial(F.gelu, approximate="tanh") if args.openai_gelu else F.gelu)
    cfg = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels, normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu, activation_func=act, add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias, hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size, init_method_std=args.init_method_std,
        pipeline_dtype=torch.float32)
    return GPTModel(cfg, get_gpt_layer_local_spec(normalization=args.normalization),
                    vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                    position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                    pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                    parallel_output=parallel_output)


def causal_mask(seq: int) -> torch.Tensor:
    return torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)[None, None]


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """A whole model's (one process, TP = PP = 1) fp32 logits, [batch, seq, padded vocab]."""
    seq = tokens.shape[1]
    pos = torch.arange(seq)[None].expand(tokens.shape[0], -1)
    model.eval()
    with torch.no_grad():
        return model(tokens, pos, causal_mask(seq))


def optimizer_for(model, args, distributed: bool = True):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        use_distributed_optimizer=distributed, grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=0.01,
                                                 use_distributed_optimizer=distributed,
                                                 params_dtype=torch.float32), [ddp])
    return ddp, opt


def train_steps(ddp, opt, args, steps: int = 2, seed: int = 1) -> None:
    """A few AdamW steps on random tokens (one process): moments that are not zero."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tok = torch.randint(0, args.vocab_size, (2, args.seq_length), generator=gen)
        pos = torch.arange(args.seq_length)[None].expand(2, -1)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(tok, pos, causal_mask(args.seq_length), labels=tok).float().mean().backward()
        ddp.finish_grad_sync()
        opt.step()


def save_like_megatron_lm(save: str, model, args, iteration: int, opt=None, sharding: str = "fully_reshardable",
                          release: bool = False, singleton: bool = False) -> str:
    """What Megatron-LM's save_checkpoint writes for torch_dist (see module doc). `singleton`: its
    `singleton_local_shards` content metadata (a key per layer, SwiGLU's halves as keys of their own)."""
    from megatron.core import dist_checkpointing
    import torch.distributed as dist

    name = "release" if release else f"iter_{iteration:07d}"
    path = os.path.join(save, name)
    meta = {"distrib_optim_sharding_type": sharding, "singleton_local_shards": singleton,
            "chained_optim_avoid_prefix": True}
    state = {"args": args, "checkpoint_version": 3.0, "iteration": iteration,
             "num_floating_point_operations_so_far": 0, "model": model.sharded_state_dict(prefix="", metadata=meta)}
    if opt is not None:
        with cpu_cuda():
            state["optimizer"] = opt.sharded_state_dict(state["model"], is_loading=False, metadata=meta)
        state["opt_param_scheduler"] = {"max_lr": args.lr, "lr_warmup_steps": 0, "num_steps": iteration * 2,
                                        "lr_decay_style": "cosine", "lr_decay_steps": 1000, "min_lr": args.min_lr,
                                        "start_wd": 0.01, "end_wd": 0.01, "wd_incr_style": "constant",
                                        "wd_incr_steps": 1000}
    from msg_megatron.patches.writer_queue import install_writer_queue

    install_writer_queue()  # (megatron's writers report through a Manager: the project's, as in its saves)
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, path, content_metadata=meta)
    if dist.get_rank() == 0:
        with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("release" if release else str(iteration))
    dist.barrier()
    return path


def load_like_megatron_lm(save: str, model, opt=None, strict: bool = True) -> dict:
    """What Megatron-LM's load_checkpoint does for torch_dist (model, optimizer and scheduler state
    from the tracker's iteration; the optimizer's sharded state dict built with the checkpoint's own
    content metadata); returns the common state (args, iteration, opt_param_scheduler, ...)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        text = f.read().strip()
    path = os.path.join(save, "release" if text == "release" else f"iter_{int(text):07d}")
    meta = dist_checkpointing.load_content_metadata(path)
    sd = {"model": model.sharded_state_dict(prefix="")}
    if opt is not None:
        inner = opt.chained_optimizers[0] if hasattr(opt, "chained_optimizers") else opt
        if not inner.optimizer.state:
            # (on a GPU, TE's FusedAdam keeps the step in its param groups; torch's AdamW, the CPU
            # fallback, needs its state allocated before megatron's state_dict(): megatron's own
            # helper, whose values the load replaces)
            inner._init_optimizer_states_with_dummy_values()
        with cpu_cuda():
            sd["optimizer"] = opt.sharded_state_dict(sd["model"], is_loading=True, metadata=meta)
    # (every key asked for must be there; the optimizer's keys are left unread by a weights-only load,
    # as with Megatron-LM's --no-load-optim)
    state = dist_checkpointing.load(sd, path, strict=StrictHandling.RAISE_UNEXPECTED if strict else
                                    StrictHandling.ASSUME_OK_UNEXPECTED)
    model.load_state_dict(state["model"], strict=True)
    if opt is not None:
        with cpu_cuda(), _step_kept(inner):
            opt.load_state_dict(state["optimizer"])
    return dist_checkpointing.load_common_state_dict(path)


@contextlib.contextmanager
def _step_kept(inner):
    """megatron 0.16.1's fully-reshardable load copies every entry of a parameter's AdamW state from
    the checkpoint, `step` included, which only TE's FusedAdam (a GPU) keeps out of that state; with
    torch's AdamW (the CPU fallback) `step` is set from the param groups just before: keep it."""
    real = inner._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        group, order = inner.model_param_group_index_map[model_param]
        st = inner.optimizer.state[inner.optimizer.param_groups[group]["params"][order]]
        if "step" in st and "step" not in tensors:
            tensors = dict(tensors, step=st["step"].clone())
        real(model_param, tensors)

    inner._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        del inner._set_main_param_and_optimizer_states


def adam_state(opt, model) -> dict:
    """{param name: (exp_avg, exp_avg_sq)} in the parameter's shape (one process, distributed optimizer)."""
    names = {p: n for n, p in model.named_parameters()}
    out = {}
    inner = opt.chained_optimizers[0] if hasattr(opt, "chained_optimizers") else opt
    for model_param, main in _model_to_main(inner).items():
        st = inner.optimizer.state[main]
        out[names[model_param]] = (st["exp_avg"].view_as(model_param).clone(),
                                   st["exp_avg_sq"].view_as(model_param).clone())
    return out


def _model_to_main(inner) -> dict:
    """model parameter -> the main (fp32 shard) parameter AdamW keys its state by."""
    out = {}
    for model_group, shard_group in zip(inner.model_float16_groups + inner.model_fp32_groups,
                                        inner.shard_float16_groups + inner.shard_fp32_groups):
        for mp, sp in zip(model_group, shard_group):
            out[mp] = sp
    for model_group, main_group in zip(inner.model_float16_groups, inner.shard_fp32_from_float16_groups):
        for mp, sp in zip(model_group, main_group):
            out[mp] = sp
    return out


def save_on_ranks(save: str, style: str, tp: int, pp: int, iteration: int = 7) -> None:
    """(A gloo-pool task, inside initialize_parallel(tp, pp)) megatron's GPTModel at TP x PP, saved by
    every rank as Megatron-LM saves it (weights only: the optimizer formats are tested at TP=1)."""
    args = megatron_args(style, tp=tp, pp=pp)
    save_like_megatron_lm(save, build_gpt(args, seed=3), args, iteration)


def checkpoint_args(save: str):
    """The args in a Megatron-LM save directory's common.pt (as --use-checkpoint-args reads them)."""
    from megatron.core import dist_checkpointing

    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        it = int(f.read().strip())
    return dist_checkpointing.load_common_state_dict(os.path.join(save, f"iter_{it:07d}"))["args"]


def loaded_logits(save: str, tokens: torch.Tensor, optimizer: bool = False):
    """megatron's GPTModel, built from the checkpoint's args at this process's TP (PP = 1), loads
    `save` as Megatron-LM does; its logits gathered over TP (and with `optimizer`, its AdamW
    state by parameter name: one process only)."""
    from megatron.core import parallel_state as ps

    args = checkpoint_args(save)
    args.tensor_model_parallel_size = ps.get_tensor_model_parallel_world_size()
    args.pipeline_model_parallel_size = 1
    model = build_gpt(args, seed=11, parallel_output=False)
    opt = optimizer_for(model, args)[1] if optimizer else None
    load_like_megatron_lm(save, model, opt)
    return logits(model, tokens), (adam_state(opt, model) if optimizer else None), model


def tp_loaded_logits(save: str, tokens: torch.Tensor) -> torch.Tensor:
    """(A gloo-pool task, inside initialize_parallel(tp, 1)) loaded_logits' logits only."""
    return loaded_logits(save, tokens)[0]
