"""Masked normalisation ops (paper eq. 16-19).

`masked_layer_norm` / `masked_rms_norm` are autograd-aware and take a mask over the last
dimension. `backend()` names the implementation that runs; this version ships the pure-PyTorch
one (`torch`); the compiled kernels (csrc/) plug in behind the same functions.
"""
from .masked_norm import backend, masked_layer_norm, masked_rms_norm  # noqa: F401
