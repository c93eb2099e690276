"""Checkpoint safety: the manifest catches truncated/corrupt/unfinished checkpoints, `auto` falls
back to the newest complete one, and SIGTERM saves and exits so that a resumed run continues exactly."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from msg_megatron.checkpoint.dist import CheckpointError, read_meta
from msg_megatron.config import load_config
from test_train import TINY, read_metrics, tiny_cfg

pytestmark = pytest.mark.slow  # processes, training runs: the full tier (README); `-m "not slow"` skips it


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r}


@pytest.fixture(scope="module")
def saved(tiny_run):
    """The session's TINY run (conftest.tiny_run): saved at steps 8, 16, 24, 32 and 40."""
    return tiny_run / "ck"


def _copy(saved, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(saved, dst)
    return dst


def test_complete_checkpoints_verify(saved):
    meta = read_meta(str(saved), full=True)
    assert meta["path"].endswith("step_000040") and meta["notes"] == []
    assert os.path.exists(os.path.join(meta["path"], "manifest.json"))


def test_truncated_file_is_named_and_auto_falls_back(saved, tmp_path):
    ck = _copy(saved, tmp_path)
    victim = next(p for p in sorted((ck / "step_000040").iterdir()) if p.suffix == ".distcp")
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(CheckpointError) as e:
        read_meta(str(ck))
    assert victim.name in str(e.value) and "truncated" in str(e.value) and "checkpoint.load=auto" in str(e.value)
    meta = read_meta(str(ck), fallback=True)
    assert meta["path"].endswith("step_000032")
    assert any("falling back" in n for n in meta["notes"])


def test_flipped_byte_needs_full_verification(saved, tmp_path):
    ck = _copy(saved, tmp_path)
    victim = next(p for p in sorted((ck / "step_000040").iterdir()) if p.suffix == ".distcp")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert read_meta(str(ck))["path"].endswith("step_000040")  # sizes alone cannot see it
    with pytest.raises(CheckpointError, match="CRC-32"):
        read_meta(str(ck), full=True)


def test_unfinished_save_is_never_taken(saved, tmp_path):
    """A newer step directory without a manifest (a save killed before its end), with and without
    the `latest` marker pointing at it."""
    ck = _copy(saved, tmp_path)
    shutil.copytree(ck / "step_000040", ck / "step_000048")
    os.remove(ck / "step_000048" / "manifest.json")
    (ck / "latest").write_text("step_000048")
    with pytest.raises(CheckpointError, match="save did not finish"):
        read_meta(str(ck))
    assert read_meta(str(ck), fallback=True)["path"].endswith("step_000040")
    os.remove(ck / "latest")
    with pytest.raises(CheckpointError, match="no `latest` marker"):
        read_meta(str(ck))
    meta = read_meta(str(ck), fallback=True)
    assert meta["path"].endswith("step_000040") and any("step_000048" in n for n in meta["notes"])


def test_load_auto_without_checkpoints_starts_fresh(tmp_path, tiny_data):
    from msg_megatron.training.trainer import Trainer

    tr = Trainer(tiny_cfg(tmp_path, "checkpoint.load=auto"))
    assert tr.step == 0


def _pretrain(args, **kw):
    env = dict(os.environ, WANDB_MODE="disabled")
    return subprocess.Popen([sys.executable, "-m", "msg_megatron.pretrain"] + args, cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _config(tmp_path, *extra):
    """The TINY config written to a file (every step logged); its uninterrupted losses are the
    session's tiny_run's (checkpoint intervals do not change them)."""
    import yaml

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(load_config(None, TINY + ["train.log_interval=1", *extra]).to_dict()))
    return cfg


@pytest.mark.timeout(600)
def test_sigterm_saves_exits_75_and_resume_is_exact(tmp_path, tiny_run):
    cfg, want = _config(tmp_path), _losses(tiny_run / "run")

    run = _pretrain([str(cfg), f"logging.run_dir={tmp_path}/a", f"checkpoint.save={tmp_path}/ck"])
    metrics = tmp_path / "a" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # signal mid-ramp, after the step-12 growth
        if metrics.exists() and len(_losses(tmp_path / "a")) >= 15:
            break
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=300) == 75, run.stderr.read()[-2000:]
    stopped = max(_losses(tmp_path / "a"))
    meta = read_meta(str(tmp_path / "ck"), full=True)
    assert meta["state"]["step"] == stopped + 1

    again = _pretrain([str(cfg), f"logging.run_dir={tmp_path}/b", f"checkpoint.save={tmp_path}/ck", "checkpoint.load=auto"])
    assert again.wait(timeout=300) == 0, again.stderr.read()[-2000:]
    got = _losses(tmp_path / "b")
    assert sorted(got) == list(range(stopped + 1, 40))
    for step, loss in got.items():  # bitwise on CPU, same layout
        assert loss == want[step], step


@pytest.mark.timeout(600)
def test_kill_9_during_a_save_keeps_the_previous_checkpoint_and_resume_is_exact(tmp_path, tiny_run):
    """SIGKILL while step 12's checkpoint is being written (mid-ramp, right at a growth): the
    half-written `.tmp-step_000012` is never taken, `latest` still names step 6, and a resumed run
    (checkpoint.load=auto) reproduces the uninterrupted run's losses bitwise from step 6 on."""
    cfg, want = _config(tmp_path, "train.save_interval=6"), _losses(tiny_run / "run")

    run = _pretrain([str(cfg), f"logging.run_dir={tmp_path}/a", f"checkpoint.save={tmp_path}/ck"],
                    start_new_session=True)
    partial = tmp_path / "ck" / ".tmp-step_000012"
    deadline = time.time() + 240
    while time.time() < deadline and not partial.exists() and run.poll() is None:
        time.sleep(0.01)
    assert partial.exists(), "never saw the step-12 save in progress"
    os.killpg(run.pid, signal.SIGKILL)  # the trainer and its helper processes, as a node's crash or SLURM ends them
    run.wait(timeout=60)
    assert not (tmp_path / "ck" / "step_000012").exists()
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step_000006"
    with pytest.raises(CheckpointError):  # named explicitly, the partial one is refused
        read_meta(str(partial))

    again = _pretrain([str(cfg), f"logging.run_dir={tmp_path}/b", f"checkpoint.save={tmp_path}/ck", "checkpoint.load=auto"])
    assert again.wait(timeout=300) == 0, again.stderr.read()[-2000:]
    got = _losses(tmp_path / "b")
    assert sorted(got) == list(range(6, 40))
    for step, loss in got.items():
        assert loss == want[step], step
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step_000040"
    # the killed run's lock was taken over (its pid is gone), and once this run's first save
    # completed, the killed save's leftover directory was removed
    assert "took over the lock" in again.stdout.read() and not partial.exists()
    assert not any(d.startswith(".tmp-step_") for d in os.listdir(tmp_path / "ck"))


def test_crafted_metadata_is_not_unpickled(saved, tmp_path):
    """torch's `.metadata` is a pickle: a crafted one (with a matching manifest, as an attacker would
    write) is refused by name and its payload never runs; the genuine one loads."""
    import pickle

    from msg_megatron.checkpoint.manifest import checksum_files, list_files, write_manifest
    from msg_megatron.checkpoint.reader import CheckpointReader

    ck = _copy(saved, tmp_path)
    step = ck / "step_000040"
    assert CheckpointReader(str(step)).names()  # the genuine metadata passes the restricted unpickler
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (step / ".metadata").write_bytes(pickle.dumps(Payload()))
    write_manifest(str(step), checksum_files(str(step), list_files(str(step)), 0, 1))
    with pytest.raises(CheckpointError, match="unsafe to load.*posix.system|unsafe to load.*os.system"):
        CheckpointReader(str(step))
    assert not marker.exists()


def test_crc_recorded_while_writing_matches_the_file_and_is_dropped_when_unsure(tmp_path):
    """The writer-side CRC (crc_writer) equals zlib's CRC of the file; a seek, a size mismatch or a
    garbled sidecar falls back to reading the file; sidecars never reach the manifest."""
    import zlib

    from msg_megatron.checkpoint.crc_writer import SIDECAR, crc_open, take_sidecar
    from msg_megatron.checkpoint.manifest import checksum_files, list_files

    data = os.urandom(3 << 20)
    with crc_open(str(tmp_path / "a.bin"), "wb") as f:
        f.write(data[:1000])
        f.write(memoryview(data)[1000:])
    assert (tmp_path / ("a.bin" + SIDECAR)).exists()
    assert list_files(str(tmp_path)) == ["a.bin"]
    assert take_sidecar(str(tmp_path / "a.bin")) == (zlib.crc32(data), len(data))
    assert not (tmp_path / ("a.bin" + SIDECAR)).exists()

    with crc_open(str(tmp_path / "b.bin"), "wb") as f:  # seeked: no sidecar
        f.write(b"x" * 10)
        f.seek(0)
        f.write(b"y")
    assert not (tmp_path / ("b.bin" + SIDECAR)).exists()

    with crc_open(str(tmp_path / "c.bin"), "wb") as f:
        f.write(data)
    with open(tmp_path / "c.bin", "ab") as f:  # grew after the writer closed it: the sidecar is stale
        f.write(b"z")
    (tmp_path / ("d.bin")).write_bytes(b"abc")
    (tmp_path / ("d.bin" + SIDECAR)).write_text("not numbers")
    got = checksum_files(str(tmp_path), ["a.bin", "b.bin", "c.bin", "d.bin"])
    assert got["c.bin"]["crc32"] == zlib.crc32(data + b"z")
    assert got["d.bin"]["crc32"] == zlib.crc32(b"abc")
    assert got["b.bin"]["crc32"] == zlib.crc32(b"y" + b"x" * 9)
    assert not any(name.endswith(SIDECAR) for name in os.listdir(tmp_path))


def test_step_directories_order_by_number_past_a_million(saved, tmp_path):
    """Step directories are ordered by their number, not as text (`step_1000000` < `step_999999` as
    text): a real save at step 1,000,000 with keep=1 keeps itself and prunes step 999,999, `latest`
    names it, and auto-resume's fallback picks it."""
    from msg_megatron.checkpoint.dist import resolve_checkpoint
    from msg_megatron.training.trainer import Trainer

    ck = tmp_path / "ck"
    ck.mkdir()
    shutil.copytree(saved / "step_000040", ck / "step_999999")  # a complete checkpoint, relabelled
    (ck / "latest").write_text("step_999999")
    t = Trainer(tiny_cfg(tmp_path, "checkpoint.keep=1", f"checkpoint.load={saved / 'step_000040'}"))
    t.step = 1_000_000
    path = t.save()
    assert os.path.basename(path) == "step_1000000"
    assert sorted(d for d in os.listdir(ck) if d.startswith("step_")) == ["step_1000000"]
    assert (ck / "latest").read_text() == "step_1000000"
    assert resolve_checkpoint(str(ck), fallback=True) == path
    # without the marker, the fallback takes the highest number, not the last name in text order
    shutil.copytree(saved / "step_000040", ck / "step_999999")
    (ck / "latest").unlink()
    notes = []
    assert resolve_checkpoint(str(ck), fallback=True, notes=notes) == path, notes
