"""msg-gridsearch: the rates of eq. 21 against hand-computed values, and the CLI end to end."""
import json

import pytest

from conftest import run_cli
from msg_megatron.gridsearch import rates

pytestmark = pytest.mark.slow  # processes, training runs: the full tier (README); `-m "not slow"` skips it


def test_rates_of_a_linear_run():
    # loss falls 0.01 per step, 2 steps per second: alpha 0.01, tau 2, gamma = alpha * tau = 0.02
    recs = [{"step": s, "loss": 5.0 - 0.01 * s, "train_time": 0.5 * s, "params": 10, "tokens_per_s": 100.0}
            for s in range(40)]
    r = rates(recs)
    assert r["alpha"] == pytest.approx(0.01) and r["tau"] == pytest.approx(2.0)
    assert r["gamma"] == pytest.approx(0.02) and r["gamma"] == pytest.approx(r["alpha"] * r["tau"])
    assert r["final_loss"] == pytest.approx(sum(5.0 - 0.01 * s for s in range(30, 40)) / 10)
    with pytest.raises(ValueError, match="too few logged steps"):
        rates(recs[:4])


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
