"""msg-plot: a run's curves from metrics.jsonl, a resume's replayed steps replacing the earlier lines."""
import json

import pytest

from conftest import run_cli
from msg_megatron.plot import read_run


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_a_resume_replaces_the_lines_of_the_steps_it_replays(tmp_path):
    step = lambda s, loss: {"step": s, "loss": loss, "lr": 1e-3, "mask": 1.0, "train_time": float(s)}  # noqa: E731
    recs = ([step(s, 10.0 + s) for s in range(6)] + [{"event": "growth", "step": 4, "stage": 1}]
            + [{"step": 4, "val_loss": 9.0}, {"step": 6, "val_loss": 8.0}]
            + [{"event": "resume", "step": 4, "stage": 0, "checkpoint": "ck/step_000004"}]
            + [{"event": "growth", "step": 4, "stage": 1}] + [step(s, 20.0 + s) for s in range(4, 8)]
            + [{"step": 8, "val_loss": 7.0}])
    _write(tmp_path / "metrics.jsonl", recs)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # a run killed mid-line
    run = read_run(str(tmp_path))
    assert [(r["step"], r["loss"]) for r in run["steps"]] == [(0, 10), (1, 11), (2, 12), (3, 13), (4, 24), (5, 25),
                                                               (6, 26), (7, 27)]
    assert [r["step"] for r in run["evals"]] == [4, 8] and [g["step"] for g in run["growths"]] == [4]
    assert len(run["resumes"]) == 1


@pytest.mark.slow
def test_msg_plot_draws_a_real_run(tmp_path, tiny_run):
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.image

    r = run_cli(["msg_megatron.plot", str(tiny_run / "run"), "--out", str(tmp_path / "m.png")])
    assert r.returncode == 0, r.stderr
    assert "40 steps (to step 39)" in r.stdout and "2 growths, 0 resumes" in r.stdout
    assert matplotlib.image.imread(str(tmp_path / "m.png")).shape[:2] == (900, 1200)
    r = run_cli(["msg_megatron.plot", str(tmp_path / "nothing")])
    assert r.returncode == 2 and "RUN_DIR is a run's logging.run_dir" in r.stderr


def test_a_kept_probe_replaces_the_window_it_was_probed_over(tmp_path):
    """growth.schedule=auto: the run trained steps 4-5 (its window, evaluated at 6), then the probe grown at 4
    was kept (event auto_kept at 4): its growth and steps replace the window's lines, in msg-plot and in the
    benchmark's reader (training/runs.current), and the check's own records stay."""
    from msg_megatron.training.runs import current, evals, growths, steps

    def step(s, loss, **k):
        return {"step": s, "loss": loss, "lr": 1e-3, "mask": 1.0, "train_time": float(s), **k}

    recs = ([step(s, 10.0 + s) for s in range(6)] + [{"step": 4, "val_loss": 9.0}, {"step": 6, "val_loss": 8.0}]
            + [{"event": "auto_probes", "step": 6, "train_time_start": 6.0, "train_time_end": 9.0},
               {"event": "auto_decision", "step": 6, "choice": [2, 2, 2, 2]},
               {"event": "auto_kept", "step": 4, "until": 6}, {"event": "growth", "step": 4, "stage": 1}]
            + [step(s, 20.0 + s, probe=True) for s in (4, 5)] + [{"step": 6, "val_loss": 7.5}, step(6, 26.0)])
    _write(tmp_path / "metrics.jsonl", recs)
    run = read_run(str(tmp_path))
    want = [(0, 10), (1, 11), (2, 12), (3, 13), (4, 24), (5, 25), (6, 26)]
    assert [(r["step"], r["loss"]) for r in run["steps"]] == want
    assert [(r["step"], r["val_loss"]) for r in run["evals"]] == [(4, 9.0), (6, 7.5)]
    assert [g["step"] for g in run["growths"]] == [4] and not run["resumes"]
    kept = current(recs)
    assert [(r["step"], r["loss"]) for r in steps(kept)] == want
    assert [(r["step"], r["val_loss"]) for r in evals(kept)] == [(4, 9.0), (6, 7.5)] and len(growths(kept)) == 1
    assert [r["event"] for r in kept if r.get("event", "").startswith("auto_")] == ["auto_probes", "auto_decision",
                                                                                     "auto_kept"]
