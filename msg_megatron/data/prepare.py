"""Prepared data directories: a tokenizer + megatron indexed datasets + a manifest.

Layout of a prepared directory (the embedded corpus's cache, or msg-preprocess output):
    tokenizer.model        the sentencepiece model (or tokenizer.json [+ tokenizer_config.json]: a
                           Hugging Face tokenizer given with --tokenizer / data.tokenizer_model)
    train.bin / train.idx  megatron-core IndexedDataset, one document (tokens + EOD) per entry
    valid.bin / valid.idx  held-out documents
    (BERT, masked-LM data: a WordPiece tokenizer.json + tokenizer_config.json, and one sequence per
    sentence, a document per run of sentences: manifest "sentences": true)
    manifest.json          what was built, file sizes; a directory without a matching manifest is
                           incomplete or corrupt and is rebuilt (cache) or reported (user data)
Directories are written under a temporary name and renamed when complete, so a crash never leaves
a half-built directory that looks finished.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import List, Optional, Tuple

from .. import __version__
from ..parallel import barrier, is_logging_rank
from ..permissions import honour_umask
from .corpus import Doc, embedded_documents, select_documents, split_documents
from .errors import DataError
from .mlm_data import train_wordpiece
from .tokenize_files import write_indexed
from .tokenizer import Tokenizer, copy_tokenizer, load_tokenizer, train_tokenizer


def default_cache_dir() -> str:
    return os.environ.get("MSG_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "msg-megatron")


def build_prepared_dir(out_dir: str, train_docs: List[Doc], valid_docs: List[Doc], vocab_size: int,
                       tokenizer_model: str = "", key: Optional[dict] = None, vocab_name: str = "model.vocab_size",
                       workers: int = 1, log=None, sentences: bool = False) -> dict:
    """Tokenize (in `workers` processes: tokenize_files.write_indexed) and write a prepared directory
    atomically; returns the manifest. `sentences`: BERT's masked-LM data (a WordPiece tokenizer is
    trained unless one is given; a sequence per sentence)."""
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        if tokenizer_model:
            tok_path = copy_tokenizer(tokenizer_model, tmp)
        elif sentences:
            tok_path = train_wordpiece((t for _, t in train_docs), tmp, vocab_size)
        else:
            tok_path = os.path.join(tmp, Tokenizer.file_name)
            train_tokenizer((t for _, t in train_docs), tok_path, vocab_size, vocab_name=vocab_name)
        tok = load_tokenizer(tok_path)
        if tok.vocab_size != vocab_size:
            raise DataError(f"tokenizer `{tokenizer_model or tok_path}` has {tok.vocab_size} pieces but "
                            f"model.vocab_size is {vocab_size}; set model.vocab_size={tok.vocab_size}")
        counts = {split: write_indexed(docs, tok_path, os.path.join(tmp, split), workers, log,
                                       sentences=sentences)["tokens"]
                  for split, docs in (("train", train_docs), ("valid", valid_docs))}
        if counts["train"] == 0:
            raise DataError("no training tokens: the input documents are empty")
        manifest = {"version": __version__, "key": key or {}, "vocab_size": vocab_size, "tokens": counts,
                    "sentences": sentences,
                    "documents": {"train": len(train_docs), "valid": len(valid_docs)},
                    "sizes": {f: os.path.getsize(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        honour_umask(tmp)  # (mkdtemp makes it 0700: a shared cluster group could not read it)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
        return manifest
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def check_prepared_dir(path: str) -> dict:
    """Return the manifest of a complete prepared directory, else raise DataError naming the problem."""
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        raise DataError(f"data directory `{path}` does not exist; build it with msg-preprocess "
                        "or set data.corpus=embedded")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        raise DataError(f"`{mpath}` is missing or unreadable: `{path}` is incomplete; rebuild it with "
                        "msg-preprocess") from None
    for name, size in manifest.get("sizes", {}).items():
        fp = os.path.join(path, name)
        if not os.path.exists(fp):
            raise DataError(f"`{fp}` is missing; rebuild `{path}` with msg-preprocess")
        if os.path.getsize(fp) != size:
            raise DataError(f"`{fp}` has {os.path.getsize(fp)} bytes, the manifest says {size}: the file is "
                            f"truncated or modified; rebuild `{path}`")
    return manifest


def prepare_embedded(cache_dir: str, corpus_mb: float, vocab_size: int, valid_fraction: float,
                     tokenizer_model: str = "", log=print, sentences: bool = False) -> str:
    """The cached prepared directory of the embedded corpus, built (or rebuilt) when needed
    (`sentences`: BERT's, a directory of its own)."""
    key = {"corpus": "embedded", "corpus_mb": corpus_mb, "vocab_size": vocab_size,
           "valid_fraction": valid_fraction, "tokenizer": _file_digest(tokenizer_model)}
    if sentences:  # (GPT's key unchanged: existing caches stay valid)
        key["sentences"] = True
        key["wordpiece"] = 2  # (2: the vocabulary the same in every build; caches of 1 differed: rebuilt)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    out = os.path.join(cache_dir or default_cache_dir(), f"embedded-{digest}")
    if os.path.exists(out):
        try:
            check_prepared_dir(out)
            return out
        except DataError as e:
            log(f"[data] cached corpus is unusable ({e}); rebuilding {out}")
    log(f"[data] building the embedded corpus ({corpus_mb} MB, vocab {vocab_size}) into {out}")
    docs = select_documents(embedded_documents(), int(corpus_mb * 1e6))
    train, valid = split_documents(docs, valid_fraction)
    manifest = build_prepared_dir(out, train, valid, vocab_size, tokenizer_model, key, sentences=sentences)
    log(f"[data] {manifest['tokens']['train']} train / {manifest['tokens']['valid']} valid tokens")
    return out


def _file_digest(path: str) -> str:
    if not path:
        return ""
    if not os.path.exists(path):
        raise DataError(f"data.tokenizer_model `{path}` does not exist")
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def resolve_data_dir_all_ranks(dcfg, vocab_size: int, log=print, sentences: bool = False) -> Tuple[str, dict]:
    """resolve_data_dir under torch.distributed: global rank 0 prepares (or validates) the data
    first and logs; the other ranks wait for it, then find the prepared directory ready."""
    if is_logging_rank():
        out = resolve_data_dir(dcfg, vocab_size, log=log, sentences=sentences)
    barrier()
    if not is_logging_rank():
        out = resolve_data_dir(dcfg, vocab_size, log=lambda *_: None, sentences=sentences)
    return out


def resolve_data_dir(dcfg, vocab_size: int, log=print, sentences: bool = False) -> Tuple[str, dict]:
    """(prepared directory, manifest) for a DataConfig; checks the vocabulary matches the model and
    that the directory holds the kind of sequences the model trains on (`sentences`: BERT's)."""
    if dcfg.corpus == "embedded":
        path = prepare_embedded(dcfg.cache_dir, dcfg.corpus_mb, vocab_size, dcfg.valid_fraction,
                                dcfg.tokenizer_model, log, sentences=sentences)
    else:
        path = dcfg.corpus
    manifest = check_prepared_dir(path)
    if bool(manifest.get("sentences")) != sentences:
        have, want = (("sentences (BERT's masked-LM data)", "documents (GPT)") if manifest.get("sentences")
                      else ("documents (GPT)", "sentences (BERT's masked-LM data)"))
        raise DataError(f"data `{path}` holds {have}, but model.family={'bert' if sentences else 'gpt'} trains on "
                        f"{want}; prepare the corpus for this model family")
    if manifest["vocab_size"] != vocab_size:
        raise DataError(f"data `{path}` was tokenized with a vocabulary of {manifest['vocab_size']} but "
                        f"model.vocab_size is {vocab_size}; set model.vocab_size={manifest['vocab_size']}")
    return path, manifest
