"""msg-generate: greedy text equals transformers' `generate()` on the Hugging Face export, token for
token; sampling is reproducible from its seed; bad arguments are one line before the model loads."""
import json

import pytest
import torch

from conftest import launch, run_cli
from train_runs import LLAMA, trained

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")


def _generate(ck, *more, world=1):
    argv = ["msg_megatron.generate", "--load", str(ck), "--prompt", "def main(args):\n    ", "--json", *more]
    r = run_cli(argv) if world == 1 else launch(world, argv)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_greedy_equals_transformers_generate(tmp_path, tiny_data):
    """The TP2 run test_parallel_resume trains (heads and FFN grown, past the ramp), loaded in one
    process: 24 greedy tokens equal those of transformers' LlamaForCausalLM on its export; at TP2 and
    PP2 (two ranks) the same greedy and sampled tokens as one process."""
    run = trained((2, 1), LLAMA + ["train.eval_iters=2"], [[32, 64, 2, 2], [32, 128, 4, 2]], save_at=8)
    ours = _generate(run / "ck", "--max-new-tokens", "24")
    r = run_cli(["msg_megatron.hf.export", "--load", str(run / "ck"), "--out", str(tmp_path / "hf")])
    assert r.returncode == 0, r.stderr[-2000:]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    from msg_megatron.data.tokenizer import find_tokenizer, load_tokenizer

    eod = load_tokenizer(find_tokenizer(str(tmp_path / "hf"))).eod
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ours["prompt_ids"]]), max_new_tokens=24, do_sample=False,
                             eos_token_id=eod, pad_token_id=eod)[0, len(ours["prompt_ids"]):].tolist()
    assert ours["new_ids"] == theirs and len(theirs) >= 8, (ours["new_ids"], theirs)  # (not an immediate end)
    # sampling: the same seed gives the same tokens, another seed others
    a, b = (_generate(run / "ck", "--temperature", "1.0", "--top-p", "0.9", "--seed", s) for s in ("3", "3"))
    c = _generate(run / "ck", "--temperature", "1.0", "--top-p", "0.9", "--seed", "4")
    assert a["new_ids"] == b["new_ids"] != c["new_ids"]
    # split over two ranks (TP2: each holds its shard; PP2): the same tokens, greedy and sampled
    assert _generate(run / "ck", "--max-new-tokens", "24", "--tensor", "2", world=2)["new_ids"] == ours["new_ids"]
    assert _generate(run / "ck", "--temperature", "1.0", "--top-p", "0.9", "--seed", "3", "--tensor", "1",
                     "--pipeline", "2", world=2)["new_ids"] == a["new_ids"]


@pytest.mark.parametrize("args,words", [
    (["--top-p", "0"], "--top-p 0.0 in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: give at least 1"),
    (["--prompt-file", "/nonexistent"], "--prompt-file `/nonexistent` does not exist"),
])
def test_bad_arguments_are_one_line(args, words, tmp_path):
    argv = ["msg_megatron.generate", "--load", str(tmp_path)] + (["--prompt", "x"] if "--prompt-file" not in args
                                                                 else []) + args
    r = run_cli(argv)
    assert r.returncode == 2 and words in r.stderr, r.stderr[-600:]
