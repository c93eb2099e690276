"""Elementwise fusions of the layer's hot path: RoPE on q and k, the MLP activation with its FFN
mask, and the bf16 cross-entropy.

Eager PyTorch runs each of these as a chain of kernels (RoPE: chunk, cat, three multiplies and an
add per tensor; SwiGLU: silu, two multiplies), each reading and writing the whole activation; the
H100 profile in docs/benchmarks.md put them at ~10% of a step. In `compile` mode they go through
`torch.compile` (inductor), which fuses each function's forward and backward into one kernel and
saves only its inputs for the backward (megatron's `jit_fuser` does the same for its fusions).

The mode is process-wide, like megatron's `jit_fuser`: `configure(mode)` is called once by the
trainer from `train.fusion` (`auto`: compile on GPUs, eager on CPU, where inductor's compile time
costs more than it saves on small models). Both modes compute the same function; they differ by
floating-point rounding (tested: tests/test_fusion.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as _unfused_cross_entropy

MODES = ("auto", "eager", "compile")
_mode = "eager"
_requested = "eager"


def resolve(mode: str) -> str:
    """`auto` -> `compile` when CUDA is available, else `eager`."""
    if mode not in MODES:
        raise ValueError(f"fusion mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        return "compile" if torch.cuda.is_available() else "eager"
    return mode


def configure(mode: str) -> str:
    """Set the process-wide fusion mode; returns the resolved mode (`eager` or `compile`)."""
    global _mode, _requested
    _mode, _requested = resolve(mode), mode
    return _mode


def mode() -> str:
    return _mode


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_qk(q, k, cos, sin):
    """Rotary embedding in the rotate-half convention (RoFormer eq. 34; HF/Llama layout)."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _swiglu_masked(h, mask: Optional[torch.Tensor]):
    """SwiGLU on fc1's [gate; up] output, then the FFN mask (paper eq. 12)."""
    gate, up = h.chunk(2, dim=-1)
    out = F.silu(gate) * up
    return out if mask is None else out * mask


def _gelu_masked(h, mask: Optional[torch.Tensor]):
    out = F.gelu(h, approximate="tanh")
    return out if mask is None else out * mask


def _gelu_erf_masked(h, mask: Optional[torch.Tensor]):
    out = F.gelu(h)
    return out if mask is None else out * mask


_compiled = {}


def _call(fn, *args):
    global _mode
    if _mode != "compile":
        return fn(*args)
    c = _compiled.get(fn)
    if c is None:
        # dynamic=None: the first shape is specialised, a second one (growth) recompiles shape-generic
        c = _compiled[fn] = torch.compile(fn, fullgraph=True)
    try:
        return c(*args)
    except Exception as e:  # noqa: BLE001 - inductor raises many types (no C++ compiler, no triton, ...)
        if _requested != "auto":
            raise RuntimeError(f"train.fusion=compile: torch.compile failed ({type(e).__name__}: {e}); "
                               f"use train.fusion=eager") from e
        # `auto` promised a faster path, not a failure: say so once and keep training eagerly
        import warnings

        warnings.warn(f"train.fusion=auto: torch.compile failed ({type(e).__name__}: {e}); "
                      f"running the eager ops", RuntimeWarning)
        _mode = "eager"
        return fn(*args)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    return _call(_rope_qk, q, k, cos, sin)


def swiglu_masked(h: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return _call(_swiglu_masked, h, mask)


def gelu_masked(h: torch.Tensor, mask: Optional[torch.Tensor], exact: bool = False) -> torch.Tensor:
    """GELU (tanh approximation; `exact`: the erf form), then the FFN mask (eq. 12)."""
    return _call(_gelu_erf_masked if exact else _gelu_masked, h, mask)


def gelu(h: torch.Tensor, exact: bool = False) -> torch.Tensor:
    return gelu_masked(h, None, exact)


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token losses from vocabulary-parallel logits [s, b, v/TP] (statistics in fp32).

    bf16 logits in compile mode use megatron's fused cross-entropy (its `jit_fuser` kernels; one
    all-reduce for the predicted logits and the softmax sums; the gradient comes back in bf16,
    which is why it is used only for bf16 logits). Otherwise megatron's unfused one on fp32 logits.
    """
    if _mode == "compile" and logits.dtype == torch.bfloat16:
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

        return fused_vocab_parallel_cross_entropy(logits, labels, ps.get_tensor_model_parallel_group())
    return _unfused_cross_entropy(logits.float(), labels)
