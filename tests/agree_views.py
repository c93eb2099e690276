"""A pooled task for tests/test_agree.py: each rank's view differs (as two nodes' views of a shared
filesystem can); returns what every helper of parallel/agree.py returned on this rank."""
import os


def agree_views(save_dir: str) -> dict:
    import torch.distributed as dist

    from msg_megatron.checkpoint.dist import CheckpointError
    from msg_megatron.parallel.agree import differs_from_rank0, first_error, on_rank0
    from msg_megatron.training.starts import agreed_meta

    rank = dist.get_rank()
    out = {"rank": rank, "on_rank0": on_rank0(lambda: f"seen by rank {rank}")}
    try:
        on_rank0(lambda: 1 / 0)
    except ZeroDivisionError as e:
        out["raised"] = str(e)
    out["first_error"] = first_error(None if rank == 0 else f"rank {rank} failed")
    out["same"] = differs_from_rank0("step_000010", "latest")
    out["differs"] = differs_from_rank0(f"step_0000{10 + rank}", "latest")

    # a rank that cannot see the checkpoint rank 0 resolved: every rank fails, naming it
    real_isdir, real_exists = os.path.isdir, os.path.exists
    if rank == 1:  # this rank's view lacks the save directory (a node without the shared filesystem)
        os.path.isdir = lambda p: not str(p).startswith(save_dir) and real_isdir(p)
        os.path.exists = lambda p: not str(p).startswith(save_dir) and real_exists(p)
    try:
        agreed_meta(save_dir)
    except CheckpointError as e:
        out["agreed_meta"] = str(e)
    finally:
        os.path.isdir, os.path.exists = real_isdir, real_exists
    return out
