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
from .mlm_data import MLMCorpus, MLMTokenizer
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
    """BERT: masked-LM samples (mlm_data.MLMCorpus) of sentence-level files through the same blends,
    splits and resumption as GPT's (gpt_data.build_samples): `data.paths` prefixes written with
    `msg-preprocess --sentences --output-prefix` and their WordPiece `data.tokenizer`, or a prepared
    directory of sentences (the embedded corpus's, or `msg-preprocess --sentences --output`)."""
    d = cfg.data
    cache = d.cache_dir or default_cache_dir()
    if d.paths:
        tok_path = d.tokenizer
        if not os.path.isfile(tok_path):
            raise DataError(f"data.tokenizer `{tok_path}` does not exist; give the WordPiece tokenizer.json the corpora "
                            "in data.paths were prepared with (msg-preprocess --sentences --tokenizer)")
        tok = MLMTokenizer(tok_path)
        if tok.vocab_size != cfg.model.vocab_size:
            raise DataError(f"data.tokenizer `{tok_path}` has {tok.vocab_size} tokens but model.vocab_size is "
                            f"{cfg.model.vocab_size}; set model.vocab_size={tok.vocab_size}")
        tr, va, why = build_samples(cfg, tok.sep, cache, train=train, mlm=_mlm_corpora(cfg, tok))
    else:
        data_dir, _ = resolve_data_dir_all_ranks(d, cfg.model.vocab_size, log, sentences=True)
        tok_path = os.path.join(data_dir, "tokenizer.json")
        tok = MLMTokenizer(tok_path)
        tr, va, why = build_samples(cfg, tok.sep, cache, [(1.0, os.path.join(data_dir, "train"))],
                                    [(1.0, os.path.join(data_dir, "valid"))], train=train,
                                    mlm=_mlm_corpora(cfg, tok))
    if tr is not None:
        log(f"[data] train: {tr.describe()}")
    return RunData(tok_path, tr, va, why)


def _mlm_corpora(cfg, tok: MLMTokenizer):
    """build_samples' corpus factory for BERT: (prefix, split, fractions, index cache) -> MLMCorpus with
    the config's masking and sentence-order pairs. Passed in so that gpt_data, which mlm_data builds
    on, need not import mlm_data."""
    def make(prefix: str, split: str, fractions, cache):
        d = cfg.data
        return MLMCorpus(prefix, tok, cfg.model.seq_length, cfg.train.seed, cache, fractions=fractions, split=split,
                         masking_probability=d.mask_prob, short_sequence_probability=d.short_seq_prob,
                         whole_word=d.whole_word_masking,
                         pairs=cfg.model.binary_head)  # (half the pairs swapped: the sentence-order labels)
    return make
