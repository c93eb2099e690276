"""End to end: training with growth, metrics, checkpoints, resume, and the command-line tools."""
import json
import os

import pytest

from conftest import off_schedule, run_cli
from msg_megatron.config import load_config

pytestmark = pytest.mark.slow  # processes, training runs: the full tier (README); `-m "not slow"` skips it

TINY = ["model.vocab_size=512", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
        "model.num_layers=3", "model.kv_channels=16", "model.seq_length=32",
        "growth.stages=[{step: 0, shape: [32, 64, 2, 1]}, {step: 12, shape: [48, 96, 3, 2]},"
        " {step: 24, shape: [64, 128, 4, 3]}]",
        "growth.ramp_steps=6", "train.steps=40", "train.global_batch_size=8", "train.micro_batch_size=4",
        "train.lr=3e-3", "train.warmup_steps=4", "train.eval_interval=20", "train.eval_iters=2",
        "data.corpus_mb=0.3", "data.valid_fraction=0.05", "logging.wandb=disabled"]


def tiny_cfg(tmp_path, *extra):
    return load_config(None, TINY + [f"logging.run_dir={tmp_path}/run", f"checkpoint.save={tmp_path}/ck"]
                       + list(extra))


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def losses_of(run_dir) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r}


def test_growth_training_logs_and_preserves_function(tiny_run):
    recs = read_metrics(tiny_run / "run" / "metrics.jsonl")
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(40))
    assert steps[-1]["shape"] == [64, 128, 4, 3]
    assert all(k in steps[0] for k in ("step", "loss", "lr", "stage", "tokens_per_s", "time", "train_time", "eta_s"))
    assert steps[-1]["eta_s"] == 0 and all(r["eta_s"] > 0 for r in steps[:-1])
    growths = [r for r in recs if r.get("event") == "growth"]
    assert [g["step"] for g in growths] == [12, 24]
    for g in growths:  # strict function preservation inside the real loop
        assert abs(g["probe_loss_after"] - g["probe_loss_before"]) <= 1e-5 * g["probe_loss_before"]
    assert any("val_loss" in r for r in recs)
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
    assert (tiny_run / "ck" / "latest").read_text().strip() == "step_000040"


def test_resume_continues_identically(tmp_path, tiny_run):
    from msg_megatron.training.trainer import Trainer

    ck = tiny_run / "ck" / "step_000016"  # mid-stage, masks mid-ramp from the step-12 growth
    Trainer(tiny_cfg(tmp_path / "b", f"checkpoint.load={ck}")).run()
    full, resumed = losses_of(tiny_run / "run"), losses_of(tmp_path / "b" / "run")
    assert sorted(resumed) == list(range(16, 40))
    for s in resumed:  # bitwise on CPU, same layout
        assert resumed[s] == full[s], s


def test_resume_with_wrong_model_is_refused(tmp_path, tiny_run):
    from msg_megatron.checkpoint.dist import CheckpointError
    from msg_megatron.training.trainer import Trainer

    with pytest.raises(CheckpointError, match="model.norm"):
        Trainer(tiny_cfg(tmp_path / "b", f"checkpoint.load={tiny_run}/ck", "model.norm=rmsnorm"))


# the README's demo at 5/12 of its length: every stage, each 32 steps (the demo: 80), ramps of 16
DEMO_SHORT = ["train.steps=200", "growth.ramp_steps=16", "train.eval_interval=100", "train.save_interval=100"] + [
    f"growth.stages.{i}.step={32 * i}" for i in range(1, 5)]


def test_demo_cli_end_to_end(tmp_path):
    """The README's demo (shortened, from a fresh data cache: the corpus and tokenizer are built as
    on a first run): loss falls, every dimension grows once with the function preserved; then eval
    and grow its checkpoint."""
    env = {"MSG_CACHE_DIR": str(tmp_path / "cache")}
    r = run_cli(["msg_megatron.pretrain", "configs/demo_cpu.yaml", *DEMO_SHORT, f"logging.run_dir={tmp_path}/run",
                 f"checkpoint.save={tmp_path}/ck"], timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[-1] < losses[0] - 2.5  # ln(2048) = 7.6 at the start
    growths = [r for r in recs if r.get("event") == "growth"]
    assert len(growths) == 4
    changed = {i for g in growths for i in range(4) if g["from"][i] != g["to"][i]}
    assert changed == {0, 1, 2, 3}  # every dimension grew
    for g in growths:
        assert abs(g["probe_loss_after"] - g["probe_loss_before"]) <= 1e-5 * g["probe_loss_before"]

    r = run_cli(["msg_megatron.eval", "--load", f"{tmp_path}/ck", "--json"], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    final_val = [x["val_loss"] for x in recs if "val_loss" in x][-1]
    assert abs(ev["val_loss"] - final_val) <= 1e-6 * final_val

    text = tmp_path / "t.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    r = run_cli(["msg_megatron.eval", "--load", f"{tmp_path}/ck", "--text", str(text), "--json"], env=env)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["loss"] > 0

    # off the demo's schedule (its last stage is the model's shape): refused, naming the way out; with the
    # schedule to continue on, grown
    r = run_cli(["msg_megatron.grow", "--load", f"{tmp_path}/ck", "--shape", "256,1024,8,6", "--save",
                 f"{tmp_path}/grown"], env=env)
    assert r.returncode == 2 and "is not the next stage of the checkpoint's schedule" in r.stderr, r.stderr[-2000:]
    r = run_cli(["msg_megatron.grow", "--load", f"{tmp_path}/ck", "--shape", "256,1024,8,6",
                 "--save", f"{tmp_path}/grown", "--json", *off_schedule(tmp_path / "ck", "256,1024,8,6")], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["to"] == [256, 1024, 8, 6] and out["rel_diff"] <= 1e-5
    r = run_cli(["msg_megatron.eval", "--load", f"{tmp_path}/grown", "--json"], env=env)
    assert abs(json.loads(r.stdout.strip().splitlines()[-1])["val_loss"] - out["val_loss_before"]) <= 1e-5 * final_val


def test_cli_errors_are_clear(tmp_path):
    r = run_cli(["msg_megatron.pretrain", "configs/demo_cpu.yaml", "model.hidden_sise=3"])
    assert r.returncode == 2 and "model.hidden_sise" in r.stderr and "hidden_size" in r.stderr
    r = run_cli(["msg_megatron.eval", "--load", str(tmp_path / "missing")])
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_cli(["msg_megatron.grow", "--load", str(tmp_path), "--shape", "1,2,3", "--save", str(tmp_path / "x")])
    assert r.returncode == 2 and "--shape" in r.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU refusal")
def test_bf16_autocast_on_cpu_is_refused_before_any_work(tmp_path):
    from msg_megatron.config import ConfigError
    from msg_megatron.training.trainer import Trainer

    with pytest.raises(ConfigError, match="train.precision=bf16-autocast needs a GPU"):
        Trainer(tiny_cfg(tmp_path, "train.precision=bf16-autocast", "data.corpus=/nonexistent"))
