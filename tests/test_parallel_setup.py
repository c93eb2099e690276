"""initialize_parallel / destroy_parallel in a world they did not create (this suite's own world of
one, a program embedding the trainer): the world stays, megatron's groups are destroyed with the
parallel state, so setting it up again and again does not pile up gloo groups and their threads."""
import threading

import torch.distributed as dist


def test_destroy_keeps_a_world_it_did_not_create_and_frees_megatrons_groups():
    from torch.distributed import distributed_c10d as c10d

    from msg_megatron.parallel import destroy_parallel, initialize_parallel

    destroy_parallel()
    groups, threads = len(c10d._world.pg_map), threading.active_count()
    for _ in range(5):
        initialize_parallel(1, 1)
        assert len(c10d._world.pg_map) > groups  # megatron's TP, PP, DP, ... groups
        destroy_parallel()
        assert dist.is_initialized() and len(c10d._world.pg_map) == groups
    assert threading.active_count() <= threads
    initialize_parallel(1, 1)  # (as the next test expects it)
