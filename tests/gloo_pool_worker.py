"""One rank of the test suite's gloo worker pool (tests/gloo_pool.py starts WORLD of these).

    python tests/gloo_pool_worker.py HOST PORT AUTHKEY_HEX RANK WORLD MASTER_PORT

It connects back to the pool, joins a gloo world of WORLD ranks (as torchrun's ranks would: RANK,
WORLD_SIZE, LOCAL_RANK, ... in its environment, one torch thread), imports torch, megatron-core and
msg_megatron once, then runs tasks until told to stop. A task is a function (pickled by reference:
module-level in a test module or helper), its arguments, the caller's environment and working
directory, and optionally a (tensor, pipeline) layout to set up first. After each task everything it
may have changed is put back: megatron's parallel state and every process group but the world, the
RNG tracker and the seeds, the environment, the working directory, torch's thread count, signal
handlers, the temporary directory (a fresh one per task, removed after).
"""
import contextlib
import io
import os
import pickle
import random
import shutil
import signal
import sys
import tempfile
import traceback
from datetime import timedelta

HERE = os.path.dirname(os.path.abspath(__file__))
IDENTITY = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
            "OMP_NUM_THREADS")
SEED = 1234  # every task starts from the same RNG state (torch, python, numpy)


def join_world(rank: int, world: int, master_port: int):
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port))
    # (a hung collective errors out after this rather than in 30 minutes; the pool kills it first)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{master_port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))


def warm_imports():
    """What almost every task needs, imported once per worker (the cost torchrun paid per rank)."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")  # (as pytest.ini: no TE/apex)
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401

    import msg_megatron.checkpoint.dist  # noqa: F401
    import msg_megatron.pretrain  # noqa: F401
    import msg_megatron.grow  # noqa: F401
    from msg_megatron.patches import apply_cpu_patches

    apply_cpu_patches()


def drop_groups_but_the_world():
    """megatron's destroy_model_parallel forgets its groups without destroying them: destroy every
    group but the world, so hundreds of tasks do not pile up gloo connections."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    world = c10d.GroupMember.WORLD
    for pg in list(c10d._world.pg_map):
        if pg is not world:
            with contextlib.suppress(Exception):
                dist.destroy_process_group(pg)


def seed_everything():
    import torch

    torch.manual_seed(SEED)
    random.seed(SEED)
    with contextlib.suppress(ImportError):
        import numpy

        numpy.random.seed(SEED)


class Tee(io.TextIOBase):
    """What a task prints: kept for the caller, and copied to this worker's log (read on a hang)."""

    def __init__(self, log):
        self.buf, self.log = io.StringIO(), log

    def write(self, s):
        self.log.write(s)
        return self.buf.write(s)

    def flush(self):
        self.log.flush()


def run_task(task: dict):
    import torch

    from msg_megatron.parallel import destroy_parallel, initialize_parallel

    env, cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    tmp = tempfile.mkdtemp(prefix=f"pool-task-r{os.environ['RANK']}-")
    os.environ.update({k: v for k, v in task["env"].items() if k not in IDENTITY})
    os.environ["TMPDIR"], tempfile.tempdir = tmp, tmp
    os.chdir(task["cwd"])
    seed_everything()
    out, err = Tee(sys.__stdout__), Tee(sys.__stderr__)
    ok, value = True, None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if task["layout"]:
                initialize_parallel(*task["layout"])
            value = task["fn"](*task["args"], **task["kwargs"])
    except BaseException as e:  # noqa: BLE001 (SystemExit, KeyboardInterrupt from a task: reported, not fatal)
        ok, value = False, f"{type(e).__name__}: {e}\n" + "".join(traceback.format_exception(e))
    finally:
        destroy_parallel()
        drop_groups_but_the_world()
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().reset()
        for s, h in handlers.items():
            signal.signal(s, h)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        tempfile.tempdir = None
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(threads)
    return ok, value, out.buf.getvalue(), err.buf.getvalue()


def main():
    host, port, key, rank, world, master_port = sys.argv[1:7]
    rank, world = int(rank), int(world)
    sys.path[:0] = [HERE, os.path.dirname(HERE)]  # test modules by their pytest names, and the package
    from multiprocessing.connection import Client

    conn = Client((host, int(port)), authkey=bytes.fromhex(key))
    conn.send(("hello", rank))
    os.environ["OMP_NUM_THREADS"] = "1"  # (as torchrun sets it for several ranks on one machine)
    import torch

    torch.set_num_threads(1)
    join_world(rank, world, int(master_port))
    warm_imports()
    conn.send(("ready", rank))
    while True:
        try:
            message = conn.recv_bytes()
        except EOFError:
            return
        try:
            task = pickle.loads(message)
        except Exception as e:  # noqa: BLE001 (a function that cannot be found here: the caller's error)
            conn.send_bytes(pickle.dumps((False, f"cannot unpickle the task: {type(e).__name__}: {e}", "", "")))
            continue
        if task == "stop":
            return
        result = run_task(task)
        try:
            payload = pickle.dumps(result)
        except Exception as e:  # noqa: BLE001
            payload = pickle.dumps((False, f"the task's result cannot be pickled: {type(e).__name__}: {e}",
                                    result[2], result[3]))
        conn.send_bytes(payload)


if __name__ == "__main__":  # the guard matters: megatron's checkpoint writers spawn and import __main__
    main()
