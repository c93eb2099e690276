"""What a model is called with for a micro-batch, and its loss, for either family's batch tensor.

GPT: token windows [micro, seq + 1] (inputs, and the next tokens as labels). BERT: masked-LM samples
[micro, 6, seq] (mlm_data.FIELDS: text, types, labels, loss_mask, padding_mask, is_random). One place for the
training schedules, validation and msg-grow's streamed check, so each family's loss has one definition.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch


class ModelInputs(NamedTuple):
    tokens: torch.Tensor  # [micro, seq]
    labels: torch.Tensor  # [micro, seq]
    extra: Dict[str, torch.Tensor]  # BERT: types, padding_mask (every pipeline stage needs them), sentence_order
    loss_mask: Optional[torch.Tensor]  # BERT: the masked positions; None: every token counts


def seq_length(batch: torch.Tensor) -> int:
    return batch.shape[-1] if batch.dim() == 3 else batch.shape[1] - 1


def model_inputs(batch: torch.Tensor) -> ModelInputs:
    if batch.dim() == 3:  # masked-LM samples
        text, types, labels, loss_mask, padding, is_random = batch.unbind(1)
        return ModelInputs(text, labels.clamp(min=0), {"types": types, "padding_mask": padding,
                                                       "sentence_order": is_random[:, 0]}, loss_mask)
    return ModelInputs(batch[:, :-1], batch[:, 1:], {}, None)


def batch_loss(out, loss_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The micro-batch's loss from the model's output (per-token losses [micro, seq], or with BERT's
    sentence-order head (per-token, per-sample order losses [micro])): the mean token loss, or (BERT)
    the mean over its masked positions plus the mean order loss (Megatron-LM's pretrain_bert:
    lm loss + sop loss), in fp32."""
    per_token, order = out if isinstance(out, tuple) else (out, None)
    if loss_mask is None:
        return per_token.float().mean()
    m = loss_mask.to(torch.float32)
    lm = (per_token.float() * m).sum() / m.sum().clamp(min=1.0)
    return lm if order is None else lm + order.float().mean()
