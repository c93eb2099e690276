"""launch/slurm/pretrain.sbatch for real, on a one-node SLURM cluster on localhost (skipped with a
reason where slurm-wlm is not installed; CI installs it).

1. sbatch with 2 tasks (gloo on CPU, data parallel 2) trains the demo config (shortened by
   overrides) to completion, growing on the way.
2. The same job, sent SIGUSR1 mid-run as SLURM does before a time limit, saves, exits 75, requeues
   itself, resumes from the newest complete checkpoint and finishes: the per-step losses equal the
   uninterrupted run's exactly (same layout on CPU: bitwise).
"""
import json
import os
import time

import pytest

from conftest import REPO
from slurm_cluster import LocalSlurm, available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not available(), reason="slurm-wlm (slurmctld, slurmd, sbatch) is not installed")]

SBATCH = os.path.join(REPO, "launch", "slurm", "pretrain.sbatch")
CONFIG = os.path.join(REPO, "configs", "demo_cpu.yaml")
SHORT = ["model.vocab_size=512", "model.seq_length=64", "data.corpus_mb=0.3", "train.steps=40",
         "train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_interval=20", "train.eval_iters=2",
         "train.log_interval=1", "train.warmup_steps=4", "growth.ramp_steps=4", "logging.wandb=disabled",
         "growth.stages=[{step: 0, shape: [128, 256, 4, 2]}, {step: 12, shape: [128, 768, 4, 4]}, "
         "{step: 24, shape: [192, 768, 6, 4]}]"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalSlurm(str(tmp_path_factory.mktemp("slurm")))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _submit(cluster, tmp, name, extra=()):
    env_over = {"MSG_LOG_DIR": str(tmp / "logs"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cluster.env.update(env_over)
    r = cluster.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", f"--job-name={name}",
                     f"--output={tmp}/{name}-%j.out", SBATCH, CONFIG, *SHORT, f"logging.run_dir={tmp}/{name}",
                     f"checkpoint.save={tmp}/{name}-ck", *extra], cwd=REPO)
    return r.stdout.strip().split(";")[0]


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(x) for x in f]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}, recs  # a resumed step's later record wins


def _job_log(tmp, job):
    out = []
    for d in (tmp, tmp / "logs"):
        for name in sorted(os.listdir(d)):
            if job in name and (d / name).is_file():
                with open(d / name) as f:
                    out.append(f"--- {name}\n{f.read()[-3000:]}")
    return "\n".join(out)


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plain")
    job = _submit(cluster, tmp, "plain")
    state = cluster.wait(job, 400)
    assert state == "COMPLETED", _job_log(tmp, job) + cluster.logs()
    return tmp, job


@pytest.mark.timeout(600)
def test_sbatch_trains_the_demo_to_completion(uninterrupted):
    tmp, job = uninterrupted
    losses, recs = _losses(tmp / "plain")
    assert sorted(losses) == list(range(40))
    assert len([r for r in recs if r.get("event") == "growth"]) == 2
    assert os.path.exists(tmp / "plain-ck" / "latest")
    log = (tmp / "logs" / f"pretrain-{job}.log").read_text()
    assert "1 node(s) x 2 task(s)" in log and "restart 0" in log
    assert "training exited with status 0" in log and "[grow]" in log


@pytest.mark.timeout(900)
def test_signal_saves_requeues_and_finishes_with_the_same_losses(cluster, uninterrupted, tmp_path):
    want, _ = _losses(uninterrupted[0] / "plain")
    job = _submit(cluster, tmp_path, "sig")
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # mid-run: after the first growth, before the end
        if metrics.exists() and max(_losses(tmp_path / "sig")[0], default=-1) >= 15:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the job never reached step 15:\n" + _job_log(tmp_path, job))
    cluster.run(["scancel", "--signal=USR1", job])  # what --signal=USR1@300 does before the time limit
    state = cluster.wait(job, 600, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                           "DEPENDENCY_NEVER_SATISFIED"))
    log = _job_log(tmp_path, job)
    assert state == "COMPLETED", log + cluster.logs()
    assert "training exited with status 75" in log and "requeueing job" in log, log
    assert "restart 1" in log and "training exited with status 0" in log, log
    full_log = (tmp_path / "logs" / f"pretrain-{job}.log").read_text()
    assert "[preempt] SIGUSR1: stopping after step" in full_log and "[resume]" in full_log
    got, _ = _losses(tmp_path / "sig")
    assert sorted(got) == sorted(want)
    assert got == want  # bitwise: same layout, resumed from the checkpoint saved at the signal


@pytest.mark.timeout(900)
def test_chain_of_stages_changes_the_layout(cluster, tmp_path):
    """chain_stages.sh: stage 0 at TP1 (2 tasks = DP2) saves and exits 76 at the stage boundary,
    grow_stage.sbatch grows and reshards to TP2 (function preserved), stage 1 resumes at TP2."""
    import subprocess

    import yaml

    from msg_megatron.config import load_config

    cfg = load_config(CONFIG, SHORT + [
        "growth.stages=[{step: 0, shape: [128, 256, 4, 2], tensor: 1}, {step: 12, shape: [192, 768, 6, 4], tensor: 2}]",
        "train.steps=24", f"logging.run_dir={tmp_path}/run", f"checkpoint.save={tmp_path}/ck"])
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = dict(cluster.env, MSG_LOG_DIR=str(tmp_path / "logs"), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    r = subprocess.run([os.path.join(REPO, "launch", "slurm", "chain_stages.sh"), str(path), "--nodes=1",
                        "--ntasks-per-node=2", f"--output={tmp_path}/chain-%j.out"], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()  # "stage S: pretrain|grow job ID (...)"
    assert [x.split()[2] for x in lines] == ["pretrain", "grow", "pretrain"], r.stdout
    state = cluster.wait(lines[-1].split()[4], 600)
    log = _job_log(tmp_path, "")
    assert state == "COMPLETED", r.stdout + log + cluster.logs()
    assert "training exited with status 76" in log and "grow job" not in log
    grow_log = next((tmp_path / "logs").glob("grow-*.log")).read_text()
    rel = float(grow_log.split("rel diff ")[1].split(")")[0])
    assert rel <= 1e-5, grow_log
    losses, recs = _losses(tmp_path / "run")
    assert sorted(losses) == list(range(24))
    assert os.path.exists(tmp_path / "ck_stage1" / "latest")
