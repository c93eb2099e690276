"""msg-preprocess --input FILE [FILE ...] --output DIR: tokenize your text into a prepared directory.

Text files are one document each; `.jsonl` files hold one JSON object per line with the text in
--json-key. A sentencepiece tokenizer (lossless settings) is trained unless --tokenizer is given.
Point a config at the result with `data.corpus=DIR`.
"""
from __future__ import annotations

import argparse
import json
import sys

from .cli import run_cli
from .data.corpus import read_user_documents, split_documents
from .data.prepare import build_prepared_dir
from .data.tokenizer import load_tokenizer


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="msg-preprocess", description=__doc__)
    ap.add_argument("--input", nargs="+", required=True, help="text or .jsonl files")
    ap.add_argument("--output", required=True, help="prepared directory to write")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--tokenizer", default="", help="existing sentencepiece .model to use")
    ap.add_argument("--valid-fraction", type=float, default=0.02)
    ap.add_argument("--json-key", default="text")
    ap.add_argument("--skip-invalid", action="store_true",
                    help="skip (and report) JSONL lines / text files that are not valid UTF-8 instead of stopping")
    args = ap.parse_args(argv)
    if args.vocab_size <= 0:
        raise ValueError("--vocab-size must be positive")

    docs = list(read_user_documents(args.input, args.json_key, args.skip_invalid,
                                    warn=lambda m: print(f"msg-preprocess: warning: {m}", file=sys.stderr)))
    if not docs:
        raise ValueError("no documents in the input files: nothing to tokenize")
    train, valid = split_documents(docs, args.valid_fraction)
    vocab = args.vocab_size
    if args.tokenizer:
        vocab = load_tokenizer(args.tokenizer).vocab_size
    manifest = build_prepared_dir(args.output, train, valid, vocab, args.tokenizer,
                                  key={"inputs": args.input, "valid_fraction": args.valid_fraction},
                                  vocab_name="--vocab-size")
    print(json.dumps({"output": args.output, "vocab_size": vocab, "tokens": manifest["tokens"],
                      "documents": manifest["documents"]}))
    print(f"use it with: data.corpus={args.output} model.vocab_size={vocab}", file=sys.stderr)
    return 0


def main(argv=None) -> None:
    sys.exit(run_cli("msg-preprocess", _main, argv))


if __name__ == "__main__":
    main()
