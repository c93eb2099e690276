"""BERT through the CLIs (configs/bert_demo_cpu.yaml, shortened) on the embedded corpus (prepared as sentences with a WordPiece tokenizer):
msg-pretrain grows every dimension with the probe loss unchanged (<= 1e-5 relative) and the MLM
loss falling; msg-eval reproduces the final validation loss; msg-grow grows the checkpoint offline
with the validation loss unchanged; the grown checkpoint resumes. Bad inputs are refused first."""
import json
import os

import numpy as np
import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow

BERT = ["configs/bert_demo_cpu.yaml", "model.vocab_size=1024", "model.seq_length=64",
        "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4", "model.num_layers=3",
        "model.kv_channels=16", "data.corpus_mb=0.5", "data.valid_fraction=0.05", "train.steps=40",
        "train.global_batch_size=8", "train.micro_batch_size=8", "train.warmup_steps=4", "train.log_interval=1",
        "growth.depth_init=interpolate",
        "train.eval_interval=20", "train.eval_iters=2", "train.save_interval=20", "growth.ramp_steps=4",
        "logging.wandb=disabled",
        "growth.stages=[{step: 0, shape: [32, 64, 2, 2]}, {step: 10, shape: [32, 128, 2, 2]}, "
        "{step: 20, shape: [64, 128, 2, 3]}, {step: 30, shape: [64, 128, 4, 3]}]"]


def _records(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


@pytest.mark.timeout(900)
def test_bert_pretrains_grows_evaluates_and_grows_offline(tmp_path, cache_dir):
    r = run_cli(["msg_megatron.pretrain", *BERT, f"logging.run_dir={tmp_path}/run", f"checkpoint.save={tmp_path}/ck"],
                timeout=800)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _records(tmp_path / "run" / "metrics.jsonl")
    losses = [x["loss"] for x in recs if "loss" in x]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # ln(1024) = 6.9 at the start
    growths = [x for x in recs if x.get("event") == "growth"]
    assert len(growths) == 3
    assert {i for g in growths for i in range(4) if g["from"][i] != g["to"][i]} == {0, 1, 2, 3}
    for g in growths:
        assert abs(g["probe_loss_after"] - g["probe_loss_before"]) <= 1e-5 * g["probe_loss_before"], g
    final_val = [x["val_loss"] for x in recs if "val_loss" in x][-1]

    r = run_cli(["msg_megatron.eval", "--load", f"{tmp_path}/ck", "--json"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert abs(json.loads(r.stdout.strip().splitlines()[-1])["val_loss"] - final_val) <= 1e-6 * final_val

    # msg-grow of the step-20 checkpoint (taken before the growth at the start of step 20) into the next
    # stage's shape, then resumed: the same new weights and AdamW state as the online growth, so the same
    # losses, bitwise at every step. (They once drifted in the last bits a few steps in: the first run,
    # which prepared the corpus itself, had been left at one torch thread, the resumed run at two.)
    r = run_cli(["msg_megatron.grow", "--load", f"{tmp_path}/ck/step_000020", "--shape", "64,128,2,3", "--save",
                 f"{tmp_path}/grown", "--json"])
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["verified"] and out["rel_diff"] <= 1e-5 and out["to"] == [64, 128, 2, 3]
    r = run_cli(["msg_megatron.pretrain", *BERT, f"checkpoint.load={tmp_path}/grown", "checkpoint.save=",
                 f"logging.run_dir={tmp_path}/run2"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = {x["step"]: x["loss"] for x in _records(tmp_path / "run2" / "metrics.jsonl") if "loss" in x}
    want = {x["step"]: x["loss"] for x in recs if "loss" in x}
    assert sorted(got) == list(range(20, 40))
    assert got == {k: want[k] for k in got}


@pytest.mark.parametrize("over, words", [
    (["data.corpus=synthetic"], "model.family=bert trains on sentence pairs from a corpus of sentences"),
    (["model.norm=rmsnorm"], "model.family=bert is BERT's encoder: set model.norm=layernorm"),
    (["data.mask_prob=1.5"], "config field `data.mask_prob` is 1.5; it must be > 0 and < 1"),
])
def test_bert_bad_inputs_are_refused_before_any_work(tmp_path, over, words):
    r = run_cli(["msg_megatron.pretrain", *BERT, *over, f"logging.run_dir={tmp_path}/run", "checkpoint.save="])
    assert r.returncode == 2 and words in r.stderr, r.stderr[-2000:]
    assert "[train]" not in r.stdout


def _stdlib_texts(tmp_path, pattern, n):
    import glob
    import shutil
    import sysconfig

    out = tmp_path / pattern.strip("*.")
    out.mkdir()
    for f in sorted(glob.glob(f"{sysconfig.get_paths()['stdlib']}/{pattern}"))[:n]:
        shutil.copy(f, out / (os.path.basename(f) + ".txt"))
    return sorted(str(p) for p in out.iterdir())


@pytest.mark.timeout(900)
def test_bert_trains_on_preprocessed_sentences_blended_split_and_resumes_bitwise(tmp_path, cache_dir, tiny_data):
    """msg-preprocess --sentences: a prepared directory (its WordPiece tokenizer trained) and
    Megatron-LM `_text_sentence` prefixes encoded with that tokenizer; BERT trains on a blend of a
    prefix and the directory's train split, validation from data.split, through a growth; resumed
    at step 12 its losses equal the uninterrupted run's bitwise. GPT's document files and a
    sentencepiece tokenizer are refused before training, naming the fix."""
    r = run_cli(["msg_megatron.preprocess", "--sentences", "--input", *_stdlib_texts(tmp_path, "[a-c]*.py", 30),
                 "--output", str(tmp_path / "dir"), "--vocab-size", "1024"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "model.family=bert" in r.stderr
    tok = str(tmp_path / "dir" / "tokenizer.json")
    r = run_cli(["msg_megatron.preprocess", "--sentences", "--input", *_stdlib_texts(tmp_path, "[d-f]*.py", 20),
                 "--output-prefix", str(tmp_path / "px"), "--tokenizer", tok])
    assert r.returncode == 0, r.stderr[-2000:]
    prefix = str(tmp_path / "px_text_sentence")
    assert os.path.isfile(prefix + ".idx")
    data = [f"data.paths=[0.6, {prefix}, 0.4, {tmp_path}/dir/train]", f"data.tokenizer={tok}", "data.split=90,10,0"]
    args = ["msg_megatron.pretrain", *BERT, *data, "train.steps=24", "train.save_interval=12", "train.eval_interval=12",
            "growth.stages=[{step: 0, shape: [32, 64, 2, 2]}, {step: 8, shape: [64, 128, 4, 3]}]"]
    r = run_cli(args + [f"logging.run_dir={tmp_path}/run", f"checkpoint.save={tmp_path}/ck"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "masked-LM samples of 64 tokens" in r.stdout and "px_text_sentence" in r.stdout
    recs = _records(tmp_path / "run" / "metrics.jsonl")
    assert len([x for x in recs if "val_loss" in x]) == 2
    # the 0.6 / 0.4 blend: the run's 192 training samples (24 steps x 8) drawn from the prefix and the
    # directory's train split as megatron blends, each within one sample of its share after every sample
    from msg_megatron.config import load_config
    from msg_megatron.data.sources import open_data

    train = open_data(load_config(args[1], args[2:] + [f"logging.run_dir={tmp_path}/x"]), log=lambda *_: None).train
    (first, segment), = train.segments
    assert [os.path.basename(c.prefix) for c in segment.corpora] == ["px_text_sentence", "train"]
    drawn = np.asarray(segment.blended.dataset_index[:24 * 8])
    for k, w in enumerate((0.6, 0.4)):
        assert np.abs(np.cumsum(drawn == k) - w * np.arange(1, len(drawn) + 1)).max() <= 1, (k, drawn)
    r = run_cli(args + [f"logging.run_dir={tmp_path}/run2", f"checkpoint.load={tmp_path}/ck/step_000012",
                        "checkpoint.save="], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    want = {x["step"]: x["loss"] for x in recs if "loss" in x}
    got = {x["step"]: x["loss"] for x in _records(tmp_path / "run2" / "metrics.jsonl") if "loss" in x}
    assert sorted(got) == list(range(12, 24)) and all(got[k] == want[k] for k in got)

    r = run_cli(["msg_megatron.preprocess", "--input", *_stdlib_texts(tmp_path, "g*.py", 5), "--output-prefix",
                 str(tmp_path / "gpt"), "--tokenizer", tok])  # (no --sentences: GPT's documents)
    assert r.returncode == 0, r.stderr[-2000:]
    for over, words in [([f"data.paths={tmp_path}/gpt_text_document", f"data.tokenizer={tok}"],
                         "holds one sequence per document (GPT's documents); BERT's masked-LM samples are built "
                         "from sentences: tokenize it with `msg-preprocess --sentences`"),
                        ([f"data.paths={prefix}", f"data.tokenizer={tiny_data}/tokenizer.model"], "is not a tokenizer.json")]:
        r = run_cli(["msg_megatron.pretrain", *BERT, *over, f"logging.run_dir={tmp_path}/bad", "checkpoint.save="])
        assert r.returncode == 2 and words in r.stderr, r.stderr[-2000:]
        assert "[train]" not in r.stdout
