"""msg-megatron: Masked Structural Growth (MSG) pre-training on megatron-core."""

__version__ = "0.1.0"

from .patches import quiet_upstream_warnings

quiet_upstream_warnings()  # (every patch of upstream code is listed in patches/__init__.py)
