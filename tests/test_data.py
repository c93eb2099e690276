"""Embedded corpus, lossless tokenizer, indexed datasets, cache integrity, msg-preprocess."""
import json
import os

import numpy as np
import pytest

from conftest import run_cli
from msg_megatron.data import DataError, Tokenizer, check_prepared_dir
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


def test_samples_are_megatrons_gpt_dataset_samples(tiny_data, tmp_path):
    """The prepared directory's validation file read through data/gpt_data.py: sample i is megatron's
    GPTDataset sample i (tokens, and the label after the last), built with the same config by hand;
    batches are a pure function of the sample numbers."""
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    from msg_megatron.config import load_config
    from msg_megatron.data.gpt_data import _config, _DatasetTokenizer, build_samples

    tok = Tokenizer(os.path.join(tiny_data, "tokenizer.model"))
    prefix = os.path.join(tiny_data, "valid")
    ds = IndexedDataset(prefix)
    assert ds[0][-1] == tok.eod
    cfg = load_config(None, ["model.vocab_size=512", "model.seq_length=16", "growth.stages=[]",
                             f"data.index_cache={tmp_path}/index"])
    _, valid, why = build_samples(cfg, tok.eod, str(tmp_path), [(1.0, os.path.join(tiny_data, "train"))],
                                  [(1.0, prefix)], train=False)
    assert why is None
    conf = _config(cfg, str(tmp_path / "by-hand"), _DatasetTokenizer(tok.eod, 512), cfg.train.seed,
                   os.path.realpath(prefix), "0,1,0")
    ref = GPTDataset(ds, os.path.realpath(prefix), np.arange(len(ds), dtype=np.int32), None, Split.valid, conf)
    assert valid.num_samples == len(ref) > 8
    first = next(valid.sequential(4, 1))
    for i in range(4):
        want = ref[i]
        assert np.array_equal(first[i, :-1].numpy(), want["tokens"].numpy())
        assert np.array_equal(first[i, 1:].numpy(), want["labels"].numpy())
    b1, b2 = valid.batch(3, 4), valid.batch(3, 4)
    assert b1.shape == (4, 17) and (b1 == b2).all()


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


def _preprocess(tmp_path, *inputs, extra=()):
    return run_cli(["msg_megatron.preprocess", "--input", *map(str, inputs), "--output", str(tmp_path / "out"),
                    "--vocab-size", "400", *extra])


@pytest.mark.parametrize("name, data, words", [
    ("sub", None, ["is a directory", "sub/*.txt"]),
    ("a.bin", b"\x7fELF\x00\x01\x02" * 50, ["NUL bytes", "binary"]),
    ("a.jsonl", b'{"text": "ok"}\n[1, 2]\n', ["a.jsonl:2", "a JSON list"]),
    ("a.jsonl", b'{"text": "ok"}\n7\n', ["a.jsonl:2", "a JSON int"]),
    ("a.jsonl", b'"just a string"\n', ["a.jsonl:1", "a JSON str"]),
    ("a.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ["a.jsonl:2: invalid UTF-8 (byte 0xe9 at column 14)",
                                                          "--skip-invalid"]),
    ("a.txt", b"line one\nline \xff two\n", ["a.txt:2: invalid UTF-8 (byte 0xff at column 6)", "--skip-invalid"]),
    ("a.txt", b"tiny text", ["--vocab-size=400 is more than", "<="]),
])
def test_preprocess_bad_inputs_are_one_line_errors(tmp_path, name, data, words):
    """In process (the CLI prints these errors' messages as `msg-preprocess: error: ...`, status 2:
    the user errors of cli.USER_ERRORS)."""
    from msg_megatron.cli import USER_ERRORS
    from msg_megatron.preprocess import _main

    path = tmp_path / name
    if data is None:
        path.mkdir()
    else:
        path.write_bytes(data)
    with pytest.raises(USER_ERRORS) as e:
        _main(["--input", str(path), "--output", str(tmp_path / "out"), "--vocab-size", "400"])
    for w in words:
        assert w in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


def test_preprocess_skips_invalid_utf8_when_asked_and_says_where(tmp_path):
    good = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}\n" for i in range(400))
    (tmp_path / "a.jsonl").write_bytes(json.dumps({"text": good}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    (tmp_path / "b.txt").write_bytes(b"bad \xff byte\n")
    r = _preprocess(tmp_path, tmp_path / "a.jsonl", tmp_path / "b.txt", extra=["--skip-invalid", "--valid-fraction", "0",
                                                                          "--vocab-size", "330"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "a.jsonl:2: invalid UTF-8" in r.stderr and "the line skipped" in r.stderr
    assert "b.txt:1: invalid UTF-8" in r.stderr and "the file skipped" in r.stderr
    assert check_prepared_dir(str(tmp_path / "out"))["documents"]["train"] == 1


def test_a_vocabulary_too_small_for_the_tokenizer_names_the_minimum(tmp_path):
    from msg_megatron.data.tokenizer import train_tokenizer

    with pytest.raises(DataError, match=r"model.vocab_size=260 is below .* set model.vocab_size >= \d+"):
        train_tokenizer(["hello world " * 20, "ab cd ü 12 漢字"], str(tmp_path / "t.model"), 260)


def _jsonl_corpus(path, n=300, gz=False):
    import gzip

    lines = [json.dumps({"text": f"doc {i}: " + "the quick brown fox jumps over the lazy dog %d\n" % (i * 7) * (1 + i % 5)})
             for i in range(n)]
    data = ("\n".join(lines) + "\n").encode()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)
    return path


@pytest.mark.slow
def test_preprocess_megatron_files_are_identical_for_any_workers_and_megatron_reads_them(tmp_path, tiny_data):
    """--output-prefix writes Megatron-LM's PREFIX_text_document.bin/.idx: byte-identical with --workers 1
    and 2, from gzip'd JSONL as from plain; megatron-core's IndexedDataset reads each document as the
    tokenizer's ids plus the end-of-document id; --per-input makes one dataset per input; the
    progress line reports tokens/s."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok_path = os.path.join(tiny_data, "tokenizer.model")
    plain = _jsonl_corpus(str(tmp_path / "web.jsonl"))
    packed = _jsonl_corpus(str(tmp_path / "books.jsonl.gz"), n=120, gz=True)
    outs = {}
    for w in (1, 2):
        r = run_cli(["msg_megatron.preprocess", "--input", plain, packed, "--output-prefix", str(tmp_path / f"w{w}"),
                     "--tokenizer", tok_path, "--workers", str(w), "--log-interval", "0"])
        assert r.returncode == 0, r.stderr[-2000:]
        assert "tokens/s" in r.stderr and "data.paths=" in r.stderr
        outs[w] = [open(tmp_path / f"w{w}_text_document{ext}", "rb").read() for ext in (".bin", ".idx")]
    assert outs[1] == outs[2]
    tok = Tokenizer(tok_path)
    ds = IndexedDataset(str(tmp_path / "w1_text_document"))
    texts = [json.loads(line)["text"] for line in open(plain)]
    assert len(ds) == 300 + 120
    for i in (0, 7, 299):
        assert ds[i].tolist() == tok.encode(texts[i]) + [tok.eod]
    r = run_cli(["msg_megatron.preprocess", "--input", plain, packed, "--output-prefix", str(tmp_path / "each"),
                 "--tokenizer", tok_path, "--per-input", "--json-key", "text"])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(res["prefixes"]) == [str(tmp_path / "each_books_text_document"), str(tmp_path / "each_web_text_document")]
    assert len(IndexedDataset(str(tmp_path / "each_books_text_document"))) == 120


@pytest.mark.slow
def test_preprocess_prepared_dir_is_identical_for_any_workers(tmp_path, tiny_data):
    tok_path = os.path.join(tiny_data, "tokenizer.model")
    src = _jsonl_corpus(str(tmp_path / "a.jsonl.gz"), gz=True)
    for w in (1, 2):
        r = run_cli(["msg_megatron.preprocess", "--input", src, "--output", str(tmp_path / f"d{w}"), "--tokenizer",
                     tok_path, "--workers", str(w)])
        assert r.returncode == 0, r.stderr[-2000:]
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx", "tokenizer.model"):
        assert open(tmp_path / "d1" / name, "rb").read() == open(tmp_path / "d2" / name, "rb").read(), name


@pytest.mark.parametrize("args, words", [
    (["--output-prefix", "P"], ["--output-prefix needs --tokenizer"]),
    (["--output", "D", "--per-input"], ["--per-input applies to --output-prefix"]),
    (["--output", "D", "--workers", "0"], ["--workers 0: give at least 1"])])
def test_preprocess_flags_that_do_not_fit_are_named(tmp_path, args, words):
    from msg_megatron.cli import USER_ERRORS
    from msg_megatron.preprocess import _main

    src = _jsonl_corpus(str(tmp_path / "a.jsonl"), n=5)
    with pytest.raises(USER_ERRORS) as e:
        _main(["--input", src] + [str(tmp_path / a) if a in ("P", "D") else a for a in args])
    for w in words:
        assert w in str(e.value), str(e.value)


def test_a_broken_gzip_input_is_named(tmp_path):
    from msg_megatron.data.corpus import read_user_documents

    bad = tmp_path / "a.jsonl.gz"
    bad.write_bytes(b"this is not gzip at all\n")
    with pytest.raises(ValueError, match=r"`.*a.jsonl.gz` is not a readable gzip file .* pass it uncompressed"):
        list(read_user_documents([str(bad)]))
