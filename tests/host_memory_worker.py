"""torchrun worker for test_host_memory: two "hosts" (each rank reports its own hostname and free
memory; only the second host is too small). Prints each rank's outcome of the host-memory check."""
import os
import socket
import sys

RANK = int(os.environ["RANK"])
socket.gethostname = lambda: ("nodea", "nodeb")[RANK]  # (what the check reads; gloo resolves its own)

from msg_megatron.config import ConfigError  # noqa: E402
from msg_megatron.parallel import initialize_parallel, placement  # noqa: E402
from msg_megatron.training import host_memory  # noqa: E402

GIB = host_memory.GIB
host_memory.available_bytes = lambda: (100 * GIB, 1 * GIB)[RANK]
initialize_parallel(1, 1)
where = placement()
try:
    host_memory.require_host_memory("a test run", 1e8, 16, "its state", "Fix it.")
except ConfigError as e:
    print(f"rank {RANK} refused: {e}", flush=True)
    sys.exit(3)
print(f"rank {RANK} passed; {where}", flush=True)
