"""msg-grow to a shape off the checkpoint's schedule (growth/off_schedule.py): refused unless the
schedule to continue on is given; then the grown checkpoint resumes and, after its ramp, exports."""
import json

import pytest

from conftest import off_schedule, run_cli
from msg_megatron.config import Shape, load_config
from msg_megatron.growth.off_schedule import continuing_overrides, grown_config
from test_train import TINY, tiny_cfg

LAYOUT = dict(tensor=1, pipeline=1, virtual_pipeline=1)


def saved():
    return load_config(None, TINY).to_dict()  # stages [32,64,2,1]@0, [48,96,3,2]@12, [64,128,4,3]@24; 40 steps


def test_the_next_stage_keeps_the_checkpoints_config():
    assert grown_config(saved(), 1, 24, Shape(64, 128, 4, 3), [], LAYOUT) == saved()


@pytest.mark.parametrize("stage,step,shape,words", [
    (2, 40, Shape(64, 128, 4, 3), "is the checkpoint's own shape (stage 2): nothing to grow"),
    (1, 16, Shape(64, 128, 4, 3), "is not the next stage of the checkpoint's schedule (growth.stages[2] is "
                                  "(64, 128, 4, 3) from step 24)"),
    (2, 40, Shape(64, 128, 4, 4), "its schedule ends at stage 2, (64, 128, 4, 3)"),
])
def test_a_shape_off_the_schedule_is_refused_naming_the_way_out(stage, step, shape, words):
    with pytest.raises(ValueError) as e:
        grown_config(saved(), stage, step, shape, [], LAYOUT)
    assert words in str(e.value)
    if "own shape" not in words:  # the way out it names works
        assert "e.g. 'growth.stages=[" in str(e.value)
        grown_config(saved(), stage, step, shape, continuing_overrides(saved(), stage, step, shape), LAYOUT)


def test_the_schedule_to_continue_on_is_recorded_with_the_model_section_it_implies():
    more = continuing_overrides(saved(), 2, 40, Shape(64, 160, 4, 4))
    assert more == ["growth.stages=[{step: 0, shape: [32, 64, 2, 1]}, {step: 12, shape: [48, 96, 3, 2]}, "
                    "{step: 24, shape: [64, 128, 4, 3]}, {step: 40, shape: [64, 160, 4, 4]}]", "train.steps=80"]
    got = grown_config(saved(), 2, 40, Shape(64, 160, 4, 4), more, LAYOUT)
    assert got["growth"]["stages"][3] == dict(got["growth"]["stages"][0], step=40, shape=[64, 160, 4, 4])
    assert (got["model"]["ffn_hidden_size"], got["model"]["num_layers"], got["train"]["steps"]) == (160, 4, 80)
    assert got["parallel"] == dict(saved()["parallel"], **LAYOUT)
    with pytest.raises(ValueError, match=r"model section is its schedule's last stage"):
        grown_config(saved(), 2, 40, Shape(64, 160, 4, 4), more + ["model.norm=rmsnorm"], LAYOUT)
    with pytest.raises(ValueError, match=r"make stage 3 --shape \(64, 160, 4, 4\) from the checkpoint's step 40"):
        grown_config(saved(), 2, 40, Shape(64, 160, 4, 4), [more[0].replace("step: 40", "step: 44"), more[1]], LAYOUT)
    with pytest.raises(ValueError, match=r"the schedule to continue on: .*not before train.steps=40"):
        grown_config(saved(), 2, 40, Shape(64, 160, 4, 4), more[:1], LAYOUT)


@pytest.mark.slow
def test_an_off_schedule_growth_resumes_and_exports_after_its_ramp(tmp_path, tiny_run, capsys):
    """The end of the TINY run (step 40, its last stage) grown deeper with the schedule to continue
    on: resumed by a config of that schedule for the ramp (6 steps) and one more, then exported."""
    ck = tiny_run / "ck"
    more = off_schedule(ck, "64,128,4,4")[:1] + ["train.steps=48", "train.decay_steps=40"]
    r = run_cli(["msg_megatron.grow", "--load", str(ck), "--shape", "64,128,4,4", "--save", str(tmp_path / "g"),
                 "--json", *more])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["rel_diff"] <= 1e-5
    from msg_megatron.training.trainer import Trainer

    out = Trainer(tiny_cfg(tmp_path / "b", f"checkpoint.load={tmp_path}/g", *more, "model.num_layers=4")).run()
    assert out["step"] == 48 and out["shape"] == [64, 128, 4, 4]
    last = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step     47 |")][0]
    assert " trained, ETA 0:00:00 | " in last, last  # (the step lines' elapsed time, ETA and clock)
    r = run_cli(["msg_megatron.hf.export", "--load", str(tmp_path / "b" / "ck"), "--out", str(tmp_path / "hf"),
                 "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["shape"] == [64, 128, 4, 4]
