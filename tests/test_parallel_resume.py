"""Resume under another layout, and offline growth (msg-grow) onto a new layout, on CPU (gloo): the
parallel runs on the suite's gloo pool, the single-process ones in this process; a checkpoint that
several cases resume is trained once (tests/train_runs.py).

- Resume under another layout (TP, PP, DP, the distributed optimizer's slices, SP + V2, bf16, BERT)
  gives the saved run's losses within 1e-5 relative; at the same layout bitwise.
- msg-grow on the pool reads a TP=2 checkpoint at TP=1 x PP=2 and grows it with the function kept;
  a grown checkpoint resumes; offline growth draws what online growth draws (bitwise); a mid-ramp
  checkpoint keeps its masks; a shape that does not fit the layout is refused.
"""
import json
import math

import pytest

from conftest import launch, off_schedule, run_cli
from train_runs import BERT, DISTOPT, LLAMA, VPP_SP, layout_args, losses, pretrain, trained, write_config

pytestmark = pytest.mark.slow  # training runs: the full tier (README); `-m "not slow"` skips it

# (layout saved, layout resumed, architecture, stages); the checkpoint is taken at step 6, mid-ramp
RESHARD = {
    "tp2_to_tp1": ((2, 1), (1, 1), LLAMA, [[32, 64, 2, 2], [32, 128, 4, 2]]),   # interleaved heads, SwiGLU fc1
    "tp1_to_tp2": ((1, 1), (2, 1), LLAMA, [[32, 64, 2, 2], [32, 128, 4, 2]]),
    "pp1_to_pp2": ((1, 1), (1, 2), [], [[32, 64, 2, 2], [48, 64, 2, 4]]),        # tied copy from the embedding
    "dp1_to_dp2": ((1, 1), (1, 1, 2), [], [[32, 64, 2, 2], [48, 64, 2, 3]]),
    # learned positions and the tied output copy saved from TP2 x PP2, resumed on one process
    "tp2pp2_to_tp1pp1": ((2, 2), (1, 1), [], [[32, 64, 2, 2], [48, 128, 4, 4]]),
    # distributed-optimizer slices over DP=2 saved in model space, resumed at TP=2 with the ordinary one
    "dp2_distopt_to_tp2": ((1, 1, 2), (2, 1), LLAMA, [[32, 64, 2, 2], [32, 128, 4, 2]], (DISTOPT, [])),
    # the same layout, slices loaded into slices: bitwise
    "pp2dp2_distopt_same": ((1, 2, 2), (1, 2, 2), [], [[32, 64, 2, 2], [48, 64, 2, 4]], (DISTOPT, DISTOPT)),
    # each of 4 DP ranks writes only its slice (boxes cut at arbitrary element ranges); read back whole at TP=2
    "dp4_distopt_to_tp2": ((1, 1, 4), (2, 1), LLAMA, [[32, 64, 2, 2], [32, 128, 4, 2]], (DISTOPT, [])),
    # whole shards (as every checkpoint before slices was written) read slice by slice
    "tp2_to_dp2_distopt": ((2, 1), (1, 1, 2), LLAMA, [[32, 64, 2, 2], [32, 128, 4, 2]], ([], DISTOPT)),
    # global layer numbers: an interleaved (V=2: rank 0 holds layers 0, 1, 4, 5 of 8) sequence-parallel
    # run resumed on one process, and a plain PP=2 run resumed interleaved
    "tp2pp2_vpp2_sp_to_tp1pp1": ((2, 2), (1, 1), LLAMA, [[32, 64, 2, 4], [48, 128, 4, 8]],
                                 (VPP_SP, [])),
    "pp2_to_pp2_vpp2": ((1, 2), (1, 2), [], [[32, 64, 2, 4], [48, 64, 2, 8]], ([], ["parallel.virtual_pipeline=2"])),
    # bf16: fp32 masters written and read as slices, parameters rounded and all-gathered from them: bitwise
    "tp2dp2_distopt_bf16_same": ((2, 1, 2), (2, 1, 2), LLAMA + ["train.precision=bf16"],
                                 [[32, 64, 2, 2], [32, 128, 4, 2]], (DISTOPT, DISTOPT)),
    # BERT mid-ramp: the same layout resumes bitwise (masked-LM samples by number), then on one process
    "bert_tp2dp2_same": ((2, 1, 2), (2, 1, 2), BERT, [[32, 64, 2, 2], [48, 128, 4, 2]]),
    "bert_pp2_to_tp1pp1": ((1, 2), (1, 1), BERT, [[32, 64, 2, 2], [48, 128, 4, 4]]),
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", sorted(RESHARD))
def test_resume_under_another_layout(tmp_path, tiny_data, case):
    saved, resumed, extra, stages, *opt_args = RESHARD[case]
    save_args, resume_args = opt_args[0] if opt_args else ([], [])
    # (tp2_to_tp1 and tp2_to_dp2_distopt resume one checkpoint, trained once)
    a = trained(saved, extra, stages, *save_args, save_at=6)
    if save_args == DISTOPT:  # the slices really are 1/DP (the flag reached megatron's optimizer)
        out = (a / "stdout.txt").read_text()
        share = f"({1 / (saved[2] if len(saved) > 2 else 1):.0%})"
        assert "megatron distributed optimizer: AdamW state for" in out and share in out, out[-2000:]
    cfg = tmp_path / "cfg.yaml"
    write_config(cfg, extra, stages)
    world, par = layout_args(resumed)
    r = pretrain(world, cfg, *par, f"logging.run_dir={tmp_path}/b", f"checkpoint.load={a}/ck/step_000006",
                 *resume_args)
    assert r.returncode == 0, r.stderr[-3000:]
    want, _ = losses(a / "run")
    got, _ = losses(tmp_path / "b")
    assert sorted(got) == [6, 7]
    for step in got:
        if saved == resumed and save_args == resume_args:
            assert got[step] == want[step], (step, got[step], want[step])  # same layout: bitwise
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])


@pytest.mark.timeout(600)
def test_offline_growth_onto_a_new_layout(tmp_path, tiny_data):
    """Train at TP=2 PP=1, then `msg-grow` on two ranks reads it at TP=1 PP=2, grows every
    dimension and writes the new layout: validation loss equal before and after (<= 1e-5 rel), and
    equal to the source run's own final validation loss (the reshard on load is exact too)."""
    a = trained((2, 1), LLAMA + ["train.eval_iters=2"], [[32, 64, 2, 2], [32, 128, 4, 2]], save_at=8)
    with open(a / "run" / "metrics.jsonl") as f:
        source_val = [json.loads(x) for x in f if "val_loss" in x][-1]["val_loss"]
    r = launch(2, ["msg_megatron.grow", "--load", str(a / "ck"), "--shape", "48,192,6,4",
                   "--save", str(tmp_path / "grown"), "--tensor", "1", "--pipeline", "2", "--json",
                   *off_schedule(a / "ck", "48,192,6,4")])
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["layout"] == {"tensor": 1, "pipeline": 2} and out["to"] == [48, 192, 6, 4]
    assert abs(out["val_loss_before"] - source_val) <= 1e-5 * source_val
    assert out["rel_diff"] <= 1e-5
    from msg_megatron.checkpoint.dist import read_meta

    meta = read_meta(str(tmp_path / "grown"), full=True)
    assert meta["shape"] == [48, 192, 6, 4] and meta["config"]["parallel"]["pipeline"] == 2


def test_msg_grow_rejects_a_shape_that_does_not_fit_the_layout(tmp_path, tiny_data):
    a = trained((1, 1), [], [[32, 64, 2, 2], [32, 128, 4, 2]], save_at=8)
    r = run_cli(["msg_megatron.grow", "--load", str(a / "ck"), "--shape", "48,192,6,3", "--save",
                 str(tmp_path / "g"), "--pipeline", "2"])
    assert r.returncode == 2 and "layers by the pipeline degree" in r.stderr and "--pipeline 2" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "g").exists()


@pytest.mark.timeout(300)
def test_training_resumes_from_an_offline_grown_checkpoint(tmp_path, tiny_data):
    """msg-grow's copied layers have no AdamW state yet (fresh moments): resuming must start them
    fresh rather than ask the checkpoint for tensors it does not hold."""
    stages = [[32, 64, 2, 2], [32, 64, 2, 4]]
    a = trained((1, 1), ["train.steps=10"], stages, save_at=4)
    r = run_cli(["msg_megatron.grow", "--load", str(a / "ck" / "step_000004"), "--shape", "32,64,2,4",
                 "--save", str(tmp_path / "g"), "--no-verify"])
    assert r.returncode == 0, r.stderr[-2000:]
    # the grown checkpoint is stage 1 at step 4: the same config resumes it (stage 1 runs from step 4 on)
    cfg = tmp_path / "cfg.yaml"
    write_config(cfg, ["train.steps=10"], stages)
    r = pretrain(1, cfg, f"logging.run_dir={tmp_path}/b", f"checkpoint.load={tmp_path}/g")
    assert r.returncode == 0, r.stderr[-2000:]
    got, _ = losses(tmp_path / "b")
    assert sorted(got) == list(range(4, 10)) and all(math.isfinite(v) for v in got.values())


@pytest.mark.timeout(300)
def test_offline_growth_draws_what_online_growth_draws(tmp_path, tiny_data):
    """One seed rule: (a) training through the growth at step 4 and (b) stopping at step 4, growing
    the checkpoint with msg-grow to the next stage's shape and resuming give bitwise equal losses
    after the growth (new weights ~ N(0, 0.02) in every dimension, AdamW moments grown alike)."""
    stages = [[32, 64, 2, 2], [48, 128, 4, 3]]
    # (the checkpoint at step 4 is taken before the growth at the start of step 4)
    a = trained((1, 1), [], stages, save_at=4)
    r = run_cli(["msg_megatron.grow", "--load", str(a / "ck" / "step_000004"), "--shape",
                 ",".join(map(str, stages[1])), "--save", str(tmp_path / "g"), "--no-verify"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = pretrain(1, a / "cfg.yaml", f"logging.run_dir={tmp_path}/c", f"checkpoint.load={tmp_path}/g")
    assert r.returncode == 0, r.stderr[-2000:]
    want, _ = losses(a / "run")
    got, _ = losses(tmp_path / "c")
    assert sorted(got) == [4, 5, 6, 7]
    for step in got:
        assert got[step] == want[step], (step, got[step], want[step])


@pytest.mark.timeout(300)
def test_offline_growth_of_a_mid_ramp_checkpoint_preserves_the_function(tmp_path, tiny_data):
    """The checkpoint of step 6 is mid-ramp (grown at step 4, ramp 3): msg-grow keeps the old masks
    at their saved values (it used to reset them to step 6's, changing the function by ~2e-3) and
    adds new ones at 0: validation loss equal within 1e-6. Its own shape is refused (nothing to grow;
    it once passed silently as a no-op)."""
    a = trained((1, 1), LLAMA + ["train.eval_iters=2"], [[32, 64, 2, 2], [32, 128, 4, 2]], save_at=6)
    ck = a / "ck" / "step_000006"
    r = run_cli(["msg_megatron.grow", "--load", str(ck), "--shape", "32,128,4,2", "--save", str(tmp_path / "g")])
    assert r.returncode == 2 and "is the checkpoint's own shape (stage 1): nothing to grow" in r.stderr, r.stderr
    assert not (tmp_path / "g").exists()
    shape = "48,192,6,3"
    r = run_cli(["msg_megatron.grow", "--load", str(ck), "--shape", shape, "--save", str(tmp_path / "g"), "--json",
                 *off_schedule(ck, shape)])
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["rel_diff"] <= 1e-6, out


@pytest.mark.timeout(300)
def test_a_resume_runs_at_its_stages_declared_layout(tmp_path, tiny_data):
    """Stage 1 declared at tensor=2: the run at TP1 (DP2) saves and exits 76 at the boundary,
    msg-grow reshards to TP2, and the same config resumes it at TP2 without parallel.tensor=2 on
    the command line (it once refused: "launch it with parallel.tensor=2")."""
    import yaml

    cfg = tmp_path / "cfg.yaml"
    write_config(cfg, ["train.steps=6"], [[32, 64, 2, 2], [32, 128, 4, 2]])
    data = yaml.safe_load(cfg.read_text())
    data["growth"]["stages"][1]["tensor"] = 2
    cfg.write_text(yaml.safe_dump(data))
    r = pretrain(2, cfg, f"logging.run_dir={tmp_path}/a", f"checkpoint.save={tmp_path}/ck")
    assert r.returncode == 76, r.stderr[-2000:]
    r = launch(2, ["msg_megatron.grow", "--load", str(tmp_path / "ck"), "--shape", "32,128,4,2", "--tensor", "2",
                   "--save", str(tmp_path / "g"), "--no-verify"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = pretrain(2, cfg, f"logging.run_dir={tmp_path}/b", f"checkpoint.load={tmp_path}/g")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[layout] resuming stage 1, which growth.stages declares at tensor=2 pipeline=1" in r.stdout, r.stdout
    assert "tensor=2 pipeline=1 data=1" in r.stdout
    got, _ = losses(tmp_path / "b")
    assert sorted(got) == [4, 5]
