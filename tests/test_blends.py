"""Blends of prepared corpora through megatron's datasets (msg_megatron/data/gpt_data.py, blends.py).

Corpora are written by megatron-core's own IndexedDatasetBuilder under Megatron-LM's `_text_document`
names, each with tokens from its own id range, so every window says which corpus it came from.
"""
import os

import numpy as np
import pytest
import torch
from conftest import assert_refused

from msg_megatron.config import load_config
from msg_megatron.config.blend_syntax import parse_blend
from msg_megatron.data.blends import check_prefix
from msg_megatron.data.errors import DataError

EOD = 2  # the tiny corpus tokenizer's end-of-document id (sentencepiece eos)
RANGES = {"a": (3, 150), "b": (150, 300), "c": (300, 450)}
SHAPES = "growth.stages=[{step: 0, shape: [32, 64, 2, 1]%s}, {step: 12, shape: [48, 96, 3, 2]%s}, " \
         "{step: 24, shape: [64, 128, 4, 3]%s}]"
BASE = ["model.vocab_size=512", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
        "model.num_layers=3", "model.kv_channels=16", "model.seq_length=32", "growth.ramp_steps=6",
        "train.steps=40", "train.global_batch_size=8", "train.micro_batch_size=4", "train.lr=3e-3",
        "train.warmup_steps=4", "train.eval_interval=20", "train.eval_iters=2", "logging.wandb=disabled"]


def write_corpus(prefix, lo, hi, tokens=40_000, seed=0, dtype=np.uint16):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    n = 0
    while n < tokens:
        doc = np.append(rng.integers(lo, hi, int(rng.integers(20, 200))), EOD)
        builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
        n += len(doc)
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    return {k: write_corpus(str(root / f"{k}_text_document"), lo, hi, seed=i)
            for i, (k, (lo, hi)) in enumerate(RANGES.items())}


def source(window) -> str:
    body = window[window != EOD]
    (name,) = {k for k, (lo, hi) in RANGES.items() if ((body >= lo) & (body < hi)).all()}
    return name


def cfg_for(tmp_path, tiny_data, paths, *extra, stages=("", "", "")):
    over = BASE + [SHAPES % stages, f"data.paths={paths}", f"data.tokenizer={tiny_data}/tokenizer.model",
                   f"data.index_cache={tmp_path}/index", f"logging.run_dir={tmp_path}/run",
                   f"checkpoint.save={tmp_path}/ck"] + list(extra)
    return load_config(None, over)


def samples_of(cfg, tmp_path):
    from msg_megatron.data.gpt_data import build_samples

    return build_samples(cfg, EOD, str(tmp_path))


def test_megatron_lm_syntaxes_give_one_blend():
    want = [(0.7, "/d/en_text_document"), (0.3, "/d/zh_text_document")]
    for value in ([0.7, "/d/en_text_document", 0.3, "/d/zh_text_document"],
                  "0.7 /d/en_text_document 0.3 /d/zh_text_document",
                  [{"weight": 7, "prefix": "/d/en_text_document"}, {"weight": 3, "prefix": "/d/zh_text_document"}]):
        got = parse_blend(value, "data.paths")
        assert [p for _, p in got] == [p for _, p in want]
        assert np.allclose([w for w, _ in got], [w for w, _ in want], atol=1e-12)
    assert parse_blend("/d/en_text_document", "data.paths") == [(1.0, "/d/en_text_document")]


@pytest.mark.parametrize("paths,words", [
    ("[0.7, /d/a, many, /d/b]", ["data.paths[2]", "weight 'many' is not a number"]),
    ("[0.7, /d/a, 0, /d/b]", ["data.paths[2]", "must be a positive number"]),
    ("[0.7, /d/a, -1, /d/b]", ["data.paths[2]", "must be a positive number"]),
    ("[0.7, /d/a, 0.3]", ["data.paths", "3 entries are not weight/prefix pairs"]),
    ("[1, /d/a.bin]", ["data.paths[1]", "names the .bin file", "prefix `/d/a`"]),
    ("[1, /d/a, 2, /d/a]", ["`/d/a` appears twice"]),
    ("[{weight: 1, path: /d/a}]", ["data.paths[0]", "`weight` and `prefix`", "unknown: path"])])
def test_bad_blends_are_refused_with_the_field_and_the_fix(paths, words):
    assert_refused([f"data.paths={paths}", "data.tokenizer=t.model"], words)


def test_blend_settings_that_do_not_go_together_are_refused():
    assert_refused(["data.paths=/d/a"], ["data.paths needs data.tokenizer"])
    assert_refused(["data.paths=/d/a", "data.tokenizer=t.model", "data.corpus=synthetic"],
                   ["data.paths is set and data.corpus='synthetic'"])
    assert_refused(["data.valid_paths=/d/v"], ["data.valid_paths is set without data.paths"])
    assert_refused(["data.tokenizer=t.json"], ["data.tokenizer='t.json' is the tokenizer of data.paths",
                                               "data.tokenizer_model"])


def test_bad_prefixes_are_named_before_any_compute(tmp_path, corpora):
    with pytest.raises(DataError, match=r"data.paths: `.*nothere.bin` does not exist"):
        check_prefix(str(tmp_path / "nothere"), "data.paths", 512)
    only_bin = str(tmp_path / "only")
    open(only_bin + ".bin", "wb").close()
    with pytest.raises(DataError, match=r"`.*only.idx` does not exist"):
        check_prefix(only_bin, "data.paths", 512)
    cut = write_corpus(str(tmp_path / "cut_text_document"), 3, 100, tokens=2000)
    with open(cut + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(cut + ".bin") - 10)
    with pytest.raises(DataError, match="truncated or does not belong to this index; rebuild the prefix"):
        check_prefix(cut, "data.paths", 512)
    narrow = write_corpus(str(tmp_path / "narrow_text_document"), 3, 100, tokens=2000, dtype=np.uint8)
    with pytest.raises(DataError, match="stores tokens as uint8 .* cannot hold model.vocab_size=512"):
        check_prefix(narrow, "data.paths", 512)
    wide = write_corpus(str(tmp_path / "wide_text_document"), 3, 600, tokens=2000)
    with pytest.raises(DataError, match=r"holds token id 5\d\d .* outside model.vocab_size=512: it was tokenized with "
                       "another tokenizer"):
        check_prefix(wide, "data.paths", 512)
    assert check_prefix(corpora["a"], "data.paths", 512)["tokens"] >= 40_000


def test_blend_proportions_over_10k_samples(tmp_path, tiny_data, corpora):
    """0.5 / 0.3 / 0.2 over 10,000 samples: megatron's blending is exact to a sample (each next
    sample comes from the corpus furthest below its share), so after every n samples each corpus
    has its weight x n of them within one sample; the corpora repeat epochs, each reshuffled."""
    cfg = cfg_for(tmp_path, tiny_data, f"[0.5, {corpora['a']}, 0.3, {corpora['b']}, 0.2, {corpora['c']}]",
                  "growth.stages=[]", "train.steps=1250")
    train, valid, why = samples_of(cfg, tmp_path)
    assert train.num_samples == 10_000 and why is None and valid.num_samples > 0
    names = [source(train.window(i)) for i in range(10_000)]
    for k, w in zip("abc", (0.5, 0.3, 0.2)):
        seen = np.cumsum([name == k for name in names])
        worst = np.abs(seen - w * np.arange(1, 10_001)).max()
        assert worst <= 1, (k, worst, names.count(k))
    a = [tuple(train.window(i)) for i in range(10_000) if names[i] == "a"]  # 5000 of A: several epochs
    n_a = train.segments[0][1].corpora[0].n
    assert len(a) > 2 * n_a and len(set(a[:n_a])) == n_a  # one epoch: every sample once
    # the next epoch: the same documents reshuffled (megatron's seed + 1), so other windows over the same
    # tokens (up to the partial sample each epoch's end drops)
    assert a[:n_a] != a[n_a:2 * n_a]
    counts = [np.bincount(np.concatenate([w[:-1] for w in a[k * n_a:(k + 1) * n_a]]), minlength=512) for k in (0, 1)]
    assert np.abs(counts[0] - counts[1]).sum() <= 2 * 32


def test_per_stage_mixtures_switch_at_the_stage_step_and_continue_each_corpus(tmp_path, tiny_data, corpora):
    """Stage 0 trains on A, stage 1 (step 12) on B+C, stage 2 (step 24) on A again: the samples switch
    exactly at 12 x 8 and 24 x 8, and A continues where stage 0 left it (no sample of stage 0 again)."""
    cfg = cfg_for(tmp_path, tiny_data, corpora["a"],
                  stages=("", f", data: [1, {corpora['b']}, 1, {corpora['c']}]", f", data: {corpora['a']}"))
    train, _, _ = samples_of(cfg, tmp_path)
    names = [source(train.window(i)) for i in range(train.num_samples)]
    assert train.num_samples == 40 * 8
    assert set(names[:96]) == {"a"} and set(names[96:192]) == {"b", "c"} and set(names[192:]) == {"a"}
    assert names[96:192].count("b") == 48
    first, later = {tuple(train.window(i)) for i in range(96)}, {tuple(train.window(i)) for i in range(192, 320)}
    assert not first & later
    again = samples_of(cfg, tmp_path)[0]  # built from the cache: the same samples
    assert all(np.array_equal(again.window(i), train.window(i)) for i in range(0, 320, 7))


def test_a_longer_run_keeps_the_sample_order(tmp_path, tiny_data, corpora):
    """Extending train.steps (a resumed run going further) appends samples: the first ones are unchanged."""
    paths = f"[0.6, {corpora['a']}, 0.4, {corpora['b']}]"
    short = samples_of(cfg_for(tmp_path, tiny_data, paths, "growth.stages=[]", "train.steps=30"), tmp_path)[0]
    long = samples_of(cfg_for(tmp_path, tiny_data, paths, "growth.stages=[]", "train.steps=3000"), tmp_path)[0]
    assert all(np.array_equal(short.window(i), long.window(i)) for i in range(240))


def test_data_parallel_ranks_read_disjoint_samples():
    from msg_megatron.training.trainer import micro_batch_samples

    for gbs, mbs, dp in ((8, 4, 2), (24, 2, 4), (16, 1, 8), (6, 3, 1)):
        seen = [s for rank in range(dp) for first in micro_batch_samples(100, gbs, mbs, rank, dp)
                for s in range(first, first + mbs)]
        assert sorted(seen) == list(range(100, 100 + gbs)), (gbs, mbs, dp)  # each sample once, none skipped


def test_validation_uses_the_held_out_documents(tmp_path, tiny_data, corpora):
    """data.split 90,10,0: validation windows come from documents training never sees."""
    cfg = cfg_for(tmp_path, tiny_data, corpora["a"], "growth.stages=[]", "data.split=90,10,0")
    train, valid, why = samples_of(cfg, tmp_path)
    assert why is None and valid.num_samples > 0
    tr = {tuple(train.window(i)) for i in range(train.num_samples)}
    va = [tuple(b.tolist()) for batch in valid.sequential(4, 100) for b in batch]
    assert va and not tr & set(va)
    cfg = cfg_for(tmp_path, tiny_data, corpora["a"], "growth.stages=[]", f"data.valid_paths={corpora['b']}")
    _, valid, _ = samples_of(cfg, tmp_path)
    assert {source(b.numpy()) for batch in valid.sequential(4, 10) for b in batch} == {"b"}


def _losses(path):
    import json

    with open(path) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.slow
def test_resume_mid_epoch_is_bitwise_for_a_blend_and_a_stage_switch(tmp_path, tiny_data, corpora, capsys):
    """Training on a blend that switches at stage 1 (step 12) and back at stage 2 (step 24), resumed
    from step 16 (mid stage 1): the losses from 16 on equal the uninterrupted run's bitwise. A resume
    with another blend is refused with the field and the fix, and accepted (and logged) with
    data.allow_blend_change=true."""
    from msg_megatron.checkpoint.dist import CheckpointError
    from msg_megatron.training.trainer import Trainer

    stages = ("", f", data: [0.7, {corpora['b']}, 0.3, {corpora['c']}]", f", data: {corpora['a']}")
    paths = f"[0.5, {corpora['a']}, 0.5, {corpora['c']}]"
    Trainer(cfg_for(tmp_path / "a", tiny_data, paths, "train.save_interval=16", stages=stages)).run()
    full = _losses(tmp_path / "a" / "run" / "metrics.jsonl")
    ck = tmp_path / "a" / "ck" / "step_000016"
    Trainer(cfg_for(tmp_path / "b", tiny_data, paths, f"checkpoint.load={ck}", stages=stages)).run()
    resumed = _losses(tmp_path / "b" / "run" / "metrics.jsonl")
    assert sorted(resumed) == list(range(16, 40))
    for s in resumed:
        assert resumed[s] == full[s], s
    other = ("", f", data: [0.5, {corpora['b']}, 0.5, {corpora['c']}]", stages[2])
    with pytest.raises(CheckpointError, match=r"was trained on other data \(stages: .*data.allow_blend_change=true"):
        Trainer(cfg_for(tmp_path / "c", tiny_data, paths, f"checkpoint.load={ck}", stages=other))
    capsys.readouterr()
    t = Trainer(cfg_for(tmp_path / "d", tiny_data, paths, f"checkpoint.load={ck}", "data.allow_blend_change=true",
                        stages=other))
    assert t.step == 16 and "[resume] data changed (stages: " in capsys.readouterr().out
    assert torch.isfinite(t.train_step().loss)  # (it trains on the new blend)


@pytest.mark.slow
def test_megatron_lm_files_with_a_tokenizers_json_train_and_export(tmp_path):
    """Megatron-LM's inputs as they are: a GPT-2-style byte-level BPE tokenizer.json trained by the
    `tokenizers` library on the embedded corpus, documents written by megatron-core's own
    IndexedDatasetBuilder as `corpus_text_document`. msg-pretrain trains on it (with a growth) with
    data.tokenizer pointing at the json, msg-export-hf exports it, and transformers' AutoTokenizer on
    the export encodes text exactly as the training tokenizer does; the model config's eos id is the
    tokenizer's end-of-document id."""
    import json

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tokenizers import Tokenizer as Fast
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    from conftest import run_cli
    from msg_megatron.data.corpus import embedded_documents, select_documents
    from msg_megatron.data.tokenizer import load_tokenizer

    docs = [t for _, t in select_documents(embedded_documents(), 300_000)]
    fast = Fast(models.BPE())
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast.decoder = decoders.ByteLevel()
    fast.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok_path = str(tmp_path / "tokenizer.json")
    fast.save(tok_path)
    tok = load_tokenizer(tok_path)
    assert tok.eod == fast.token_to_id("<|endoftext|>") and tok.vocab_size == 512
    prefix = str(tmp_path / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for text in docs:
        ids = tok.encode(text) + [tok.eod]
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
    builder.finalize(prefix + ".idx")

    over = BASE + [SHAPES % ("", "", ""), f"data.paths={prefix}", f"data.tokenizer={tok_path}",
                   f"data.index_cache={tmp_path}/index", f"logging.run_dir={tmp_path}/run",
                   f"checkpoint.save={tmp_path}/ck", "train.steps=32", "data.split=80,20,0"]
    r = run_cli(["msg_megatron.pretrain", "configs/demo_cpu.yaml"] + over, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads(r.stdout.strip().splitlines()[-1])["final"]
    assert final["step"] == 32 and final["val_loss"] < 6.0  # (ln 512 = 6.24: it learned)
    r = run_cli(["msg_megatron.hf.export", "--load", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")])
    assert r.returncode == 0, r.stderr[-3000:]
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in (docs[3][:2000], "def f(x):\n\treturn  x  # naïve ✓\n", "数字 12345\r\n"):
        assert auto(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert auto.decode(tok.encode(text)) == text
    assert auto.eos_token == "<|endoftext|>"
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["eos_token_id"] == tok.eod


def test_a_tokenizer_that_does_not_fit_the_model_is_named(tmp_path, tiny_data, corpora):
    from msg_megatron.data.sources import open_data

    cfg = load_config(None, BASE + ["growth.stages=[]", "model.vocab_size=1024", f"data.paths={corpora['a']}",
                                    f"data.tokenizer={tiny_data}/tokenizer.model", f"data.index_cache={tmp_path}/i"])
    with pytest.raises(DataError, match="has 512 tokens but model.vocab_size is 1024; set model.vocab_size=512"):
        open_data(cfg, train=False)
    cfg = load_config(None, BASE + ["growth.stages=[]", f"data.paths={corpora['a']}",
                                    f"data.tokenizer={tmp_path}/none.json", f"data.index_cache={tmp_path}/i"])
    with pytest.raises(DataError, match="data.tokenizer `.*none.json` does not exist"):
        open_data(cfg, train=False)


def test_a_tokenizer_json_without_an_end_of_document_token_is_named(tmp_path):
    from tokenizers import Tokenizer as Fast
    from tokenizers import models

    from msg_megatron.data.tokenizer import load_tokenizer

    Fast(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match='names no end-of-document token: put a tokenizer_config.json beside it with '
                                        '"eos_token"'):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "b"}')
    assert load_tokenizer(str(tmp_path / "tokenizer.json")).eod == 1
