"""msg-grow streams one layer at a time (growth/stream.py): its checkpoint equals, tensor for
tensor and bitwise, what growing the whole model in process writes (tests/grow_reference.py, the
msg-grow before it streamed), for every layout and any number of processes sharing the layers; its
peak memory does not grow with depth."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, launch, off_schedule, pooled, run_cli
from train_runs import DISTOPT, LLAMA, write_config

pytestmark = pytest.mark.slow  # processes, training runs: the full tier (README); `-m "not slow"` skips it


def all_tensors(path: str) -> dict:
    """Every tensor of a checkpoint, whole (in the saved order of units), by key; rng_state left out
    (it is the process's generator, not model state)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from msg_megatron.checkpoint.dist import read_meta, tensor_index

    step_dir = read_meta(path)["path"]
    sd = {k: ShardedTensor.from_rank_offsets(k, torch.empty(md.global_shape, dtype=md.dtype), replica_id=0)
          for k, md in tensor_index(step_dir).items() if k != "rng_state"}
    loaded = dist_checkpointing.load(sd, step_dir)
    return {k: loaded[k] for k in sd}


def assert_same_checkpoints(got_dir, want_dir):
    got, want = all_tensors(got_dir), all_tensors(want_dir)
    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    from msg_megatron.checkpoint.dist import read_meta

    g, w = read_meta(got_dir), read_meta(want_dir)
    assert g["shape"] == w["shape"] and g["state"] == w["state"] and g["optimizer"] == w["optimizer"]
    assert g["config"] == w["config"]


def _train(tmp_path, extra, stages, nproc=1, layout=()):
    cfg = tmp_path / "cfg.yaml"
    write_config(cfg, extra, stages)
    args = ["msg_megatron.pretrain", str(cfg), f"logging.run_dir={tmp_path}/a", f"checkpoint.save={tmp_path}/ck",
            *layout]
    r = launch(nproc, args) if nproc > 1 else run_cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp_path / "ck"


def _grow(nproc, args):
    r = launch(nproc, ["msg_megatron.grow"] + args) if nproc > 1 else run_cli(["msg_megatron.grow"] + args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _reference(ckpt, shape, out, tp, pp, depth_init="interpolate"):
    """The whole-model growth (tests/grow_reference.py) at TP x PP: in this process, or on the pool."""
    from grow_reference import grow_whole_model

    args = (str(ckpt), shape, str(out), tp, pp, depth_init, tuple(off_schedule(ckpt, shape)))
    if tp * pp == 1:
        grow_whole_model(*args)
    else:
        pooled(tp * pp, grow_whole_model, *args)


@pytest.fixture(scope="module")
def llama_ck(tmp_path_factory, tiny_data):
    """A Llama-style checkpoint (SwiGLU, RoPE, RMSNorm; tied embeddings) whose second stage grew
    mid-run; the tests only read it."""
    return _train(tmp_path_factory.mktemp("llama"), LLAMA, [[32, 64, 2, 2], [32, 128, 4, 2]])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("depth_init", ["interpolate", "stack", "random"])
def test_streamed_growth_writes_what_whole_model_growth_writes(tmp_path, llama_ck, depth_init):
    """Every dimension grows; each depth init: copied layers without AdamW state."""
    ck = llama_ck
    shape = "48,192,6,5"
    r = _grow(1, ["--load", str(ck), "--shape", shape, "--save", str(tmp_path / "g"), "--depth-init", depth_init,
                  "--json", *off_schedule(ck, shape)])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["rel_diff"] <= 1e-6, out
    _reference(ck, shape, tmp_path / "ref", 1, 1, depth_init)
    assert_same_checkpoints(tmp_path / "g", tmp_path / "ref")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout,nproc,extra", [
    (("2", "1"), 4, LLAMA + DISTOPT),          # TP2, two processes per layer group: DP ranks share the layers
    (("1", "2"), 4, ["model.tie_embeddings=true"]),  # PP2 (the tied output copy), shared by DP ranks
    (("2", "2"), 4, LLAMA + ["train.precision=bf16"]),  # TP2 x PP2, bf16 masters
])
def test_streamed_growth_under_torchrun_equals_whole_model_growth(tmp_path, tiny_data, layout, nproc, extra):
    ck = _train(tmp_path, extra, [[32, 64, 2, 2], [32, 128, 4, 2]], nproc=2,
                layout=["parallel.distributed_optimizer=true"] if DISTOPT[0] in extra else [])
    tp, pp = layout
    shape = "48,192,6,6"
    r = _grow(nproc, ["--load", str(ck), "--shape", shape, "--save", str(tmp_path / "g"), "--tensor", tp,
                      "--pipeline", pp, "--json", *off_schedule(ck, shape)])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["layout"] == {"tensor": int(tp), "pipeline": int(pp)} and out["rel_diff"] <= 1e-6, out
    _reference(ck, shape, tmp_path / "ref", int(tp), int(pp))
    assert_same_checkpoints(tmp_path / "g", tmp_path / "ref")


def _peak_kib_of_msg_grow(args) -> int:
    """msg-grow in a fresh process; its peak RSS from the kernel's high-water mark (the streamed
    save writes in-process: no writer processes to miss)."""
    code = ("import re, sys\nfrom msg_megatron.grow import _main\n_main(sys.argv[1:])\n"
            "print('PEAK', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    r = subprocess.run([sys.executable, "-c", code] + args, capture_output=True, text=True, timeout=300, cwd=REPO,
                       env=dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return int(r.stdout.split("PEAK")[-1])


@pytest.mark.timeout(600)
def test_msg_grow_peak_does_not_grow_with_depth(tmp_path):
    """Doubling the depth of a 4-layer and of an 8-layer checkpoint of the same width: the second
    holds 4 more old layers and 8 more new ones than the first would if it held the whole model
    (fp32 weights + AdamW moments: ~12 B per parameter, ~340 MB here). Streamed, the two peaks
    differ by less than a fifth of that (measured: a few MB)."""
    h, f, a, vocab = 512, 2048, 8, 256
    peaks = {}
    for layers in (4, 8):
        ck = tmp_path / f"ck{layers}"
        r = run_cli(["msg_megatron.pretrain", "configs/demo_cpu.yaml", "data.corpus=synthetic", "train.steps=1",
                     "train.save_interval=1", "train.global_batch_size=1", "train.micro_batch_size=1",
                     "train.eval_interval=0", "train.eval_iters=1", "growth.stages=[]", f"model.hidden_size={h}",
                     f"model.ffn_hidden_size={f}", f"model.num_attention_heads={a}", "model.kv_channels=64",
                     f"model.num_layers={layers}", f"model.vocab_size={vocab}", "model.seq_length=16",
                     f"checkpoint.save={ck}", f"logging.run_dir={tmp_path}/run{layers}"], timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        grown = f"{h},{f},{a},{2 * layers}"
        peaks[layers] = _peak_kib_of_msg_grow(["--load", str(ck), "--shape", grown, "--save",
                                               str(tmp_path / f"g{layers}"), *off_schedule(ck, grown)])
    layer = 4 * h * h + 2 * h * f + 2 * h  # parameters of one layer (GPT-2 style: ungated MLP, no biases)
    whole_model_extra = 12 * (4 + 8) * layer  # 4 more old layers + 8 more new ones, weights and moments
    extra = (peaks[8] - peaks[4]) * 1024
    print(f"msg-grow peaks {peaks[4] / 1024:.0f} MB (4->8 layers), {peaks[8] / 1024:.0f} MB (8->16); difference "
          f"{extra / 2**20:.1f} MB, whole-model growth would add {whole_model_extra / 2**20:.0f} MB")
    assert extra < 0.2 * whole_model_extra, (peaks, extra / 2**20, whole_model_extra / 2**20)


@pytest.mark.timeout(300)
def test_msg_grow_refuses_a_non_empty_save_directory_unless_overwrite(tmp_path, llama_ck):
    ck = llama_ck
    other = tmp_path / "other"
    (other / "step_000008").mkdir(parents=True)
    (other / "step_000008" / "msg_meta.json").write_text("{}")  # someone else's checkpoint
    more = off_schedule(ck, "32,128,4,3")
    r = run_cli(["msg_megatron.grow", "--load", str(ck), "--shape", "32,128,4,3", "--save", str(other), *more])
    assert r.returncode == 2 and "exists and is not empty" in r.stderr and "--overwrite" in r.stderr, r.stderr[-2000:]
    assert (other / "step_000008" / "msg_meta.json").read_text() == "{}"  # untouched
    r = run_cli(["msg_megatron.grow", "--load", str(ck), "--shape", "32,128,4,3", "--save", str(other), "--overwrite",
                 "--json", *more])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["verified"] is True


@pytest.mark.timeout(300)
def test_msg_grow_says_when_it_could_not_verify(tmp_path, tiny_data):
    """A validation split smaller than one micro-batch (94 windows of 512 tokens, micro-batch 128):
    the growth is written, and msg-grow says the function was not verified and why."""
    from test_train import TINY

    ck = tmp_path / "ck"  # (two steps of one stage: what the check needs is the validation split)
    r = run_cli(["msg_megatron.pretrain", "configs/demo_cpu.yaml"] + TINY + [
        "train.steps=2", "train.save_interval=2", "growth.stages=[]", "model.seq_length=512",
        "train.micro_batch_size=128", "train.global_batch_size=128", "train.eval_interval=0",
        f"checkpoint.save={ck}", f"logging.run_dir={tmp_path}/run"])
    assert r.returncode == 0, r.stderr[-2000:]
    more = off_schedule(ck, "64,128,4,4")
    r = run_cli(["msg_megatron.grow", "--load", str(ck), "--shape", "64,128,4,4", "--save", str(tmp_path / "g"),
                 "--json", *more])
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["verified"] is False and "fewer than one micro-batch" in out["not_verified_because"], out
    assert "function preservation NOT verified" in r.stderr
    r = run_cli(["msg_megatron.grow", "--load", str(ck), "--shape", "64,128,4,4", "--save", str(tmp_path / "g2"),
                 "--no-verify", *more])
    assert r.returncode == 0 and "NOT verified: --no-verify" in r.stderr, r.stderr[-2000:]
