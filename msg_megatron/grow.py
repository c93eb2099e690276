"""msg-grow --load CKPT --shape H,F,A,L --save OUT [--tensor T --pipeline P]: grow a checkpoint offline.

New entries start masked (masks at 0, born at the checkpoint's step), so the grown checkpoint
computes the same function; the AdamW moments grow with it. The checkpoint is read in the target
layout (any saved layout reshards on load), grown there and written in it, so a change of TP/PP
between growth stages is one command. It streams: each process reads one layer of its shards,
grows it and writes it (growth/stream.py), so it holds about one layer's old and new state plus
the embeddings whatever the depth. Run it under torchrun with any multiple of T x P processes:
the extra ones share the layers. Unless --no-verify, prints the validation loss before and after
(each computed layer by layer from the checkpoint) as the function-preservation check.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .checkpoint.dist import CheckpointError, _rng_sharded, read_meta, save_checkpoint
from .checkpoint.run_lock import hold_save_dir
from .checkpoint.verify import verify_checksums
from .cli import run_cli
from .config import Shape, config_from_dict
from .data import DataError, validation_problem
from .data.sources import open_data
from .data.tokenizer import find_tokenizer
from .growth.off_schedule import grown_config
from .growth.operators import check_growth
from .growth.stream import GrowthSource, set_writers, skeleton, stage_groups
from .growth.stream_eval import streamed_validation_loss
from .model import count_parameters
from .model.gpt import padded_vocab_size
from .parallel import device, initialize_parallel, is_logging_rank
from .parallel.agree import differs_from_rank0
from .training.host_memory import local_params, require_host_memory
from .training.sizes import msg_grow_peak


def parse_shape(text: str, flag: str = "--shape"):
    try:
        parts = [int(x) for x in text.replace(" ", "").strip("()[]").split(",")]
    except ValueError:
        parts = []
    if len(parts) != 4 or any(p <= 0 for p in parts):
        raise ValueError(f"{flag} `{text}` must be four positive integers hidden,ffn,heads,layers (e.g. 256,1024,4,4)")
    return Shape(*parts)


def _check_host_memory(cfg, old, new, tp: int, pp: int) -> None:
    """On a CPU: msg-grow holds one old layer and what grows from it, plus the stage's ends
    (training/phase_memory.py, `streamed_growth_peak`); refused before anything is loaded."""
    params = local_params(cfg.model, new, tp, pp)
    peak = msg_grow_peak(cfg.model, old, new, padded_vocab_size(cfg.model), tp, pp)
    require_host_memory(
        f"growing {old} -> {new} at TP={tp}, PP={pp}", params, peak / params,
        "one old layer and the layers grown from it plus the embeddings, streamed (bytes per grown "
        "parameter of this process's stage)", "Grow on more machines (torchrun/srun with --tensor/--pipeline), "
        "or on GPUs.")


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="msg-grow", description=__doc__)
    ap.add_argument("--load", required=True, help="checkpoint step directory or save directory")
    ap.add_argument("--shape", required=True, help="target hidden,ffn,heads,layers")
    ap.add_argument("--save", required=True, help="save directory for the grown checkpoint")
    ap.add_argument("--init", default=None, choices=["normal", "zeros", "copy"], help="default: the config's")
    ap.add_argument("--init-std", type=float, default=None)
    ap.add_argument("--operator", default=None, choices=["msg", "nomask", "net2net"],
                    help="default: the config's growth.operator (msg)")
    ap.add_argument("--depth-init", default=None, choices=["interpolate", "stack", "random"])
    ap.add_argument("--tensor", type=int, default=None, help="target tensor-parallel degree (default: the saved one)")
    ap.add_argument("--pipeline", type=int, default=None, help="target pipeline degree (default: the saved one)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu"],
                    help="where the growth runs: this process's GPU when there is one (auto), or host memory")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the CRC-32 check of the checkpoint's files and the before/after validation loss")
    ap.add_argument("overrides", nargs="*",
                    help="section.field=value over the config the grown checkpoint records: for a --shape off its "
                         "schedule, the schedule to continue on (growth.stages=[...], train.steps=N)")
    ap.add_argument("--overwrite", action="store_true", help="write into a --save directory that is not empty")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    shape = parse_shape(args.shape)

    import torch
    from megatron.core import parallel_state as ps

    meta = read_meta(args.load)
    if os.path.abspath(os.path.dirname(meta["path"])) == os.path.abspath(args.save):
        raise CheckpointError(f"--save `{args.save}` is the source's own save directory; choose a new one so "
                              "the original stays intact")
    if os.path.isdir(args.save) and not args.overwrite and any(
            not e.startswith(".msg-") for e in os.listdir(args.save)):  # (a lock left by a killed run is no content)
        raise CheckpointError(f"--save `{args.save}` exists and is not empty; choose a new directory, or pass "
                              "--overwrite to write the grown checkpoint into it (a step directory of the same "
                              "step is replaced)")
    if os.path.exists(args.save) and not os.path.isdir(args.save):
        raise CheckpointError(f"--save `{args.save}` is a file, not a directory; choose a directory")
    cfg = config_from_dict(meta["config"])
    g = cfg.growth
    tp = args.tensor or cfg.parallel.tensor
    pp = args.pipeline or cfg.parallel.pipeline
    # the layout this checkpoint is written at (a record: checkpoints keep global layer numbers, so
    # any layout resumes them); the saved interleaving degree where it still applies
    v = cfg.parallel.virtual_pipeline
    v = v if pp > 1 and shape.layers % (pp * v) == 0 else 1
    old = Shape(*meta["shape"])
    q = cfg.model.heads_per_group
    for what, s in (("the checkpoint's shape", old), ("--shape", shape)):
        if s.heads % q:
            raise ValueError(f"{what} {s} has {s.heads} heads, not a multiple of the model's {q} query heads per "
                             f"group (model.num_query_groups): heads grow by whole groups")
        if (s.heads // q) % tp or s.ffn % tp or s.layers % pp:
            raise ValueError(f"{what} {s} does not fit --tensor {tp} --pipeline {pp}: query groups ({s.heads // q}) "
                             f"and ffn must divide by the tensor degree and layers by the pipeline degree")
    # the schedule the grown checkpoint continues on: refused here, before any compute, if there is none
    saved_cfg = grown_config(meta["config"], meta["state"]["stage"], meta["state"]["step"], shape, args.overrides,
                             dict(tensor=tp, pipeline=pp, virtual_pipeline=v))
    # the growth settings: the config's, with this command's flags over them
    g = dataclasses.replace(g, init=args.init or g.init, depth_init=args.depth_init or g.depth_init,
                            init_std=g.init_std if args.init_std is None else args.init_std,
                            operator=args.operator or g.operator)
    grow_cfg = dataclasses.replace(cfg, growth=g)
    depth_init = g.depth_init
    check_growth(old, shape, g.init, depth_init, tp, pp)  # (grow_model's own checks, before any compute)
    initialize_parallel(tp, pp, cfg.train.seed)
    # (each rank resolved --load on its own before the process group existed: the same step?)
    mismatch = differs_from_rank0(meta["path"], f"--load `{args.load}` resolves to different checkpoints")
    if mismatch:
        raise CheckpointError(mismatch)
    if not args.no_verify:  # (the ranks share the reading; a damaged source would grow into a damaged checkpoint)
        verify_checksums(meta["path"])
    _check_host_memory(cfg, old, shape, tp, pp)
    lock = hold_save_dir(args.save, "msg-grow", log=lambda m: is_logging_rank() and print(m, file=sys.stderr))
    dev = torch.device("cpu") if args.device == "cpu" else device()
    step, path = meta["state"]["step"], meta["path"]

    valid, unverified = None, "--no-verify" if args.no_verify else None
    mbs, iters = cfg.train.micro_batch_size, cfg.train.eval_iters
    if not args.no_verify:
        try:
            data = open_data(cfg, log=lambda *_: None, train=False)
        except DataError as e:
            unverified = f"no validation data ({e})"
        else:
            valid = data.valid
            unverified = data.no_valid or validation_problem(valid, mbs, iters)
            if unverified:
                valid = None
    before = streamed_validation_loss(path, cfg, old, valid, mbs, iters, dev)

    # one layer at a time: the grown checkpoint's tensors are made as they are written
    groups = stage_groups(old, shape, depth_init)
    stage = meta["state"]["stage"] + 1  # (the new weights: as training into that stage would draw them)
    # (no update_masks: old masks keep the values saved with the checkpoint, those of its last step
    # run, step - 1; new ones are 0; the resumed run sets every mask for its first step itself)
    source = GrowthSource(path, grow_cfg, old, shape, groups, step, stage, dev, ps.get_data_parallel_rank(),
                          ps.get_data_parallel_world_size())
    rng = source.grow_ends()
    new_model, sd = skeleton(cfg, shape, source.read[1], groups)
    sd = set_writers(sd, groups, source.owner)
    sd["rng_state"] = _rng_sharded(rng)  # (every rank writes its own row)
    source.fixed[("rng_state", tuple(sd["rng_state"].global_offset))] = sd["rng_state"].data

    state = dict(meta["state"], stage=meta["state"]["stage"] + 1)
    tok = find_tokenizer(path)
    saved = save_checkpoint(args.save, new_model, None, state, saved_cfg, tok or "",
                            streamed=(sd, source, bool(meta.get("optimizer"))))
    if lock is not None:
        lock.release()
    after = streamed_validation_loss(saved, cfg, shape, valid, mbs, iters, dev)
    out = {"from": list(old.as_tuple()), "to": list(shape.as_tuple()), "step": step, "saved": saved,
           "params": count_parameters(new_model), "val_loss_before": before, "val_loss_after": after}
    if before is not None:
        out["rel_diff"] = abs(after - before) / abs(before)
    out["verified"] = before is not None
    if unverified:
        out["not_verified_because"] = unverified
    out["layout"] = {"tensor": tp, "pipeline": pp}
    if not is_logging_rank():
        return 0
    if unverified:
        print(f"msg-grow: function preservation NOT verified: {unverified}", file=sys.stderr)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"grew {old} -> {shape} at step {step}: {out['params']:,} params, saved {saved}")
        if before is not None:
            print(f"function preservation: val_loss {before:.6f} -> {after:.6f} (rel diff {out['rel_diff']:.2e})")
    return 0


def main(argv=None) -> None:
    sys.exit(run_cli("msg-grow", _main, argv))


if __name__ == "__main__":
    main()
