"""tools/bench_growth.py --quick end to end for both families (about 40 s each): every method runs,
the report, JSON and plot are written, the full-size run continues past its budget (its figures at
the budget taken from the same run) and every speed-up is a measured ratio or a stated bound, and
the growth records say what the paper says: MSG's probe loss is unchanged at every growth (<= 1e-5
relative), Net2Net's changes at the hidden growth under LayerNorm (eq. 7; BERT's post-LN too); every
method's model is scored downstream at the budget."""
import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # processes, training runs: the full tier (README); `-m "not slow"` skips it


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family, stem", [("gpt", "growth_cpu_quick"), ("bert", "growth_cpu_bert_quick")])
def test_bench_growth_quick(tmp_path, cache_dir, family, stem):
    r = subprocess.run([sys.executable, "tools/bench_growth.py", "--family", family, "--quick", "--json", "--out-dir",
                        str(tmp_path), "--work-dir", str(tmp_path / "runs")], capture_output=True, text=True,
                       timeout=540, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"{stem}.{ext}").stat().st_size > 0
    assert res["family"] == family and res["budget_steps"] == 60 and res["cap_steps"] == 180
    m = res["methods"]
    full = m["full"]
    assert res["budget_steps"] <= full["ext_steps"] <= res["cap_steps"] and full["val_steps"][-1] == 60
    target = min(m[n]["final_val_loss"] for n in ("msg", "auto", "nomask", "net2net"))
    assert (full["ext_steps"] == res["cap_steps"]) == (min(v for _, v in full["val_curve_ext"]) > target)
    for name in ("msg", "auto", "nomask", "net2net"):  # a ratio where the full run got there, else a bound
        assert (m[name]["speedup"] is None) != (m[name]["speedup_bound"] is None)
    assert sorted(m) == ["auto", "full", "msg", "net2net", "nomask"]
    # MSG auto: one decision per check (20, 40: decided 4 steps later), its probes inside its training time
    auto = m["auto"]
    assert [d["step"] for d in auto["decisions"]][:1] == [24] and all(d["step"] % 20 == 4 for d in auto["decisions"])
    assert len(auto["probe_spans"]) == len(auto["decisions"]) and 0 < auto["probe_share"] < 1
    assert [g["to"] for g in auto["growths"]] == [d["choice"] for d in auto["decisions"] if d["choice"]]
    report = (tmp_path / f"{stem}.md").read_text()
    assert "MSG auto" in report
    # each probe's gap profile (4-step probes: a quarter per step, no second-half slope), in the report too
    probed = [g for d in auto["decisions"] for g in d["gaps"]]
    assert len(probed) == sum(len(d["candidates"]) for d in auto["decisions"]) > 0
    assert all(len(q) == 4 and late != late for _, q, late, _ in probed)  # (NaN: under 6 steps)
    assert "Each probe's transient" in report and "- (a probe under 6 steps, or diverged)" in report
    assert m["full"]["train_flops"] > m["msg"]["train_flops"]  # the growth schedule costs fewer FLOPs
    assert len(m["msg"]["growths"]) == 4 and not m["full"]["growths"]
    for g in m["msg"]["growths"]:
        assert abs(g["probe_after"] - g["probe_before"]) <= 1e-5 * g["probe_before"]
    hidden = next(g for g in m["net2net"]["growths"] if g["step"] == 30)  # (64, ...) -> (96, ...)
    assert abs(hidden["probe_after"] - hidden["probe_before"]) > 1e-3 * hidden["probe_before"]
    assert [x["ramp_steps"] for x in res["ramp_study"]] == [2, 5]
    assert "wall-time speed-up" in (tmp_path / f"{stem}.md").read_text()
    # every method's model has its downstream scores at the budget (GPT: the shipped lm-eval tasks; BERT:
    # masked-LM accuracy), in the report
    want = {"msg_zen/acc", "msg_nextline/acc", "msg_complete/exact_match", "msg_prose_bpb/bits_per_byte",
            "msg_code_bpb/bits_per_byte"} if family == "gpt" else {"mlm_accuracy"}
    for name in m:
        assert want <= set(m[name]["scores"]), (name, m[name]["scores"])
    eq = full["scores_at_msg_flops"]  # and the full run's where its FLOPs equal MSG's (equal compute)
    assert want <= set(eq["scores"]) and eq["step"] < 60 and abs(eq["train_flops"] / m["msg"]["train_flops"] - 1) < 0.2
    assert "Downstream scores" in (tmp_path / f"{stem}.md").read_text()
