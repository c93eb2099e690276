"""The validation loss of a checkpoint, computed one layer at a time (msg-grow's check of function
preservation without holding the model).

The activations of all evaluation batches ([s, b, h] each) pass through the model piece by piece
(`MaskedGPT(piece=...)`: the embeddings, each layer, the final norm and output layer), each piece
loaded from the checkpoint in fp32, used and freed. Loading is a collective, so the pipeline stages
take turns: while stage s computes, the other ranks take part in its loads with an empty piece;
then stage s sends its activations to stage s + 1 (point to point, same TP and DP position). Each
DP replica evaluates the same batches. Same definition as `training.evaluate.validation_loss`:
the mean over batches of each batch's loss (data/batches.py: the mean token loss, BERT's over the
masked positions).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..config import Shape
from ..data.batches import batch_loss, model_inputs, seq_length
from ..model.gpt import Piece, pp_rank_size, stage_piece
from .stream import load_piece, read_once


@torch.no_grad()
def streamed_validation_loss(path: str, cfg, shape: Shape, windows, micro_batch_size: int, iters: int,
                             device: torch.device) -> Optional[float]:
    from megatron.core import parallel_state as ps

    if windows is None:
        return None
    batches = list(windows.sequential(micro_batch_size, iters))
    if not batches:
        return None
    read = read_once(path)
    pp_rank, pp = pp_rank_size()
    mine = stage_piece(shape)
    pieces = ([Piece((), mine.pre_process, False)] + [Piece((g,), False, False) for g in mine.layers]
              + [Piece((), False, mine.post_process)])
    empty = Piece((), False, False)
    acts, total = None, torch.zeros((), dtype=torch.float64)
    for stage in range(pp):
        if stage != pp_rank:
            for _ in pieces:  # (every stage has as many pieces)
                load_piece(read, cfg, shape, empty, device, optimizer=False)
            continue
        if stage > 0:
            acts = [torch.empty(seq_length(b), b.shape[0], shape.hidden, device=device) for b in batches]
            for x in acts:
                dist.recv(x, src=ps.get_pipeline_model_parallel_prev_rank())
        for piece in pieces:
            model, _ = load_piece(read, cfg, shape, piece, device, optimizer=False)
            model.eval()
            out = []
            for i, batch in enumerate(batches):
                x = model_inputs(batch.to(device))
                if not piece.pre_process:
                    model.set_input_tensor(acts[i])
                if piece.post_process:
                    total += batch_loss(model(x.tokens, x.labels, **x.extra), x.loss_mask).double().cpu()
                else:
                    out.append(model(x.tokens, **x.extra))
            acts = out or acts
            del model
        if stage < pp - 1:
            for x in acts:
                dist.send(x.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
    if pp > 1:
        total = total.to(device)
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return float(total) / len(batches)
