"""parallel/agree.py on 2 gloo processes whose views differ: a decision taken on rank 0 is every
rank's, an error on one rank is every rank's (no rank left waiting in a collective)."""
import pytest

from agree_views import agree_views
from conftest import pooled, tiny_checkpoint

pytestmark = pytest.mark.slow


@pytest.mark.timeout(200)
def test_decisions_and_errors_are_agreed(tmp_path):
    tiny_checkpoint(tmp_path)
    # rank 0 sees the save directory, rank 1 does not (as a node without the shared filesystem)
    outs = {o["rank"]: o for o in pooled(2, agree_views, str(tmp_path / "ck"), layout=(1, 1), timeout=180)}
    assert sorted(outs) == [0, 1]
    for o in outs.values():
        assert o["on_rank0"] == "seen by rank 0"
        assert o["raised"] == "division by zero"
        assert o["first_error"] == "rank 1 failed"
        assert o["same"] is None
        assert o["differs"].startswith("latest: rank 1 on host ") and "found 'step_000011', global rank 0 " \
            "'step_000010'" in o["differs"]
        assert "seen from rank 1 on host" in o["agreed_meta"] and "though global rank 0 found it" in o["agreed_meta"]
        assert f"{tmp_path}/ck/step_000002" in o["agreed_meta"]
