"""msg-import-megatron --load DIR [--iteration N] --save OUT [--tensor T --pipeline P]: a Megatron-LM GPT
checkpoint (torch_dist) as a checkpoint of this project, ready to grow (msg-grow) or to train here.

The model section comes from common.pt's `args` (checkpoint/megatron_args.py; what this project's
model cannot express is refused by name before anything is written). Every rank builds only its
shard of the target layout (one process: the whole model; under torchrun with T x P x D processes:
its TP/PP piece) and fills it one layer at a time from the Megatron-LM checkpoint, whatever layout
wrote it: a process holds its shard plus one layer of the source (weights and moments).

With optimizer state in a model-space format (`--dist-ckpt-optim-fully-reshardable`, or Megatron-LM's
plain optimizer) the AdamW moments, the fp32 masters and the step come along, and the checkpoint is
at Megatron-LM's iteration with its learning-rate schedule (train section from `args`), so training
or growing here continues the run. Without (`--no-optimizer`, or a checkpoint without optimizer
state) it is a step-0 checkpoint like msg-import-hf's, for `checkpoint.init_from` or msg-grow.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .checkpoint.dist import CheckpointError, save_checkpoint
from .checkpoint.megatron_lm import MegatronCheckpoint, fill_model
from .checkpoint.run_lock import hold_save_dir
from .cli import run_cli
from .config import config_from_dict
from .config.loading import apply_overrides
from .data.tokenizer import load_tokenizer
from .growth.optimizer_state import PieceState
from .model import build_model, count_parameters
from .model.gpt import padded_vocab_size
from .parallel import initialize_parallel, is_logging_rank
from .training.host_memory import local_params, require_host_memory

REFUSED_OPTIMIZER = (
    "its optimizer state is in Megatron-LM's `{fmt}` format (flat buffers of the layout that wrote it), which "
    "this importer does not read. Re-save it from Megatron-LM with --dist-ckpt-optim-fully-reshardable (load it "
    "and save once more), or import the weights only with --no-optimizer")


def train_section(ck: MegatronCheckpoint) -> dict:
    """The train section that continues Megatron-LM's run: its learning-rate schedule, batch and AdamW
    settings (Megatron-LM counts its scheduler in samples; here steps are iterations)."""
    a, sched = ck.args, ck.common.get("opt_param_scheduler") or {}
    gbs = int(getattr(a, "global_batch_size", None) or 8)
    mbs = int(getattr(a, "micro_batch_size", None) or gbs)
    out = {"global_batch_size": gbs, "micro_batch_size": mbs}
    for ours, theirs in (("lr", "lr"), ("min_lr", "min_lr"), ("weight_decay", "weight_decay"),
                         ("adam_beta1", "adam_beta1"), ("adam_beta2", "adam_beta2"), ("adam_eps", "adam_eps"),
                         ("clip_grad", "clip_grad"), ("seed", "seed")):
        v = getattr(a, theirs, None)
        if v is not None:
            out[ours] = v
    style = sched.get("lr_decay_style") or getattr(a, "lr_decay_style", None)
    if style in ("cosine", "linear", "constant"):
        out["decay_style"] = style
    warm = sched.get("lr_warmup_steps")
    out["warmup_steps"] = (int(warm) // gbs if warm is not None else int(getattr(a, "lr_warmup_iters", 0) or 0))
    decay = sched.get("lr_decay_steps")
    decay = int(decay) // gbs if decay else getattr(a, "lr_decay_iters", None) or getattr(a, "train_iters", None)
    steps = getattr(a, "train_iters", None) or decay
    if steps:
        out["steps"] = max(int(steps), ck.iteration + 1)
    if decay:
        out["decay_steps"] = int(decay)
    if getattr(a, "bf16", False):
        out["precision"] = "bf16"
    return out


def import_megatron(load: str, save: str, iteration=None, tensor: int = 1, pipeline: int = 1,
                    optimizer: bool = True, tokenizer: str = "", overrides=()) -> dict:
    model_over = [o for o in overrides if o.split("=", 1)[0].startswith(("model.", "growth.stages", "parallel."))]
    if model_over:
        raise ValueError(f"`{model_over[0]}`: the model, its first stage and the layout come from the checkpoint "
                         "(and --tensor/--pipeline); overrides set the other sections (data, train, growth, ...)")
    if tokenizer and not os.path.exists(tokenizer):
        raise FileNotFoundError(f"--tokenizer `{tokenizer}` does not exist")
    tok_vocab = load_tokenizer(tokenizer).vocab_size if tokenizer else None
    ck = MegatronCheckpoint(load, iteration, tok_vocab)
    ck.check_layers()
    fmt = ck.optimizer_format()
    if optimizer and fmt not in (None, "model_space"):
        raise CheckpointError(f"`{ck.path}`: " + REFUSED_OPTIMIZER.format(fmt=fmt))
    with_state = optimizer and fmt == "model_space" and not ck.release
    if os.path.exists(save) and any(not e.startswith(".msg-") for e in os.listdir(save)):
        raise ValueError(f"--save `{save}` exists and is not empty; choose a new folder so nothing is overwritten")
    shape = ck.shape
    train = train_section(ck) if with_state else {}
    cfg = config_from_dict(apply_overrides(
        {"model": vars(ck.mcfg), "parallel": {"tensor": tensor, "pipeline": pipeline}, "train": train,
         "growth": {"stages": [{"step": 0, "shape": list(shape.as_tuple())}]}}, list(overrides)))
    sharded = int(os.environ.get("WORLD_SIZE", "1")) > 1
    tp, pp = (tensor, pipeline) if sharded else (1, 1)
    initialize_parallel(tp, pp, cfg.train.seed)
    require_host_memory(f"importing `{ck.path}` ({shape})", local_params(cfg.model, shape, tp, pp),
                        12 if with_state else 4, "the fp32 weights" + (" and AdamW moments" if with_state else ""),
                        "import under torchrun with --tensor/--pipeline over several machines (each rank then "
                        "holds only its shards)" + (", or --no-optimizer" if with_state else ""))
    lock = hold_save_dir(save, "msg-import-megatron")
    model = build_model(cfg.model, shape, perform_init=False)
    state = PieceState() if with_state else None
    fill_model(model, ck, state)
    step = ck.iteration if with_state else 0
    consumed = int(getattr(ck.args, "consumed_train_samples", 0) or 0) if with_state else 0
    meta_state = {"step": step, "stage": 0, "consumed_samples": consumed,
                  "imported_from": os.path.abspath(ck.path), "megatron_iteration": ck.iteration}
    path = save_checkpoint(save, model, state, meta_state, cfg.to_dict(), tokenizer)
    if lock is not None:
        lock.release()
    return {"saved": path, "shape": list(shape.as_tuple()), "params": count_parameters(model),
            "iteration": ck.iteration, "step": step, "optimizer": bool(with_state),
            "optimizer_format": fmt or "none", "vocab_size": cfg.model.vocab_size,
            "vocab_padded": padded_vocab_size(cfg.model), "layout": {"tensor": tensor, "pipeline": pipeline}}


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="msg-import-megatron", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True,
                    help="Megatron-LM save directory (its tracker file) or an iter_* directory")
    ap.add_argument("--iteration", type=int, default=None, help="this iteration instead of the tracker's")
    ap.add_argument("--save", required=True, help="save directory for the checkpoint (must be new or empty)")
    ap.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree the checkpoint is for")
    ap.add_argument("--pipeline", type=int, default=1, help="pipeline degree the checkpoint is for")
    ap.add_argument("--no-optimizer", action="store_true", help="weights only (a step-0 checkpoint)")
    ap.add_argument("--tokenizer", default="", help="tokenizer.json or sentencepiece model the run used "
                    "(checked against the vocabulary; stored with the checkpoint)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*", help="section.field=value for the sections the checkpoint does not "
                    "set (data.paths=..., train.steps=..., growth.ramp_steps=...)")
    args = ap.parse_args(argv)
    res = import_megatron(args.load, args.save, args.iteration, args.tensor, args.pipeline, not args.no_optimizer,
                          args.tokenizer, args.overrides)
    if not is_logging_rank():
        return 0
    if args.json:
        print(json.dumps(res))
        return 0
    what = (f"with AdamW state at step {res['step']}" if res["optimizer"] else
            f"weights only (optimizer state: {res['optimizer_format']})")
    print(f"imported Megatron-LM iteration {res['iteration']} {tuple(res['shape'])}, {res['params']:,} params, "
          f"{what} -> {res['saved']}")
    print(f"grow it: msg-grow --load {res['saved']} --shape H,F,A,L --save NEW_DIR; or start a growth run from "
          f"it: msg-pretrain CONFIG checkpoint.init_from={res['saved']}")
    return 0


def main(argv=None) -> None:
    sys.exit(run_cli("msg-import-megatron", _main, argv))


if __name__ == "__main__":
    main()
