"""No host sync per step: losses and gradient norms stay on the device until train.log_interval.

- The gradient norm and clipping on the device (optim/grad_clip.py) equal megatron-core's own
  `clip_grad_norm` bitwise (gradients) and to the last float64 bit (norm), clipping or not.
- Reading losses every 4 steps logs the same losses and gradient norms, bitwise, as every step.
- A non-finite loss still stops the run, at the next read, naming its step and the steps read; a
  save in between reads first, so no checkpoint of the broken model is written.
- Two ranks (DP=2, started as srun does) with log_interval=3: SIGTERM to one rank stops both at the same step (the flag is
  agreed with the losses), exit 75, and the resumed run continues bitwise.
"""
import os
import signal
import time

import pytest
import torch
import yaml

from conftest import tiny_model_cfg
from msg_megatron.config import ParallelConfig, TrainConfig, load_config
from test_checkpoint import _losses
from test_train import TINY, read_metrics, tiny_cfg


def _grads_ready(clip):
    from msg_megatron.model import build_model
    from msg_megatron.optim.optimizer import build_optimizer

    model = build_model(tiny_model_cfg(), _shape())
    opt = build_optimizer(model, TrainConfig(clip_grad=clip), ParallelConfig())
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    opt.ddp(tokens, tokens).mean().backward()
    opt.finish_grad_sync()
    opt._inner.prepare_grads()
    return opt


def _shape():
    from msg_megatron.config import Shape

    return Shape(48, 96, 6, 5)


@pytest.mark.parametrize("clip", [1e-3, 1e9])  # clipping active / inactive
def test_device_clipping_equals_megatron(clip):
    from msg_megatron.optim.grad_clip import clip_grad_norm_on_device

    a, b = _grads_ready(clip), _grads_ready(clip)
    want = a._inner.clip_grad_norm(clip)  # megatron-core's: a Python float, after a host sync
    got = clip_grad_norm_on_device(b._inner, clip)
    assert got.dtype == torch.float64 and float(got) == want
    ga = [p.grad for p in a._inner.get_parameters()]
    gb = [p.grad for p in b._inner.get_parameters()]
    assert len(ga) == len(gb) > 0
    for x, y in zip(ga, gb):
        assert torch.equal(x, y)


@pytest.mark.slow
def test_log_interval_reads_late_but_logs_the_same_values(tmp_path, tiny_run):
    from msg_megatron.training.trainer import Trainer

    Trainer(tiny_cfg(tmp_path / "b", "train.log_interval=4", "checkpoint.save=")).run()
    every = {r["step"]: r for r in read_metrics(tiny_run / "run" / "metrics.jsonl") if "loss" in r}  # (log_interval=1)
    late = {r["step"]: r for r in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl") if "loss" in r}
    assert sorted(late) == list(range(0, 40, 4)) + [39]
    for step, rec in late.items():  # across the growths at steps 12 and 24 too
        assert rec["loss"] == every[step]["loss"] and rec["grad_norm"] == every[step]["grad_norm"], step


@pytest.mark.slow
def test_nonfinite_loss_stops_at_the_next_read_and_is_never_saved(tmp_path, tiny_data, monkeypatch):
    import msg_megatron.training.trainer as trainer_mod

    real = trainer_mod.run_microbatches
    t = None

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        return out * float("nan") if t is not None and t.step == 5 else out

    monkeypatch.setattr(trainer_mod, "run_microbatches", poisoned)
    t = trainer_mod.Trainer(tiny_cfg(tmp_path, "train.steps=26", "train.log_interval=4", "train.save_interval=7"))
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 5 \(read with steps 5-6: .*log_interval=4"):
        t.run()
    ck = tmp_path / "ck"
    assert not ck.exists() or not any(d.startswith("step_") for d in os.listdir(ck))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_to_one_rank_with_late_reads_stops_all_together_and_resumes_exactly(tmp_path, tiny_data):
    import subprocess
    import sys

    from conftest import free_port as _port, launch as pooled_launch

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(load_config(None, TINY + ["train.steps=40", "train.log_interval=3"]).to_dict()))
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")

    def start_ranks(*extra):
        """Two ranks started as srun starts them (no torchrun agent between them and the signal)."""
        port = str(_port())
        cmd = [sys.executable, "-m", "msg_megatron.pretrain", str(cfg)] + list(extra)
        procs = []
        for r in range(2):  # output to files: a full pipe would block the rank
            log = open(tmp_path / f"rank{r}-{port}.log", "w+")
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                           env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                    LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                    MASTER_PORT=port)), log))
        return procs

    def wait(procs):
        codes = [p.wait(timeout=400) for p, _ in procs]
        out = ""
        for _, log in procs:
            log.seek(0)
            out += log.read()[-2000:]
            log.close()
        return codes, out

    # the uninterrupted reference and the resume on the gloo pool (one thread per rank, as these ranks)
    r = pooled_launch(2, ["msg_megatron.pretrain", str(cfg), f"logging.run_dir={tmp_path}/ref", "checkpoint.save="])
    assert r.returncode == 0, r.stderr[-3000:]
    want = _losses(tmp_path / "ref")
    run = start_ranks(f"logging.run_dir={tmp_path}/a", f"checkpoint.save={tmp_path}/ck")
    deadline = time.time() + 300
    while time.time() < deadline:
        if (tmp_path / "a" / "metrics.jsonl").exists() and len(_losses(tmp_path / "a")) >= 5:
            break
        time.sleep(0.2)
    run[1][0].send_signal(signal.SIGTERM)  # one rank signalled: both stop, at the same step
    codes, err = wait(run)
    assert codes == [75, 75], err
    from msg_megatron.checkpoint.dist import read_meta

    stopped = read_meta(str(tmp_path / "ck"), full=True)["state"]["step"]
    assert stopped % 3 == 1 or stopped == 40  # at a read: after step 3k (log_interval=3)
    r = pooled_launch(2, ["msg_megatron.pretrain", str(cfg), f"logging.run_dir={tmp_path}/b",
                          f"checkpoint.save={tmp_path}/ck", "checkpoint.load=auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    got = _losses(tmp_path / "b")
    assert got and min(got) >= stopped
    for step, loss in got.items():
        assert loss == want[step], step
