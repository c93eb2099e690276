"""A blend's files, checked before any compute: `check_prefix` reads a prefix's megatron index and
checks the token file against it and the vocabulary (the blend syntax: config/blend_syntax.py)."""
from __future__ import annotations

import os
import struct

import numpy as np

from .errors import DataError


def check_prefix(prefix: str, where: str, vocab_size: int, sample_tokens: int = 1 << 20) -> dict:
    """A prepared corpus usable for a model of `vocab_size`: its .bin and .idx exist, the index reads,
    the token file holds exactly the tokens the index lists (not truncated), the dtype can hold the
    vocabulary, and the first `sample_tokens` tokens are inside it. Returns {tokens, documents, dtype}."""
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"{where}: `{prefix}{ext}` does not exist (a prefix names `PREFIX.bin` and `PREFIX.idx`, "
                            "as Megatron-LM's preprocess_data.py and msg-preprocess write them)")
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    with open(prefix + ".idx", "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _INDEX_HEADER or struct.unpack("<Q", head[9:17])[0] != 1:
        raise DataError(f"{where}: `{prefix}.idx` is not a megatron indexed-dataset index (bad header); rebuild it")
    code, seqs, docs = head[17], *struct.unpack("<QQ", head[18:34])
    if code not in {d.value for d in DType}:
        raise DataError(f"{where}: `{prefix}.idx` names an unknown token dtype (code {code}); rebuild it")
    dtype = np.dtype(DType.dtype_from_code(code))
    expect_idx = 34 + seqs * 4 + seqs * 8 + docs * 8
    if os.path.getsize(prefix + ".idx") < expect_idx:
        raise DataError(f"{where}: `{prefix}.idx` has {os.path.getsize(prefix + '.idx')} bytes, fewer than the "
                        f"{expect_idx} its header needs: truncated; rebuild it")
    lengths = np.memmap(prefix + ".idx", dtype=np.int32, mode="r", offset=34, shape=(seqs,)) if seqs else []
    tokens = int(lengths.sum(dtype=np.int64)) if seqs else 0  # (over the mapped index: no copy)
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
