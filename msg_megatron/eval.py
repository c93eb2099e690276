"""msg-eval --load CKPT [--text FILE] [--json]: validation loss of a checkpoint, or its loss on a text file."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from .checkpoint.dist import load_checkpoint, read_meta
from .checkpoint.verify import verify_checksums
from .cli import run_cli
from .config import Shape, config_from_dict
from .data import validation_problem
from .data.sources import open_data
from .data.tokenizer import find_tokenizer, load_tokenizer
from .model import build_model
from .parallel import initialize_parallel
from .training.evaluate import validation_loss


def load_model_from_checkpoint(path: str, verify: bool = True):
    """(model, config, meta) built at the checkpoint's shape, masks as saved; `verify`: the files'
    CRC-32s checked first."""
    meta = read_meta(path)
    cfg = config_from_dict(meta["config"])
    initialize_parallel(1, 1, cfg.train.seed)
    if verify:
        verify_checksums(meta["path"])
    model = build_model(cfg.model, Shape(*meta["shape"]), perform_init=False)
    load_checkpoint(meta["path"], model)
    return model, cfg, meta


@torch.no_grad()
def text_loss(model, tokenizer, text: str, seq_length: int) -> float:
    ids = tokenizer.encode(text) + [tokenizer.eod]
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 tokens; nothing to score")
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, seq_length):
        chunk = torch.tensor(ids[start:start + seq_length + 1])[None]
        if chunk.shape[1] < 2:
            break
        losses = model(chunk[:, :-1], chunk[:, 1:])
        total += float(losses.sum())
        count += losses.numel()
    return total / count


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="msg-eval", description=__doc__)
    ap.add_argument("--load", required=True, help="checkpoint step directory or save directory")
    ap.add_argument("--text", help="score this text file instead of the validation split")
    ap.add_argument("--iters", type=int, default=None, help="validation batches (default: train.eval_iters)")
    ap.add_argument("--no-verify", action="store_true", help="skip the CRC-32 check of the checkpoint's files")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        raise ValueError(f"--iters {args.iters}: give at least 1 validation batch (default: train.eval_iters)")

    model, cfg, meta = load_model_from_checkpoint(args.load, verify=not args.no_verify)
    model.eval()
    out = {"checkpoint": meta["path"], "step": meta["state"]["step"], "shape": meta["shape"]}
    if args.text:
        if cfg.model.family == "bert":
            raise ValueError(f"`{meta['path']}` is a BERT (model.family=bert): --text scores next-token prediction, "
                             "which a masked-LM encoder does not do; score its masked-LM validation loss (no --text)")
        if not os.path.exists(args.text):
            raise FileNotFoundError(f"--text file `{args.text}` does not exist")
        found = find_tokenizer(meta["path"])
        if found is None:
            raise ValueError(f"`{meta['path']}` holds no tokenizer (tokenizer.model or tokenizer.json): --text needs "
                             "one; score the validation split instead (no --text)")
        tok = load_tokenizer(found)
        with open(args.text, encoding="utf-8", errors="replace") as f:
            out["loss"] = text_loss(model, tok, f.read(), cfg.model.seq_length)
        out["text"] = args.text
    else:
        data = open_data(cfg, log=lambda *_: None, train=False)
        valid = data.valid
        iters = args.iters or cfg.train.eval_iters
        problem = data.no_valid or validation_problem(valid, cfg.train.micro_batch_size, iters)
        if problem:
            raise ValueError(f"no validation loss for `{meta['path']}`: {problem} (or score a file with --text)")
        out["val_loss"] = validation_loss(model, valid, cfg.train.micro_batch_size, iters)
    key = "loss" if args.text else "val_loss"
    if not math.isfinite(out[key]):  # a score no one can use: an error, never exit 0
        raise ValueError(f"`{meta['path']}` scores {key} = {out[key]}: the model's outputs are not finite (a diverged "
                         "run, or damaged weights: msg-eval without --no-verify checks the files); use another step")
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{meta['path']} (step {out['step']}, shape {tuple(out['shape'])}): {key} = {out[key]:.6f}")
    return 0


def main(argv=None) -> None:
    sys.exit(run_cli("msg-eval", _main, argv))


if __name__ == "__main__":
    main()
