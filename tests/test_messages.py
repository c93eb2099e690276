"""One clear line for each input that used to end in a traceback or a wrong hint (issue 23, items
11 and 12): validation data too small, msg-eval's --iters, a checkpoint path that is a file,
msg-gridsearch's flag name."""
import json
import re

import pytest

from conftest import run_cli
from test_train import TINY


def _train(tmp_path, *extra):
    r = run_cli(["msg_megatron.pretrain", "configs/demo_cpu.yaml"] + TINY + [
        "train.steps=2", "train.save_interval=2", "growth.stages=[]", f"checkpoint.save={tmp_path}/ck",
        f"logging.run_dir={tmp_path}/run"] + list(extra))
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.mark.timeout(300)
def test_validation_split_smaller_than_a_micro_batch_is_said_not_logged_as_null(tmp_path, tiny_data):
    # the tiny corpus holds out one document of 48,212 tokens: 94 windows of 512, a micro-batch is 128
    r = _train(tmp_path, "model.seq_length=512", "train.micro_batch_size=128", "train.global_batch_size=128")
    assert "[eval] no validation loss will be reported: the validation split holds" in r.stdout
    final = json.loads(r.stdout.strip().splitlines()[-1])["final"]
    assert final["val_loss"] is None and "fewer than one micro-batch" in final["no_validation"]
    # msg-eval on it: the reason, not a crash on formatting None
    r = run_cli(["msg_megatron.eval", "--load", f"{tmp_path}/ck"])
    assert r.returncode == 2 and "no validation loss for" in r.stderr and "micro-batch" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("iters", ["-1", "0"])
def test_msg_eval_refuses_iters_below_one(tmp_path, iters):
    r = run_cli(["msg_megatron.eval", "--load", f"{tmp_path}/ck", "--iters", iters])  # (before the checkpoint)
    assert r.returncode == 2 and f"--iters {iters}: give at least 1" in r.stderr, r.stderr[-2000:]


def test_an_empty_validation_split_is_named(tmp_path):
    """A one-document corpus holds nothing out: opening its empty split says so (no mmap error)."""
    from msg_megatron.config import load_config
    from msg_megatron.data.sources import open_data

    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}\n" for i in range(300))
    (tmp_path / "one.txt").write_text(text)
    r = run_cli(["msg_megatron.preprocess", "--input", str(tmp_path / "one.txt"), "--output", str(tmp_path / "p"),
                 "--vocab-size", "330"])
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = load_config(None, ["model.vocab_size=330", "model.seq_length=16", "growth.stages=[]",
                             f"data.corpus={tmp_path / 'p'}", f"data.index_cache={tmp_path}/index"])
    data = open_data(cfg, log=lambda *_: None, train=False)
    assert data.valid is None and re.search("valid.bin` holds no tokens .* use a larger corpus", data.no_valid)


def test_a_checkpoint_path_that_is_a_file_is_named_as_such(tmp_path):
    f = tmp_path / "ckpt.pt"
    f.write_bytes(b"x")
    r = run_cli(["msg_megatron.eval", "--load", str(f)])
    assert r.returncode == 2 and "is a file; name a checkpoint directory" in r.stderr, r.stderr[-2000:]


def test_gridsearch_names_its_own_flag():
    r = run_cli(["msg_megatron.gridsearch", "configs/demo_cpu.yaml", "--candidates", "1,2,3"])
    assert r.returncode == 2 and "--candidates entry `1,2,3`" in r.stderr and "--shape" not in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_bad_config_under_torchrun_is_said_once(tmp_path):
    """It was printed once per rank, then torchrun's ~40-line traceback: launch/local.sh checks the
    config once before torchrun (one line, exit 2, no worker started), and under torchrun itself
    only each host's local rank 0 says an error found before the process group exists."""
    import os
    import subprocess
    import sys

    from conftest import REPO, torchrun

    env = dict(os.environ, WANDB_MODE="disabled", MSG_PYTHON=sys.executable)
    r = subprocess.run([os.path.join(REPO, "launch", "local.sh"), "2", "configs/demo_cpu.yaml", "model.hidden_sise=3"],
                       capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    lines = [x for x in r.stderr.splitlines() if "error" in x.lower() and "warn" not in x.lower()]
    assert r.returncode == 2 and len(lines) == 1 and "model.hidden_sise" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "torch.distributed" not in r.stderr
    r = subprocess.run([os.path.join(REPO, "launch", "local.sh"), "2", "configs/demo_cpu.yaml"],  # 16 in 1 micro-batch
                       capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert r.returncode == 2 and "do not split over 2 data-parallel ranks" in r.stderr, r.stderr[-2000:]
    r = torchrun(2, ["-m", "msg_megatron.pretrain", "configs/demo_cpu.yaml", "model.hidden_sise=3"], timeout=120)
    assert r.returncode != 0 and r.stderr.count("msg-pretrain: error: unknown config key `model.hidden_sise`") == 1, \
        r.stderr[-3000:]
