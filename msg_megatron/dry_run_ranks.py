"""Which ranks msg-plan --dry-run builds, and the fake world each one is built in (dry_run.py).

A simulated rank is this process as global rank R of the stage's world on torch's fake process
group, megatron's parallel state set up for R, new tensors on `meta`: shapes and dtypes without
memory. The dry run owns torch.distributed while it does so, one rank at a time.
"""
from __future__ import annotations

import contextlib
import sys
from typing import List

import torch

from .parallel import destroy_parallel, initialize_parallel
from .patches import apply_cpu_patches, meta_world


def rank_coordinates(rank: int, tp: int, pp: int, dp: int) -> tuple:
    """(tp rank, dp rank, pp rank) of a global rank in megatron's default order (tp-cp-ep-dp-pp:
    TP fastest, PP slowest); checked against megatron's own parallel state when each rank is built."""
    return rank % tp, (rank // tp) % dp, rank // (tp * dp)


def select_ranks(spec: str, tp: int, pp: int, dp: int) -> List[int]:
    """`edges`: the first and last rank of every coordinate (TP, PP and DP); `all`; or `R1,R2,...`."""
    world = tp * pp * dp
    if spec == "all":
        return list(range(world))
    if spec == "edges":
        ends = lambda n: sorted({0, n - 1})  # noqa: E731
        return sorted(t + tp * (d + dp * p) for t in ends(tp) for d in ends(dp) for p in ends(pp))
    try:
        ranks = sorted({int(r) for r in spec.split(",")})
    except ValueError:
        raise ValueError(f"--ranks {spec!r}: use edges, all or a comma-separated list of ranks") from None
    bad = [r for r in ranks if not 0 <= r < world]
    if bad:
        raise ValueError(f"--ranks {spec}: rank(s) {bad} are outside the world of {world} ranks")
    return ranks


def ranks_to_build(spec: str, tp: int, pp: int, dp: int) -> tuple:
    """(ranks to build, their TP x PP coordinates whose every DP rank is built, whether that is every rank).

    `all`: every rank, and the checkpoint coverage is checked over the whole world. Otherwise: one DP
    replica (every TP x PP rank at DP rank 0: the model tensors), every DP rank of the first and the
    last pipeline stage's first TP coordinate (their optimizer slices: the ends differ by stage, TP
    ranks only by offsets), and the ranks whose memory is reported."""
    world = tp * pp * dp
    if spec == "all":
        return list(range(world)), [(0, p) for p in range(pp)], True
    coords = sorted({(0, 0), (0, pp - 1)})
    built = {t + tp * dp * p for t in range(tp) for p in range(pp)}
    built |= {t + tp * (d + dp * p) for t, p in coords for d in range(dp)}
    built |= set(select_ranks(spec, tp, pp, dp))
    return sorted(built), coords, len(built) == world


@contextlib.contextmanager
def fake_rank(world: int, rank: int, tp: int, pp: int, seed: int, sequence_parallel: bool, virtual_pipeline: int):
    """This process as global rank `rank` of `world` on torch's fake process group, megatron's
    parallel state set up for it, new tensors on `meta`."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore


    if dist.is_initialized():
        raise RuntimeError("the dry run needs a process without torch.distributed (msg-plan runs it in its own)")
    apply_cpu_patches()  # (first: meta_world then replaces its current_device for the block)
    hook = sys.excepthook  # (each init wraps it to prefix "[rank N]:"; one prefix per rank built otherwise)
    with meta_world():
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            initialize_parallel(tp, pp, seed, sequence_parallel, virtual_pipeline)
            with torch.device("meta"):
                yield
        finally:
            destroy_parallel()  # (megatron's state; the fake world is this block's own to destroy)
            dist.destroy_process_group()
            sys.excepthook = hook
