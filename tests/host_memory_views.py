"""A pooled task for tests/test_host_memory.py: two "hosts" (each rank reports its own hostname and
free memory; only the second host is too small). Returns this rank's outcome of the host-memory check."""
import socket


def host_memory_outcome() -> str:
    import torch.distributed as dist

    from msg_megatron.config import ConfigError
    from msg_megatron.parallel import placement
    from msg_megatron.parallel import setup
    from msg_megatron.training import host_memory

    rank = dist.get_rank()
    real_host, real_available = socket.gethostname, host_memory.available_bytes
    socket.gethostname = lambda: ("nodea", "nodeb")[rank]  # (what the check reads; gloo resolves its own)
    host_memory.available_bytes = lambda: (100 * host_memory.GIB, 1 * host_memory.GIB)[rank]
    setup._HOSTS = None  # (gathered again, with these names)
    try:
        where = placement()
        host_memory.require_host_memory("a test run", 1e8, 16, "its state", "Fix it.")
        return f"rank {rank} passed; {where}"
    except ConfigError as e:
        return f"rank {rank} refused: {e}"
    finally:
        socket.gethostname, host_memory.available_bytes = real_host, real_available
