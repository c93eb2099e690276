"""Tensor and data parallelism on CPU (gloo), each run under torchrun with a timeout.

- A TP=2 model grown in every dimension equals, gathered into the canonical layout, a TP=1 model
  grown from the same weights: bitwise (the same old values are copied and the same new values are
  drawn), and the loss on a fixed batch is unchanged by the growth (function preservation).
- Training equivalence: the same config trained at (TP, PP, DP) in {(2,1,1), (1,2,1), (2,2,1),
  (1,1,2), (2,1,2)} with a growth mid-run gives per-step losses equal to the single-process run
  within 1e-5 relative, before, at and after the growth (reduction orders differ: not bitwise);
  also with megatron's distributed optimizer at (1,2,2), with overlapped DP reduces at (2,1,2), and
  in bf16 (fp32 masters in the distributed optimizer's slices) at (2,2,2) within 1e-2; megatron's
  sequence parallelism at TP4, its interleaved pipeline at TP2 x PP2 x V2 (with SP, layers
  doubled inside each chunk), grouped-query attention at TP2 growing by groups, recomputation.
- Resume under another layout, also from distributed-optimizer slices into the ordinary optimizer,
  from an SP + V2 run onto one process and from PP2 onto V2; at the same layout bitwise.
- Bad layouts fail fast with a message naming the numbers.
"""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO, run_cli
from msg_megatron.config import load_config

pytestmark = pytest.mark.slow  # processes, training runs: the full tier (README); `-m "not slow"` skips it

MODELS = {
    "llama": {"vocab_size": 97, "hidden_size": 48, "ffn_hidden_size": 96, "num_attention_heads": 4, "num_layers": 3,
              "kv_channels": 8, "seq_length": 16, "norm": "rmsnorm", "activation": "swiglu",
              "position_embedding": "rope"},
    "gpt2": {"vocab_size": 97, "hidden_size": 48, "ffn_hidden_size": 96, "num_attention_heads": 4, "num_layers": 3,
             "kv_channels": 8, "seq_length": 16, "norm": "layernorm", "activation": "gelu",
             "position_embedding": "learned", "tie_embeddings": False},
    # BERT's post-LN encoder (bidirectional, token types, MLM head with the vocabulary-parallel decoder bias)
    "bert": {"family": "bert", "vocab_size": 97, "hidden_size": 48, "ffn_hidden_size": 96, "num_attention_heads": 4,
             "num_layers": 3, "kv_channels": 8, "seq_length": 16},
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, args, timeout=300, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_port())] + args
    full_env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=full_env)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_tp2_growth_equals_single_rank_growth(tmp_path, arch):
    spec = {"model": MODELS[arch], "old": [32, 64, 2, 2], "new": [48, 96, 4, 3], "init_std": 1.0}
    outs = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}.pt"
        r = torchrun(tp, ["tests/parallel_worker.py", str(out), str(tp), json.dumps(spec)])
        assert r.returncode == 0, r.stderr[-3000:]
        outs[tp] = torch.load(out)
    a, b = outs[1], outs[2]
    for key in ("sd_before", "sd_after"):
        assert sorted(a[key]) == sorted(b[key])
        for name in a[key]:  # the layout bookkeeping (interleaved QKV, [gate; up] per rank, unit ids)
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    # function preservation at the growth step under TP=2 (new weights ~ N(0, 1), masks at 0)
    assert abs(b["after"] - b["before"]) <= 1e-6 * abs(b["before"])
    torch.testing.assert_close(b["logits_after"], a["logits_after"], rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(300)
def test_new_weights_across_ranks(tmp_path):
    """New replicated tensors are identical on the TP ranks, new sharded ones differ per TP rank,
    and everything is identical across DP ranks (TP=2 x DP=2, growth in every dimension)."""
    spec = {"model": MODELS["gpt2"], "old": [32, 64, 2, 2], "new": [48, 96, 4, 3], "init_std": 1.0}
    out = tmp_path / "w.pt"
    r = torchrun(4, ["tests/parallel_worker.py", str(out), "2", json.dumps(spec)])
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(f"{out}.rank{i}") for i in range(4)]
    by = {(x["tp_rank"], x["dp_rank"]): x for x in ranks}
    assert sorted(by) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    sharded = set(by[(0, 0)]["sharded"])
    assert "layers.2.mlp.linear_fc1.weight" in sharded and "layers.2.input_norm.weight" not in sharded
    for name, t in by[(0, 0)]["local"].items():
        for tp in (0, 1):  # DP replicas hold identical tensors
            assert torch.equal(by[(tp, 0)]["local"][name], by[(tp, 1)]["local"][name]), name
        other = by[(1, 0)]["local"][name]
        if name in sharded and name.endswith(".weight"):  # (new biases are zeros everywhere)
            assert not torch.equal(t, other), name  # different shards of the new weights
        elif name not in sharded and not name.endswith(("_mask", "_birth", "_ids")):
            assert torch.equal(t, other), name  # replicated: the same everywhere
    # the freshly grown replicated tensors really are new random values (not zeros/ones)
    pos = by[(0, 0)]["local"]["position_embeddings.weight"]
    assert pos[:, 32:].abs().sum() > 0


TRAIN = ["model.vocab_size=512", "model.seq_length=32", "model.kv_channels=8", "growth.ramp_steps=3",
         "train.steps=8", "train.global_batch_size=8", "train.micro_batch_size=2", "train.lr=3e-3",
         "train.warmup_steps=2", "train.log_interval=1", "train.eval_interval=0", "data.corpus_mb=0.3",
         "data.valid_fraction=0.05", "logging.wandb=disabled"]

LLAMA = ["model.norm=rmsnorm", "model.activation=swiglu", "model.position_embedding=rope"]
BERT = ["model.family=bert"]
DISTOPT = ["parallel.distributed_optimizer=true"]
VPP_SP = ["parallel.virtual_pipeline=2", "parallel.sequence_parallel=true"]
# (tensor, pipeline, data-parallel, architecture, stages): every growth dimension appears, and every
# layout of the issue: (2,1,1), (1,2,1), (2,2,1), (1,1,2), (2,1,2)
CASES = {
    # grouped-query attention: 2 query heads per group, grows 2 -> 4 groups (one more per TP rank)
    "tp2_gqa": (2, 1, 1, LLAMA + ["model.num_query_groups=4"], [[32, 64, 4, 2], [32, 128, 8, 2]]),  # ffn + groups
    "pp2": (1, 2, 1, [], [[32, 64, 2, 2], [48, 64, 2, 4]]),                              # hidden + layers, tied copy
    "dp2": (1, 1, 2, [], [[32, 64, 2, 2], [48, 64, 2, 3]]),                              # hidden + layers
    "tp2dp2": (2, 1, 2, ["model.tie_embeddings=false"], [[32, 64, 2, 2], [48, 64, 2, 2]]),  # hidden
    # megatron's distributed optimizer (AdamW state in 1/DP slices, grown across the slices) against
    # the single-process run with the ordinary optimizer; under PP with the tied embedding's copy
    "pp2dp2_distopt": (1, 2, 2, LLAMA, [[32, 64, 2, 2], [48, 128, 4, 4]], DISTOPT),
    # bucket reduces started during the last micro-batch's backward (2 micro-batches per rank)
    "tp2dp2_overlap": (2, 1, 2, ["model.tie_embeddings=false"], [[32, 64, 2, 2], [48, 64, 2, 2]],
                       DISTOPT + ["parallel.overlap_grad_reduce=true"]),
    # bf16 parameters with fp32 masters in the distributed optimizer's slices, under TP x PP x DP,
    # against the single-process bf16 run: bf16 matmuls split over TP round differently (1e-2).
    # The parallel run takes the fusion code path (megatron's fused vocab-parallel cross-entropy on
    # bf16 logits split over TP), with TORCHDYNAMO_DISABLE=1 so the compiled functions run their
    # Python (inductor's own numerics are tests/test_fusion.py's; 8 compiling ranks cost minutes)
    # activation recomputation (megatron's tensor_parallel.checkpoint) under TP x PP's schedule,
    # and selective recomputation of core attention under TP, against the plain single-process run
    # (also the (2,2,1) layout's case: ffn, heads, layers)
    "tp2pp2_recompute_full": (2, 2, 1, LLAMA, [[32, 64, 2, 2], [32, 128, 4, 4]],
                              ["train.recompute=full", "train.recompute_num_layers=1"]),
    "tp2_recompute_selective": (2, 1, 1, [], [[32, 64, 2, 2], [48, 128, 4, 2]], ["train.recompute=selective"]),
    # megatron's sequence parallelism: activations between TP regions split along the sequence (at TP2:
    # tp2pp2_vpp2_sp below)
    "tp4_sp": (4, 1, 1, [], [[32, 64, 4, 2], [48, 128, 8, 3]], ["parallel.sequence_parallel=true"]),
    # megatron's interleaved 1F1B: 2 chunks per pipeline rank, layers doubled inside each chunk,
    # with sequence parallelism (the p2p tensors are sequence shards)
    "tp2pp2_vpp2_sp": (2, 2, 1, LLAMA, [[32, 64, 2, 4], [48, 128, 4, 8]], VPP_SP),
    "tp2pp2dp2_bf16": (2, 2, 2, LLAMA + ["train.precision=bf16"], [[32, 64, 2, 2], [48, 128, 4, 4]],
                       DISTOPT + ["train.fusion=compile"], 1e-2),
    # BERT (masked-LM samples of the embedded corpus's sentences): post-LN layers, token types and the
    # padding mask on every pipeline stage, the MLM head and decoder bias on the last; every dimension;
    # the sentence-order head (model.binary_head) under sequence parallelism ([CLS] on the first TP rank)
    "bert_tp2pp2_sop_sp": (2, 2, 1, BERT + ["model.binary_head=true"], [[32, 64, 2, 2], [48, 128, 4, 4]],
                           ["parallel.sequence_parallel=true"]),
}


def _write_config(path, extra, stages):
    over = TRAIN + extra + [
        f"model.hidden_size={stages[-1][0]}", f"model.ffn_hidden_size={stages[-1][1]}",
        f"model.num_attention_heads={stages[-1][2]}", f"model.num_layers={stages[-1][3]}",
        "growth.stages=[{step: 0, shape: %s}, {step: 4, shape: %s}]" % (stages[0], stages[1])]
    cfg = load_config(None, over)
    path.write_text(yaml.safe_dump(cfg.to_dict()))


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}, [r for r in recs if r.get("event") == "growth"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_matches_single_process(tmp_path, tiny_data, case):
    tp, pp, dp, extra, stages, *rest = CASES[case]
    par_extra = rest[0] if rest else []
    tol = rest[1] if len(rest) > 1 else 1e-5
    cfg = tmp_path / "cfg.yaml"
    _write_config(cfg, extra, stages)
    ref = run_cli(["msg_megatron.pretrain", str(cfg), f"logging.run_dir={tmp_path}/ref"], timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    r = torchrun(tp * pp * dp, ["-m", "msg_megatron.pretrain", str(cfg), f"parallel.tensor={tp}",
                                f"parallel.pipeline={pp}", f"logging.run_dir={tmp_path}/par"]
                 + par_extra, env={"TORCHDYNAMO_DISABLE": "1"} if "train.fusion=compile" in par_extra else None)
    assert r.returncode == 0, r.stderr[-3000:]
    if "train.fusion=compile" in par_extra:
        assert "fusion compile" in r.stdout + r.stderr
    if "parallel.sequence_parallel=true" in par_extra:  # the flag reached megatron's config
        assert "sequence parallel" in r.stdout, r.stdout[-2000:]
    if "parallel.virtual_pipeline=2" in par_extra:
        assert f"tensor={tp} pipeline={pp} data={dp}, virtual pipeline 2" in r.stdout, r.stdout[-2000:]
    want, _ = _losses(tmp_path / "ref")
    got, growths = _losses(tmp_path / "par")
    assert sorted(got) == list(range(8)) == sorted(want)  # one metrics file, written once
    for step in range(8):  # before (0-3), at (4) and after (5-7, mid-ramp) the growth
        assert abs(got[step] - want[step]) <= tol * abs(want[step]), (step, got[step], want[step])
    assert len(growths) == 1
    g = growths[0]  # function preservation at the growth step under this layout (also TP=2 x PP=2)
    assert abs(g["probe_loss_after"] - g["probe_loss_before"]) <= min(tol, 1e-3) * g["probe_loss_before"]
    ref_growth = _losses(tmp_path / "ref")[1][0]
    assert g["params"] == ref_growth["params"]  # the parameter count is global under every layout


@pytest.mark.timeout(300)
def test_world_size_not_a_multiple_of_layout_fails_fast(tmp_path, tiny_data):
    cfg = tmp_path / "cfg.yaml"
    _write_config(cfg, [], [[32, 64, 2, 2], [32, 128, 4, 2]])
    r = torchrun(3, ["-m", "msg_megatron.pretrain", str(cfg), "parallel.tensor=2"])
    assert r.returncode != 0
    assert "world size 3" in r.stderr and "parallel.tensor x parallel.pipeline = 2 x 1" in r.stderr, r.stderr[-2000:]


# (layout saved, layout resumed, architecture, stages); the checkpoint is taken at step 6, mid-ramp
RESHARD = {
    "tp2_to_tp1": ((2, 1), (1, 1), LLAMA, [[32, 64, 2, 2], [32, 128, 4, 2]]),   # interleaved heads, SwiGLU fc1
    "tp1_to_tp2": ((1, 1), (2, 1), LLAMA, [[32, 64, 2, 2], [32, 128, 4, 2]]),
    "pp1_to_pp2": ((1, 1), (1, 2), [], [[32, 64, 2, 2], [48, 64, 2, 4]]),        # tied copy from the embedding
    "dp1_to_dp2": ((1, 1), (1, 1, 2), [], [[32, 64, 2, 2], [48, 64, 2, 3]]),
    # learned positions and the tied output copy saved from TP2 x PP2, resumed on one process
    "tp2pp2_to_tp1pp1": ((2, 2), (1, 1), [], [[32, 64, 2, 2], [48, 128, 4, 4]]),
    # distributed-optimizer slices over DP=2 saved in model space, resumed at TP=2 with the ordinary one
    "dp2_distopt_to_tp2": ((1, 1, 2), (2, 1), LLAMA, [[32, 64, 2, 2], [32, 128, 4, 2]], (DISTOPT, [])),
    # the same layout, slices loaded into slices: bitwise
    "pp2dp2_distopt_same": ((1, 2, 2), (1, 2, 2), [], [[32, 64, 2, 2], [48, 64, 2, 4]], (DISTOPT, DISTOPT)),
    # each of 4 DP ranks writes only its slice (boxes cut at arbitrary element ranges); read back whole at TP=2
    "dp4_distopt_to_tp2": ((1, 1, 4), (2, 1), LLAMA, [[32, 64, 2, 2], [32, 128, 4, 2]], (DISTOPT, [])),
    # whole shards (as every checkpoint before slices was written) read slice by slice
    "tp2_to_dp2_distopt": ((2, 1), (1, 1, 2), LLAMA, [[32, 64, 2, 2], [32, 128, 4, 2]], ([], DISTOPT)),
    # global layer numbers: an interleaved (V=2: rank 0 holds layers 0, 1, 4, 5 of 8) sequence-parallel
    # run resumed on one process, and a plain PP=2 run resumed interleaved
    "tp2pp2_vpp2_sp_to_tp1pp1": ((2, 2), (1, 1), LLAMA, [[32, 64, 2, 4], [48, 128, 4, 8]],
                                 (VPP_SP, [])),
    "pp2_to_pp2_vpp2": ((1, 2), (1, 2), [], [[32, 64, 2, 4], [48, 64, 2, 8]], ([], ["parallel.virtual_pipeline=2"])),
    # bf16: fp32 masters written and read as slices, parameters rounded and all-gathered from them: bitwise
    "tp2dp2_distopt_bf16_same": ((2, 1, 2), (2, 1, 2), LLAMA + ["train.precision=bf16"],
                                 [[32, 64, 2, 2], [32, 128, 4, 2]], (DISTOPT, DISTOPT)),
    # BERT mid-ramp: the same layout resumes bitwise (masked-LM samples by number), then on one process
    "bert_tp2dp2_same": ((2, 1, 2), (2, 1, 2), BERT, [[32, 64, 2, 2], [48, 128, 4, 2]]),
    "bert_pp2_to_tp1pp1": ((1, 2), (1, 1), BERT, [[32, 64, 2, 2], [48, 128, 4, 4]]),
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", sorted(RESHARD))
def test_resume_under_another_layout(tmp_path, tiny_data, case):
    saved, resumed, extra, stages, *opt_args = RESHARD[case]
    save_args, resume_args = opt_args[0] if opt_args else ([], [])
    cfg = tmp_path / "cfg.yaml"
    _write_config(cfg, extra, stages)

    def launch(layout, *args):
        tp, pp = layout[0], layout[1]
        world = tp * pp * (layout[2] if len(layout) > 2 else 1)
        return torchrun(world, ["-m", "msg_megatron.pretrain", str(cfg), f"parallel.tensor={tp}",
                                f"parallel.pipeline={pp}"] + list(args))

    r = launch(saved, f"logging.run_dir={tmp_path}/a", f"checkpoint.save={tmp_path}/ck", "train.save_interval=6",
               *save_args)
    assert r.returncode == 0, r.stderr[-3000:]
    if save_args == DISTOPT:  # the slices really are 1/DP (the flag reached megatron's optimizer)
        share = f"({1 / (saved[2] if len(saved) > 2 else 1):.0%})"
        assert "megatron distributed optimizer: AdamW state for" in r.stdout and share in r.stdout, r.stdout[-2000:]
    r = launch(resumed, f"logging.run_dir={tmp_path}/b", f"checkpoint.load={tmp_path}/ck/step_000006", *resume_args)
    assert r.returncode == 0, r.stderr[-3000:]
    want, _ = _losses(tmp_path / "a")
    got, _ = _losses(tmp_path / "b")
    assert sorted(got) == [6, 7]
    for step in got:
        if saved == resumed and save_args == resume_args:
            assert got[step] == want[step], (step, got[step], want[step])  # same layout: bitwise
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])


@pytest.mark.timeout(600)
def test_offline_growth_onto_a_new_layout(tmp_path, tiny_data):
    """Train at TP=2 PP=1, then `msg-grow` under torchrun reads it at TP=1 PP=2, grows every
    dimension and writes the new layout: validation loss equal before and after (<= 1e-5 rel), and
    equal to the source run's own final validation loss (the reshard on load is exact too)."""
    cfg = tmp_path / "cfg.yaml"
    _write_config(cfg, LLAMA + ["train.eval_iters=2"], [[32, 64, 2, 2], [32, 128, 4, 2]])
    r = torchrun(2, ["-m", "msg_megatron.pretrain", str(cfg), "parallel.tensor=2",
                     f"logging.run_dir={tmp_path}/a", f"checkpoint.save={tmp_path}/ck"])
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "a" / "metrics.jsonl") as f:
        source_val = [json.loads(x) for x in f if "val_loss" in x][-1]["val_loss"]
    r = torchrun(2, ["-m", "msg_megatron.grow", "--load", str(tmp_path / "ck"), "--shape", "48,192,6,4",
                     "--save", str(tmp_path / "grown"), "--tensor", "1", "--pipeline", "2", "--json"])
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["layout"] == {"tensor": 1, "pipeline": 2} and out["to"] == [48, 192, 6, 4]
    assert abs(out["val_loss_before"] - source_val) <= 1e-5 * source_val
    assert out["rel_diff"] <= 1e-5
    from msg_megatron.checkpoint.dist import read_meta

    meta = read_meta(str(tmp_path / "grown"), full=True)
    assert meta["shape"] == [48, 192, 6, 4] and meta["config"]["parallel"]["pipeline"] == 2


def test_msg_grow_rejects_a_shape_that_does_not_fit_the_layout(tmp_path, tiny_data):
    cfg = tmp_path / "cfg.yaml"
    _write_config(cfg, [], [[32, 64, 2, 2], [32, 128, 4, 2]])
    r = run_cli(["msg_megatron.pretrain", str(cfg), f"logging.run_dir={tmp_path}/a", f"checkpoint.save={tmp_path}/ck"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(["msg_megatron.grow", "--load", str(tmp_path / "ck"), "--shape", "48,192,6,3", "--save",
                 str(tmp_path / "g"), "--pipeline", "2"])
    assert r.returncode == 2 and "layers by the pipeline degree" in r.stderr and "--pipeline 2" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "g").exists()


@pytest.mark.timeout(300)
def test_training_resumes_from_an_offline_grown_checkpoint(tmp_path, tiny_data):
    """msg-grow's copied layers have no AdamW state yet (fresh moments): resuming must start them
    fresh rather than ask the checkpoint for tensors it does not hold."""
    cfg = tmp_path / "cfg.yaml"
    _write_config(cfg, ["train.steps=10", "train.save_interval=4"], [[32, 64, 2, 2], [32, 64, 2, 4]])
    r = run_cli(["msg_megatron.pretrain", str(cfg), f"logging.run_dir={tmp_path}/a", f"checkpoint.save={tmp_path}/ck"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(["msg_megatron.grow", "--load", str(tmp_path / "ck" / "step_000004"), "--shape", "32,64,2,4",
                 "--save", str(tmp_path / "g"), "--no-verify"])
    assert r.returncode == 0, r.stderr[-2000:]
    # the grown checkpoint is stage 1 at step 4: the same config resumes it (stage 1 runs from step 4 on)
    over = [f"logging.run_dir={tmp_path}/b", f"checkpoint.load={tmp_path}/g"]
    _write_config(cfg, ["train.steps=10"], [[32, 64, 2, 2], [32, 64, 2, 4]])
    r = run_cli(["msg_megatron.pretrain", str(cfg), *over])
    assert r.returncode == 0, r.stderr[-2000:]
    got, _ = _losses(tmp_path / "b")
    assert sorted(got) == list(range(4, 10)) and all(math.isfinite(v) for v in got.values())


@pytest.mark.timeout(300)
def test_local_launcher_runs_and_resumes(tmp_path, tiny_data):
    """launch/local.sh: torchrun on one machine, checkpoint.load=auto added (a second call resumes)."""
    cfg = tmp_path / "cfg.yaml"
    _write_config(cfg, [f"checkpoint.save={tmp_path}/ck", f"logging.run_dir={tmp_path}/run"],
                  [[32, 64, 2, 2], [32, 128, 4, 2]])
    env = dict(os.environ, WANDB_MODE="disabled", MSG_PYTHON=sys.executable)
    cmd = [os.path.join(REPO, "launch", "local.sh"), "2", str(cfg), "parallel.tensor=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no checkpoint in" in r.stdout
    r = subprocess.run(cmd + ["train.steps=10"], capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[resume]" in r.stdout and "step_000008" in r.stdout
    got, _ = _losses(tmp_path / "run")
    assert sorted(got) == list(range(10))


@pytest.mark.timeout(300)
def test_offline_growth_draws_what_online_growth_draws(tmp_path, tiny_data):
    """One seed rule: (a) training through the growth at step 4 and (b) stopping at step 4, growing
    the checkpoint with msg-grow to the next stage's shape and resuming give bitwise equal losses
    after the growth (new weights ~ N(0, 0.02) in every dimension, AdamW moments grown alike)."""
    cfg = tmp_path / "cfg.yaml"
    stages = [[32, 64, 2, 2], [48, 128, 4, 3]]
    _write_config(cfg, [], stages)
    # (the checkpoint at step 4 is taken before the growth at the start of step 4)
    r = run_cli(["msg_megatron.pretrain", str(cfg), f"logging.run_dir={tmp_path}/a", "train.save_interval=4",
                 f"checkpoint.save={tmp_path}/ck"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(["msg_megatron.grow", "--load", str(tmp_path / "ck" / "step_000004"), "--shape", ",".join(map(str, stages[1])),
                 "--save", str(tmp_path / "g"), "--no-verify"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(["msg_megatron.pretrain", str(cfg), f"logging.run_dir={tmp_path}/c", f"checkpoint.load={tmp_path}/g"])
    assert r.returncode == 0, r.stderr[-2000:]
    want, _ = _losses(tmp_path / "a")
    got, _ = _losses(tmp_path / "c")
    assert sorted(got) == [4, 5, 6, 7]
    for step in got:
        assert got[step] == want[step], (step, got[step], want[step])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("shape", ["32,128,4,2", "48,192,6,3"])  # unchanged; every dimension
def test_offline_growth_of_a_mid_ramp_checkpoint_preserves_the_function(tmp_path, tiny_data, shape):
    """The checkpoint of step 6 is mid-ramp (grown at step 4, ramp 3): msg-grow keeps the old masks
    at their saved values (it used to reset them to step 6's, changing the function by ~2e-3 even at
    an unchanged shape) and adds new ones at 0: validation loss equal within 1e-6."""
    cfg = tmp_path / "cfg.yaml"
    _write_config(cfg, LLAMA + ["train.eval_iters=2", "train.save_interval=6"], [[32, 64, 2, 2], [32, 128, 4, 2]])
    r = run_cli(["msg_megatron.pretrain", str(cfg), f"logging.run_dir={tmp_path}/a", f"checkpoint.save={tmp_path}/ck"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(["msg_megatron.grow", "--load", str(tmp_path / "ck" / "step_000006"), "--shape", shape,
                 "--save", str(tmp_path / "g"), "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["rel_diff"] <= 1e-6, out
