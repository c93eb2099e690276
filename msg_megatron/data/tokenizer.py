"""Tokenizers: our lossless sentencepiece model (identity normalisation, byte fallback, whitespace
kept: text encodes and decodes back to the identical string, which matters for a corpus of source
code), or any Hugging Face `tokenizer.json` (the `tokenizers` library: GPT-2 BPE, Llama-3 style),
chosen by `load_tokenizer` from the file. Both give vocab_size, eod (and bos / pad where defined),
encode, decode, and the files a checkpoint or export carries.
"""
from __future__ import annotations

import io
import json
import os
import re
from typing import Iterable, List, Optional

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
    """A sentencepiece model (`tokenizer.model`)."""

    file_name = "tokenizer.model"

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

    @property
    def bos(self) -> Optional[int]:
        return self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    @property
    def pad(self) -> Optional[int]:
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else None

    def files(self) -> List[str]:
        """The files that make up this tokenizer (what a checkpoint copies)."""
        return [self.path]


# end-of-document tokens by name, for a tokenizer.json without a tokenizer_config.json beside it
EOD_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class HFTokenizer:
    """A Hugging Face `tokenizer.json`. Its end-of-document id is the `eos_token` of a
    `tokenizer_config.json` beside it (as transformers saves them), else a special token with a
    known name (EOD_NAMES); bos and pad likewise."""

    file_name = "tokenizer.json"

    def __init__(self, path: str):
        from tokenizers import Tokenizer as Fast

        try:
            self.tk = Fast.from_file(path)
        except Exception as e:  # (the Rust error: one line)
            raise ValueError(f"cannot load the Hugging Face tokenizer `{path}`: {e}") from None
        self.path = path
        self.config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        named = self._configured()
        self.eod = self._special("eos_token", named, EOD_NAMES)
        if self.eod is None:
            raise DataError(f"`{path}` names no end-of-document token: put a tokenizer_config.json beside it with "
                            f'"eos_token" (e.g. {{"eos_token": "<|endoftext|>"}}), or add one of {", ".join(EOD_NAMES)} '
                            "as a special token")
        self.bos = self._special("bos_token", named, BOS_NAMES)
        self.pad = self._special("pad_token", named, PAD_NAMES)
        # BERT's (masked-LM samples, data/mlm_data.py); None where the tokenizer has none
        self.cls = self._special("cls_token", named, ("[CLS]",))
        self.sep = self._special("sep_token", named, ("[SEP]",))
        self.mask = self._special("mask_token", named, ("[MASK]",))

    def _configured(self) -> dict:
        if not os.path.isfile(self.config_path):
            return {}
        try:
            with open(self.config_path, encoding="utf-8") as f:
                conf = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"`{self.config_path}` is not readable JSON ({e}); fix or remove it") from None
        out = {}
        for key in ("eos_token", "bos_token", "pad_token", "cls_token", "sep_token", "mask_token"):
            v = conf.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                out[key] = v
        return out

    def _special(self, key: str, named: dict, names) -> Optional[int]:
        if key in named:
            tid = self.tk.token_to_id(named[key])
            if tid is None:
                raise DataError(f"`{self.config_path}` sets {key}={named[key]!r}, which `{self.path}` does not have")
            return tid
        specials = {t.content for t in self.tk.get_added_tokens_decoder().values() if t.special}
        for name in names:
            if name in specials:
                return self.tk.token_to_id(name)
        return None

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: List[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def token_name(self, tid: Optional[int]) -> Optional[str]:
        return None if tid is None else self.tk.id_to_token(tid)

    def files(self) -> List[str]:
        return [self.path] + ([self.config_path] if os.path.isfile(self.config_path) else [])


def load_tokenizer(path: str):
    """The tokenizer in `path`: a `.json` is a Hugging Face tokenizer.json, anything else a
    sentencepiece model; a directory, the tokenizer.model or tokenizer.json in it."""
    if os.path.isdir(path):
        for name in (Tokenizer.file_name, HFTokenizer.file_name):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        raise DataError(f"`{path}` holds no tokenizer.json or tokenizer.model")
    if not os.path.isfile(path):
        raise DataError(f"tokenizer `{path}` does not exist")
    return HFTokenizer(path) if path.endswith(".json") else Tokenizer(path)


def find_tokenizer(folder: str) -> Optional[str]:
    """The tokenizer file a checkpoint, prepared directory or Hugging Face folder carries (None:
    none). A sentencepiece model first: where both are (our own exports, Llama-2 folders), the
    tokenizer.json was converted from it."""
    for name in (Tokenizer.file_name, HFTokenizer.file_name):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def copy_tokenizer(path: str, out_dir: str) -> str:
    """Copy the tokenizer in `path` (and its companion files) into `out_dir` under its standard
    name; returns the copy's path."""
    import shutil

    tok = load_tokenizer(path)
    for f in tok.files():
        name = tok.file_name if f == tok.path else os.path.basename(f)
        shutil.copyfile(f, os.path.join(out_dir, name))
    return os.path.join(out_dir, tok.file_name)
