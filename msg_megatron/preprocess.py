"""msg-preprocess: tokenize your text for training.

Two outputs:
  --output DIR            a prepared directory (train/valid split by document, the tokenizer, a
                          manifest): `data.corpus=DIR`. A sentencepiece tokenizer is trained on
                          the text unless --tokenizer gives one.
  --output-prefix PREFIX  Megatron-LM's files: PREFIX_text_document.bin/.idx for all inputs
                          (with --per-input, PREFIX_<input name>_text_document per input), the
                          format of Megatron-LM's tools/preprocess_data.py --append-eod, so either
                          tool reads the other's: `data.paths=... data.tokenizer=TOKENIZER`.
                          Needs --tokenizer (a sentencepiece .model or a tokenizer.json).

--sentences: BERT's masked-LM data (model.family=bert): one sequence per sentence, a document
being its run of sentences (Megatron-LM's --split-sentences: prefixes are PREFIX_text_sentence);
--output trains a WordPiece tokenizer with [PAD] [UNK] [CLS] [SEP] [MASK] unless --tokenizer gives
one that has them.

Inputs: text files (one document each) and `.jsonl` files (one JSON object per line, the text in
--json-key), either gzip'd (`.gz`). --workers N tokenizes in N processes; the output is
byte-identical for any N. Progress with tokens/s goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

from .cli import run_cli
from .data.corpus import read_user_documents, split_documents
from .data.mlm_data import MLMTokenizer
from .data.prepare import build_prepared_dir
from .data.tokenize_files import write_indexed
from .data.tokenizer import load_tokenizer


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _warn(msg: str) -> None:
    print(f"msg-preprocess: warning: {msg}", file=sys.stderr)


def _input_name(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".gz", ".jsonl", ".json", ".txt"):
        if name.endswith(ext):
            name = name[:-len(ext)]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "input"


def _prefixes(args) -> dict:
    """{output prefix: [inputs]}: one dataset for all inputs, or one per input."""
    level = "sentence" if args.sentences else "document"  # (Megatron-LM's names)
    if not args.per_input:
        return {f"{args.output_prefix}_text_{level}": list(args.input)}
    out = {}
    for p in args.input:
        prefix = f"{args.output_prefix}_{_input_name(p)}_text_{level}"
        if prefix in out:
            raise ValueError(f"--per-input: `{p}` and `{out[prefix][0]}` both make `{prefix}`; rename one input")
        out[prefix] = [p]
    return out


def _megatron_files(args) -> int:
    if not args.tokenizer:
        raise ValueError("--output-prefix needs --tokenizer: the tokenizer to encode with (a sentencepiece .model or "
                         "a tokenizer.json); it is also what training reads as data.tokenizer")
    vocab = _check_tokenizer(args).vocab_size
    results = {}
    for prefix, inputs in _prefixes(args).items():
        docs = read_user_documents(inputs, args.json_key, args.skip_invalid, warn=_warn)
        res = write_indexed(docs, args.tokenizer, prefix, args.workers, log=_log, log_every=args.log_interval,
                            sentences=args.sentences)
        if not res["documents"]:
            for ext in (".bin", ".idx"):
                os.remove(prefix + ext)
            raise ValueError(f"no documents in {', '.join(inputs)}: nothing to tokenize")
        results[prefix] = res
    print(json.dumps({"prefixes": results, "vocab_size": vocab, "tokenizer": args.tokenizer}))
    blend = ", ".join(f"1, {p}" for p in results) if len(results) > 1 else next(iter(results))
    _log(f"use it with: data.paths=[{blend}] data.tokenizer={args.tokenizer} model.vocab_size={vocab}"
         + (" model.family=bert" if args.sentences else ""))
    return 0


def _check_tokenizer(args):
    """--tokenizer loaded (for --sentences: one with BERT's special tokens), before any input is read."""
    if args.sentences:
        return MLMTokenizer(args.tokenizer)
    return load_tokenizer(args.tokenizer)


def _prepared_dir(args) -> int:
    if args.vocab_size <= 0:
        raise ValueError("--vocab-size must be positive")
    docs = list(read_user_documents(args.input, args.json_key, args.skip_invalid, warn=_warn))
    if not docs:
        raise ValueError("no documents in the input files: nothing to tokenize")
    train, valid = split_documents(docs, args.valid_fraction)
    vocab = args.vocab_size
    if args.tokenizer:
        vocab = _check_tokenizer(args).vocab_size
    manifest = build_prepared_dir(args.output, train, valid, vocab, args.tokenizer,
                                  key={"inputs": args.input, "valid_fraction": args.valid_fraction},
                                  vocab_name="--vocab-size", workers=args.workers,
                                  log=lambda m: _log(m) if args.workers > 1 else None, sentences=args.sentences)
    print(json.dumps({"output": args.output, "vocab_size": vocab, "tokens": manifest["tokens"],
                      "documents": manifest["documents"]}))
    _log(f"use it with: data.corpus={args.output} model.vocab_size={vocab}"
         + (" model.family=bert" if args.sentences else ""))
    return 0


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="msg-preprocess", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="text or .jsonl files, or either gzip'd (.gz)")
    out = ap.add_mutually_exclusive_group(required=True)
    out.add_argument("--output", help="prepared directory to write (data.corpus=DIR)")
    out.add_argument("--output-prefix", help="Megatron-LM files PREFIX_text_document.bin/.idx (data.paths)")
    ap.add_argument("--per-input", action="store_true",
                    help="--output-prefix: one dataset per input, PREFIX_<input name>_text_document")
    ap.add_argument("--sentences", action="store_true",
                    help="BERT's masked-LM data: a sequence per sentence (and a WordPiece tokenizer for --output)")
    ap.add_argument("--vocab-size", type=int, default=4096, help="--output: the tokenizer to train's vocabulary")
    ap.add_argument("--tokenizer", default="", help="an existing tokenizer: a sentencepiece .model or a tokenizer.json")
    ap.add_argument("--valid-fraction", type=float, default=0.02, help="--output: documents held out for validation")
    ap.add_argument("--json-key", default="text")
    ap.add_argument("--workers", type=int, default=1, help="tokenizer processes (the output is identical for any)")
    ap.add_argument("--log-interval", type=float, default=5.0, help="seconds between progress lines")
    ap.add_argument("--skip-invalid", action="store_true",
                    help="skip (and report) JSONL lines / text files that are not valid UTF-8 instead of stopping")
    args = ap.parse_args(argv)
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: give at least 1")
    if args.per_input and not args.output_prefix:
        raise ValueError("--per-input applies to --output-prefix (Megatron-LM files); --output writes one directory")
    return _megatron_files(args) if args.output_prefix else _prepared_dir(args)


def main(argv=None) -> None:
    sys.exit(run_cli("msg-preprocess", _main, argv))


if __name__ == "__main__":
    main()
