"""A lossless sentencepiece tokenizer: identity normalisation, byte fallback, whitespace kept.

Text encodes and decodes back to the identical string (newlines and indentation included), which
matters for a corpus of source code.
"""
from __future__ import annotations

import io
import re
from typing import Iterable, List

import sentencepiece as spm

from .errors import DataError


def train_tokenizer(texts: Iterable[str], model_path: str, vocab_size: int, max_lines: int = 300_000,
                    vocab_name: str = "model.vocab_size") -> None:
    """Train a BPE model on the lines of `texts` and write it to `model_path` (`vocab_name`: the
    setting to name when the size does not fit the text)."""
    lines = []
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                lines.append(line[:4096])
            if len(lines) >= max_lines:
                break
    if not lines:
        raise ValueError("cannot train a tokenizer on empty text")
    model = io.BytesIO()
    try:
        _train(lines, model, vocab_size)
    except RuntimeError as e:  # sentencepiece's own limits, as one line naming model.vocab_size

        text = str(e)
        low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", text)
        high = re.search(r"Please set it to a value <= (\d+)", text)
        if low:
            raise DataError(f"{vocab_name}={vocab_size} is below what a tokenizer of this corpus needs: its "
                            f"characters and byte pieces take {low.group(2)} entries; set {vocab_name} >= "
                            f"{low.group(2)}") from None
        if high:
            raise DataError(f"{vocab_name}={vocab_size} is more than this corpus can fill: a tokenizer "
                            f"trained on it has at most {high.group(1)} pieces; set {vocab_name} <= "
                            f"{high.group(1)}, or use more text") from None
        raise DataError(f"training the tokenizer ({vocab_name}={vocab_size}) failed: {text}") from None
    with open(model_path, "wb") as f:
        f.write(model.getvalue())


def _train(lines, model, vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        normalization_rule_name="identity", byte_fallback=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        character_coverage=0.9995, max_sentence_length=8192, num_threads=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, hard_vocab_limit=True,
    )


class Tokenizer:
    def __init__(self, model_path: str):
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"cannot load sentencepiece model `{model_path}`: {e}") from None
        self.path = model_path

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def decode(self, ids: List[int]) -> str:
        return self.sp.decode(ids)
