"""Process groups and the CPU compatibility layer for megatron-core."""
from .setup import barrier, destroy_parallel, device, initialize_parallel, is_logging_rank, sequence_parallel  # noqa: F401
