"""Mask-weighted LayerNorm and RMSNorm (paper eq. 16-19), compiled or pure PyTorch.

With mask c over the features: mu = sum(c*x)/sum(c), var = sum(c*(x-mu)^2)/sum(c) (eq. 17),
RMSNorm: ms = sum(c*x^2)/sum(c); the normalised output is multiplied by c again (eq. 19), so
features with c = 0 neither influence the statistics nor leave the norm. Statistics are kept in
float32 at least, whatever the input dtype. The mask is a constant (no gradient).

Backends: `cpu-ext` (csrc/masked_norm_cpu.cpp, built by setup.py) for CPU tensors, `cuda`
(csrc/masked_norm_cuda.cu, built when torch has CUDA) for CUDA tensors, else `torch` (the
reference implementation below). mask=None is the
folded fast path: the ordinary norm.
"""
from __future__ import annotations

import glob
import os
import platform
from typing import Optional

import torch
import torch.nn.functional as F

_EXT_ERROR: Optional[str] = None


def _load_extension() -> bool:
    global _EXT_ERROR
    if os.environ.get("MSG_DISABLE_EXTENSIONS") == "1":
        _EXT_ERROR = "disabled by MSG_DISABLE_EXTENSIONS=1"
        return False
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        _EXT_ERROR = "this CPU lacks AVX2, which the x86 build of the extension targets"
        return False
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    libs = glob.glob(os.path.join(here, "_masked_norm_cpu*.so"))
    if not libs:
        _EXT_ERROR = "not built (reinstall with: pip install --no-build-isolation -e .)"
        return False
    try:
        torch.ops.load_library(libs[0])
        return True
    except (OSError, RuntimeError) as e:
        _EXT_ERROR = f"failed to load {libs[0]}: {e}"
        return False


_HAS_CPU_EXT = _load_extension()


def _load_cuda_extension() -> bool:
    """The CUDA kernels register into the operators the CPU library defines, so it loads second."""
    if not (_HAS_CPU_EXT and torch.cuda.is_available()):
        return False
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    libs = glob.glob(os.path.join(here, "_masked_norm_cuda*.so"))
    try:
        if libs:
            torch.ops.load_library(libs[0])
            return True
    except (OSError, RuntimeError):
        pass
    return False


_HAS_CUDA_EXT = _load_cuda_extension()


def backend(device: str = "cpu") -> str:
    """Which implementation runs for tensors on `device` (`cpu` or `cuda`): `cuda`, `cpu-ext` or `torch`."""
    if device.startswith("cuda"):
        return "cuda" if _HAS_CUDA_EXT else "torch"
    return "cpu-ext" if _HAS_CPU_EXT else "torch"


def extension_status() -> str:
    return "loaded" if _HAS_CPU_EXT else f"unavailable: {_EXT_ERROR}"


class _MaskedNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, weight, bias, eps, rms):
        if rms:
            y, mean, rstd = torch.ops.msg_ops.masked_rms_norm_fwd(x, mask, weight, eps)
        else:
            y, mean, rstd = torch.ops.msg_ops.masked_layer_norm_fwd(x, mask, weight, bias, eps)
        ctx.save_for_backward(x, mask, weight, mean, rstd)
        ctx.rms, ctx.has_bias = rms, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mask, weight, mean, rstd = ctx.saved_tensors
        op = torch.ops.msg_ops.masked_rms_norm_bwd if ctx.rms else torch.ops.msg_ops.masked_layer_norm_bwd
        dx, dw, db = op(dy, x, mask, weight, mean, rstd)
        return dx, None, dw.to(weight.dtype), db.to(weight.dtype) if ctx.has_bias else None, None, None


def _check_shapes(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Shape errors are reported here, in Python, before any kernel runs: the same message on every
    backend, and no C++ exception has to cross the extension boundary."""
    d = x.shape[-1] if x.dim() else 0
    for name, t in (("mask", mask), ("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (d,):
            raise RuntimeError(f"masked norm: {name} must have shape [{d}] (the last dimension of x), "
                               f"got {list(t.shape)}")


_WARNED = False


def _warn_once_unbuilt() -> None:
    """A kernel that was not built is said once, at first use, with the fix (the install itself
    cannot say it: pip hides the output of a build that succeeds)."""
    global _WARNED
    if _WARNED or _HAS_CPU_EXT or (_EXT_ERROR or "").startswith(("disabled", "this CPU lacks")):
        return
    _WARNED = True
    import warnings

    warnings.warn(f"msg-megatron: the compiled CPU masked norm is {_EXT_ERROR}; the slower pure-PyTorch one "
                  "runs instead. Fix: install torch first, then `pip install --no-build-isolation -e .` in the "
                  "repository (the build needs torch importable).", RuntimeWarning, stacklevel=3)


def _use_ext(x: torch.Tensor) -> bool:
    if x.device.type == "cuda":
        return _HAS_CUDA_EXT and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if x.device.type == "cpu" and not _HAS_CPU_EXT:
        _warn_once_unbuilt()
    return _HAS_CPU_EXT and x.device.type == "cpu"


def masked_layer_norm(x: torch.Tensor, mask: Optional[torch.Tensor], weight: torch.Tensor,
                      bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    if mask is None:  # folded: an ordinary LayerNorm
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    _check_shapes(x, mask, weight, bias)
    if _use_ext(x):
        return _MaskedNormFn.apply(x, mask.detach(), weight, bias, eps, False)
    return masked_layer_norm_torch(x, mask, weight, bias, eps)


def masked_rms_norm(x: torch.Tensor, mask: Optional[torch.Tensor], weight: torch.Tensor,
                    eps: float) -> torch.Tensor:
    if mask is not None:
        _check_shapes(x, mask, weight, None)
    if mask is not None and _use_ext(x):
        return _MaskedNormFn.apply(x, mask.detach(), weight, None, eps, True)
    if mask is None and x.is_cuda and x.dtype == weight.dtype:
        # folded on a GPU: torch's fused RMSNorm (the CPU keeps the reference ops, bit-stable)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return masked_rms_norm_torch(x, mask, weight, eps)


def masked_layer_norm_torch(x, mask, weight, bias, eps):
    """Reference implementation in plain PyTorch ops."""
    if mask is None:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    dtype = x.dtype
    xf = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    m = mask.to(xf.dtype)
    denom = m.sum()
    mu = (xf * m).sum(-1, keepdim=True) / denom
    xc = xf - mu
    var = (xc * xc * m).sum(-1, keepdim=True) / denom
    y = xc * torch.rsqrt(var + eps) * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return (y * m).to(dtype)


def masked_rms_norm_torch(x, mask, weight, eps):
    """Reference implementation in plain PyTorch ops."""
    dtype = x.dtype
    xf = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    if mask is None:
        ms = (xf * xf).mean(-1, keepdim=True)
        return (xf * torch.rsqrt(ms + eps) * weight.to(xf.dtype)).to(dtype)
    m = mask.to(xf.dtype)
    ms = (xf * xf * m).sum(-1, keepdim=True) / m.sum()
    return (xf * torch.rsqrt(ms + eps) * weight.to(xf.dtype) * m).to(dtype)
