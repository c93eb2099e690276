"""msg-grow --load CKPT --shape H,F,A,L --save OUT [--tensor T --pipeline P]: grow a checkpoint offline.

New entries start masked (masks at 0, born at the checkpoint's step), so the grown checkpoint
computes the same function; the AdamW moments grow with it. The checkpoint is read in the target
layout (any saved layout reshards on load), grown there and written in it, so a change of TP/PP
between growth stages is one command; for large models run it under torchrun with T x P (x DP)
processes, each holding only its shards. Unless --no-verify, prints the validation loss before and
after as the function-preservation check.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .cli import run_cli


def parse_shape(text: str):
    from .config import Shape

    try:
        parts = [int(x) for x in text.replace(" ", "").strip("()[]").split(",")]
    except ValueError:
        parts = []
    if len(parts) != 4 or any(p <= 0 for p in parts):
        raise ValueError(f"--shape `{text}` must be four positive integers hidden,ffn,heads,layers (e.g. 256,1024,4,4)")
    return Shape(*parts)


def _check_host_memory(cfg, old, new, tp: int, pp: int) -> None:
    """On a CPU: the checkpoint's model and optimizer and the grown ones meet during the growth
    (training/phase_memory.py, `grow`); refused before anything is loaded."""
    from megatron.core import parallel_state as ps

    from .training.host_memory import largest_local_tensor, local_params, require_host_memory
    from .training.phase_memory import phase_peaks

    dp, t = ps.get_data_parallel_world_size(), cfg.train
    params = local_params(cfg.model, new, tp, pp)
    peak = phase_peaks(t.precision, dp, bool(cfg.parallel.distributed_optimizer), params,
                       largest_local_tensor(cfg.model, new, tp), local_params(cfg.model, old, tp, pp))["grow"]
    require_host_memory(
        f"growing {old} -> {new} at TP={tp}, PP={pp}, DP={dp}", params, peak / params,
        f"the old model and AdamW state while the grown ones are built (train.precision={t.precision}; bytes per "
        "grown parameter)", "Grow on more machines (torchrun/srun with --tensor/--pipeline), or on GPUs.")


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
    ap.add_argument("--no-verify", action="store_true", help="skip the before/after validation loss")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    shape = parse_shape(args.shape)

    from .checkpoint.dist import CheckpointError, load_checkpoint, read_meta, save_checkpoint
    from .config import Shape, config_from_dict
    from .data import TokenWindows, resolve_data_dir_all_ranks
    from .growth.axes import GrowthPlan
    from .growth.operators import grow_model, growth_seed
    from .growth.optimizer_state import grow_optimizer
    from .model import build_model, count_parameters
    from .parallel import initialize_parallel, is_logging_rank
    from .training.evaluate import validation_loss
    from .training.optimizer import build_optimizer

    meta = read_meta(args.load)
    if os.path.abspath(os.path.dirname(meta["path"])) == os.path.abspath(args.save):
        raise CheckpointError(f"--save `{args.save}` is the source's own save directory; choose a new one so "
                              "the original stays intact")
    cfg = config_from_dict(meta["config"])
    g = cfg.growth
    tp = args.tensor or cfg.parallel.tensor
    pp = args.pipeline or cfg.parallel.pipeline
    old = Shape(*meta["shape"])
    for what, s in (("the checkpoint's shape", old), ("--shape", shape)):
        if s.heads % tp or s.ffn % tp or s.layers % pp:
            raise ValueError(f"{what} {s} does not fit --tensor {tp} --pipeline {pp}: heads and ffn must divide by "
                             f"the tensor degree and layers by the pipeline degree")
    depth_init = args.depth_init or g.depth_init
    if pp > 1 and shape.layers != old.layers and depth_init != "interpolate":
        raise ValueError(f"--depth-init {depth_init} with --pipeline {pp} would move layers between stages; "
                         "use interpolate")
    initialize_parallel(tp, pp, cfg.train.seed)
    old_shape = Shape(*meta["shape"])
    _check_host_memory(cfg, old_shape, shape, tp, pp)
    model = build_model(cfg.model, old_shape, perform_init=False)
    optimizer = build_optimizer(model, cfg.train, cfg.parallel)
    load_checkpoint(meta["path"], model, optimizer)
    step = meta["state"]["step"]

    valid = None
    if not args.no_verify:
        data_dir, _ = resolve_data_dir_all_ranks(cfg.data, cfg.model.vocab_size, log=lambda *_: None)
        valid = TokenWindows(os.path.join(data_dir, "valid"), cfg.model.seq_length, cfg.train.seed)
    before = validation_loss(model, valid, cfg.train.micro_batch_size, cfg.train.eval_iters)

    optimizer.release_for_growth()  # the old gradient buffers are not needed for growth
    plan = GrowthPlan(model, shape)
    new_model, name_map = grow_model(
        model, shape, step=step, plan=plan, init=args.init or g.init,
        init_std=g.init_std if args.init_std is None else args.init_std,
        depth_init=depth_init, operator=args.operator or g.operator,
        seed=growth_seed(cfg.train.seed, meta["state"]["stage"] + 1))  # as training into that stage would
    new_opt = grow_optimizer(optimizer, model, new_model, name_map, plan, cfg.train, cfg.parallel)
    # no update_masks here: the old masks keep the values saved with the checkpoint (those of its last
    # step run, step - 1), new ones are 0; the resumed run sets every mask for its first step itself
    after = validation_loss(new_model, valid, cfg.train.micro_batch_size, cfg.train.eval_iters)

    state = dict(meta["state"], stage=meta["state"]["stage"] + 1)
    tok = os.path.join(meta["path"], "tokenizer.model")
    saved_cfg = dict(meta["config"], parallel=dict(meta["config"]["parallel"], tensor=tp, pipeline=pp))
    path = save_checkpoint(args.save, new_model, new_opt, state, saved_cfg, tok if os.path.exists(tok) else "",
                           writers=cfg.checkpoint.writers)
    out = {"from": list(old_shape.as_tuple()), "to": list(shape.as_tuple()), "step": step, "saved": path,
           "params": count_parameters(new_model), "val_loss_before": before, "val_loss_after": after}
    if before is not None:
        out["rel_diff"] = abs(after - before) / abs(before)
    out["layout"] = {"tensor": tp, "pipeline": pp}
    if not is_logging_rank():
        return 0
    if args.json:
        print(json.dumps(out))
    else:
        print(f"grew {old_shape} -> {shape} at step {step}: {out['params']:,} params, saved {path}")
        if before is not None:
            print(f"function preservation: val_loss {before:.6f} -> {after:.6f} (rel diff {out['rel_diff']:.2e})")
    return 0


def main(argv=None) -> None:
    sys.exit(run_cli("msg-grow", _main, argv))


if __name__ == "__main__":
    main()
