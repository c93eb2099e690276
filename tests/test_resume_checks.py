"""What a resume may not change silently (training/resume_checks.py): the stages the checkpoint has
reached, the masks at the resume step, the learning rate from the resume step on. And a re-run into
a save directory that holds checkpoints resumes instead of starting over."""
import os
import shutil

import pytest

from msg_megatron.checkpoint.dist import CheckpointError
from msg_megatron.config import load_config
from msg_megatron.training.resume_checks import check_resume
from test_train import TINY, read_metrics, tiny_cfg

STAGES = "growth.stages=[{step: 0, shape: [32, 64, 2, 1]}, {step: 12, shape: [48, 96, 3, 2]}, " \
         "{step: %d, shape: [64, 128, 4, 3]}]"


def cfg(*extra):
    return load_config(None, TINY + list(extra))


def check(saved, mine, step, stage):
    logs = []
    check_resume(mine, saved, {"step": step, "stage": stage}, "ck/step", logs.append)
    return logs


def test_a_finished_ramp_that_a_new_ramp_steps_would_reopen_is_refused():
    saved = cfg()  # ramp 6: the stage-1 units (born at 12) are at 1 from step 18
    with pytest.raises(CheckpointError, match=r"growth.ramp_steps=6, this config has 16: the masks of stage 1 "
                                              r"\(grown at step 12\) would go from 1 to 0.75 at step 24"):
        check(saved, cfg("growth.ramp_steps=16"), 24, 1)
    logs = check(saved, cfg("growth.ramp_steps=16", "growth.allow_ramp_change=true"), 24, 1)
    assert len(logs) == 1 and "growth.ramp_steps 6 -> 16" in logs[0] and "1 to 0.75" in logs[0]
    # mid-ramp: the mask at the resume step changes too
    with pytest.raises(CheckpointError, match="from 0.667 to 0.4"):
        check(saved, cfg("growth.ramp_steps=10"), 16, 1)
    # past both ramps, or before any growth: the same masks, only later stages use the new ramp
    assert check(saved, cfg("growth.ramp_steps=10"), 24, 1) == []
    assert check(saved, cfg("growth.ramp_steps=10"), 8, 0) == []


def test_a_longer_run_that_stretches_the_decay_is_refused_unless_chosen():
    saved = cfg()  # cosine over train.steps=40
    with pytest.raises(CheckpointError, match=r"train.steps 40 -> 80: the learning rate at step 16 would be "
                                              r".*set train.decay_steps=40 to keep the decay"):
        check(saved, cfg("train.steps=80"), 16, 1)
    assert check(saved, cfg("train.steps=80", "train.decay_steps=40"), 16, 1) == []  # the same rate every step
    logs = check(saved, cfg("train.steps=80", "train.allow_lr_schedule_change=true"), 16, 1)
    assert "train.allow_lr_schedule_change=true" in logs[0] and "train.steps 40 -> 80" in logs[0]
    with pytest.raises(CheckpointError, match=r"train.lr 0.003 -> 0.001.*restore them"):
        check(saved, cfg("train.lr=1e-3"), 16, 1)
    with pytest.raises(CheckpointError, match="growth.lr_reset_stages"):  # a reset still ahead moves the rate
        check(saved, cfg("growth.lr_reset_stages=[2]"), 16, 1)
    assert check(saved, cfg("growth.lr_reset_stages=[1]", "train.allow_lr_schedule_change=true"), 8, 0)[0].endswith(
        "the learning rate at step 12 would be 0.003 instead of 0.002661")  # the reset's step, the peak again


def test_the_stages_a_checkpoint_has_reached_cannot_move():
    saved = cfg(STAGES % 24)
    with pytest.raises(CheckpointError, match=r"grew to stage 1 at step 12 .* growth.stages\[1\] now says step 14"):
        check(saved, cfg(STAGES % 24, "growth.stages.1.step=14"), 16, 1)
    with pytest.raises(CheckpointError, match=r"growth.stages\[2\] now starts at step 14, before it"):
        check(saved, cfg(STAGES % 14), 16, 1)
    assert check(saved, cfg(STAGES % 30), 16, 1) == []  # the future may change
    assert check(saved, cfg(STAGES % 16), 16, 1) == []  # grows right at the resume step, as scheduled


@pytest.mark.slow
def test_a_rerun_into_a_save_directory_resumes_and_marks_it(tmp_path, tiny_run, capsys):
    """The same command twice: the second run resumes from the newest checkpoint (here the end,
    step 40: nothing to train, nothing overwritten) and metrics.jsonl says so."""
    from msg_megatron.training.trainer import Trainer

    shutil.copytree(tiny_run / "ck", tmp_path / "ck")
    before = {n: os.path.getmtime(tmp_path / "ck" / n / "msg_meta.json") for n in os.listdir(tmp_path / "ck")
              if n.startswith("step_")}
    out = Trainer(tiny_cfg(tmp_path)).run()  # no checkpoint.load
    assert out["step"] == 40 and "already holds checkpoints: resuming from its newest" in capsys.readouterr().out
    after = {n: os.path.getmtime(tmp_path / "ck" / n / "msg_meta.json") for n in os.listdir(tmp_path / "ck")
             if n.startswith("step_")}
    assert after == before
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r for r in recs if r.get("event") == "resume"] == [
        {**recs[0], "event": "resume", "step": 40, "stage": 2, "checkpoint": str(tmp_path / "ck" / "step_000040")}]
    assert not any("loss" in r for r in recs)

    # refused before any compute: a resume that moves a reached stage
    with pytest.raises(CheckpointError, match=r"growth.stages\[1\] now says step 10"):
        Trainer(tiny_cfg(tmp_path, "growth.stages.1.step=10"))
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step_000040"
