"""lm-evaluation-harness on the model where it is: its `LM` interface over training/scoring.py.

lm-eval (`pip install "msg-megatron[eval]"`, lm-eval 0.4.13) is imported only here and only when
tasks are run. Every rank of the job calls `run_tasks` with the same arguments: lm-eval builds the
same requests on every rank (it is told it runs alone), the Scorer splits them over the DP replicas
and gives every rank every result, so every rank computes the same metrics and rank 0 reports them.

The adapter follows lm-eval's own `hf` model where it chooses: the end-of-document token is both
its end-of-text and its prefix token (documents were separated by EOD in training, so a document
after EOD is what the model learnt to start), text is encoded without special tokens, a context and
continuation are scored as the last seq_length + 1 tokens, rolling log-likelihoods use lm-eval's
disjoint windows of seq_length tokens, and generation is greedy with the context cut to
seq_length - max_gen_toks tokens and the text cut at the first stop sequence.
"""
from __future__ import annotations

import os
import random
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .scoring import Scorer

LM_EVAL_VERSION = "0.4.13"
INSTALL = f'pip install --no-build-isolation "msg-megatron[eval]" (lm-eval[hf]=={LM_EVAL_VERSION})'
TASKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks")


class EvalError(ValueError):
    """A task request this evaluation cannot run (one line for the user)."""


def lm_eval_problem() -> Optional[str]:
    """Why lm-evaluation-harness cannot be used here, or None."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import TemplateLM  # noqa: F401
    except ImportError as e:
        return f"lm-evaluation-harness is not installed ({e}); install it with: {INSTALL}"
    return None


def _adapter_class():
    from lm_eval import utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

    class MSGLM(TemplateLM):
        """An in-process msg-megatron model as lm-eval's `LM` (see the module doc)."""

        def __init__(self, scorer: Scorer, tokenizer):
            super().__init__()
            self.scorer, self.tok = scorer, tokenizer
            self._rank, self._world_size = 0, 1  # (the Scorer shares the work; lm-eval sees one process)
            self._device = "cpu"

        @property
        def eot_token_id(self) -> int:
            return self.tok.eod

        @property
        def max_length(self) -> int:
            return self.scorer.seq_length

        @property
        def max_gen_toks(self) -> int:  # (lm-eval's `hf` default, where a task sets none)
            return 256

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> List[int]:
            return self.tok.encode(string)

        def tok_decode(self, ids: Sequence[int]) -> str:
            return self.tok.decode(list(ids))

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            for (_, continuation), _, cont in requests:
                if len(cont) > self.max_length:  # (lm-eval's `hf` model asserts the same)
                    raise EvalError(f"a continuation of {len(cont)} tokens ({continuation[:40]!r}...) is longer than "
                                    f"the model's context of {self.max_length} (model.seq_length): it cannot be "
                                    "scored; shorten the task's choices or targets")
            return self.scorer.loglikelihood([(ctx, cont) for _, ctx, cont in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
            windows, owner = [], []
            for k, (string,) in enumerate(req.args for req in requests):
                for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                        token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length, context_len=1)):
                    windows.append((ctx, cont))
                    owner.append(k)
            totals = [0.0] * len(requests)
            for k, (logprob, _) in zip(owner, self.scorer.loglikelihood(windows)):
                totals[k] += logprob
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
            eos = self.tok_decode([self.eot_token_id])
            groups = {}  # requests with the same generation settings run together
            for k, req in enumerate(requests):
                context, gen_kwargs = req.args
                kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
                if kw.get("do_sample") or float(kw.get("temperature", 0.0) or 0.0) > 0:
                    raise EvalError(f"a task asks for sampled generation ({gen_kwargs}); msg-eval generates greedily "
                                    "(set do_sample: false / temperature: 0 in the task's generation_kwargs)")
                until = tuple(handle_stop_sequences(kw.pop("until", None), eos=eos))
                groups.setdefault((until, int(kw.pop("max_gen_toks"))), []).append((k, context))
            out = [""] * len(requests)
            for (until, max_gen), items in groups.items():
                room = self.max_length - max_gen
                if room <= 0:
                    raise EvalError(f"a task asks for up to {max_gen} generated tokens, which leaves no room for its "
                                    f"context in the model's {self.max_length} positions (model.seq_length); lower "
                                    "max_gen_toks in the task's generation_kwargs")
                prompts = [self.tok_encode(c)[-room:] for _, c in items]

                def stop(i, new, until=until):
                    text = self.tok_decode(new)
                    return any(s and s in text for s in until)

                for (k, _), new in zip(items, self.scorer.greedy(prompts, max_gen, stop)):
                    text = self.tok_decode([t for t in new if t != self.eot_token_id])
                    out[k] = postprocess_generated_text(text, list(until), None)
            return out

    return MSGLM


def task_manager(tasks: Sequence[str], include_path: Optional[str] = None):
    """lm-eval's TaskManager that knows `tasks` (the shipped ones, `include_path`'s, lm-eval's own), or
    EvalError naming what is missing: lm-eval itself, the folder, or a task. No model needed: callers
    check before they load one."""
    problem = lm_eval_problem()
    if problem:
        raise EvalError(problem)
    import logging

    from lm_eval.tasks import TaskManager

    paths = [TASKS_DIR] + ([include_path] if include_path else [])
    for p in paths[1:]:
        if not os.path.isdir(p):
            raise EvalError(f"--include-path `{p}` is not a folder of task YAML files")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    # lm-eval's own ~15k task files take ~9 s to index: only when a task is not on the include path
    manager = TaskManager(include_path=paths, include_defaults=False, verbosity="WARNING")
    if any(not manager.match_tasks([t]) for t in tasks):
        manager = TaskManager(include_path=paths, include_defaults=True, verbosity="WARNING")
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        mine = sorted(n for n in manager.all_tasks if n.startswith("msg_"))
        raise EvalError(f"unknown task(s) {', '.join(unknown)}: neither lm-eval's nor on the include path; the "
                        f"shipped offline tasks are {', '.join(mine)} (`lm-eval ls tasks` lists lm-eval's own)")
    return manager


def run_tasks(model, tokenizer, tasks: Sequence[str], *, seq_length: int, vocab_size: int, batch_size: int = 8,
              include_path: Optional[str] = None, limit: Optional[float] = None,
              num_fewshot: Optional[int] = None, seed: int = 1234, log_samples: bool = False,
              manager=None) -> dict:
    """{"scores": {task: {metric: value}}, "samples": lm-eval's per-document records or None} of `tasks` on
    `model`, on every rank (called on every rank alike; the model in eval mode for the call). The
    shipped tasks (msg_megatron/tasks) are always on the include path. `log_samples`: also each
    request's responses ("samples", as lm-eval's results["samples"]). `manager`: task_manager's, when the
    caller checked the task names already."""
    manager = manager or task_manager(tasks, include_path)
    import lm_eval

    gpt = getattr(model, "module", model)
    was_training = gpt.training
    gpt.eval()
    # lm-eval seeds Python's, numpy's and torch's global generators: a run's own streams are put back after
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    quiet = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # (lm-eval's progress bars, one per request type and task)
    try:
        lm = _adapter_class()(Scorer(model, seq_length, vocab_size, tokenizer.eod, batch_size), tokenizer)
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            log_samples=log_samples, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, verbosity="WARNING")
    finally:
        gpt.train(was_training)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])
        if quiet is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = quiet
    # lm-eval returns its results on the processes with LOCAL_RANK 0 only (every rank computed them)
    out = [{"scores": scores(results), "samples": results.get("samples")} if results is not None else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(out, src=0)
    return out[0]


def scores(results: dict) -> dict:
    """{task: {metric: value}} of lm-eval's results, without its stderr entries and display names
    (`acc,none` -> `acc`; another filter keeps its name: `exact_match,strip`)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if key == "alias" or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("", "none") else key] = float(value)
        out[task] = row
    return out
