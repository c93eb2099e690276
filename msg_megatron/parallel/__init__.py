"""Process groups and the CPU compatibility layer for megatron-core."""
from .setup import initialize_parallel, destroy_parallel  # noqa: F401
