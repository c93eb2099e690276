"""msg-eval --load CKPT [--text FILE | --tasks T1,T2 ...] [--json]: a checkpoint's validation loss, its loss and
bits per byte on a text file, or lm-evaluation-harness tasks run on it in this process.

One process, or under torchrun at --tensor / --pipeline (default: the checkpoint's own layout; the
remaining factor of the world is data parallel): every rank loads only its shard, the ranks of a model
replica run the same batches, the replicas split the requests, and rank 0 prints the result. A
checkpoint inside a growth ramp is evaluated with its masks as saved.

--tasks: lm-eval task names or tags (the shipped offline ones: msg_offline = msg_zen, msg_nextline,
msg_complete, msg_prose_bpb, msg_code_bpb; see msg_megatron/tasks), with --include-path for a folder of
your own task YAML files. Needs the `eval` extra (lm-eval 0.4.13).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from typing import Optional

from .checkpoint.dist import CheckpointError, load_checkpoint, read_meta
from .checkpoint.verify import verify_checksums
from .cli import run_cli
from .config import Shape, config_from_dict
from .data import validation_problem
from .data.sources import open_data
from .data.tokenizer import find_tokenizer, load_tokenizer
from .model import build_model
from .parallel import initialize_parallel, is_logging_rank
from .parallel.agree import differs_from_rank0
from .training.evaluate import validation_loss
from .training.harness import run_tasks, task_manager
from .training.scoring import Scorer, masked_lm_accuracy, pseudo_log_likelihood


def load_model_from_checkpoint(path: str, verify: bool = True, tensor: Optional[int] = None,
                               pipeline: Optional[int] = None):
    """(model, config, meta) built at the checkpoint's shape, masks as saved; `verify`: the files'
    CRC-32s checked first. Under torchrun the model is split over `tensor` x `pipeline` ranks (default:
    the checkpoint's layout), the rest of the world data parallel; in one process it is whole."""
    meta = read_meta(path)
    cfg = config_from_dict(meta["config"])
    shape = Shape(*meta["shape"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp, pp = (tensor or cfg.parallel.tensor, pipeline or cfg.parallel.pipeline) if world > 1 else (1, 1)
    if world > 1:
        check_layout(cfg, shape, tp, pp, world, "--tensor", "--pipeline")
    elif (tensor or 1) * (pipeline or 1) > 1:
        raise ValueError(f"--tensor {tensor or 1} --pipeline {pipeline or 1} needs that many ranks: run under "
                         "torchrun --nproc-per-node N (N a multiple of their product), or drop them for one process")
    initialize_parallel(tp, pp, cfg.train.seed)
    if world > 1:  # (each rank resolved --load on its own before the process group existed: the same step?)
        mismatch = differs_from_rank0(meta["path"], f"--load `{path}` resolves to different checkpoints")
        if mismatch:
            raise CheckpointError(mismatch)
    if verify:
        verify_checksums(meta["path"])
    model = build_model(cfg.model, shape, perform_init=False)
    load_checkpoint(meta["path"], model)
    return model, cfg, meta


def check_layout(cfg, shape: Shape, tp: int, pp: int, world: int, tp_flag: str, pp_flag: str) -> None:
    """The model fits `tp` x `pp` ranks of a world of `world` (one line naming the flags otherwise)."""
    q = shape.heads // cfg.model.num_query_groups if cfg.model.num_query_groups else 1
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ValueError(f"{tp_flag} {tp} x {pp_flag} {pp} does not divide the {world} ranks (WORLD_SIZE); give "
                         "degrees whose product divides it (the rest is data parallel)")
    if (shape.heads // q) % tp or shape.ffn % tp or shape.layers % pp:
        raise ValueError(f"the checkpoint's shape {shape} does not split over {tp_flag} {tp} {pp_flag} {pp}: "
                         f"query groups ({shape.heads // q}) and FFN must divide by the tensor degree and layers "
                         "by the pipeline degree")


def text_loss(model, tokenizer, text: str, seq_length: int, vocab_size: int) -> dict:
    """The text as one document after a document boundary (EOD first, as training saw documents start),
    every token scored once in windows of seq_length, the last one after as much context as fits:
    lm-evaluation-harness's disjoint rolling windows, so
    `bits_per_byte` equals its loglikelihood_rolling metric on the same text. {"loss": mean token loss
    (nats), "tokens", "bytes", "bits_per_byte"}."""
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("the text encodes to no tokens; nothing to score")
    seq, pairs = [tokenizer.eod] + ids, []
    for start in range(0, len(ids), seq_length):  # tokens start.. of seq[1:], after as much context as fits
        k = min(seq_length, len(ids) - start)
        window = seq[max(0, start + k - seq_length):start + k + 1]
        pairs.append((window[:-k], window[-k:]))
    scorer = Scorer(model, seq_length, vocab_size, tokenizer.eod, batch_size=8)
    logprob = sum(lp for lp, _ in scorer.loglikelihood(pairs))
    n_bytes = len(text.encode("utf-8"))
    return {"loss": -logprob / len(ids), "tokens": len(ids), "bytes": n_bytes,
            "bits_per_byte": -logprob / (n_bytes * math.log(2))}


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="msg-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="checkpoint step directory or save directory")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--text", help="score this text file instead of the validation split")
    what.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (e.g. msg_offline)")
    ap.add_argument("--include-path", help="a folder of your own lm-eval task YAML files (with --tasks)")
    ap.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    ap.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per request")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward (--tasks, --text)")
    ap.add_argument("--tensor", type=int, default=None, help="tensor-parallel degree under torchrun "
                    "(default: the checkpoint's)")
    ap.add_argument("--pipeline", type=int, default=None, help="pipeline degree under torchrun "
                    "(default: the checkpoint's)")
    ap.add_argument("--iters", type=int, default=None, help="validation batches (default: train.eval_iters)")
    ap.add_argument("--no-verify", action="store_true", help="skip the CRC-32 check of the checkpoint's files")
    ap.add_argument("--output", help="with --tasks: also write the scores and every request's responses (lm-eval's "
                    "samples) to this JSON file")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        raise ValueError(f"--iters {args.iters}: give at least 1 validation batch (default: train.eval_iters)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: give at least 1")
    if not args.tasks and (args.include_path or args.limit is not None or args.num_fewshot is not None
                           or args.output):
        raise ValueError("--include-path, --limit, --num-fewshot and --output go with --tasks")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    if args.tasks is not None and not tasks:
        raise ValueError("--tasks is empty; name lm-eval tasks, e.g. --tasks msg_offline")
    manager = task_manager(tasks, args.include_path) if tasks else None  # (before the model loads)
    if args.text and not os.path.exists(args.text):
        raise FileNotFoundError(f"--text file `{args.text}` does not exist")
    bert = False
    if tasks or args.text:
        meta = read_meta(args.load)
        bert = meta["config"]["model"].get("family") == "bert"
        if bert and tasks:
            raise ValueError(f"`{meta['path']}` is a BERT (model.family=bert), a masked-LM encoder: lm-eval's tasks "
                             "score left-to-right next-token prediction, which it does not do; msg-eval gives it its "
                             "masked-LM loss and accuracy on the validation split (no --tasks) and the "
                             "pseudo-log-likelihood of a text file (--text)")

    model, cfg, meta = load_model_from_checkpoint(args.load, not args.no_verify, args.tensor, args.pipeline)
    model.eval()
    out = {"checkpoint": meta["path"], "step": meta["state"]["step"], "shape": meta["shape"]}
    if tasks or args.text:
        found = find_tokenizer(meta["path"])
        if found is None:
            raise ValueError(f"`{meta['path']}` holds no tokenizer (tokenizer.model or tokenizer.json): "
                             f"{'--tasks' if tasks else '--text'} needs one; score the validation split instead")
        tok = load_tokenizer(found)
        if tok.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"`{found}` has {tok.vocab_size} tokens but the model {cfg.model.vocab_size} "
                             "(model.vocab_size): it is not the tokenizer the model was trained with")
    if tasks:
        results = run_tasks(model, tok, tasks, seq_length=cfg.model.seq_length, vocab_size=tok.vocab_size,
                            batch_size=args.batch_size, include_path=args.include_path, limit=args.limit,
                            num_fewshot=args.num_fewshot, seed=cfg.train.seed, log_samples=bool(args.output),
                            manager=manager)
        out["tasks"] = results["scores"]
        if args.output and is_logging_rank():
            with open(args.output + ".tmp", "w", encoding="utf-8") as f:
                json.dump(dict(out, samples=results["samples"]), f, default=str)
            os.replace(args.output + ".tmp", args.output)
        key = None
    elif args.text:
        with open(args.text, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if bert:
            out.update(pseudo_log_likelihood(model, tok, text, cfg.model.seq_length, args.batch_size))
            key = "pseudo_perplexity"
        else:
            out.update(text_loss(model, tok, text, cfg.model.seq_length, tok.vocab_size))
            key = "loss"
        out["text"] = args.text
    else:
        data = open_data(cfg, log=lambda *_: None, train=False)
        valid = data.valid
        iters = args.iters or cfg.train.eval_iters
        problem = data.no_valid or validation_problem(valid, cfg.train.micro_batch_size, iters)
        if problem:
            raise ValueError(f"no validation loss for `{meta['path']}`: {problem} (or score a file with --text)")
        out["val_loss"] = validation_loss(model, valid, cfg.train.micro_batch_size, iters)
        if cfg.model.family == "bert":  # (the masked positions of the same batches)
            out["mlm_accuracy"] = masked_lm_accuracy(model, valid, cfg.train.micro_batch_size, iters)
        key = "val_loss"
    if key and not math.isfinite(out[key]):  # a score no one can use: an error, never exit 0
        raise ValueError(f"`{meta['path']}` scores {key} = {out[key]}: the model's outputs are not finite (a diverged "
                         "run, or damaged weights: msg-eval without --no-verify checks the files); use another step")
    if not is_logging_rank():
        return 0
    if args.json:
        print(json.dumps(out))
    elif tasks:
        print(f"{meta['path']} (step {out['step']}, shape {tuple(out['shape'])}):")
        for task, row in out["tasks"].items():
            print(f"  {task}: " + ", ".join(f"{k} = {v:.6g}" for k, v in row.items()))
    else:
        extra = (f", bits_per_byte = {out['bits_per_byte']:.6f}" if key == "loss" else
                 f", mlm_accuracy = {out['mlm_accuracy']:.4f}" if out.get("mlm_accuracy") is not None else "")
        print(f"{meta['path']} (step {out['step']}, shape {tuple(out['shape'])}): {key} = {out[key]:.6f}{extra}")
    return 0


def main(argv=None) -> None:
    sys.exit(run_cli("msg-eval", _main, argv))


if __name__ == "__main__":
    main()
