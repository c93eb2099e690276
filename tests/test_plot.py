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
