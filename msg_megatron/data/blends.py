"""Blends of prepared corpora as Megatron-LM writes them, read and checked before any compute.

`data.paths` (and `data.valid_paths`, `growth.stages[i].data`) take:
- one prefix: `/data/en_text_document` (its `.bin` and `.idx`);
- Megatron-LM's list, a weight before each prefix: `[0.7, /data/en_text_document, 0.3, /data/zh_text_document]`
  (or the same as one string, `"0.7 /data/en 0.3 /data/zh"`, as on Megatron-LM's command line);
- a list of mappings: `[{weight: 0.7, prefix: /data/en_text_document}, ...]`.
Weights are relative (normalised to sum to 1). `check_prefix` reads a prefix's index and checks the
token file against it and the vocabulary.
"""
from __future__ import annotations

import os
import struct
from typing import List, Tuple

import numpy as np

from .errors import DataError

Blend = List[Tuple[float, str]]  # [(weight, prefix)], weights summing to 1

_FORM = "write one prefix, [weight, prefix, weight, prefix, ...] or [{weight: W, prefix: P}, ...]"


def _weight(value, where: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{where}: weight {value!r} is not a number; {_FORM}")
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: weight {value!r} is not a number; {_FORM}") from None
    if not w > 0 or w != w or w == float("inf"):
        raise ValueError(f"{where}: weight {value!r} must be a positive number; drop the corpus or give it a "
                         "weight > 0")
    return w


def _prefix(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {value!r} is not a dataset prefix (a path without .bin/.idx); {_FORM}")
    p = value.strip()
    for ext in (".bin", ".idx"):  # a common slip: the file instead of its prefix
        if p.endswith(ext):
            raise ValueError(f"{where}: `{p}` names the {ext} file; give the prefix `{p[:-len(ext)]}`")
    return p


def parse_blend(value, where: str) -> Blend:
    """The blend `value` means ([] for none), weights normalised; ValueError naming `where` and the fix."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        parts = value.split()
        value = parts if len(parts) > 1 else [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: {value!r} is not a blend; {_FORM}")
    items = list(value)
    if all(isinstance(v, dict) for v in items):
        pairs = []
        for i, v in enumerate(items):
            unknown = sorted(set(v) - {"weight", "prefix"})
            if unknown or "prefix" not in v or ("weight" not in v and len(items) > 1):
                raise ValueError(f"{where}[{i}]: {v!r} needs exactly the keys `weight` and `prefix`"
                                 + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
            pairs.append((_weight(v.get("weight", 1.0), f"{where}[{i}].weight"), _prefix(v["prefix"], f"{where}[{i}].prefix")))
    elif len(items) == 1:
        pairs = [(1.0, _prefix(items[0], f"{where}[0]"))]
    else:
        if len(items) % 2:
            raise ValueError(f"{where}: {len(items)} entries are not weight/prefix pairs; {_FORM}")
        pairs = [(_weight(items[i], f"{where}[{i}]"), _prefix(items[i + 1], f"{where}[{i + 1}]"))
                 for i in range(0, len(items), 2)]
    seen = set()
    for _, p in pairs:
        if p in seen:
            raise ValueError(f"{where}: `{p}` appears twice; give it one weight (the sum)")
        seen.add(p)
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


def parse_split(value: str, where: str = "data.split") -> List[float]:
    """Megatron-LM's train,valid,test split (`969,30,1`, or fractions) as three fractions."""
    try:
        parts = [float(x) for x in str(value).replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"{where}={value!r}: write three numbers, train,valid,test, e.g. 969,30,1") from None
    if len(parts) == 1:
        parts += [0.0, 0.0]
    if len(parts) != 3 or any(p < 0 for p in parts) or parts[0] <= 0:
        raise ValueError(f"{where}={value!r}: write three non-negative numbers train,valid,test with train > 0, "
                         "e.g. 969,30,1")
    total = sum(parts)
    return [p / total for p in parts]


_HEADER = b"MMIDIDX\x00\x00"
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
           8: np.uint16}  # megatron-core's indexed_dataset.DType codes


def check_prefix(prefix: str, where: str, vocab_size: int, sample_tokens: int = 1 << 20) -> dict:
    """A prepared corpus usable for a model of `vocab_size`: its .bin and .idx exist, the index reads,
    the token file holds exactly the tokens the index lists (not truncated), the dtype can hold the
    vocabulary, and the first `sample_tokens` tokens are inside it. Returns {tokens, documents, dtype}."""
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"{where}: `{prefix}{ext}` does not exist (a prefix names `PREFIX.bin` and `PREFIX.idx`, "
                            "as Megatron-LM's preprocess_data.py and msg-preprocess write them)")
    with open(prefix + ".idx", "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _HEADER or struct.unpack("<Q", head[9:17])[0] != 1:
        raise DataError(f"{where}: `{prefix}.idx` is not a megatron indexed-dataset index (bad header); rebuild it")
    code, seqs, docs = head[17], *struct.unpack("<QQ", head[18:34])
    if code not in _DTYPES:
        raise DataError(f"{where}: `{prefix}.idx` names an unknown token dtype (code {code}); rebuild it")
    dtype = np.dtype(_DTYPES[code])
    expect_idx = 34 + seqs * 4 + seqs * 8 + docs * 8
    if os.path.getsize(prefix + ".idx") < expect_idx:
        raise DataError(f"{where}: `{prefix}.idx` has {os.path.getsize(prefix + '.idx')} bytes, fewer than the "
                        f"{expect_idx} its header needs: truncated; rebuild it")
    lengths = np.memmap(prefix + ".idx", dtype=np.int32, mode="r", offset=34, shape=(seqs,)) if seqs else []
    tokens = int(np.asarray(lengths, dtype=np.int64).sum()) if seqs else 0
    size = os.path.getsize(prefix + ".bin")
    if size != tokens * dtype.itemsize:
        raise DataError(f"{where}: `{prefix}.bin` has {size} bytes but its index lists {tokens} tokens of "
                        f"{dtype.itemsize} B ({tokens * dtype.itemsize} bytes): the file is truncated or does not belong "
                        "to this index; rebuild the prefix")
    if dtype.kind in "ui" and vocab_size - 1 > np.iinfo(dtype).max:
        raise DataError(f"{where}: `{prefix}` stores tokens as {dtype.name} (at most {np.iinfo(dtype).max}), which "
                        f"cannot hold model.vocab_size={vocab_size}; re-tokenize it with a wider dtype or check the "
                        "tokenizer")
    if tokens:
        head_tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(min(tokens, sample_tokens),))
        top = int(head_tokens.max())
        if top >= vocab_size or int(head_tokens.min()) < 0:
            raise DataError(f"{where}: `{prefix}` holds token id {top} (in its first {len(head_tokens)} tokens), outside "
                            f"model.vocab_size={vocab_size}: it was tokenized with another tokenizer; use that "
                            "tokenizer's vocabulary size or re-tokenize")
    return {"tokens": tokens, "documents": max(docs - 1, 0), "dtype": dtype.name}
