"""What evaluation reads from the output layer, computed where the vocabulary is split over TP.

`token_scores`: for each position, log p(label) under the full (padded) vocabulary's softmax and
whether the label is the argmax (lm-evaluation-harness's `loglikelihood` pair), from this rank's
vocabulary slice of the logits and three all-reduces of [s, b] tensors over the TP group: the
logits are never gathered (at a 100k vocabulary and 2k tokens they would be 800 MB per sequence).
`logits_at`: the full-vocabulary logits of one position per sequence (generation's next token),
gathered for those positions only.

The padded rows (model.make_vocab_size_divisible_by) are part of the softmax, as in training's loss
and in the Hugging Face export (whose lm_head keeps them), so scores equal those of the export.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _tp():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() == 1:
        return None, 0
    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()


@torch.no_grad()
def token_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [s, b, v/TP] (this rank's vocabulary slice), labels [s, b] -> [s, b, 2] fp32:
    (log p(label), 1.0 where label is the argmax else 0.0), equal on every TP rank."""
    group, rank = _tp()
    local = logits.float()
    width = local.shape[-1]
    start = rank * width
    top = local.max(dim=-1).values
    if group is not None:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    sumexp = torch.exp(local - top[..., None]).sum(dim=-1)
    mine = (labels >= start) & (labels < start + width)
    picked = local.gather(-1, (labels - start).clamp(0, width - 1)[..., None])[..., 0] * mine
    if group is not None:
        dist.all_reduce(sumexp, group=group)
        dist.all_reduce(picked, group=group)
    logprob = picked - top - torch.log(sumexp)
    # (the label's logit is one of the values the max was taken over: equal exactly when it is the max;
    # an exact tie with another token, which torch's argmax would break by index, does not occur in fp32)
    greedy = (picked >= top).to(torch.float32)
    return torch.stack([logprob, greedy], dim=-1)


@torch.no_grad()
def logits_at(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """logits [s, b, v/TP], positions [b] -> [b, vocab_padded] fp32, the same on every TP rank."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    rows = logits[positions, torch.arange(logits.shape[1], device=logits.device)].float()  # [b, v/TP]
    group, _ = _tp()
    return rows if group is None else gather_from_tensor_model_parallel_region(rows.contiguous())
