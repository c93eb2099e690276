"""Masked-language-model samples for BERT through megatron-core's BERTMaskedWordPieceDataset.

- **Text -> sentences -> tokens**: documents are split into sentences (`split_sentences`: one per
  line of code, prose at sentence ends) and written as megatron IndexedDataset files in which a
  sequence is a sentence and a document a run of them (tokenize_files.write_indexed with
  `sentences`: what Megatron-LM's `preprocess_data.py --split-sentences` writes), with a WordPiece tokenizer (`train_wordpiece`:
  `[PAD] [UNK] [CLS] [SEP] [MASK]`, pieces inside a word marked `##`, as BERT's; saved as a
  `tokenizer.json` that transformers' AutoTokenizer loads).
- **Samples** are megatron's: segment A and B from consecutive sentences of one document up to
  `seq_length - 3` tokens (shorter with short_sequence_probability), `[CLS] A [SEP] B [SEP]`, token
  types 0/1, then masking: `masking_probability` (15%) of the tokens chosen (whole words with
  `whole_word`), of those 80% replaced by `[MASK]`, 10% by a random token, 10% kept; labels and
  a loss mask at the chosen positions. With the sentence-order/NSP head (`pairs`), B is swapped
  with A half of the time (`is_random`).
- **Resumable by sample number**: a corpus is a sequence of epochs, epoch e one megatron dataset of
  one epoch built with seed `seed + e * EPOCH_SEED_STRIDE` (megatron seeds sample i's masking with
  seed + i, so the stride keeps epochs' masking streams apart); sample k is epoch k // n's
  sample k % n, whatever the run's length. The sample index is built once by global rank 0 into
  the shared index cache (atomically, gpt_data._IndexCache) and memory-mapped by every rank.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from ..patches import one_epoch_mapping
from .errors import DataError
from .gpt_data import _IndexCache, split_key, split_range
from .tokenizer import HFTokenizer

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 of a tokenizer train_wordpiece makes
EPOCH_SEED_STRIDE = 1 << 24  # (epochs of up to 16M samples draw disjoint masking seeds)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(\[])")


def split_sentences(text: str) -> List[str]:
    """A document's sentences: each non-blank line, itself split after `.`, `!` or `?` followed by
    a space and a capital (prose); code lines stay whole."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            out += [s for s in _SENTENCE_END.split(line) if s]
    return out


def train_wordpiece(texts: Iterable[str], out_dir: str, vocab_size: int, max_lines: int = 300_000) -> str:
    """Train a BERT WordPiece tokenizer on `texts` (the `tokenizers` library); writes
    `out_dir/tokenizer.json` and a `tokenizer_config.json` naming the special tokens, atomically.
    Returns the tokenizer.json path. The same texts give the same vocabulary in every process (below)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False,
                                      lowercase=False)
    pre = pre_tokenizers.BertPreTokenizer()
    lines = []
    for text in texts:
        lines.extend(line for line in text.splitlines() if line.strip())
        if len(lines) >= max_lines:
            break
    del lines[max_lines:]
    # Why the "##c" pieces are given up front: the trainer (BPE underneath) creates each continuing
    # piece "##c" as it first meets c inside a word while iterating a hash map of the words, whose
    # order is random per process; those ids break its ties between equally frequent merges, so two
    # builds of the same data gave different vocabularies (huggingface/tokenizers#1794; BERT's
    # benchmark data moved by 138 tokens in 1.2M). Listed in sorted order, they exist before the
    # words are read and every id is the same in every process.
    words = set()  # (the distinct whitespace-separated words: the pre-tokenizer then reads each once)
    for i in range(0, len(lines), 2000):
        words.update(norm.normalize_str("\n".join(lines[i:i + 2000])).split())
    words, inner = sorted(words), set()
    for i in range(0, len(words), 5000):
        for w, _ in pre.pre_tokenize_str(" ".join(words[i:i + 5000])):
            inner.update(w[1:])
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=1,
                                        special_tokens=list(SPECIALS) + [f"##{c}" for c in sorted(inner)],
                                        continuing_subword_prefix="##", show_progress=False)
    trained = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    trained.normalizer, trained.pre_tokenizer = norm, pre
    trained.train_from_iterator(lines, trainer=trainer)
    # the trainer made the "##c" pieces special (whole-token matches, dropped on decode): rebuilt from
    # the vocabulary with BERT's own special tokens only
    tk = Tokenizer(models.WordPiece(trained.get_vocab(), unk_token="[UNK]", max_input_chars_per_word=100))
    tk.normalizer, tk.pre_tokenizer = norm, pre
    tk.decoder = decoders.WordPiece(prefix="##")
    tk.add_special_tokens(list(SPECIALS))
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                      special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    conf = {"tokenizer_class": "BertTokenizerFast", "do_lower_case": False, "unk_token": "[UNK]",
            "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
    tk.save(path + ".tmp")
    with open(os.path.join(out_dir, "tokenizer_config.json.tmp"), "w") as f:
        json.dump(conf, f, indent=1)
    os.replace(os.path.join(out_dir, "tokenizer_config.json.tmp"), os.path.join(out_dir, "tokenizer_config.json"))
    os.replace(path + ".tmp", path)
    return path


class MLMTokenizer:
    """What megatron's masked datasets read of a tokenizer (cls, sep, mask, pad, inv_vocab, vocab_size):
    a WordPiece `tokenizer.json` (data/tokenizer.HFTokenizer: the special tokens by the
    tokenizer_config.json beside it, else by BERT's names). One without them is refused, naming
    what is missing."""

    def __init__(self, path: str):
        if not str(path).endswith(".json"):
            raise DataError(f"`{path}` is not a tokenizer.json: BERT's masked-LM data needs a WordPiece tokenizer.json "
                            "with [CLS] [SEP] [MASK] [PAD] (msg-preprocess --sentences --output trains one)")
        try:
            self.hf = HFTokenizer(path)
        except ValueError as e:
            raise DataError(str(e)) from None
        self.path = path
        missing = [f"{attr} ({name!r})" for attr, name in (("cls", "[CLS]"), ("sep", "[SEP]"), ("mask", "[MASK]"),
                                                           ("pad", "[PAD]")) if getattr(self.hf, attr) is None]
        if missing:
            raise DataError(f"the tokenizer `{path}` lacks the special tokens BERT's masked-LM samples need: "
                            f"{', '.join(missing)}; use a BERT WordPiece tokenizer that has [CLS] [SEP] [MASK] [PAD], "
                            "or name its tokens in a tokenizer_config.json beside it (cls_token, sep_token, "
                            "mask_token, pad_token)")
        self.cls, self.sep, self.mask, self.pad = self.hf.cls, self.hf.sep, self.hf.mask, self.hf.pad
        vocab = self.hf.tk.get_vocab(with_added_tokens=True)
        self.vocab_size = len(vocab)
        self.inv_vocab = {i: t for t, i in sorted(vocab.items(), key=lambda kv: kv[1])}
        self.unique_identifiers = {"class": "msg-megatron-wordpiece", "vocab_size": self.vocab_size,
                                   "specials": [self.cls, self.sep, self.mask, self.pad]}

    def encode(self, text: str) -> List[int]:
        return self.hf.encode(text)

    def word_start(self, tid: int) -> bool:
        return not self.inv_vocab[tid].startswith("##")


class MLMCorpus:
    """One prefix's documents of one split as epochs of megatron BERTMaskedWordPieceDatasets (module
    doc): gpt_data.Corpus's interface (n, ensure, [k], identity), so gpt_data.build_samples blends,
    splits and resumes BERT's corpora as GPT's. `cache`: a gpt_data._IndexCache or its directory;
    `fractions`: data.split (None: the whole file; `documents` gives a range directly)."""

    def __init__(self, prefix: str, tok: MLMTokenizer, seq_length: int, seed: int, cache,
                 documents: Optional[Tuple[int, int]] = None, masking_probability: float = 0.15,
                 short_sequence_probability: float = 0.1, whole_word: bool = False, max_ngram: int = 1,
                 pairs: bool = False, split: str = "train", fractions: Optional[List[float]] = None):
        from megatron.core.datasets.indexed_dataset import IndexedDataset
        from megatron.core.datasets.utils import Split

        self.prefix, self.tok, self.seq_length, self.seed = os.path.realpath(prefix), tok, seq_length, seed
        self.cache = cache if isinstance(cache, _IndexCache) else _IndexCache(cache)
        self.low = IndexedDataset(self.prefix, mmap=True)
        n_docs = self.low.document_indices.shape[0] - 1
        if n_docs > 1 and self.low.sequence_lengths.shape[0] == n_docs:
            raise DataError(f"`{prefix}` holds one sequence per document (GPT's documents); BERT's masked-LM samples "
                            "are built from sentences: tokenize it with `msg-preprocess --sentences` (Megatron-LM: "
                            "preprocess_data.py --split-sentences)")
        self.split, self.which = split, {"train": Split.train, "valid": Split.valid}[split]
        self.documents = documents or split_range(n_docs, fractions, self.which)
        if self.documents[1] <= self.documents[0]:
            raise DataError(f"`{prefix}` has no documents in {self.documents} for masked-LM samples")
        self.options = dict(masking_probability=masking_probability, short_sequence_probability=short_sequence_probability,
                            masking_max_ngram=max_ngram, masking_do_full_word=whole_word,
                            masking_do_permutation=False, masking_use_longer_ngrams=False,
                            masking_use_geometric_distribution=False, classification_head=pairs)
        self.split_key = split_key(fractions, split)
        self.epochs: list = []
        self.ensure(1)
        self.n = len(self.epochs[0])
        if self.n == 0:
            raise DataError(f"`{prefix}` gives no masked-LM sample of {seq_length} tokens (pairs={pairs}: "
                            "documents need two sentences); use more text or a shorter model.seq_length")

    def _config(self, path: str, seed: int):
        from megatron.core.datasets.bert_dataset import BERTMaskedWordPieceDatasetConfig

        return BERTMaskedWordPieceDatasetConfig(
            random_seed=seed, sequence_length=self.seq_length, blend=([self.prefix], None), split=self.split_key,
            path_to_cache=path, tokenizer=self.tok, mmap_bin_files=True, **self.options)

    def _epoch(self, e: int):
        from megatron.core.datasets.bert_dataset import BERTMaskedWordPieceDataset

        def make(path, building):
            docs = np.arange(*self.documents, dtype=np.int32)
            with one_epoch_mapping():  # (num_samples=None: one epoch)
                return BERTMaskedWordPieceDataset(self.low, self.prefix, docs, None, self.which,
                                                  self._config(path, self.seed + e * EPOCH_SEED_STRIDE))
        return self.cache.build(make)

    def ensure(self, epochs: int) -> None:
        while len(self.epochs) < epochs:
            self.epochs.append(self._epoch(len(self.epochs)))

    def sample(self, k: int) -> Dict[str, np.ndarray]:
        """Sample k: {text, types, labels, loss_mask, padding_mask (int64 [seq_length]), is_random, truncated}."""
        e, i = divmod(int(k), self.n)
        self.ensure(e + 1)
        return self.epochs[e][i]

    def __getitem__(self, k: int) -> np.ndarray:
        """Sample k as one int64 array [6, seq_length] of FIELDS (a batch stacks them: [micro, 6, seq],
        so micro-batches travel through the schedules as GPT's token windows do); `is_random` (1:
        segments swapped, the sentence-order label; 0 without `pairs`) fills its row."""
        s = self.sample(k)
        rows = [np.asarray(s[f], dtype=np.int64) for f in FIELDS[:-1]]
        return np.stack(rows + [np.full(self.seq_length, int(s["is_random"]), dtype=np.int64)])

    @property
    def identity(self) -> dict:
        o = self.options  # (another masking is another sample order: resuming across it is a data change)
        return {"prefix": self.prefix, "split": self.split, "range": self.split_key, "kind": "masked-lm",
                "masking": [o["masking_probability"], o["short_sequence_probability"], o["masking_do_full_word"],
                            o["masking_max_ngram"], o["classification_head"]]}


# the fields of a masked-LM sample, in the order a batch tensor [micro, FIELDS, seq] stacks them
FIELDS = ("text", "types", "labels", "loss_mask", "padding_mask", "is_random")

