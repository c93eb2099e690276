"""msg-export-megatron --load CKPT --out DIR [--tensor N --pipeline M] [--no-optimizer]: a checkpoint of
this project as a Megatron-LM torch_dist checkpoint that `pretrain_gpt.py --load DIR` accepts.

DIR gets `iter_XXXXXXX/` (megatron's dist_checkpointing files, `common.pt` with the `args` Megatron-LM
checks, `metadata.json`) and `latest_checkpointed_iteration.txt`. Layers are stacked on a leading
layer axis as megatron-core's TransformerBlock saves them; heads and FFN units are in the canonical
(TP=1) order, which is megatron's; a dist checkpoint loads under any TP/PP, and --tensor/--pipeline
(recorded in `args`) choose the vocabulary padding Megatron-LM will compute: make_vocab_size_divisible_by
is set so that Megatron-LM's padding (a multiple of it x TP) gives exactly this model's embedding rows,
so the softmax runs over the same entries and the function is unchanged.

Optimizer state (unless --no-optimizer): Megatron-LM's fully reshardable distributed-optimizer format
(`optimizer.state.{param,exp_avg,exp_avg_sq}.<key>`, param groups with the step in common.pt,
`--dist-ckpt-optim-fully-reshardable`), loadable under any layout. Megatron keeps one AdamW step per
parameter group: parameters whose moments started at a growth get the group's (largest) step.
Megatron-LM's RNG state is not written (`no_save_rng` in args: it reseeds).

The export streams: one process reads one layer of the checkpoint (weights and moments) while it is
written, whatever the model's size. A checkpoint still inside a growth ramp is refused (naming the
first step it can be exported at). DIR is written as DIR.tmp-* and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Dict, Optional

import torch

from .checkpoint.dist import CheckpointError
from .checkpoint.megatron_args import args_for_export, megatron_padded_vocab
from .checkpoint.megatron_lm import LAYER_KEYS, MOMENT_KEYS, OUTER_KEYS, TRACKER
from .checkpoint.reader import CheckpointReader
from .checkpoint.stream_writer import placeholder, streamed_save
from .checkpoint.verify import verify_checksums
from .cli import run_cli
from .model.gpt import padded_vocab_size
from .model.params import outer_rows
from .permissions import honour_umask
from .training.schedule import lr_schedule

EXTRA_STATE = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
STATES = ("param",) + MOMENT_KEYS  # megatron's names: the fp32 master, then AdamW's moments


def divisible_for(vocab: int, padded: int, tp: int) -> int:
    """The make_vocab_size_divisible_by that makes Megatron-LM pad `vocab` to exactly `padded` at TP `tp`."""
    if padded % tp:
        raise ValueError(f"--tensor {tp} does not divide the model's {padded} embedding rows; Megatron-LM splits "
                         "the vocabulary evenly over TP: choose a --tensor that divides it")
    for d in sorted({d for d in range(1, padded // tp + 1) if (padded // tp) % d == 0}, reverse=True):
        if megatron_padded_vocab(vocab, d, tp) == padded:
            return d
    raise ValueError(f"no make_vocab_size_divisible_by pads {vocab} to {padded} at --tensor {tp}")


class ExportSource:
    """Our checkpoint's tensors, one layer at a time, under megatron's keys (stream_writer asks)."""

    def __init__(self, reader: CheckpointReader, optimizer: bool):
        self.reader, self.optimizer = reader, optimizer
        self.layer: Optional[int] = None
        self.tensors: Dict[tuple, torch.Tensor] = {}
        self.outer = self._outer()

    def _outer(self) -> Dict[tuple, torch.Tensor]:
        names = [r.name for r in outer_rows() if not r.is_buffer and r.name in OUTER_KEYS and self.reader.has(r.name)]
        out = {}
        for name, t in self.reader.load(names).items():
            out[("", OUTER_KEYS[name])] = t
            out[("param", OUTER_KEYS[name])] = t
        if self.optimizer:
            for state in MOMENT_KEYS:
                have = [n for n in names if self.reader.has_state(n, state)]
                out.update(((state, OUTER_KEYS[n]), t) for n, t in self.reader.load(have, state).items())
        return out

    def _load_layer(self, i: int) -> None:
        self.tensors = {}
        weights = self.reader.layer(i)
        for name, t in weights.items():
            if name in LAYER_KEYS:
                self.tensors[("", LAYER_KEYS[name])] = t
                self.tensors[("param", LAYER_KEYS[name])] = t
        if self.optimizer:
            for state in MOMENT_KEYS:
                for name, t in self.reader.layer(i, state).items():
                    if name in LAYER_KEYS:
                        self.tensors[(state, LAYER_KEYS[name])] = t
        self.layer = i

    def __call__(self, key: str, item) -> torch.Tensor:
        state, name = "", key
        if key.startswith("optimizer.state."):
            state, name = key[len("optimizer.state."):].split(".", 1)
        if name.startswith("decoder.layers."):
            i = item.index.offset[0]
            if i != self.layer:
                self._load_layer(i)
            t = self.tensors[(state, name[len("decoder.layers."):])]
            return t.unsqueeze(0)  # (the box of layer i in the stacked tensor)
        return self.outer[(state, name)]

    def order(self, item) -> tuple:
        """Layer by layer (megatron groups the boxes of one key: every layer of one key, then the next),
        so that each layer is read once: the outer tensors first, then layer 0's, ..."""
        key = item.index.fqn
        return (item.index.offset[0], key) if "decoder.layers." in key else (-1, key)

    def finish(self) -> None:
        self.tensors = {}


def state_dict(reader: CheckpointReader, optimizer: bool) -> dict:
    """Placeholders for every tensor Megatron-LM's GPTModel (and its optimizer) saves."""
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    sd = {}
    layers = reader.shape.layers
    outer = [n for n in OUTER_KEYS if reader.has(n)]
    layer0 = {n[len("layers.0."):] for n in reader.names() if n.startswith("layers.0.")}
    inner = [n for n in LAYER_KEYS if n in layer0]
    shapes = {n: reader._md[f"model.{n}"].global_shape for n in outer}
    shapes.update({n: reader._md[f"model.layers.0.{n}"].global_shape for n in inner})
    prefixes = [""] + ([f"optimizer.state.{s}." for s in STATES] if optimizer else [])
    for prefix in prefixes:
        for n in outer:
            t = placeholder(torch.empty(shapes[n], device="meta"))
            sd[prefix + OUTER_KEYS[n]] = ShardedTensor.from_rank_offsets(prefix + OUTER_KEYS[n], t, replica_id=0)
    for i in range(layers):  # layer-major: the source reads each layer once
        for prefix in prefixes:
            for n in inner:
                key = prefix + "decoder.layers." + LAYER_KEYS[n]
                t = placeholder(torch.empty((1,) + tuple(shapes[n]), device="meta"))
                sd[f"{key}@{i}"] = ShardedTensor.from_rank_offsets(key, t, (0, i, layers), replica_id=0)
        # each linear module's `_extra_state` (Transformer Engine's FP8 metadata; None without FP8),
        # which megatron's GPTModel expects in a checkpoint of its layers
        for module in EXTRA_STATE:
            key = f"decoder.layers.{module}._extra_state"
            sd[f"{key}@{i}"] = ShardedObject(key, None, (layers,), (i,), replica_id=0)
    return sd


def param_groups(cfg, step: int, adam_step: int) -> list:
    """Megatron's two default parameter groups (weight decay on / off: biases and norms), as its
    DistributedOptimizer.state_dict() holds them; `load_state_dict` matches them by their identifiers."""
    t = cfg.train
    lr = lr_schedule(cfg)(max(step - 1, 0))
    groups = []
    for wd_mult in (1.0, 0.0):
        groups.append({"is_expert_parallel": False, "default_config": True, "wd_mult": wd_mult, "lr_mult": 1.0,
                       "is_decoupled_lr": False, "max_lr": t.lr, "min_lr": t.min_lr, "lr": lr,
                       "betas": (getattr(t, "adam_beta1", 0.9), getattr(t, "adam_beta2", 0.999)), "eps": t.adam_eps,
                       "weight_decay": t.weight_decay * wd_mult, "amsgrad": False, "maximize": False, "foreach": None,
                       "capturable": False, "differentiable": False, "fused": None, "decoupled_weight_decay": True,
                       "step": float(adam_step)})
    return groups


def scheduler_state(cfg, step: int) -> dict:
    """Megatron's OptimizerParamScheduler.state_dict() for this run's schedule (it counts samples)."""
    t, gbs = cfg.train, cfg.train.global_batch_size
    return {"max_lr": t.lr, "lr_warmup_steps": t.warmup_steps * gbs, "num_steps": step * gbs,
            "lr_decay_style": t.decay_style, "lr_decay_steps": (t.decay_steps or t.steps) * gbs, "min_lr": t.min_lr,
            "start_wd": t.weight_decay, "end_wd": t.weight_decay, "wd_incr_style": "constant",
            "wd_incr_steps": t.steps * gbs}


def export(load: str, out: str, tensor: int = 1, pipeline: int = 1, optimizer: bool = True, force: bool = False,
           verify: bool = True) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("msg-export-megatron runs in one process (it streams one layer at a time); run it "
                         "without torchrun")
    reader = CheckpointReader(load)
    if verify:
        verify_checksums(reader.path)
    mcfg, shape = reader.mcfg, reader.shape
    if mcfg.family != "gpt":
        raise CheckpointError(f"`{reader.path}` is a {mcfg.family} model; msg-export-megatron writes Megatron-LM's "
                              "GPTModel only (BERT: use msg-export-hf)")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        if not force:
            raise ValueError(f"--out `{out}` exists and is not empty; choose a new folder or pass --force to replace "
                             "an earlier export there")
        if not os.path.exists(os.path.join(out, TRACKER)) or os.path.realpath(reader.path).startswith(
                os.path.realpath(out) + os.sep):
            raise ValueError(f"--out `{out}` is not an earlier Megatron-LM export (no {TRACKER}) or holds the "
                             "checkpoint being exported; --force replaces only an earlier export. Choose a new folder")
    for t, what in ((tensor, "--tensor"), (pipeline, "--pipeline")):
        if t < 1:
            raise ValueError(f"{what} must be >= 1 (it is {t})")
    if shape.layers % pipeline:
        raise ValueError(f"--pipeline {pipeline} does not divide the {shape.layers} layers")
    if shape.heads % tensor or mcfg.groups(shape) % tensor or shape.ffn % tensor:
        raise ValueError(f"--tensor {tensor} must divide the heads ({shape.heads}), query groups "
                         f"({mcfg.groups(shape)}) and FFN size ({shape.ffn})")
    reader.refuse_mid_ramp("exporting it to Megatron-LM")
    padded = padded_vocab_size(mcfg)
    divisible = divisible_for(mcfg.vocab_size, padded, tensor)
    has_moments = optimizer and bool(reader.meta.get("optimizer")) and any(
        reader.has_state(n, "exp_avg") for n in reader.names())
    if optimizer and not has_moments:
        raise CheckpointError(f"`{reader.path}` holds no optimizer state (an import or a weights-only checkpoint); "
                              "export the weights with --no-optimizer")
    step = reader.step
    state = reader.meta.get("state", {})
    iteration = max(step, 1)  # Megatron-LM reads iteration 0 as "no checkpoint"
    args = args_for_export(mcfg, shape, padded, divisible, tensor, pipeline, iteration,
                           int(state.get("consumed_samples", 0)), reader.meta["config"].get("train", {}), has_moments)
    sd = state_dict(reader, has_moments)
    source = ExportSource(reader, has_moments)
    adam_step = 0
    if has_moments:  # (one element per parameter: its AdamW step; megatron keeps one per group)
        stepped = [n for n in reader.names() if reader.has_state(n, "step")]
        adam_step = int(max(float(v.max()) for v in reader.load(stepped, "step").values()))
    common = {"args": args, "checkpoint_version": 3.0, "iteration": iteration,
              "num_floating_point_operations_so_far": 0}
    meta = {"distrib_optim_sharding_type": "fully_reshardable", "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}
    if has_moments:
        common["optimizer"] = {"optimizer": {"param_groups": param_groups(reader.cfg, step, adam_step)},
                               "param_state_sharding_type": "fully_reshardable"}
        common["opt_param_scheduler"] = scheduler_state(reader.cfg, step)
    tmp = f"{os.path.normpath(out)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    name = f"iter_{iteration:07d}"
    os.makedirs(os.path.join(tmp, name))
    try:
        with streamed_save(source):
            dist_checkpointing.save(dict(sd, **common), os.path.join(tmp, name),
                                    TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1),
                                    content_metadata=meta)
        with open(os.path.join(tmp, TRACKER), "w") as f:
            f.write(str(iteration))
        honour_umask(tmp)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    flags = megatron_flags(args)
    return {"out": out, "iteration": iteration, "shape": list(shape.as_tuple()), "optimizer": has_moments,
            "padded_vocab_size": padded, "make_vocab_size_divisible_by": divisible, "megatron_flags": flags}


def megatron_flags(args) -> str:
    """The model flags a Megatron-LM run loading the export must be given (its own args must match)."""
    f = [f"--num-layers {args.num_layers}", f"--hidden-size {args.hidden_size}",
         f"--ffn-hidden-size {args.ffn_hidden_size}", f"--num-attention-heads {args.num_attention_heads}",
         f"--kv-channels {args.kv_channels}", f"--seq-length {args.seq_length}",
         f"--max-position-embeddings {args.max_position_embeddings}", f"--normalization {args.normalization}",
         f"--norm-epsilon {args.norm_epsilon}", f"--position-embedding-type {args.position_embedding_type}",
         f"--make-vocab-size-divisible-by {args.make_vocab_size_divisible_by}",
         f"--tensor-model-parallel-size {args.tensor_model_parallel_size}",
         f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}", "--ckpt-format torch_dist",
         "--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable"]
    if args.group_query_attention:
        f.append(f"--group-query-attention --num-query-groups {args.num_query_groups}")
    if args.swiglu:
        f.append("--swiglu")
    if args.openai_gelu:
        f.append("--openai-gelu")
    if args.position_embedding_type == "rope":
        f.append(f"--rotary-base {args.rotary_base}")
    if args.untie_embeddings_and_output_weights:
        f.append("--untie-embeddings-and-output-weights")
    if not args.add_bias_linear:
        f.append("--disable-bias-linear")
    if args.bf16:
        f.append("--bf16")
    return " ".join(f)


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="msg-export-megatron", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="checkpoint step directory or save directory (its `latest`)")
    ap.add_argument("--out", required=True, help="Megatron-LM save directory to write (new or empty)")
    ap.add_argument("--tensor", type=int, default=1, help="TP degree the Megatron-LM run will use (vocab padding)")
    ap.add_argument("--pipeline", type=int, default=1, help="PP degree the Megatron-LM run will use")
    ap.add_argument("--no-optimizer", action="store_true", help="weights only (Megatron-LM then starts AdamW fresh)")
    ap.add_argument("--force", action="store_true", help="replace an earlier export in --out")
    ap.add_argument("--no-verify", action="store_true", help="skip the CRC-32 check of the checkpoint's files")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    res = export(a.load, a.out, a.tensor, a.pipeline, not a.no_optimizer, a.force, not a.no_verify)
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"exported {tuple(res['shape'])} at iteration {res['iteration']} "
          f"({'with' if res['optimizer'] else 'without'} optimizer state) to {res['out']}")
    print(f"continue in Megatron-LM: pretrain_gpt.py --load {res['out']} {res['megatron_flags']}"
          + ("" if res["optimizer"] else " --no-load-optim --no-load-rng"))
    return 0


def main(argv=None) -> None:
    sys.exit(run_cli("msg-export-megatron", _main, argv))


if __name__ == "__main__":
    main()
