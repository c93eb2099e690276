"""Peak memory per process of each phase of a run, from the state it holds (one model, one place).

msg-plan prints these per stage for GPUs; the CPU host-memory check refuses a run whose peak
phase cannot fit. Per local parameter element (the process's shard), with w = weight bytes
(2 bf16, 4 fp32), m = fp32 master bytes (4 for bf16 parameters, else 0), moments 8, gradients 4
(megatron's fp32 main-gradient buffer), and the optimizer part (m + 8) / DP under the distributed
optimizer (else / 1):

  train  w + 4 + (m + 8)/DP, plus activations (msg-plan's formula; 0 in the host check)
  save   the same state, no activations (each DP rank writes its own slice from the optimizer's
         tensors; on a GPU, megatron stages what the rank writes in host memory, not the GPU's)
  load   the same state, plus one tensor (the largest) in transit
  grow   into a stage, online or by msg-grow at that stage's layout, the larger of
    A  copying weights: old model in fp32 (4 + (m + 8)/DP, gradients freed) + new model in fp32
       (4) + one tensor;
    B  growing the optimizer: old weights freed; the new model's optimizer is built (bf16: the
       fp32 values kept until each becomes its master, 4; then w + 4 + m/DP) while the old
       moments (8/DP) are consumed parameter by parameter, one parameter's whole moments (8 x the
       largest) in flight.
  msg-grow  streams (growth/stream.py): `streamed_growth_peak`, about one old layer and the layers
         grown from it plus the stage's ends, whatever the depth.
The bytes of `grow` are measured on CPU by tools/bench_memory.py (docs/benchmarks.md).
"""
from __future__ import annotations

from typing import Optional


def bytes_per_param(precision: str) -> tuple:
    """(weight bytes, fp32 master bytes) per parameter element for train.precision."""
    return (2, 4) if precision == "bf16" else (4, 0)


def optimizer_bytes(precision: str, dp: int, distributed: bool) -> float:
    """AdamW state (+ fp32 masters) per local parameter element."""
    _, m = bytes_per_param(precision)
    return (m + 8) / (dp if distributed else 1)


def phase_peaks(precision: str, dp: int, distributed: bool, params: float, largest: float,
                old_params: Optional[float] = None, activations: float = 0.0) -> dict:
    """Peak bytes per process of train / save / load, and of the growth into this stage when
    `old_params` (the previous shape's local parameters at this stage's layout) is given.
    `largest`: elements of the largest local tensor."""
    w, m = bytes_per_param(precision)
    d = dp if distributed else 1
    state = params * (w + 4 + (m + 8) / d)
    out = {"train": state + activations, "save": state, "load": state + 4 * largest}
    if old_params is not None:
        copy = old_params * (4 + (m + 8) / d) + params * 4 + 4 * largest
        build = params * ((4 if m else 0) + w + 4 + m / d) + old_params * 8 / d + 8 * largest
        out["grow"] = max(copy, build)
    return out


def streamed_growth_peak(ends_old: float, ends_new: float, layer_old: float, layer_new: float,
                         per_group: int) -> float:
    """Peak bytes per process of msg-grow (growth/stream.py), from local elements: the stage's old
    and new ends (embeddings, output layer; fp32 weights and both moments, 12 B each, kept by the
    rank that writes them until they are written), one old layer as loaded (12 B, plus its moments
    in transit while megatron's loaded copies are moved into place, 8 B) and the `per_group` new
    layers grown from it (the original with its moments, 12 B; each copy its weights, 4 B)."""
    return 12 * (ends_old + ends_new) + 20 * layer_old + layer_new * (12 + 4 * (per_group - 1))
