"""Gradient reduction across data-parallel ranks and the global gradient norm under TP.

Data parallelism: each DP rank back-propagates its share of the micro-batches of a global batch,
each scaled by 1/(micro-batches in the whole global batch), and the gradients are summed across
the DP group here, so the update equals the single-process one up to summation order. The sum is
done in flat buckets (one all-reduce per ~`bucket_mb` MB) rather than one call per parameter.

Tied embeddings under PP: the first stage's embedding and the last stage's output copy get their
gradients summed over megatron's embedding group, so the two stay equal after every update.

Gradient norm: a tensor-parallel-sharded parameter (megatron marks it `tensor_model_parallel`)
contributes its local squares summed over the TP and PP groups; a replicated one (norm weights,
biases of row-parallel layers, positions) counts once and the tied output copy (`shared`) not at
all, as in megatron's `get_grad_norm_fp32`.
"""
from __future__ import annotations

import math
from typing import Iterable, List

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def allreduce_data_parallel_grads(params: Iterable[torch.nn.Parameter], bucket_mb: float = 64.0) -> None:
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_world_size() == 1:
        return
    group = ps.get_data_parallel_group()
    grads = [p.grad for p in params if p.grad is not None]
    limit = int(bucket_mb * 2**20)
    bucket: List[torch.Tensor] = []
    size = 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= limit):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=group)
            for t, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                t.copy_(reduced)
            bucket, size = [], 0


def grad_norm_and_clip(params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Global L2 norm of the gradients (all TP shards); scale them to `max_norm` if above it
    (max_norm <= 0: no clipping). Same formula as torch.nn.utils.clip_grad_norm_."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    params = [p for p in params if p.grad is not None]
    # a sharded parameter counts on every TP rank (its shards), a replicated one on TP rank 0 only
    from .setup import device

    sq = torch.zeros((), dtype=torch.float64, device=device())
    for p in params:
        if param_is_not_tensor_parallel_duplicate(p) and not getattr(p, "shared", False):
            sq += p.grad.detach().double().pow(2).sum()  # stays on the device: no sync per tensor
    if ps.get_model_parallel_group().size() > 1:  # TP x PP
        dist.all_reduce(sq, group=ps.get_model_parallel_group())
    total = math.sqrt(float(sq))
    if max_norm > 0:
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for p in params:
                p.grad.detach().mul_(coef)
    return total


def allreduce_tied_embedding_grads(model) -> None:
    """Sum the embedding's and the output copy's gradients (tied embeddings, PP > 1)."""
    from megatron.core import parallel_state as ps

    if (ps.get_pipeline_model_parallel_world_size() == 1 or not model.mcfg.tie_embeddings
            or not ps.is_rank_in_embedding_group()):
        return
    weight = model.embedding.weight if model.pre_process else model.output_layer.weight
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=ps.get_embedding_group())
