"""growth.schedule=auto (training/auto_growth.py): the run probes grown copies of itself and grows when
one learns faster per FLOP, against plain references: numpy's least squares for the rates, the run
without probes (bitwise), the fixed schedule of the same stages (bitwise), an uninterrupted run
(resumes, bitwise), and one process (TP2 x PP2, 1e-5)."""
import json
import os

import pytest

from conftest import REPO, assert_refused, launch, run_cli
from msg_megatron.config import load_config

BASE = ["model.vocab_size=512", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
        "model.num_layers=2", "model.kv_channels=16", "model.seq_length=32", "growth.ramp_steps=5",
        "train.steps=45", "train.global_batch_size=8", "train.micro_batch_size=4", "train.lr=3e-3",
        "train.warmup_steps=4", "train.eval_interval=0", "train.eval_iters=2", "train.log_interval=1",
        "data.corpus_mb=0.3", "data.valid_fraction=0.05", "logging.wandb=disabled"]
AUTO = ["growth.schedule=auto", "growth.stages=[{step: 0, shape: [32, 64, 2, 1]}]", "growth.auto.check_interval=20",
        "growth.auto.probe_steps=10", "growth.auto.window=20", "growth.auto.max_probe_share=1"]
# the run's own learning rate stalls (a warmup far longer than the run) while a grown copy restarts at the peak
# (growth.lr_reset_stages, paper appendix D): a candidate that is clearly better
STALLED = ["train.lr=2e-2", "train.warmup_steps=2000", "growth.lr_reset_stages=[1]"]


def auto_cfg(tmp, *extra):
    return load_config(None, BASE + AUTO + [f"logging.run_dir={tmp}/run", f"checkpoint.save={tmp}/ck"] + list(extra))


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(run_dir) -> dict:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}  # (a resume's later lines win)


def decisions(run_dir) -> list:
    out = {}
    for r in records(run_dir):
        if r.get("event") == "auto_decision":
            out[r["step"]] = {"choice": r["choice"], "gamma": r["gamma"],
                              "candidates": [(c["shape"], c["gamma"], c["sigma"]) for c in r["candidates"]]}
    return [out[s] | {"step": s} for s in sorted(out)]


# ---- the rates (unit tier) ---------------------------------------------------------------------
def test_grown_gain_is_the_paired_least_squares_rate():
    """grown_gain against numpy's least squares written out: the grown model's slope is the run's plus
    the slope of the paired differences; gamma = -slope / cost; and the batch noise both share cancels
    (the same noise added to both leaves delta and its error unchanged)."""
    import numpy as np

    from msg_megatron.training.rates import grown_gain

    rng = np.random.default_rng(1)
    steps = np.arange(10)
    batch = rng.normal(0, 0.2, 10)  # shared: the batches' difficulty
    cur = 5.0 - 0.01 * steps + batch
    grown = 5.0 - 0.05 * steps + batch + rng.normal(0, 0.002, 10)
    run_slope = (-0.01, 0.004)
    g = grown_gain(run_slope, 2.0, list(cur), list(grown), 3.0)
    (d, _), cov = np.polyfit(steps, grown - cur, 1, cov=True)
    assert g["delta"] == pytest.approx(d) and g["delta_se"] == pytest.approx(float(np.sqrt(cov[0, 0])))
    assert g["gamma"] == pytest.approx(-(-0.01 + d) / 3.0)
    assert g["gain"] == pytest.approx(-(-0.01 + d) / 3.0 - 0.01 / 2.0)
    assert g["gain_se"] == pytest.approx(float(np.hypot(np.sqrt(cov[0, 0]) / 3.0, 0.004 * (1 / 2.0 - 1 / 3.0))))
    assert g["sigma"] > 10  # 0.04 / step faster at 1.5x the cost, measured to ~0.0003
    louder = grown_gain(run_slope, 2.0, list(cur + 3 * batch), list(grown + 3 * batch), 3.0)
    assert louder["delta"] == pytest.approx(g["delta"]) and louder["delta_se"] == pytest.approx(g["delta_se"])
    diverged = grown_gain(run_slope, 2.0, list(cur), [5.0] * 9 + [float("nan")], 3.0)
    assert diverged["gain"] == float("-inf")


def test_gap_profile_is_the_paired_gap_by_quarter_and_its_late_slope():
    """gap_profile against numpy: the mean of grown - run over each quarter of the probe, and the least-squares
    slope (with its standard error) over the second half; a transient (behind, then gaining) shows as positive
    early quarters and a negative late slope while the slope over the whole probe is near 0."""
    import numpy as np

    from msg_megatron.training.rates import gap_profile, grown_gain

    rng = np.random.default_rng(2)
    steps = np.arange(14)
    batch = rng.normal(0, 0.2, 14)
    cur = 5.0 - 0.01 * steps + batch
    gap = np.where(steps < 7, 0.004 * steps, 0.028 - 0.006 * (steps - 7)) + rng.normal(0, 0.001, 14)
    g = gap_profile(list(cur), list(cur + gap))
    bounds = [0, 4, 7, 10, 14]  # (round(k * 14 / 4): 0, 3.5 -> 4, 7, 10.5 -> 10, 14)
    assert g["gap_quarters"] == pytest.approx([gap[a:b].mean() for a, b in zip(bounds, bounds[1:])], abs=1e-12)
    (slope, _), cov = np.polyfit(steps[7:], gap[7:], 1, cov=True)
    assert g["late_delta"] == pytest.approx(slope) and g["late_delta_se"] == pytest.approx(float(np.sqrt(cov[0, 0])))
    assert g["gap_quarters"][1] > 0.01 and g["late_delta"] < -0.005
    assert abs(grown_gain((-0.01, 0.001), 1.0, list(cur), list(cur + gap), 1.0)["delta"]) < 0.001  # (whole probe: ~0)
    short = gap_profile([5.0, 4.9, 4.8], [5.0, 4.95, 4.9])  # (3 steps: three quarters, no late slope)
    assert short["gap_quarters"] == pytest.approx([0.0, 0.05, 0.1]) and np.isnan(short["late_delta"])
    assert np.isnan(gap_profile([5.0] * 8, [5.0] * 7 + [float("nan")])["late_delta"])
    with pytest.raises(ValueError, match="paired losses"):
        gap_profile([5.0] * 3, [5.0] * 4)


def test_probes_shorter_than_the_ramp_are_warned_of(tmp_path):
    """A probe shorter than growth.ramp_steps ends inside the growth's transient: said at the start (and by
    msg-plan: tests/test_plan.py), naming both fields and the fix; nothing for probes that cover the ramp."""
    from msg_megatron.config.candidates import probe_warnings

    (w,) = probe_warnings(auto_cfg(tmp_path, "growth.ramp_steps=20"))
    assert all(x in w for x in ("probe_steps=10", "ramp_steps=20", "0.50", "probe_steps >= 20"))
    assert probe_warnings(auto_cfg(tmp_path)) == []  # (probe_steps 10 >= ramp_steps 5)
    assert probe_warnings(load_config(None, BASE)) == []  # (a fixed schedule)


@pytest.mark.parametrize("extra, words", [
    (["growth.auto.probe_steps=30"], ["growth.auto.probe_steps=30", "step 50", "train.steps=45"]),
    (["growth.stages=[{step: 0, shape: [64, 128, 4, 2]}]"], ["no candidate", "model section's shape already"]),
    (["growth.auto.shapes=[[64, 64, 2, 3]]"], ["growth.auto.shapes[0]", "beyond the model section"]),
    (["growth.stages=[{step: 0, shape: [32, 64, 2, 3]}]"], ["growth.stages[0].shape", "larger than the model"]),
    (["checkpoint.save="], ["checkpoint.save"]),
    (["growth.auto.window=5"], ["growth.auto.window=5", "probe_steps=10"]),
    (["growth.auto.cost=tokens"], ["growth.auto.cost"]),
    (["growth.auto.margin_sigma=-1"], ["growth.auto.margin_sigma"]),
    (["growth.auto.max_probe_share=0"], ["growth.auto.max_probe_share=0", "(0, 1]"]),
    (["growth.stages=[]"], ["growth.stages[0]"]),
    (["growth.stages=[{step: 0, shape: [32, 64, 2, 1], tensor: 2}]"], ["job's layout"]),
    (["model.num_attention_heads=3", "parallel.tensor=2"], ["could grow into [32, 64, 3, 1]", "parallel.tensor=2"]),
])
def test_bad_auto_settings_are_refused_before_compute(tmp_path, extra, words):
    assert_refused(BASE + AUTO + [f"checkpoint.save={tmp_path}/ck"] + extra, words)


def test_a_probe_share_without_room_for_a_check_is_refused_before_compute(tmp_path):
    """The first check alone over max_probe_share: refused where the run is set up (run_setup, before data or
    model), with the share it needs; the share outside (0, 1] already at config load."""
    from msg_megatron.training.auto_growth import check_probe_share

    assert_refused(BASE + AUTO + [f"checkpoint.save={tmp_path}/ck", "growth.auto.max_probe_share=0.05"],
                   ["growth.auto.max_probe_share=0.05", "no room for a check", "step 20"],
                   make=lambda *o: check_probe_share(load_config(None, list(o))))
    check_probe_share(auto_cfg(tmp_path))  # (share 1: fits)


def test_a_check_runs_only_within_the_probe_share(tmp_path):
    """growth.auto.max_probe_share: a check runs when its cheapest probe (probe_steps at that candidate's FLOPs
    per step) plus what the earlier checks cost stay within the share of the run's FLOPs if it never grew after the
    check; otherwise the skip is logged and the run trains on. The share written out by hand."""
    from types import SimpleNamespace

    from msg_megatron.config import Shape
    from msg_megatron.model.gpt import padded_vocab_size
    from msg_megatron.training.auto_growth import AutoSchedule
    from msg_megatron.training.flops import flops_per_token

    cfg = auto_cfg(tmp_path)
    vocab, tokens, start = padded_vocab_size(cfg.model), 8 * cfg.model.seq_length, Shape(32, 64, 2, 1)
    fpt = [flops_per_token(cfg.model, s, vocab) for s in
           (start, Shape(64, 64, 2, 1), Shape(32, 128, 2, 1), Shape(32, 64, 4, 1), Shape(32, 64, 2, 2))]
    spent, earlier = 20 * tokens * fpt[0], 1e9  # (20 steps of the start shape; earlier probes' FLOPs)
    check = 10 * tokens * min(fpt[1:])  # (the cheapest candidate's probe: the first a check runs)
    share = (earlier + check) / (spent + earlier + 25 * tokens * fpt[0] + check)
    logged = []
    tr = SimpleNamespace(step=20, schedule=cfg.schedule(), stage=0, train_flops=spent + earlier,
                         model=SimpleNamespace(shape=start, vocab_padded=vocab),
                         metrics=SimpleNamespace(log=logged.append, print=lambda *_: None))
    auto = AutoSchedule(cfg, {"probe_flops": earlier})
    auto.a.max_probe_share = share * 1.001
    assert auto.due(tr) and not logged
    auto.a.max_probe_share = share * 0.999
    assert not auto.due(tr)
    assert logged[0]["event"] == "auto_skipped" and logged[0]["probe_share_if_checked"] == pytest.approx(share)
    tr.step = 21  # (not a multiple of check_interval: not due, nothing logged)
    assert not auto.due(tr) and len(logged) == 1


def test_a_check_whose_checkpoint_is_gone_names_it(tmp_path):
    """A resume inside a check's window from a directory without the check's own checkpoint (neither in
    checkpoint.save nor beside the one resumed from): refused, naming the checkpoint and the two fixes; found
    beside the resumed one, it is used."""
    from types import SimpleNamespace

    from msg_megatron.checkpoint.dist import CheckpointError
    from msg_megatron.training.auto_growth import AutoSchedule

    auto = AutoSchedule(auto_cfg(tmp_path), {"check": {"step": 20, "from": "step_000020", "consumed": 160,
                                                       "current": {}}})
    other = tmp_path / "elsewhere"
    (other / "step_000025").mkdir(parents=True)
    tr = SimpleNamespace(resumed_from=str(other / "step_000025"))
    with pytest.raises(CheckpointError, match="step_000020.*resume from a checkpoint before step 20.*copy"):
        auto._start_path(tr)
    (other / "step_000020").mkdir()
    assert auto._start_path(tr) == str(other / "step_000020")


# ---- runs (slow tier) --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """The stalled run, saving every 5 steps (it grows at its decision, step 30), and the normal one."""
    from msg_megatron.training.trainer import Trainer

    tmp = tmp_path_factory.mktemp("auto")
    Trainer(auto_cfg(tmp / "stalled", *STALLED, "train.save_interval=5", "checkpoint.keep=20")).run()
    Trainer(auto_cfg(tmp / "normal")).run()
    return tmp


@pytest.mark.slow
def test_auto_grows_into_a_clearly_better_candidate_and_not_otherwise(runs):
    """The stalled run checks at step 20: it trains its window (20-29), then probes candidates from step 20
    cheapest first and keeps the first above the margin: its growth is at step 20, its steps replace the
    window's (metrics.jsonl event auto_kept). Early in the normal run every candidate is behind: no growth."""
    from msg_megatron.config import Shape
    from msg_megatron.model.gpt import padded_vocab_size
    from msg_megatron.training.flops import flops_per_token
    from msg_megatron.training.runs import current

    grew = decisions(runs / "stalled" / "run")
    assert [d["step"] for d in grew] == [30] and grew[0]["choice"] is not None
    probed = grew[0]["candidates"]  # (cheapest first; none probed after the one kept)
    assert probed[-1][0] == grew[0]["choice"] and probed[-1][2] > 2 and all(c[2] <= 2 for c in probed[:-1]), grew
    everything = records(runs / "stalled" / "run")
    recs = current(everything)
    growth = [r for r in recs if r.get("event") == "growth"]
    assert [(g["step"], g["to"]) for g in growth] == [(20, grew[0]["choice"])]
    assert abs(growth[0]["probe_loss_after"] - growth[0]["probe_loss_before"]) <= 1e-5 * growth[0]["probe_loss_before"]
    trained = [r for r in recs if "loss" in r and "event" not in r]
    assert [r["step"] for r in trained] == list(range(45))
    assert all((r["shape"] == grew[0]["choice"]) == (r["step"] >= 20) for r in trained)
    assert all(bool(r.get("probe")) == (20 <= r["step"] < 30) for r in trained)  # (the kept probe's steps)
    window = [r for r in everything if "loss" in r and "event" not in r and 20 <= r["step"] < 30 and not r.get("probe")]
    assert len(window) == 10 and all(r["shape"] == [32, 64, 2, 1] for r in window)  # (the run's own, replaced)
    assert [r["step"] for r in everything if r.get("event") == "auto_check"] == [20]
    # the kept probe's gap profile is its logged losses' minus the window's (numpy, 1e-12)
    import numpy as np
    row = [r for r in everything if r.get("event") == "auto_decision"][0]["candidates"][-1]
    gap = np.array([r["loss"] for r in trained if r.get("probe")]) - np.array([r["loss"] for r in window])
    assert row["gap_quarters"] == pytest.approx([gap[a:b].mean() for a, b in ((0, 2), (2, 5), (5, 8), (8, 10))],
                                                abs=1e-12)
    assert row["late_delta"] == pytest.approx(np.polyfit(np.arange(5, 10), gap[5:], 1)[0], abs=1e-12)
    probes = [r for r in everything if r.get("event") == "auto_probes"]
    assert [p["step"] for p in probes] == [30] and 0 < probes[0]["probe_share"] < 1 and probes[0]["window_s"] > 0
    assert any("gamma" in r and "gamma_se" in r for r in trained)  # (the running estimate)
    # early, the small model learns faster per FLOP than any grown copy: no growth, all four probed cheapest first
    kept = decisions(runs / "normal" / "run")
    assert [d["step"] for d in kept] == [30] and kept[0]["choice"] is None
    assert len(kept[0]["candidates"]) == 4 and all(c[2] < 2 for c in kept[0]["candidates"]), kept
    cfg = auto_cfg(runs)
    cost = [flops_per_token(cfg.model, Shape(*c[0]), padded_vocab_size(cfg.model)) for c in kept[0]["candidates"]]
    assert cost == sorted(cost)


@pytest.mark.slow
def test_probes_leave_the_run_bitwise_where_it_was(runs, tmp_path):
    """The normal run probed four grown copies from step 20 at step 30 and kept its shape: every loss equals a
    run of that shape without any probe, bitwise (weights, AdamW state, masks, RNG and data position restored)."""
    from msg_megatron.training.trainer import Trainer

    plain = load_config(None, BASE + ["model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_attention_heads=2",
                                      "model.num_layers=1", f"logging.run_dir={tmp_path}/run"])
    Trainer(plain).run()
    want, got = losses(tmp_path / "run"), losses(runs / "normal" / "run")
    assert sorted(got) == list(range(45)) and got == want


@pytest.mark.slow
def test_a_committed_growth_is_the_fixed_schedules(runs, tmp_path):
    """msg-schedule --from-auto writes the stages the run chose as a fixed schedule; training it gives the
    auto run's losses bitwise (the growth it committed is the growth a fixed stage makes at that step)."""
    from msg_megatron.training.trainer import Trainer

    out = tmp_path / "fixed.yaml"
    r = run_cli(["msg_megatron.schedule_from_auto", "--from-auto", str(runs / "stalled" / "ck"), "--output", str(out)])
    assert r.returncode == 0, r.stderr
    fixed = load_config(str(out), [f"logging.run_dir={tmp_path}/run"])
    choice = decisions(runs / "stalled" / "run")[0]["choice"]
    assert fixed.growth.schedule == "fixed" and [(s.step, s.shape) for s in fixed.growth.stages] == [
        (0, [32, 64, 2, 1]), (20, choice)]
    assert "not the model section" in r.stderr  # (it stopped at one growth: the model section is the shape reached)
    Trainer(fixed).run()
    assert losses(tmp_path / "run") == losses(runs / "stalled" / "run")
    bad = run_cli(["msg_megatron.schedule_from_auto", "--from-auto", str(tmp_path / "nothing")])
    assert bad.returncode == 2 and "nothing" in bad.stderr


@pytest.mark.slow
def test_resume_inside_a_probe_and_across_a_growth_is_bitwise(runs, tmp_path):
    """kill -9 in the probes (as a node's crash ends the trainer and its helper processes): the run resumes
    from the window end's checkpoint and replays the probes from the check's (which checkpoint.keep=1 did
    not prune); resumed inside the window (step 25) or mid-ramp after the kept growth (step 35): losses and
    decisions bitwise the uninterrupted run's."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from msg_megatron.training.trainer import Trainer

    ref = runs / "stalled"
    want, want_dec = losses(ref / "run"), decisions(ref / "run")
    for step in (25, 35):
        Trainer(auto_cfg(tmp_path / f"r{step}", *STALLED, f"checkpoint.load={ref}/ck/step_{step:06d}")).run()
        got = losses(tmp_path / f"r{step}" / "run")
        first = 20 if step < 30 else step  # (resumed inside the window, the run logs the kept probe's steps from 20)
        assert sorted(got) == list(range(first, 45)) and all(got[s] == want[s] for s in got), step
        assert decisions(tmp_path / f"r{step}" / "run") == [d for d in want_dec if d["step"] >= step]

    cfg = auto_cfg(tmp_path / "k", *STALLED, "checkpoint.keep=1")
    (tmp_path / "k.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    out = open(tmp_path / "k.out", "w")
    run = subprocess.Popen([sys.executable, "-m", "msg_megatron.pretrain", str(tmp_path / "k.yaml")], cwd=REPO,
                           env=dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1"), stdout=out,
                           stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and run.poll() is None and "[auto] probing" not in (tmp_path / "k.out").read_text():
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=60)
    text = (tmp_path / "k.out").read_text()
    assert text.count("[auto] probing") == 1 and "[auto] step 30: gamma" not in text, text[-2000:]  # (in the probes)
    assert (tmp_path / "k" / "ck" / "latest").read_text().strip() == "step_000030"  # the window's end
    assert {"step_000020", "step_000030"} <= set(os.listdir(tmp_path / "k" / "ck"))  # (20: protected from keep=1)
    Trainer(cfg).run()
    assert losses(tmp_path / "k" / "run") == want and decisions(tmp_path / "k" / "run") == want_dec


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tp2_pp2_decides_and_trains_as_one_process(tmp_path, tiny_data):
    """The stalled run at TP2 x PP2 (four pool ranks; probes at the run's layout) against one process: the
    same decisions, each rate within 1e-5 relative, each loss within 1e-5."""
    import yaml

    from msg_megatron.training.trainer import Trainer

    shapes = ["model.num_layers=4", "growth.stages=[{step: 0, shape: [32, 64, 2, 2]}]"]
    Trainer(auto_cfg(tmp_path / "one", *STALLED, *shapes)).run()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({}))
    r = launch(4, ["msg_megatron.pretrain", str(cfg), *BASE, *AUTO, *STALLED, *shapes, "parallel.tensor=2",
                   "parallel.pipeline=2", f"logging.run_dir={tmp_path}/tp/run", f"checkpoint.save={tmp_path}/tp/ck"],
               timeout=540)
    assert r.returncode == 0, r.stderr[-3000:]
    one, tp = decisions(tmp_path / "one" / "run"), decisions(tmp_path / "tp" / "run")
    assert [(d["step"], d["choice"]) for d in tp] == [(d["step"], d["choice"]) for d in one] and one[0]["choice"]
    for a, b in zip(one, tp):
        for (sa, ga, _), (sb, gb, _) in zip(a["candidates"], b["candidates"]):
            assert sa == sb and gb == pytest.approx(ga, rel=1e-5)
    la, lb = losses(tmp_path / "one" / "run"), losses(tmp_path / "tp" / "run")
    assert sorted(la) == sorted(lb) and all(abs(la[s] - lb[s]) <= 1e-5 * abs(la[s]) for s in la)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_time_as_the_cost_decides_alike_on_every_rank(tmp_path, tiny_data):
    """growth.auto.cost=time: each rank measures its own seconds; the decision takes the slowest rank's, so
    both DP ranks grow alike (a disagreement would stop the run at the next step's collectives)."""
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({}))
    r = launch(2, ["msg_megatron.pretrain", str(cfg), *BASE, *AUTO, *STALLED, "growth.auto.cost=time",
                   f"logging.run_dir={tmp_path}/run", f"checkpoint.save={tmp_path}/ck"], timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    dec = decisions(tmp_path / "run")
    assert [d["step"] for d in dec] == [30] and dec[0]["choice"] and dec[0]["candidates"]
    assert all(json.loads(line)["unit"] == "loss per second" for line in (tmp_path / "run" / "metrics.jsonl")
               .read_text().splitlines() if '"auto_decision"' in line)
