"""Process groups and the CPU compatibility layer for megatron-core."""
from .setup import (
           barrier,
           destroy_parallel,
           device,
           hosts,
           initialize_parallel,
           is_logging_rank,
           placement,
           sequence_parallel,
)

__all__ = ["barrier", "destroy_parallel", "device", "hosts", "initialize_parallel", "is_logging_rank", "placement",
           "sequence_parallel"]
