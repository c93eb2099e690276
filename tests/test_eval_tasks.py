"""msg-eval --tasks: lm-evaluation-harness run in process on a checkpoint, against lm-eval's own `hf`
model on the Hugging Face export, at TP2 / PP2 / DP2 against one process, and inside a growth ramp
against the model evaluated by hand (full logits, log-softmax) with its masks as saved.

The run: Llama-style, grown in heads and FFN at step 4 under TP2 (units interleaved by rank), ramp 3,
model.seq_length=64, checkpoints at steps 3, 6 (mask 2/3: mid-ramp) and 8.
Tolerances (fp32): accuracy and generated text identical; a request's log-likelihood within 1e-4
(seen 2e-5 vs transformers, 0 at PP2, 5e-6 at TP2); a document's rolling log-likelihood (hundreds of
tokens) within 1e-6 relative.
"""
import json
import math
import sys

import pytest
import torch

from conftest import launch, run_cli
from train_runs import LLAMA, losses, trained

transformers = pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

TASKS = "msg_zen,msg_nextline,msg_complete,msg_prose_bpb,msg_code_bpb"


def _run():
    return trained((2, 1), LLAMA + ["model.seq_length=64", "train.eval_iters=2"], [[32, 64, 2, 2], [32, 128, 4, 2]],
                   save_at=3)


def _eval(ck, out, *more, world=1):
    argv = ["msg_megatron.eval", "--load", str(ck), "--tasks", TASKS, "--limit", "12", "--output", str(out),
            "--json", *more]
    r = run_cli(argv) if world == 1 else launch(world, argv)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def _responses(result):
    """{(task, doc_id, k): response} of lm-eval's samples (k: the request's index within its document)."""
    out = {}
    for task, rows in result["samples"].items():
        for row in rows:
            for k, resp in enumerate(row["resps"]):
                out[(task, row["doc_id"], k)] = resp[0]
    return out


def _assert_same(a, b, tol=1e-4, rel_rolling=1e-6):
    ra, rb = _responses(a), _responses(b)
    assert ra.keys() == rb.keys() and len(ra) > 100
    for key, x in ra.items():
        y = rb[key]
        if isinstance(x, str):
            assert x == y, (key, x, y)
        elif isinstance(x, (list, tuple)):  # (log-likelihood, is greedy)
            assert abs(x[0] - y[0]) <= tol and bool(x[1]) == bool(y[1]), (key, x, y)
        else:  # a document's rolling log-likelihood
            assert abs(x - y) <= rel_rolling * abs(y), (key, x, y)
    for task, row in a["tasks"].items():
        for metric in ("acc", "acc_norm", "exact_match"):
            if metric in row:
                assert row[metric] == b["tasks"][task][metric], (task, metric)


@pytest.mark.slow
def test_tasks_equal_lm_eval_hf_on_the_export(tmp_path):
    """In one process vs lm-eval's `hf` model on the export (its tokenizer stating EOD as BOS and pad):
    every response equal within the tolerances; and msg-eval --text's bits per byte on a document equals
    lm-eval's loglikelihood_rolling bits_per_byte on the export, through a user's own task
    (--include-path, a JSONL file by absolute path)."""
    r = run_cli(["msg_megatron.eval", "--load", str(tmp_path / "missing"), "--tasks", "msg_zen,no_such_task"])
    assert r.returncode == 2 and "unknown task(s) no_such_task" in r.stderr, r.stderr[-800:]
    run = _run()
    ours = _eval(run / "ck", tmp_path / "ours.json")
    r = run_cli(["msg_megatron.hf.export", "--load", str(run / "ck"), "--out", str(tmp_path / "hf")])
    assert r.returncode == 0, r.stderr[-2000:]
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id  # EOD: what training put between documents
    from lm_eval.tasks import TaskManager

    from msg_megatron.training.harness import TASKS_DIR

    theirs = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(tmp_path / "hf"), "dtype": "float32", "device": "cpu"},
        tasks=TASKS.split(","), limit=12, log_samples=True, bootstrap_iters=0, batch_size=4,
        task_manager=TaskManager(include_path=TASKS_DIR, include_defaults=False))
    theirs["tasks"] = {t: {k.split(",")[0]: v for k, v in row.items()} for t, row in theirs["results"].items()}
    _assert_same(ours, theirs)

    # a user's task over a file of their own; msg-eval --text scores the same document
    text = json.loads((tmp_path / "ours.json").read_text())["samples"]["msg_prose_bpb"][0]["doc"]["text"]
    (tmp_path / "doc.txt").write_text(text)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "doc.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tmp_path / "mine" / "my_doc.yaml").write_text(
        "task: my_doc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'mine' / 'doc.jsonl'}\noutput_type: loglikelihood_rolling\ntest_split: test\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n")
    r = run_cli(["msg_megatron.eval", "--load", str(run / "ck"), "--tasks", "my_doc", "--include-path",
                 str(tmp_path / "mine"), "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    mine = json.loads(r.stdout.strip().splitlines()[-1])["tasks"]["my_doc"]["bits_per_byte"]
    r = run_cli(["msg_megatron.eval", "--load", str(run / "ck"), "--text", str(tmp_path / "doc.txt"), "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    plain = json.loads(r.stdout.strip().splitlines()[-1])
    hf_doc = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(tmp_path / "hf"), "dtype": "float32", "device": "cpu"},
        tasks=["my_doc"], bootstrap_iters=0, task_manager=TaskManager(include_path=str(tmp_path / "mine"),
                                                                      include_defaults=False))
    hf_bpb = hf_doc["results"]["my_doc"]["bits_per_byte,none"]
    assert abs(plain["bits_per_byte"] - hf_bpb) <= 1e-6 * hf_bpb and abs(mine - hf_bpb) <= 1e-6 * hf_bpb, \
        (plain, mine, hf_bpb)
    assert abs(plain["loss"] * plain["tokens"] - plain["bits_per_byte"] * plain["bytes"] * math.log(2)) < 1e-6 * \
        plain["loss"] * plain["tokens"]


@pytest.mark.slow
def test_tasks_at_tp2_pp2_dp2_equal_one_process(tmp_path):
    """The final checkpoint at TP2, PP2 and DP2 (two ranks each: each holds its shard; DP2 splits the
    requests) gives one process's responses, and the mid-ramp checkpoint (step 6) at TP2 gives its own
    one-process responses."""
    run = _run()
    one = _eval(run / "ck", tmp_path / "one.json")
    for flags in (["--tensor", "2", "--pipeline", "1"], ["--tensor", "1", "--pipeline", "2"],
                  ["--tensor", "1", "--pipeline", "1"]):
        _assert_same(_eval(run / "ck", tmp_path / "two.json", *flags, world=2), one)
    mid = run / "ck" / "step_000006"
    _assert_same(_eval(mid, tmp_path / "mid2.json", "--tensor", "2", world=2), _eval(mid, tmp_path / "mid1.json"))


@pytest.mark.slow
def test_mid_ramp_scores_equal_the_model_by_hand(tmp_path):
    """Inside the ramp (step 6 of births at 4, ramp 3: masks 2/3) msg-eval's log-likelihoods equal the
    model built at the stage's shape with the checkpoint's masks, evaluated by hand (full logits,
    log_softmax, the continuation's tokens), within 1e-4; with the masks forced to 1 they differ."""
    from msg_megatron.data.tokenizer import find_tokenizer, load_tokenizer
    from msg_megatron.eval import load_model_from_checkpoint

    mid = _run() / "ck" / "step_000006"
    got = _eval(mid, tmp_path / "mid.json")
    model, cfg, meta = load_model_from_checkpoint(str(mid))
    model.eval()
    masks = [b for n, b in model.named_buffers() if n.endswith("_mask") and b.numel()]
    assert any(((m > 0) & (m < 1)).any() for m in masks)  # a ramp is running
    tok = load_tokenizer(find_tokenizer(str(mid)))
    L = cfg.model.seq_length

    def by_hand(context, continuation):
        n_space = len(context) - len(context.rstrip())  # (lm-eval moves the context's trailing whitespace over)
        context, continuation = context[:len(context) - n_space], context[len(context) - n_space:] + continuation
        ctx = tok.encode(context)
        whole = tok.encode(context + continuation)
        cont = whole[len(ctx):]
        seq = whole[-(L + 1):]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor(seq[:-1])[None])[0].double(), -1)
        n = len(seq) - 1
        return sum(float(logp[n - len(cont) + j, cont[j]]) for j in range(len(cont)))

    rows = [r for r in got["samples"]["msg_nextline"]][:6]
    for row in rows:
        for args, resp in zip(row["arguments"], row["resps"]):
            context, continuation = args if isinstance(args, (list, tuple)) else (args["arg_0"], args["arg_1"])
            assert abs(by_hand(context, continuation) - resp[0][0]) <= 1e-4
    from msg_megatron.model.masks import Mask

    for mod in model.modules():  # the same model past its ramp
        for mask in vars(mod).values():
            if isinstance(mask, Mask):
                mask.set_step(10**6, cfg.growth.ramp_steps)
    context, continuation = rows[0]["arguments"][0] if isinstance(rows[0]["arguments"][0], (list, tuple)) else (
        rows[0]["arguments"][0]["arg_0"], rows[0]["arguments"][0]["arg_1"])
    assert abs(by_hand(context, continuation) - rows[0]["resps"][0][0][0]) > 1e-3


def test_refusals_are_one_line_before_any_model(tmp_path, monkeypatch):
    """A missing --include-path, --limit without --tasks, and lm-eval not installed: one line (status 2)
    naming the fix, before the checkpoint is even read (--load does not exist). (An unknown task name:
    in test_tasks_equal_lm_eval_hf_on_the_export, since it indexes lm-eval's own tasks, ~9 s.)"""
    for args, words in (
            (["--tasks", "msg_zen", "--include-path", str(tmp_path / "nope")], "is not a folder of task YAML"),
            (["--limit", "3"], "go with --tasks"),
            (["--tasks", ","], "--tasks is empty")):
        r = run_cli(["msg_megatron.eval", "--load", str(tmp_path / "missing"), *args])
        assert r.returncode == 2 and words in r.stderr, (args, r.stderr[-800:])
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # (import lm_eval raises ImportError)
    r = run_cli(["msg_megatron.eval", "--load", str(tmp_path / "missing"), "--tasks", "msg_zen"])
    assert r.returncode == 2 and "lm-evaluation-harness is not installed" in r.stderr and "[eval]" in r.stderr, \
        r.stderr[-800:]


@pytest.mark.slow
def test_tasks_during_training_equal_msg_eval(tmp_path):
    """train.eval_tasks runs at the end of the growth ramp (step 4 + ramp 3 = 7) and at the end (8),
    scores in metrics.jsonl as tasks/<task>/<metric>; the final ones equal msg-eval --tasks on the
    final checkpoint (accuracy identical, bits per byte within 1e-6 relative); the training losses are
    bitwise those of the same run without them (evaluation leaves the run's state and RNG streams alone)."""
    stages = [[32, 64, 2, 2], [32, 128, 4, 2]]
    run = trained((1, 1), LLAMA + ["model.seq_length=64", "train.eval_tasks=[msg_zen,msg_code_bpb]",
                                   "train.eval_tasks_limit=6"], stages, save_at=8)
    plain = trained((1, 1), LLAMA + ["model.seq_length=64"], stages)
    assert losses(run / "run")[0] == losses(plain / "run")[0]
    with open(run / "run" / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    scored = {r["step"]: r for r in recs if "tasks/msg_zen/acc" in r}
    assert sorted(scored) == [7, 8], sorted(scored)
    assert "[tasks] step 7" in (run / "stdout.txt").read_text()
    r = run_cli(["msg_megatron.eval", "--load", str(run / "ck"), "--tasks", "msg_zen,msg_code_bpb", "--limit", "6",
                 "--batch-size", "2", "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])["tasks"]
    assert scored[8]["tasks/msg_zen/acc"] == got["msg_zen"]["acc"]
    want = got["msg_code_bpb"]["bits_per_byte"]
    assert abs(scored[8]["tasks/msg_code_bpb/bits_per_byte"] - want) <= 1e-6 * want
