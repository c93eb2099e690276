"""Forward (and backward) over a list of micro-batches with megatron's schedules.

One code path for every layout: megatron-core's `get_forward_backward_func()` picks the
no-pipelining schedule at PP = 1, 1F1B (`forward_backward_pipelining_without_interleaving`) at
PP > 1, and the interleaved 1F1B schedule under parallel.virtual_pipeline > 1, which takes the
stage's chunks (MaskedGPT.chunk_views) and one data iterator per chunk; activations travel between stages as [seq, batch, hidden] tensors of the parameters' dtype
(model.config.pipeline_dtype: float32, or bfloat16 under train.precision=bf16, set by cast_params).

The loss of each micro-batch is the mean per-token loss (BERT: over its masked positions). The schedule divides it by the number of
micro-batches it runs; `loss_scale` rescales so the backward sums to the single-process gradient
(train step: local micro-batches / micro-batches in the whole global batch). The returned value is
the sum of the micro-batch mean losses, on every rank (it only exists on the last stage, which
shares it with the others over the pipeline group); with `on_device`, the last stage's sum as a
device tensor and no collective or host sync (the trainer reduces many steps' at once).
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from ..data.batches import batch_loss, model_inputs, seq_length
from ..parallel import device


def run_microbatches(model, batches: List[torch.Tensor], *, forward_only: bool, loss_scale: float = 1.0,
                     autocast_bf16: bool = False, on_device: bool = False):
    from megatron.core import parallel_state as ps

    if not batches:
        return 0.0
    real = len(batches)
    dev = device()
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast_bf16)

    def forward_step(data_iterator, module):
        x = model_inputs(next(data_iterator).to(dev, non_blocking=True))
        out = module(x.tokens, x.labels, **x.extra)  # per-token losses on the last stage, else hidden

        def loss_func(per_token: torch.Tensor):
            loss = batch_loss(per_token, x.loss_mask)
            return loss * loss_scale, {"loss": loss.detach()}

        return out, loss_func

    # autocast_bf16 (train.precision=bf16-autocast): matmuls in bf16; parameters, norms, residual
    # stream and loss stay fp32. One autocast
    # region around all micro-batches, so each weight is cast to bf16 once per step (autocast's
    # cache), not once per micro-batch.
    with autocast:
        store = _schedule(model, batches, forward_step, forward_only, batches[0].shape[0], seq_length(batches[0]))
    total = torch.zeros((), dtype=torch.float64, device=dev)
    if ps.is_pipeline_last_stage():
        for rec in store[:real]:
            total += rec["loss"].double()
    if on_device:  # the last stage's sum (0 elsewhere) as a device tensor: the caller reduces it later
        return total
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return float(total)  # the one host sync of the step


@torch.no_grad()
def forward_outputs(model, inputs: List[dict], out_shape: tuple) -> List[torch.Tensor]:
    """The last pipeline stage's outputs of `model(**x)` for each x of `inputs` (one micro-batch each,
    all of one shape: {"tokens": [b, s], ...}), each of `out_shape`, on every stage of the replica (sent
    from the last stage over the pipeline group). Evaluation's forward: model/scores.py's outputs."""
    from megatron.core import parallel_state as ps

    if not inputs:
        return []
    real, dev = len(inputs), device()
    b, s = inputs[0]["tokens"].shape

    def forward_step(data_iterator, module):
        x = next(data_iterator)
        out = module(**{k: v.to(dev) if torch.is_tensor(v) else v for k, v in x.items()})

        def keep(result: torch.Tensor):
            return torch.zeros((), device=dev), {"out": result}

        return out, keep

    store = _schedule(model, inputs, forward_step, True, b, s)
    pp = ps.get_pipeline_model_parallel_world_size()
    last = ps.is_pipeline_last_stage()
    outs = [rec["out"].float().contiguous() for rec in store[:real]] if last else \
        [torch.empty(out_shape, dtype=torch.float32, device=dev) for _ in range(real)]
    if pp > 1:
        group, src = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_last_rank()
        for t in outs:
            dist.broadcast(t, src=src, group=group)
    return outs


def _schedule(model, batches: list, forward_step, forward_only: bool, micro: int, seq: int) -> list:
    """megatron's schedule for this layout over `batches`: the last stage's loss_func records."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    gpt = getattr(model, "module", model)  # (megatron's DDP wraps the MaskedGPT)
    chunks = getattr(gpt, "chunks", 1)
    real = len(batches)
    pp = ps.get_pipeline_model_parallel_world_size()
    if chunks > 1 and real % pp:
        if not forward_only:  # (run_setup checks the training batch split before any compute)
            raise ValueError(f"{real} micro-batches do not fill megatron's interleaved schedule's groups of "
                             f"parallel.pipeline={pp}")
        # a forward-only call with fewer (the growth probe, a short validation, evaluation): padded with
        # copies of its last batch, whose outputs are dropped
        batches = list(batches) + [batches[-1]] * (pp - real % pp)
    if chunks > 1:  # one data iterator per chunk: each chunk's forward takes its micro-batches in order
        model, data = gpt.chunk_views(), [iter(batches) for _ in range(chunks)]
    else:
        data = iter(batches)
    with torch.set_grad_enabled(not forward_only):
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=model,
            num_microbatches=len(batches), seq_length=seq, micro_batch_size=micro,
            forward_only=forward_only)
