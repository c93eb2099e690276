"""msg-gridsearch: the rates of eq. 21 against hand-computed values, and the CLI end to end."""
import json

import pytest

from conftest import run_cli
from msg_megatron.gridsearch import rates

pytestmark = pytest.mark.slow  # processes, training runs: the full tier (README); `-m "not slow"` skips it


def test_rates_of_a_linear_run():
    # loss falls 0.01 per step, 2 steps per second: alpha 0.01, tau 2, gamma = alpha * tau = 0.02
    recs = [{"step": s, "loss": 5.0 - 0.01 * s, "train_time": 0.5 * s, "params": 10, "tokens_per_s": 100.0,
             "train_flops": 2e12 * s} for s in range(40)]
    r = rates(recs)
    assert r["gamma_per_pflop"] == pytest.approx(0.01 / 2e12 * 1e15)  # 0.01 per step, 2 TFLOP per step
    assert r["alpha"] == pytest.approx(0.01) and r["tau"] == pytest.approx(2.0)
    assert r["gamma"] == pytest.approx(0.02) and r["gamma"] == pytest.approx(r["alpha"] * r["tau"])
    assert r["final_loss"] == pytest.approx(sum(5.0 - 0.01 * s for s in range(30, 40)) / 10)
    with pytest.raises(ValueError, match="too few logged steps"):
        rates(recs[:4])
    assert r["gamma_se"] == pytest.approx(0.0, abs=1e-12)  # no noise on a straight line


def test_gamma_noise_is_the_slopes_standard_error():
    """gamma's standard error on a noisy run equals numpy's least-squares fit covariance (independent
    reference), and shrinks as the noise does."""
    import numpy as np

    rng = np.random.default_rng(0)
    for sd in (0.05, 0.005):
        noise = rng.normal(0, sd, 60)
        recs = [{"step": s, "loss": 5.0 - 0.01 * s + float(noise[s]), "train_time": 0.5 * s, "params": 10,
                 "tokens_per_s": 100.0} for s in range(60)]
        r = rates(recs)
        t = np.array([x["train_time"] for x in recs[30:]])
        y = np.array([x["loss"] for x in recs[30:]])
        (slope, _), cov = np.polyfit(t, y, 1, cov=True)
        assert r["gamma"] == pytest.approx(-slope) and r["gamma_se"] == pytest.approx(float(np.sqrt(cov[0, 0])))
        assert r["gamma_se"] < 0.6 * sd  # (30 points over 15 s: se ~ sd / 22)


@pytest.mark.timeout(300)
def test_gridsearch_cli(tmp_path, tiny_data):
    over = ["model.vocab_size=512", "model.seq_length=32", "data.corpus_mb=0.3", "data.valid_fraction=0.05",
            "train.global_batch_size=4", "train.micro_batch_size=4", "checkpoint.save="]
    r = run_cli(["msg_megatron.gridsearch", "configs/demo_cpu.yaml", *over, "--steps", "12", "--json",
                 "--out", str(tmp_path), "--candidates", "64,128,2,1", "128,256,4,2"])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert [x["shape"] for x in res] == [[64, 128, 2, 1], [128, 256, 4, 2]]
    assert res[0]["params"] < res[1]["params"] and res[0]["tau"] > 0
    for x in res:  # each candidate trained (and logged) exactly the requested steps
        with open(tmp_path / "x".join(map(str, x["shape"])) / "metrics.jsonl") as f:
            assert len([1 for line in f if '"loss"' in line]) == 12
    r = run_cli(["msg_megatron.gridsearch", "configs/demo_cpu.yaml", "--candidates", "64,128,2"])
    assert r.returncode == 2 and "four positive integers" in r.stderr


def _pretrain_in_process(config, overrides, run_dir, timeout=None, stop=None):
    """runs.run_pretrain without the child process (test_gridsearch_cli runs the real children)."""
    from conftest import run_cli
    from msg_megatron.training.runs import RunFailed, read_metrics

    r = run_cli(["msg_megatron.pretrain", config, *overrides, f"logging.run_dir={run_dir}", "logging.wandb=disabled"])
    if r.returncode:
        raise RunFailed(r.stderr[-2000:])
    return read_metrics(run_dir)


@pytest.mark.timeout(600)
def test_gridsearch_builds_a_schedule_one_dimension_per_stage_by_best_gamma(tmp_path, tiny_data, monkeypatch):
    """--schedule: each round tries every dimension not yet final, grown to its final size, and the
    best gamma is the next stage; stages split train.steps equally (remainder first); the printed
    block is a config's growth.stages. (Its five candidate runs in this process.)"""
    from msg_megatron import gridsearch

    monkeypatch.setattr(gridsearch, "run_pretrain", _pretrain_in_process)
    over = ["model.vocab_size=512", "model.seq_length=32", "data.corpus_mb=0.3", "data.valid_fraction=0.05",
            "train.global_batch_size=4", "train.micro_batch_size=4", "checkpoint.save=", "model.hidden_size=96",
            "model.ffn_hidden_size=256", "model.num_attention_heads=2", "model.num_layers=2", "model.kv_channels=32",
            "train.steps=50", "growth.stages=[]"]
    r = run_cli(["msg_megatron.gridsearch", "configs/demo_cpu.yaml", *over, "--steps", "8", "--json",
                 "--out", str(tmp_path), "--schedule", "64,128,2,1"], timeout=500)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert [len(x) for x in res["rounds"]] == [3, 2]  # heads are final already; the last dimension is forced
    shapes = [s for _, s in res["stages"]]
    assert shapes[0] == [64, 128, 2, 1] and shapes[-1] == [96, 256, 2, 2] and len(shapes) == 4
    for a, b in zip(shapes, shapes[1:]):  # one dimension per stage
        assert sum(x != y for x, y in zip(a, b)) == 1
    for results, nxt in zip(res["rounds"], shapes[1:]):
        best = max(results, key=lambda x: x["gamma"])
        assert best["shape"] == nxt and best.get("chosen")
    assert [st for st, _ in res["stages"]] == [0, 14, 26, 38]  # 50 = 14 + 3 x 12
    from msg_megatron.config import load_config
    from msg_megatron.gridsearch import stages_yaml

    cfg = tmp_path / "grown.yaml"
    cfg.write_text(stages_yaml(res["stages"]) + "\n")
    loaded = load_config(str(cfg), [o for o in over if not o.startswith("growth.")])
    assert [list(s.shape) for s in loaded.growth.stages] == shapes
    r = run_cli(["msg_megatron.gridsearch", "configs/demo_cpu.yaml", "--schedule", "256,256,4,2"])
    assert r.returncode == 2 and "larger than the config's model shape" in r.stderr
