"""msg-megatron: Masked Structural Growth (MSG) pre-training on megatron-core."""

__version__ = "0.1.0"
