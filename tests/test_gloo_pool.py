"""The suite's gloo worker pool (tests/gloo_pool.py) itself: a task runs on every rank at the layout
asked for; what one task changes (megatron's parallel state, a process group, an environment
variable, the RNG, torch's threads, the working directory, a temporary file) is gone in the next;
a rank that raises, hangs or dies fails that call with its traceback or log, and the next call gets
a new pool."""
import os

import pytest

from conftest import pooled
from gloo_pool import PoolTaskFailed, pool

pytestmark = pytest.mark.slow  # (worker processes: the full tier)


def change_everything(tmp_path):
    import tempfile

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    assert ps.get_tensor_model_parallel_world_size() == 2 and dist.get_world_size() == 2
    dist.new_group([0, 1])
    os.environ["MSG_POOL_LEAK"] = "1"
    torch.randn(100)
    torch.set_num_threads(2)
    os.chdir(tmp_path)
    leftover = tempfile.mkstemp()[1]
    print(f"rank {dist.get_rank()} changed everything")
    return {"tp_rank": ps.get_tensor_model_parallel_rank(), "rng": torch.get_rng_state(), "tmp": leftover}


def look_around():
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from torch.distributed import distributed_c10d as c10d

    return {"initialized": ps.model_parallel_is_initialized(), "groups": len(c10d._world.pg_map),
            "env": os.environ.get("MSG_POOL_LEAK"), "rng": torch.get_rng_state(), "threads": torch.get_num_threads(),
            "cwd": os.getcwd(), "world": dist.get_world_size(), "rank": dist.get_rank()}


def test_a_task_runs_at_its_layout_and_leaves_nothing_behind(tmp_path):
    first = pool(2).run(change_everything, tmp_path, layout=(2, 1))
    assert [v["tp_rank"] for v, _, _ in first] == [0, 1]
    assert [out for _, out, _ in first] == ["rank 0 changed everything\n", "rank 1 changed everything\n"]
    after = pooled(2, look_around)
    for rank, (state, (before, _, _)) in enumerate(zip(after, first)):
        assert state["rank"] == rank and state["world"] == 2
        assert not state["initialized"] and state["groups"] == 1  # only the world is left
        assert state["env"] is None and state["threads"] == 1 and state["cwd"] != str(tmp_path)
        assert not os.path.exists(before["tmp"])  # the task's temporary directory is gone
        assert not __import__("torch").equal(state["rng"], before["rng"])  # reseeded, not where the task left it
    assert __import__("torch").equal(after[0]["rng"], after[1]["rng"])  # every task starts from one seed


def fail_on(rank_to_fail, how):
    import time

    import torch.distributed as dist

    if dist.get_rank() == rank_to_fail:
        if how == "raise":
            raise ValueError("rank one's own error")
        if how == "die":
            os._exit(3)
        time.sleep(3600)  # hang
    return dist.get_rank()


@pytest.mark.parametrize("how, words", [("raise", "rank 1 of 2 raised in fail_on:\nValueError: rank one's own error"),
                                        ("hang", "rank(s) [1] of the gloo pool of 2 did not finish within 5 s"),
                                        ("die", "rank 1 of the gloo pool of 2 died (exit 3)")])
def test_a_failing_rank_fails_the_call_and_the_next_call_gets_a_new_pool(how, words):
    before = pool(2)
    with pytest.raises(PoolTaskFailed) as e:
        before.run(fail_on, 1, how, timeout=5)
    assert words in str(e.value), str(e.value)
    assert not before.alive()
    assert pooled(2, fail_on, None, how) == [0, 1] and pool(2) is not before
