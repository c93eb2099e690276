"""The offline tools check a checkpoint's CRC-32s before they use it (checkpoint/verify.py), and a
score that is not finite is an error, never exit 0."""
import json
import math
import os
import shutil

import pytest

from conftest import off_schedule, run_cli

pytestmark = pytest.mark.slow  # reads the TINY run's checkpoints


def _flip_one_bit(step_dir) -> str:
    """One bit of the largest data file, in place (its size unchanged: only a CRC sees it)."""
    files = [os.path.join(step_dir, f) for f in os.listdir(step_dir) if f.endswith(".distcp")]
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))
    return os.path.basename(path)


def test_a_flipped_bit_stops_eval_export_and_grow_naming_the_file(tmp_path, tiny_run):
    ck = tmp_path / "step_000040"
    shutil.copytree(tiny_run / "ck" / "step_000040", ck)
    bad = _flip_one_bit(ck)
    for tool in (["msg_megatron.eval", "--load", str(ck)],
                 ["msg_megatron.hf.export", "--load", str(ck), "--out", str(tmp_path / "hf")],
                 ["msg_megatron.grow", "--load", str(ck), "--shape", "64,128,4,4", "--save", str(tmp_path / "g"),
                  *off_schedule(ck, "64,128,4,4")]):
        r = run_cli(tool)
        assert r.returncode == 2, (tool, r.stderr[-2000:])
        assert f"{bad}` fails its CRC-32 check" in r.stderr and "--no-verify skips this check" in r.stderr, r.stderr
    assert not (tmp_path / "hf").exists() and not (tmp_path / "g").exists()
    # --no-verify uses it as it is (a score, whatever the flipped bit did to it, or the non-finite refusal)
    r = run_cli(["msg_megatron.eval", "--load", str(ck), "--no-verify", "--json"])
    assert (r.returncode == 0 and math.isfinite(json.loads(r.stdout.splitlines()[-1])["val_loss"])
            or r.returncode == 2 and "not finite" in r.stderr), r.stderr[-2000:]


def test_a_score_that_is_not_finite_is_an_error(tiny_run, monkeypatch):
    import msg_megatron.eval as ev

    monkeypatch.setattr(ev, "validation_loss", lambda *a, **k: float("inf"))
    r = run_cli(["msg_megatron.eval", "--load", str(tiny_run / "ck"), "--json"])
    assert r.returncode == 2 and "scores val_loss = inf" in r.stderr and not r.stdout.strip(), (r.stdout, r.stderr)
