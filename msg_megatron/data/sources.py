"""A run's data, whatever its source: synthetic tokens, a prepared directory (the embedded corpus or
msg-preprocess output) or Megatron-LM prefixes in `data.paths`; the last two through megatron's
datasets (gpt_data.py). One place for the trainer, msg-grow's verification and msg-eval."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .errors import DataError
from .gpt_data import build_samples
from .loader import SyntheticWindows
from .mlm_data import MLMCorpus, MLMSamples, MLMTokenizer
from .prepare import default_cache_dir, resolve_data_dir_all_ranks
from .tokenizer import find_tokenizer, load_tokenizer


@dataclass
class RunData:
    tokenizer_path: str  # what checkpoints carry for exports and msg-eval ("" for synthetic data)
    train: object  # None when only validation was asked for
    valid: object  # None when there is no usable validation split
    no_valid: Optional[str]  # why there is none


def open_data(cfg, log=print, train: bool = True) -> RunData:
    """The run's training (unless not `train`) and validation samples, the files checked first
    (every rank calls it: megatron's indices are built by rank 0 and mapped by all)."""
    d, seq, seed = cfg.data, cfg.model.seq_length, cfg.train.seed
    if cfg.model.family == "bert":
        return _masked_lm_data(cfg, log, train)
    if d.corpus == "synthetic" and not d.paths:
        return RunData("", SyntheticWindows(cfg.model.vocab_size, seq, seed) if train else None,
                       SyntheticWindows(cfg.model.vocab_size, seq, seed), None)
    cache = d.cache_dir or default_cache_dir()
    if d.paths:
        if not os.path.isfile(d.tokenizer):
            raise DataError(f"data.tokenizer `{d.tokenizer}` does not exist; give the tokenizer the corpora in "
                            "data.paths were prepared with (a sentencepiece .model or a tokenizer.json)")
        tok = load_tokenizer(d.tokenizer)
        if tok.vocab_size != cfg.model.vocab_size:
            raise DataError(f"data.tokenizer `{d.tokenizer}` has {tok.vocab_size} tokens but model.vocab_size is "
                            f"{cfg.model.vocab_size}; set model.vocab_size={tok.vocab_size}")
        tr, va, why = build_samples(cfg, tok.eod, cache, train=train)
        if tr is not None:
            log(f"[data] train: {tr.describe()}")
        return RunData(d.tokenizer, tr, va, why)
    data_dir, _ = resolve_data_dir_all_ranks(d, cfg.model.vocab_size, log)
    tok_path = find_tokenizer(data_dir)
    if tok_path is None:
        raise DataError(f"`{data_dir}` holds no tokenizer (tokenizer.model or tokenizer.json); rebuild it with "
                        "msg-preprocess")
    tr, va, why = build_samples(cfg, load_tokenizer(tok_path).eod, cache, [(1.0, os.path.join(data_dir, "train"))],
                                [(1.0, os.path.join(data_dir, "valid"))], train=train)
    return RunData(tok_path, tr, va, why)


def _masked_lm_data(cfg, log, train: bool) -> RunData:
    """BERT: masked-LM samples (mlm_data.py) of a prepared directory of sentences (the embedded
    corpus's, or msg-preprocess output): train from its train split, validation from its valid split."""
    d = cfg.data
    if d.corpus == "synthetic" or d.paths:
        what = "data.corpus=synthetic" if d.corpus == "synthetic" else "data.paths"
        raise DataError(f"model.family=bert trains on sentence pairs from a prepared corpus of sentences; {what} "
                        "is GPT's; use data.corpus=embedded (or a directory msg-preprocess wrote for BERT)")
    data_dir, _ = resolve_data_dir_all_ranks(d, cfg.model.vocab_size, log, sentences=True)
    tok_path = os.path.join(data_dir, "tokenizer.json")
    tok = MLMTokenizer(tok_path)
    cache = os.path.join(d.cache_dir or default_cache_dir(), "mlm-index")
    kw = dict(seq_length=cfg.model.seq_length, seed=cfg.train.seed, cache_dir=cache)
    tr = None
    if train:
        corpus = MLMCorpus(os.path.join(data_dir, "train"), tok, split="train", **kw)
        tr = MLMSamples(corpus, 1 << 62)  # (epochs without end: sample k depends on k only)
        log(f"[data] train: {tr.describe()}")
    va, why = None, None
    try:
        valid = MLMCorpus(os.path.join(data_dir, "valid"), tok, split="valid", **kw)
        va = MLMSamples(valid, valid.n)
    except DataError as e:
        why = f"the validation split gives no masked-LM samples ({e})"
    return RunData(tok_path, tr, va, why)
