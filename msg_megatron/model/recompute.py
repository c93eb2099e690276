"""Activation recomputation (train.recompute) with megatron-core's `tensor_parallel.checkpoint`.

The setting lives where megatron keeps it, in the model's TransformerConfig
(`recompute_granularity` full/selective, `recompute_method` block, `recompute_num_layers`), which
every module of the model shares; growth copies it to the grown model. megatron's
CheckpointFunction saves the inputs, runs the function without a graph, and in the backward
restores the RNG states (CPU and the TP tracker), reruns it with a graph and backpropagates.
The masks are buffers that do not change between a step's forward and backward, so the rerun
computes the same values and, in fp32, bitwise the same gradients. What megatron's function does
not restore is autocast (megatron trains in bf16 parameters, not autocast): `_under_forward_autocast`
reruns the function under the autocast state of its forward.
"""
from __future__ import annotations

import torch
from megatron.core import tensor_parallel

MODES = ("none", "selective", "full")


def configure_recompute(model: torch.nn.Module, mode: str, num_layers: int = 0) -> None:
    """Set train.recompute / recompute_num_layers on a model (0 layers: every layer under full)."""
    if mode not in MODES:
        raise ValueError(f"recompute mode {mode!r}; use one of {', '.join(MODES)}")
    cfg = model.config
    cfg.recompute_granularity = None if mode == "none" else mode
    cfg.recompute_method = "block" if mode == "full" else None
    cfg.recompute_num_layers = (num_layers or None) if mode == "full" else None


def copy_recompute(src_config, dst_config) -> None:
    for key in ("recompute_granularity", "recompute_method", "recompute_num_layers"):
        setattr(dst_config, key, getattr(src_config, key))


def full_layers(config, local_layers: int) -> int:
    """How many of a stage's first layers are recomputed whole (megatron's block method)."""
    if config.recompute_granularity != "full":
        return 0
    return min(config.recompute_num_layers or local_layers, local_layers)


def selective(config) -> bool:
    return config.recompute_granularity == "selective"


def checkpoint(fn, *args):
    """fn(*args) recomputed in the backward instead of keeping its activations (tensors or None)."""
    return tensor_parallel.checkpoint(_under_forward_autocast(fn), False, *args)


def _under_forward_autocast(fn):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    enabled = torch.is_autocast_enabled(dev)
    dtype = torch.get_autocast_dtype(dev)

    def run(*args):
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            return fn(*args)

    return run
