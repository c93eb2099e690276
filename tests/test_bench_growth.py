"""tools/bench_growth.py --quick end to end (about 40 s): every method runs, the report, JSON and
plot are written, and the growth records say what the paper says: MSG's probe loss is unchanged at
every growth (<= 1e-5 relative), Net2Net's changes at the hidden growth under LayerNorm (eq. 7)."""
import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # processes, training runs: the full tier (README); `-m "not slow"` skips it


@pytest.mark.timeout(600)
def test_bench_growth_quick(tmp_path, cache_dir):
    r = subprocess.run([sys.executable, "tools/bench_growth.py", "--quick", "--json", "--out-dir", str(tmp_path),
                        "--work-dir", str(tmp_path / "runs")], capture_output=True, text=True, timeout=540, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for stem in ("json", "md", "png"):
        assert (tmp_path / f"growth_cpu_quick.{stem}").stat().st_size > 0
    m = res["methods"]
    assert sorted(m) == ["full", "msg", "net2net", "nomask"]
    assert m["full"]["train_flops"] > m["msg"]["train_flops"]  # the growth schedule costs fewer FLOPs
    assert len(m["msg"]["growths"]) == 4 and not m["full"]["growths"]
    for g in m["msg"]["growths"]:
        assert abs(g["probe_after"] - g["probe_before"]) <= 1e-5 * g["probe_before"]
    hidden = next(g for g in m["net2net"]["growths"] if g["step"] == 30)  # (64, ...) -> (96, ...)
    assert abs(hidden["probe_after"] - hidden["probe_before"]) > 1e-3 * hidden["probe_before"]
    assert [x["ramp_steps"] for x in res["ramp_study"]] == [2, 5]
    assert "wall-time speed-up" in (tmp_path / "growth_cpu_quick.md").read_text()
