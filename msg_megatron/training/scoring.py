"""Scoring and greedy generation with the model as it is laid out (any TP / PP / DP), for evaluation.

The requests (token ids) are the same on every rank. They are cut into batches, and log-likelihood
batches into calls of PP batches (one forward-only 1F1B schedule each, so the pipeline's stages work
at once); DP replicas take the calls in turn (call j on replica j % DP) and share their results at
the end (one all_gather_object over the data-parallel group), so every rank returns every result.
Inside a replica all TP and PP ranks run the same calls in the same order: megatron's schedule
carries the activations between stages, model/scores.py computes what is read from the
vocabulary-split output layer, and the last stage's result is broadcast to the replica's other stages.

Sequences are padded on the right to the call's longest (rounded up to the TP degree under sequence
parallelism): a causal model's positions before the padding do not see it, and positions start at 0
as in training, so padding changes a sequence's scores only by float rounding (other matrix shapes).
Greedy generation runs one batch's tokens at a time (no pipelining across batches).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..data.batches import model_inputs
from ..model.gpt import padded_vocab_size
from .microbatches import forward_outputs


def _dp():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None, 0, 1
    return ps.get_data_parallel_group(), ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def _pp() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def _tp_multiple(model) -> int:
    cfg = getattr(model, "module", model).config
    return cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1


def _shared(mine: dict, count: int) -> list:
    """{index: result} of this replica -> every result by index, on every rank."""
    group, _, dp = _dp()
    if dp > 1:
        parts = [None] * dp
        dist.all_gather_object(parts, mine, group=group)
        for p in parts:
            mine.update(p)
    return [mine[i] for i in range(count)]


class Scorer:
    """`loglikelihood` and `greedy` over `model` (a MaskedGPT, or megatron's DDP around one, any layout).
    `vocab_size`: the tokenizer's (generation never picks an embedding padding row), `seq_length`: the
    model's context, `batch_size`: sequences per forward."""

    def __init__(self, model, seq_length: int, vocab_size: int, eod: int, batch_size: int = 8):
        self.model, self.seq_length, self.vocab_size, self.eod = model, seq_length, vocab_size, eod
        self.batch_size = max(1, int(batch_size))
        gpt = getattr(model, "module", model)
        self.vocab_padded = padded_vocab_size(gpt.mcfg)
        self.multiple = _tp_multiple(model)

    def _pad_to(self, n: int) -> int:
        return -(-n // self.multiple) * self.multiple

    def loglikelihood(self, pairs: Sequence[Tuple[List[int], List[int]]]) -> List[Tuple[float, bool]]:
        """(sum of log p(continuation | context), whether every continuation token is the argmax) per
        (context ids, continuation ids). As lm-evaluation-harness's `hf` model: the input is the last
        seq_length + 1 tokens of context + continuation minus the last, the continuation scored at the
        end of it."""
        rows = []
        for ctx, cont in pairs:
            whole = (list(ctx) + list(cont))[-(self.seq_length + 1):]
            rows.append((whole[:-1], whole[1:], min(len(cont), len(whole) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: least padding
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        # a pipeline's stages work at once only on several micro-batches in one schedule: `pp` batches of
        # one padded shape per call (1F1B forward-only), the replicas taking the calls in turn
        pp = _pp()
        calls = [batches[i:i + pp] for i in range(0, len(batches), pp)]
        _, rank, dp = _dp()
        mine = {}
        for j, call in enumerate(calls):
            if j % dp != rank:
                continue
            width = self._pad_to(max(len(rows[i][0]) for batch in call for i in batch))
            micro = len(call[0])  # (the first batch is full; a short last one gets rows of padding)
            inputs = []
            for batch in call:
                tokens = torch.full((micro, width), self.eod, dtype=torch.long)
                labels = torch.zeros((micro, width), dtype=torch.long)
                for r, i in enumerate(batch):
                    inp, lab, _ = rows[i]
                    tokens[r, :len(inp)] = torch.tensor(inp)
                    labels[r, :len(lab)] = torch.tensor(lab)
                inputs.append({"tokens": tokens, "labels": labels, "scores": True})
            for batch, out in zip(call, forward_outputs(self.model, inputs, (micro, width, 2))):
                for r, i in enumerate(batch):
                    n, k = len(rows[i][0]), rows[i][2]
                    part = out[r, n - k:n].double()
                    mine[i] = (float(part[:, 0].sum()), bool((part[:, 1] > 0.5).all()))
        return _shared(mine, len(rows))

    def last_logits(self, windows: Sequence[List[int]]) -> torch.Tensor:
        """The full-vocabulary logits [len(windows), vocab_padded] after the last token of each window (at
        most seq_length tokens), on every rank of this replica."""
        width = self._pad_to(max(len(w) for w in windows))
        tokens = torch.full((len(windows), width), self.eod, dtype=torch.long)
        for r, w in enumerate(windows):
            tokens[r, :len(w)] = torch.tensor(w)
        last = torch.tensor([len(w) - 1 for w in windows])
        return forward_outputs(self.model, [{"tokens": tokens, "logits_at": last}],
                               (len(windows), self.vocab_padded))[0]

    def greedy(self, prompts: Sequence[List[int]], max_new_tokens: int,
               stop: Optional[Callable[[int, List[int]], bool]] = None) -> List[List[int]]:
        """Greedy continuations (highest logit among the tokenizer's ids, ties to the lowest id) of each
        prompt: up to `max_new_tokens`, ending after EOD or once `stop(index, new ids)` is true. Each new
        token reruns the model on the last seq_length tokens (msg_megatron/generate.py says why no KV cache)."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        _, rank, dp = _dp()
        mine = {}
        for j, batch in enumerate(batches):
            if j % dp != rank:
                continue
            new = {i: [] for i in batch}
            live = list(batch)
            for _ in range(max_new_tokens):
                windows = [(list(prompts[i]) + new[i])[-self.seq_length:] for i in live]
                logits = self.last_logits(windows)
                picks = torch.argmax(logits[:, :self.vocab_size], dim=-1).tolist()
                still = []
                for i, t in zip(live, picks):
                    new[i].append(t)
                    if t != self.eod and not (stop and stop(i, new[i])):
                        still.append(i)
                live = still
                if not live:
                    break
            mine.update(new)
        return _shared(mine, len(prompts))


@torch.no_grad()
def masked_lm_accuracy(model, windows, micro_batch_size: int, iters: int) -> Optional[float]:
    """BERT: the share of the masked positions of the first `iters` validation batches whose highest
    logit is the original token (the same batches as the validation loss; every rank alike)."""
    gpt = getattr(model, "module", model)
    was_training = gpt.training
    gpt.eval()
    correct = total = 0.0
    for batch in windows.sequential(micro_batch_size, iters):
        x = model_inputs(batch)
        b, s = x.tokens.shape
        out = forward_outputs(model, [{"tokens": x.tokens, "labels": x.labels, "scores": True,
                                       "types": x.extra["types"], "padding_mask": x.extra["padding_mask"]}],
                              (b, s, 2))[0]
        m = x.loss_mask.to(torch.float32)
        correct += float((out[..., 1] * m).sum())
        total += float(m.sum())
    gpt.train(was_training)
    return correct / total if total else None


@torch.no_grad()
def pseudo_log_likelihood(model, tokenizer, text: str, seq_length: int, batch_size: int = 8) -> dict:
    """BERT: the text's pseudo-log-likelihood (Salazar et al. 2020): each token masked in turn and
    scored given all the others, in windows of [CLS] + seq_length - 2 tokens + [SEP]. {"pll": sum of
    log p (nats), "tokens", "pseudo_perplexity": exp(-pll / tokens)}. Every rank alike."""
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("the text encodes to no tokens; nothing to score")
    span = seq_length - 2
    rows = []  # (masked window, position)
    originals = []
    for start in range(0, len(ids), span):
        window = [tokenizer.cls] + ids[start:start + span] + [tokenizer.sep]
        for j in range(1, len(window) - 1):
            masked = list(window)
            masked[j] = tokenizer.mask
            rows.append((masked, j))
            originals.append(window)
    total = 0.0
    for k in range(0, len(rows), batch_size):
        part = range(k, min(k + batch_size, len(rows)))
        mult = _tp_multiple(model)
        width = -(-max(len(rows[i][0]) for i in part) // mult) * mult
        tokens = torch.full((len(part), width), tokenizer.pad, dtype=torch.long)
        labels = torch.zeros((len(part), width), dtype=torch.long)
        keep = torch.zeros((len(part), width), dtype=torch.long)
        for r, i in enumerate(part):
            n = len(rows[i][0])
            tokens[r, :n] = torch.tensor(rows[i][0])
            labels[r, :n] = torch.tensor(originals[i])
            keep[r, :n] = 1
        out = forward_outputs(model, [{"tokens": tokens, "labels": labels, "scores": True,
                                       "types": torch.zeros_like(tokens), "padding_mask": keep}],
                              (len(part), width, 2))[0]
        for r, i in enumerate(part):
            total += float(out[r, rows[i][1], 0])
    return {"pll": total, "tokens": len(ids), "pseudo_perplexity": math.exp(-total / len(ids))}
