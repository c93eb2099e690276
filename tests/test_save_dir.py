"""The save directory: one run per directory (checkpoint/run_lock.py), a target that cannot be
written refused at start, a full disk during a save reported in one line with its own exit status
while the previous checkpoint stays intact, and a resume past train.steps refused."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, off_schedule, run_cli
from msg_megatron.checkpoint import run_lock
from msg_megatron.checkpoint.run_lock import LOCK, RunLock, SaveDirInUse

pytestmark = pytest.mark.slow  # processes, training runs: the full tier (README); `-m "not slow"` skips it

TINY = ["configs/demo_cpu.yaml", "data.corpus=synthetic", "train.global_batch_size=2", "train.micro_batch_size=2",
        "train.eval_interval=0", "growth.stages=[]", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "model.num_attention_heads=2", "model.kv_channels=16", "model.num_layers=1", "model.vocab_size=256",
        "model.seq_length=16", "train.log_interval=1"]


def _pretrain(tmp_path, name, *extra):
    return ["msg_megatron.pretrain"] + TINY + [f"logging.run_dir={tmp_path}/{name}"] + list(extra)


def _write_lock(save, **holder):
    os.makedirs(save, exist_ok=True)
    me = dict(host="another-host", pid=12345, job=None, prog="msg-pretrain", started=time.time(), token="t0")
    me.update(holder)
    with open(os.path.join(save, LOCK), "w") as f:
        json.dump(me, f)


@pytest.mark.timeout(300)
def test_a_second_run_is_refused_while_the_first_holds_the_save_directory(tmp_path):
    """A real concurrent second process: refused at start with the holder's host and pid, nothing
    written; once the first is SIGKILLed its lock is stale (pid gone) and is taken over, reported."""
    ck = tmp_path / "ck"
    first = subprocess.Popen([sys.executable, "-m"] + _pretrain(tmp_path, "a", "train.steps=100000",
                                                                "train.save_interval=0", f"checkpoint.save={ck}"),
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, WANDB_MODE="disabled"))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (ck / LOCK).exists() and first.poll() is None:
            time.sleep(0.05)
        assert (ck / LOCK).exists(), first.stderr.read()[-2000:] if first.poll() is not None else "no lock"
        second = run_cli(_pretrain(tmp_path, "b", "train.steps=4", "train.save_interval=2", f"checkpoint.save={ck}",
                                   "train.lr=5e-4"))
        assert second.returncode == 2, second.stderr[-2000:]
        assert "is in use by another run: msg-pretrain on host" in second.stderr
        assert f"pid {first.pid}" in second.stderr and "choose another save directory" in second.stderr
        assert not any(d.startswith(("step_", ".tmp-step_")) for d in os.listdir(ck))
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait(timeout=60)
    third = run_cli(_pretrain(tmp_path, "c", "train.steps=2", "train.save_interval=2", f"checkpoint.save={ck}"))
    assert third.returncode == 0, third.stderr[-2000:]
    assert "took over the lock of msg-pretrain" in third.stdout and "its process no longer exists" in third.stdout
    assert not (ck / LOCK).exists()  # released at the end


def test_a_live_holder_on_another_host_is_refused_and_a_stale_one_taken_over(tmp_path):
    save = str(tmp_path / "ck")
    _write_lock(save)  # another host, fresh heartbeat: cannot be checked, so refused (fail safe)
    with pytest.raises(SaveDirInUse, match="another-host, pid 12345"):
        RunLock(save, "msg-pretrain").acquire()
    old = time.time() - run_lock.STALE_S - 5
    os.utime(os.path.join(save, LOCK), (old, old))  # its heartbeat stopped
    lock = RunLock(save, "msg-pretrain").acquire()
    assert "heartbeat stopped" in lock.note and lock.held()
    lock.release()
    assert not os.path.exists(os.path.join(save, LOCK))


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    save = str(tmp_path / "ck")
    _write_lock(save, job="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = RunLock(save, "msg-pretrain").acquire()
    assert "earlier run of this SLURM job 4242" in lock.note
    lock.release()
    _write_lock(save, job="4243")  # another job: refused
    with pytest.raises(SaveDirInUse, match="SLURM job 4243"):
        RunLock(save, "msg-pretrain").acquire()


@pytest.mark.timeout(300)
def test_msg_grow_and_import_refuse_a_save_directory_in_use(tmp_path):
    """A save directory locked by a live process on this host (not this one: the tools run in it)
    is refused by msg-grow and by msg-import-hf, and nothing but the lock is in it afterwards."""
    transformers = pytest.importorskip("transformers")
    r = run_cli(_pretrain(tmp_path, "a", "train.steps=2", "train.save_interval=2", f"checkpoint.save={tmp_path}/ck"))
    assert r.returncode == 0, r.stderr[-2000:]
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2,
                                                              n_positions=32))
    hf.save_pretrained(str(tmp_path / "hf"))
    holder = subprocess.Popen(["sleep", "600"])
    try:
        busy = str(tmp_path / "busy")
        _write_lock(busy, host=os.uname().nodename, pid=holder.pid)  # alive, on this host
        for tool in (["msg_megatron.grow", "--load", f"{tmp_path}/ck", "--shape", "32,64,2,2", "--save", busy,
                      "--no-verify", *off_schedule(tmp_path / "ck", "32,64,2,2")],
                     ["msg_megatron.hf.import_hf", "--hf", str(tmp_path / "hf"), "--save", busy, "--no-verify"]):
            r = run_cli(tool)
            assert r.returncode == 2 and "is in use by another run" in r.stderr, (tool[0], r.stderr[-2000:])
            assert f"pid {holder.pid}" in r.stderr, r.stderr[-2000:]
            assert os.listdir(busy) == [LOCK]
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.timeout(300)
def test_export_force_replaces_only_an_earlier_export(tmp_path):
    """msg-export-hf --force once deleted whatever --out was: the checkpoint it read, or a live run's
    save directory. It now replaces an earlier export and refuses anything else, which stays intact."""
    ck = tmp_path / "ck"
    r = run_cli(_pretrain(tmp_path, "a", "train.steps=2", "train.save_interval=2", f"checkpoint.save={ck}"))
    assert r.returncode == 0, r.stderr[-2000:]
    other = tmp_path / "other"  # another run's save directory
    (other / "step_000002").mkdir(parents=True)
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("mine")
    locked = tmp_path / "locked"
    _write_lock(locked)
    export = ["msg_megatron.hf.export", "--load", str(ck), "--force", "--out"]
    for out, why in ((ck, "holds the checkpoint being exported"),
                     (ck / "step_000002", "holds the checkpoint being exported"),
                     (ck / "step_000002" / "sub", "lies inside the checkpoint being exported"),
                     (other, "holds checkpoints"), (locked, "holds a run lock"),
                     (mine, "is not an earlier export"), (mine / "todo.txt", "is a file")):
        if out.name == "sub":
            out.mkdir()
            (out / "x").write_text("x")
        before = sorted(os.listdir(out)) if out.is_dir() else out.read_text()
        r = run_cli(export + [str(out)])
        assert r.returncode == 2 and why in r.stderr and "--force replaces only an earlier export" in r.stderr, \
            (out, r.stderr[-2000:])
        assert (sorted(os.listdir(out)) if out.is_dir() else out.read_text()) == before
    r = run_cli(export[:-2] + ["--out", str(tmp_path / "hf")])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(export[:-2] + ["--out", str(tmp_path / "hf")])
    assert r.returncode == 2 and "pass --force to replace an earlier export" in r.stderr
    r = run_cli(export + [str(tmp_path / "hf")])
    assert r.returncode == 0, r.stderr[-2000:]


def _unwritable(tmp_path) -> str:
    """A directory this process cannot write: read-only by mode, or (root ignores modes) a path on
    the read-only sysfs."""
    if os.geteuid() == 0:
        return "/sys/fs/msg-megatron-ck"
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    return str(d)


@pytest.mark.timeout(180)
def test_an_unwritable_save_directory_is_refused_before_any_work(tmp_path):
    target = _unwritable(tmp_path)
    r = run_cli(_pretrain(tmp_path, "a", "train.steps=2", "train.save_interval=0", f"checkpoint.save={target}",
                          "data.corpus=/nonexistent-corpus"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"checkpoint directory `{target}` cannot be written" in r.stderr and "choose another directory" in r.stderr
    assert "nonexistent-corpus" not in r.stderr  # refused before the data was looked at


@pytest.mark.timeout(300)
def test_a_full_disk_during_a_save_is_one_line_exit_74_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC injected into the checkpoint writer for the step-4 save only (megatron's writer
    processes are forked from this one and inherit the patch); the rest is the real msg-pretrain."""
    import errno

    from msg_megatron.checkpoint import crc_writer
    from msg_megatron.checkpoint.dist import read_meta

    real = crc_writer._CrcFile.write

    def write(self, data):
        if "step_000004" in self._path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(crc_writer._CrcFile, "write", write)
    ck = tmp_path / "ck"
    r = run_cli(_pretrain(tmp_path, "a", "train.steps=6", "train.save_interval=2", f"checkpoint.save={ck}"))
    assert r.returncode == 74, r.stderr[-3000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("msg-pretrain: error:")]
    assert len(err) == 1 and "no space left on device" in err[0] and "step_000002` is intact" in err[0], r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(d for d in os.listdir(ck) if not d.startswith(".msg-")) == ["latest", "step_000002"]
    assert read_meta(str(ck), full=True)["state"]["step"] == 2


@pytest.mark.timeout(300)
def test_resuming_with_train_steps_below_the_checkpoint_step_is_refused(tmp_path):
    ck = tmp_path / "ck"
    r = run_cli(_pretrain(tmp_path, "a", "train.steps=4", "train.save_interval=4", f"checkpoint.save={ck}"))
    assert r.returncode == 0, r.stderr[-2000:]
    before = (ck / "step_000004" / "manifest.json").read_bytes()
    r = run_cli(_pretrain(tmp_path, "b", "train.steps=2", "train.save_interval=2", f"checkpoint.save={ck}",
                          "checkpoint.load=auto"))
    assert r.returncode == 2 and "is at step 4, past train.steps=2" in r.stderr, r.stderr[-2000:]
    assert (ck / "step_000004" / "manifest.json").read_bytes() == before
