"""msg-generate --load CKPT (--prompt TEXT | --prompt-file F) [--max-new-tokens N] [--temperature T]
[--top-p P] [--seed S] [--tensor T --pipeline P] [--json]: text from a checkpoint, through the model as
trained (masks as saved: a checkpoint inside a growth ramp generates as the ramping model computes).

One process, or under torchrun with the model split over --tensor x --pipeline ranks (default: the
checkpoint's layout; msg-eval's loading): each rank holds its shard, the next token's logits are
gathered over TP for that one position only, sent from the last pipeline stage, and every rank draws
the same token (the same seeded generator); rank 0 prints.

Greedy by default (the highest logit, ties to the lowest id, as transformers' `generate()`); with
--temperature > 0, sampling from softmax(logits / T) restricted to the smallest set of tokens whose
probability reaches --top-p, from a generator seeded with --seed (same seed, same text). Tokens are
drawn from the tokenizer's vocabulary only, never from the embedding's padding rows. Generation
stops after --max-new-tokens or at the end-of-document token (documents were separated by it in
training). The context is the last model.seq_length tokens (the positions the model was trained on).

Each new token reruns the model on the whole context: no KV cache. At this project's CPU sizes and
the lengths a check needs, the forward is milliseconds; a cache would be a second attention path
to keep equal to the trained one (masks, GQA, RoPE offsets) for no measured gain here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List

import torch

from .checkpoint.dist import read_meta
from .cli import run_cli
from .data.tokenizer import find_tokenizer, load_tokenizer
from .eval import load_model_from_checkpoint
from .parallel import is_logging_rank
from .training.scoring import Scorer


@torch.no_grad()
def generate(scorer: Scorer, ids: List[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0) -> List[int]:
    """The new token ids after `ids` (see module doc), from training/scoring.py's Scorer (any layout)."""
    gen = torch.Generator().manual_seed(seed)
    out = list(ids)
    for _ in range(max_new_tokens):
        logits = scorer.last_logits([out[-scorer.seq_length:]])[0, :scorer.vocab_size].float()
        if temperature <= 0:
            nxt = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            if top_p < 1.0:
                sorted_p, order = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # (the token that crosses top_p stays)
                probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
            nxt = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
        out.append(nxt)
        if nxt == scorer.eod:
            break
    return out[len(ids):]


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="msg-generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="checkpoint step directory or save directory")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text to continue")
    src.add_argument("--prompt-file", help="a file holding the text to continue")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (with --temperature)")
    ap.add_argument("--seed", type=int, default=0, help="the sampling generator's seed")
    ap.add_argument("--tensor", type=int, default=None, help="tensor-parallel degree under torchrun "
                    "(default: the checkpoint's)")
    ap.add_argument("--pipeline", type=int, default=None, help="pipeline degree under torchrun "
                    "(default: the checkpoint's)")
    ap.add_argument("--no-verify", action="store_true", help="skip the CRC-32 check of the checkpoint's files")
    ap.add_argument("--json", action="store_true", help="one JSON line: the prompt's and the new token ids, the text")
    a = ap.parse_args(argv)
    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {a.max_new_tokens}: give at least 1")
    if a.temperature < 0 or not 0 < a.top_p <= 1:
        raise ValueError(f"--temperature {a.temperature} must be >= 0 and --top-p {a.top_p} in (0, 1]")
    if a.prompt_file and not os.path.exists(a.prompt_file):
        raise FileNotFoundError(f"--prompt-file `{a.prompt_file}` does not exist")
    meta = read_meta(a.load)
    if meta["config"]["model"].get("family") == "bert":
        raise ValueError(f"`{meta['path']}` is a BERT (model.family=bert), a masked-LM encoder: it does not generate "
                         "text left to right")
    model, cfg, meta = load_model_from_checkpoint(a.load, not a.no_verify, a.tensor, a.pipeline)
    found = find_tokenizer(meta["path"])
    if found is None:
        raise ValueError(f"`{meta['path']}` holds no tokenizer (tokenizer.model or tokenizer.json): msg-generate needs "
                         "the one the model was trained with")
    tok = load_tokenizer(found)
    if a.prompt_file:
        with open(a.prompt_file, encoding="utf-8") as f:
            text = f.read()
    else:
        text = a.prompt
    ids = tok.encode(text)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give some text")
    model.eval()
    scorer = Scorer(model, cfg.model.seq_length, min(cfg.model.vocab_size, tok.vocab_size), tok.eod, batch_size=1)
    new = generate(scorer, ids, a.max_new_tokens, a.temperature, a.top_p, a.seed)
    completion = tok.decode([t for t in new if t != tok.eod])
    if not is_logging_rank():
        return 0
    if a.json:
        print(json.dumps({"checkpoint": meta["path"], "step": meta["state"]["step"], "prompt_ids": ids,
                          "new_ids": new, "text": completion}))
    else:
        print(text + completion)
    return 0


def main(argv=None) -> None:
    sys.exit(run_cli("msg-generate", _main, argv))


if __name__ == "__main__":
    main()
