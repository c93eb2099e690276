"""launch/slurm/* for real, on a two-node SLURM cluster on this machine (tests/slurm_cluster.py:
each node a network + UTS namespace with its own hostname and address, joined by a veth pair;
slurmctld on the first, a slurmd on each; the filesystem shared as a cluster's is). Where that
cannot run (not root, no iproute2), the same jobs run on a one-node localhost cluster and the
checks that need two hosts are skipped with the reason; without slurm-wlm everything skips.

1. sbatch --nodes=2 --ntasks-per-node=2 pretrain.sbatch at TP2 (TP inside a node, DP across
   the two) trains a short growth schedule: the per-step losses equal a single process's within
   1e-5 relative (different reduction orders: not bitwise), both hosts counted, 2 processes each.
2. The same job, SIGUSR1 sent only to the second node's tasks (as a node's share of a time-limit
   signal arriving first): every rank stops at the same step (the flag is agreed in the loss
   reduction), saves, exits 75, the job requeues itself on both nodes, resumes and finishes with
   the uninterrupted run's losses exactly (same layout on CPU: bitwise).
3. chain_stages.sh: stage 0 at TP1 (4 tasks = DP4 over both nodes) saves and exits 76 at the stage
   boundary, grow_stage.sbatch grows and reshards to TP2 (function preserved) on both nodes,
   stage 1 resumes at TP2 x DP2.
"""
import json
import os
import re
import time

import pytest
from conftest import REPO, run_cli
from slurm_cluster import LocalSlurm, TwoNodeSlurm, available, two_nodes_unavailable

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not available(), reason="slurm-wlm (slurmctld, slurmd, sbatch) is not installed")]

WHY_ONE_NODE = two_nodes_unavailable()
SBATCH = os.path.join(REPO, "launch", "slurm", "pretrain.sbatch")
CONFIG = os.path.join(REPO, "configs", "demo_cpu.yaml")
SHORT = ["model.vocab_size=512", "model.seq_length=64", "data.corpus_mb=0.3", "train.steps=24",
         "train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_interval=12", "train.eval_iters=2",
         "train.log_interval=1", "train.warmup_steps=4", "growth.ramp_steps=4", "logging.wandb=disabled",
         "growth.stages=[{step: 0, shape: [128, 256, 4, 2]}, {step: 8, shape: [128, 768, 4, 4]}, "
         "{step: 16, shape: [192, 768, 6, 4]}]"]
JOB = ["--nodes=2", "--ntasks-per-node=2"] if WHY_ONE_NODE is None else ["--nodes=1", "--ntasks-per-node=4"]
two_hosts = pytest.mark.skipif(WHY_ONE_NODE is not None, reason=f"one-node cluster: {WHY_ONE_NODE}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("slurm"))
    c = LocalSlurm(root) if WHY_ONE_NODE else TwoNodeSlurm(root)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _env(cluster, tmp):
    cluster.env.update({"MSG_LOG_DIR": str(tmp / "logs"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
                        "MSG_CACHE_DIR": str(tmp.parent / "cache")})  # (shared by the tests of this module)
    return cluster.env


def _submit(cluster, tmp, name, extra=()):
    _env(cluster, tmp)
    r = cluster.run(["sbatch", "--parsable", *JOB, f"--job-name={name}", f"--output={tmp}/{name}-%j.out", SBATCH,
                     CONFIG, *SHORT, "parallel.tensor=2", f"logging.run_dir={tmp}/{name}",
                     f"checkpoint.save={tmp}/{name}-ck", *extra], cwd=REPO)
    return r.stdout.strip().split(";")[0]


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(x) for x in f]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}, recs  # a resumed step's later record wins


def _job_log(tmp, job):
    out = []
    for d in (tmp, tmp / "logs"):
        for name in sorted(os.listdir(d)) if d.is_dir() else []:
            if job in name and (d / name).is_file():
                with open(d / name) as f:
                    out.append(f"--- {name}\n{f.read()[-3000:]}")
    return "\n".join(out)


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plain")
    job = _submit(cluster, tmp, "plain")
    state = cluster.wait(job, 500)
    assert state == "COMPLETED", _job_log(tmp, job) + cluster.logs()
    return tmp, job


@pytest.mark.timeout(900)
def test_sbatch_trains_across_the_nodes_like_one_process(uninterrupted, tmp_path):
    tmp, job = uninterrupted
    losses, recs = _losses(tmp / "plain")
    assert sorted(losses) == list(range(24))
    assert len([r for r in recs if r.get("event") == "growth"]) == 2
    assert os.path.exists(tmp / "plain-ck" / "latest")
    log = (tmp / "logs" / f"pretrain-{job}.log").read_text()
    assert "restart 0" in log and "training exited with status 0" in log and "[grow]" in log
    if WHY_ONE_NODE is None:
        # the placement every rank gathered (what the host-memory check counts per host): TP pairs
        # on one host, the two DP replicas on two
        assert "2 node(s) x 2 task(s)" in log and "master nodea:" in log
        assert "[launch] 4 process(es) on 2 host(s): nodea (ranks 0-1), nodeb (ranks 2-3)" in log, log
        assert "tensor=2 pipeline=1 data=2" in log

    # the same schedule in one process (TP1, DP1: the 4 micro-batches in a row)
    r = run_cli(["msg_megatron.pretrain", CONFIG, *SHORT, f"logging.run_dir={tmp_path}/one", "checkpoint.save="],
                timeout=600, env={"MSG_CACHE_DIR": str(tmp.parent / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    want, _ = _losses(tmp_path / "one")
    assert sorted(want) == sorted(losses)
    for step in want:
        assert abs(losses[step] - want[step]) <= 1e-5 * abs(want[step]), (step, losses[step], want[step])


@pytest.mark.timeout(900)
def test_signal_on_one_node_saves_requeues_and_finishes_with_the_same_losses(cluster, uninterrupted, tmp_path):
    want, _ = _losses(uninterrupted[0] / "plain")
    job = _submit(cluster, tmp_path, "sig")
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline:  # mid-run: after the first growth, before the second
        if metrics.exists() and max(_losses(tmp_path / "sig")[0], default=-1) >= 10:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the job never reached step 10:\n" + _job_log(tmp_path, job))
    if WHY_ONE_NODE is None:  # the second node's tasks only: rank 0 learns it from the others
        pids = cluster.node_pids("nodeb", "msg_megatron.pretrain")
        assert len(pids) == 2, pids
        for pid in pids:
            os.kill(pid, 10)  # SIGUSR1
    else:
        cluster.run(["scancel", "--signal=USR1", job])  # what --signal=USR1@300 does before the time limit
    state = cluster.wait(job, 600, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                           "DEPENDENCY_NEVER_SATISFIED"))
    log = _job_log(tmp_path, job)
    assert state == "COMPLETED", log + cluster.logs()
    assert "training exited with status 75" in log and "requeueing job" in log, log
    assert "restart 1" in log and "training exited with status 0" in log, log
    full_log = (tmp_path / "logs" / f"pretrain-{job}.log").read_text()
    assert "[resume]" in full_log
    if WHY_ONE_NODE is None:
        assert "[preempt] a signal on another rank: stopping after step" in full_log, full_log
        # srun's report of the second node's tasks ("task 2", "task 3" or together "tasks 2-3")
        assert re.search(r"nodeb: tasks? [23](-3)?: Exited with exit code 75", full_log), full_log
        assert "[launch] 4 process(es) on 2 host(s)" in full_log.split("restart 1")[1]  # both nodes back
    else:
        assert "[preempt] SIGUSR1: stopping after step" in full_log
    got, _ = _losses(tmp_path / "sig")
    assert sorted(got) == sorted(want)
    assert got == want  # bitwise: same layout, resumed from the checkpoint saved at the signal


@pytest.mark.timeout(900)
def test_chain_of_stages_changes_the_layout_across_the_nodes(cluster, tmp_path):
    """chain_stages.sh: stage 0 at TP1 (4 tasks = DP4) saves and exits 76 at the stage boundary,
    grow_stage.sbatch grows and reshards to TP2 (function preserved), stage 1 resumes at TP2 x DP2."""
    import subprocess

    import yaml

    from msg_megatron.config import load_config

    cfg = load_config(CONFIG, SHORT + [
        "growth.stages=[{step: 0, shape: [128, 256, 4, 2], tensor: 1}, {step: 8, shape: [192, 768, 6, 4], tensor: 2}]",
        "train.steps=16", f"logging.run_dir={tmp_path}/run", f"checkpoint.save={tmp_path}/ck"])
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = _env(cluster, tmp_path)
    r = subprocess.run(cluster.command([os.path.join(REPO, "launch", "slurm", "chain_stages.sh"), str(path), *JOB,
                                        f"--output={tmp_path}/chain-%j.out"]),
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()  # "stage S: pretrain|grow job ID (...)"
    assert [x.split()[2] for x in lines] == ["pretrain", "grow", "pretrain"], r.stdout
    state = cluster.wait(lines[-1].split()[4], 700)
    log = _job_log(tmp_path, "")
    assert state == "COMPLETED", r.stdout + log + cluster.logs()
    assert "training exited with status 76" in log and "grow job" not in log
    grow_log = next((tmp_path / "logs").glob("grow-*.log")).read_text()
    rel = float(grow_log.split("rel diff ")[1].split(")")[0])
    assert rel <= 1e-5, grow_log
    losses, recs = _losses(tmp_path / "run")
    assert sorted(losses) == list(range(16))
    assert os.path.exists(tmp_path / "ck_stage1" / "latest")
    if WHY_ONE_NODE is None:
        pre = sorted((tmp_path / "logs").glob("pretrain-*.log"), key=lambda p: int(p.stem.split("-")[1]))
        assert "tensor=1 pipeline=1 data=4" in pre[0].read_text() and "tensor=2 pipeline=1 data=2" in pre[1].read_text()
        assert "nodea (ranks 0-1), nodeb (ranks 2-3)" in pre[1].read_text()


@two_hosts
@pytest.mark.timeout(400)
def test_a_node_that_does_not_see_the_checkpoints_stops_every_rank(cluster, uninterrupted, tmp_path):
    """nodeb has its own empty directory where the save directory should be shared: every rank
    exits with the error naming the rank and host, instead of nodea's ranks resuming while nodeb's
    start fresh (global rank 0 decides which step every rank loads)."""
    import shutil

    shutil.copytree(uninterrupted[0] / "plain-ck", tmp_path / "unshared-ck")
    cluster.hide_on("nodeb", tmp_path / "unshared-ck")
    job = _submit(cluster, tmp_path, "unshared")
    state = cluster.wait(job, 300)
    log = _job_log(tmp_path, job)
    assert state == "FAILED", log + cluster.logs()
    assert "(seen from rank 2 on host nodeb, though global rank 0 found it: every node must see the checkpoint " \
           "directory at the same path" in log, log
    assert "starting fresh" not in log and "[train]" not in log


@two_hosts
def test_the_cluster_has_two_hosts(cluster):
    """The premise of the tests above: two hostnames, two addresses, reachable from each other."""
    r = cluster.run(["srun", "--nodes=2", "--ntasks-per-node=1", "bash", "-c",
                     'echo "$(hostname) $(getent hosts nodea | cut -d" " -f1) $(getent hosts nodeb | cut -d" " -f1)"'])
    assert sorted(r.stdout.split("\n")[:2]) == ["nodea 10.213.0.1 10.213.0.2", "nodeb 10.213.0.1 10.213.0.2"], r.stdout
