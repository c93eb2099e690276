"""A lossless sentencepiece tokenizer: identity normalisation, byte fallback, whitespace kept.

Text encodes and decodes back to the identical string (newlines and indentation included), which
matters for a corpus of source code.
"""
from __future__ import annotations

import io
from typing import Iterable, List

import sentencepiece as spm


def train_tokenizer(texts: Iterable[str], model_path: str, vocab_size: int, max_lines: int = 300_000) -> None:
    """Train a BPE model on the lines of `texts` and write it to `model_path`."""
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
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        normalization_rule_name="identity", byte_fallback=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        character_coverage=0.9995, max_sentence_length=8192, num_threads=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, hard_vocab_limit=True,
    )
    with open(model_path, "wb") as f:
        f.write(model.getvalue())


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
