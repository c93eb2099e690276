"""Embedded corpus, lossless tokenizer, indexed datasets, cache integrity, msg-preprocess."""
import json
import os

import numpy as np
import pytest

from conftest import run_cli
from msg_megatron.data import DataError, TokenWindows, Tokenizer, check_prepared_dir
from msg_megatron.data.corpus import embedded_documents, select_documents, split_documents
from msg_megatron.data.prepare import prepare_embedded


def test_embedded_corpus_is_local_and_deterministic():
    docs = embedded_documents()
    assert sum(len(t) for _, t in docs) > 5e6  # the stdlib sources + pydoc topics
    a = select_documents(docs, 200_000)
    assert a == select_documents(embedded_documents(), 200_000)
    train, valid = split_documents(a, 0.1)
    assert valid and not {n for n, _ in train} & {n for n, _ in valid}


def test_tokenizer_is_lossless(tiny_data):
    tok = Tokenizer(os.path.join(tiny_data, "tokenizer.model"))
    assert tok.vocab_size == 512
    for text in ["def f(x):\n\treturn  x  # naïve ✓\n\n", "  leading and trailing  ", "数字 12345\r\n", ""]:
        assert tok.decode(tok.encode(text)) == text


def test_indexed_dataset_round_trip(tiny_data):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = Tokenizer(os.path.join(tiny_data, "tokenizer.model"))
    ds = IndexedDataset(os.path.join(tiny_data, "valid"))
    doc = ds[0]
    assert doc[-1] == tok.eod
    windows = TokenWindows(os.path.join(tiny_data, "valid"), 16, seed=1)
    flat = np.concatenate([ds[i] for i in range(len(ds))])
    first = next(windows.sequential(1, 1))[0].numpy()
    assert np.array_equal(first, flat[:17])
    b1, b2 = windows.batch(3, 4), windows.batch(3, 4)
    assert b1.shape == (4, 17) and (b1 == b2).all()  # a pure function of the sample index


def test_corrupt_cache_is_rebuilt(cache_dir, tiny_data):
    with open(os.path.join(tiny_data, "train.bin"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="truncated"):
        check_prepared_dir(tiny_data)
    messages = []
    path = prepare_embedded(cache_dir, 0.3, 512, 0.05, log=messages.append)
    assert path == tiny_data and any("rebuilding" in m for m in messages)
    check_prepared_dir(path)


def test_preprocess_jsonl_and_errors(tmp_path, tiny_data):
    src = tmp_path / "docs.jsonl"
    with open(src, "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"document {i}: the quick brown fox {i * 7} jumps.\n" * 5}) + "\n")
    out = tmp_path / "prepared"
    r = run_cli(["msg_megatron.preprocess", "--input", str(src), "--output", str(out),
                 "--tokenizer", os.path.join(tiny_data, "tokenizer.model"), "--valid-fraction", "0.1"])
    assert r.returncode == 0, r.stderr
    manifest = check_prepared_dir(str(out))
    assert manifest["vocab_size"] == 512 and manifest["documents"]["train"] + manifest["documents"]["valid"] == 60

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    r = run_cli(["msg_megatron.preprocess", "--input", str(bad), "--output", str(tmp_path / "x")])
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr and "--json-key" in r.stderr
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_wrong_vocab_is_reported(tiny_data):
    from msg_megatron.config import DataConfig
    from msg_megatron.data import resolve_data_dir

    with pytest.raises(DataError, match="model.vocab_size=512"):
        resolve_data_dir(DataConfig(corpus=tiny_data), 1000)
