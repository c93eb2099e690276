"""Tensor and data parallelism on CPU (gloo): every parallel run on the suite's gloo pool (one
persistent world per size, tests/gloo_pool.py), every single-process reference in this process and
shared by the cases that compare against it (tests/train_runs.py).

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
- Bad layouts fail fast on every rank with a message naming the numbers; launch/local.sh (a real
  torchrun) runs and resumes. (Resume under another layout and offline growth: tests/test_parallel_resume.py.)
"""
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, pooled
from growth_on_ranks import grow_and_gather
from train_runs import BERT, DISTOPT, LLAMA, VPP_SP, losses, pretrain, trained, write_config

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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_tp2_growth_equals_single_rank_growth(arch):
    spec = {"model": MODELS[arch], "old": [32, 64, 2, 2], "new": [48, 96, 4, 3], "init_std": 1.0}
    a = grow_and_gather(spec)  # TP=1: this process
    b = pooled(2, grow_and_gather, spec, layout=(2, 1))[0]
    for key in ("sd_before", "sd_after"):
        assert sorted(a[key]) == sorted(b[key])
        for name in a[key]:  # the layout bookkeeping (interleaved QKV, [gate; up] per rank, unit ids)
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    # function preservation at the growth step under TP=2 (new weights ~ N(0, 1), masks at 0)
    assert abs(b["after"] - b["before"]) <= 1e-6 * abs(b["before"])
    torch.testing.assert_close(b["logits_after"], a["logits_after"], rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(300)
def test_new_weights_across_ranks():
    """New replicated tensors are identical on the TP ranks, new sharded ones differ per TP rank,
    and everything is identical across DP ranks (TP=2 x DP=2, growth in every dimension)."""
    spec = {"model": MODELS["gpt2"], "old": [32, 64, 2, 2], "new": [48, 96, 4, 3], "init_std": 1.0}
    ranks = pooled(4, grow_and_gather, spec, layout=(2, 1))
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


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_matches_single_process(tmp_path, tiny_data, case):
    tp, pp, dp, extra, stages, *rest = CASES[case]
    par_extra = rest[0] if rest else []
    tol = rest[1] if len(rest) > 1 else 1e-5
    ref = trained((1, 1), extra, stages)  # (tp2dp2 and tp2dp2_overlap share theirs)
    cfg = tmp_path / "cfg.yaml"
    write_config(cfg, extra, stages)
    compiled = "train.fusion=compile" in par_extra
    r = pretrain(tp * pp * dp, cfg, f"parallel.tensor={tp}", f"parallel.pipeline={pp}",
                 f"logging.run_dir={tmp_path}/par", *par_extra, env={"TORCHDYNAMO_DISABLE": "1"} if compiled else None)
    assert r.returncode == 0, r.stderr[-3000:]
    if compiled:
        assert "fusion compile" in r.stdout + r.stderr
    if "parallel.sequence_parallel=true" in par_extra:  # the flag reached megatron's config
        assert "sequence parallel" in r.stdout, r.stdout[-2000:]
    if "parallel.virtual_pipeline=2" in par_extra:
        assert f"tensor={tp} pipeline={pp} data={dp}, virtual pipeline 2" in r.stdout, r.stdout[-2000:]
    want, ref_growths = losses(ref / "run")
    got, growths = losses(tmp_path / "par")
    assert sorted(got) == list(range(8)) == sorted(want)  # one metrics file, written once
    for step in range(8):  # before (0-3), at (4) and after (5-7, mid-ramp) the growth
        assert abs(got[step] - want[step]) <= tol * abs(want[step]), (step, got[step], want[step])
    assert len(growths) == 1
    g = growths[0]  # function preservation at the growth step under this layout (also TP=2 x PP=2)
    assert abs(g["probe_loss_after"] - g["probe_loss_before"]) <= min(tol, 1e-3) * g["probe_loss_before"]
    assert g["params"] == ref_growths[0]["params"]  # the parameter count is global under every layout


@pytest.mark.timeout(300)
def test_world_size_not_a_multiple_of_layout_fails_fast(tmp_path, tiny_data):
    """Two ranks asked for TP=4: every rank exits 2 with the numbers, before any collective (a real
    torchrun of the tools: test_local_launcher_runs_and_resumes)."""
    cfg = tmp_path / "cfg.yaml"
    write_config(cfg, [], [[32, 64, 4, 2], [32, 128, 4, 2]])
    r = pretrain(2, cfg, "parallel.tensor=4")
    assert r.returncode == 2
    assert r.stderr.count("world size 2 is not a multiple of parallel.tensor x parallel.pipeline = 4 x 1") == 2, \
        r.stderr[-2000:]


@pytest.mark.timeout(300)
def test_local_launcher_saves_on_sigterm_exits_75_and_resumes(tmp_path, tiny_data):
    """launch/local.sh: torchrun on one machine, checkpoint.load=auto added (a second call resumes).
    SIGTERM to it after a periodic save (megatron's writers then have their results server, which
    the signal to the process group used to kill: BrokenPipeError, exit 1, no checkpoint): every
    worker saves at the step boundary, and the script exits 75 as one process does."""
    cfg = tmp_path / "cfg.yaml"
    write_config(cfg, [f"checkpoint.save={tmp_path}/ck", f"logging.run_dir={tmp_path}/run", "train.steps=100000",
                       "train.decay_steps=8", "train.save_interval=2", "train.log_interval=1", "train.eval_interval=0"],
                 [[32, 64, 2, 2], [32, 128, 4, 2]])
    env = dict(os.environ, WANDB_MODE="disabled", MSG_PYTHON=sys.executable)
    cmd = [os.path.join(REPO, "launch", "local.sh"), "2", str(cfg), "parallel.tensor=2"]
    with open(tmp_path / "err", "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO, env=env)
        out = []
        try:
            for line in p.stdout:  # (the test's timeout bounds a run that never saves)
                out.append(line)
                if line.startswith("[save] step 2 "):
                    p.send_signal(signal.SIGTERM)
                    break
            out += p.stdout.readlines()
            p.wait(timeout=120)
        finally:
            p.kill()
    out, stderr = "".join(out), (tmp_path / "err").read_text()
    assert p.returncode == 75, stderr[-3000:]
    assert "no checkpoint in" in out and "[preempt] SIGTERM" in out and "BrokenPipeError" not in stderr
    stopped = int((tmp_path / "ck" / "latest").read_text().strip()[len("step_"):])
    assert f"[save] step {stopped} -> " in out and stopped >= 3
    r = subprocess.run(cmd + [f"train.steps={stopped + 2}"], capture_output=True, text=True, timeout=240, cwd=REPO,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[resume]" in r.stdout and f"step_{stopped:06d}" in r.stdout
    got, _ = losses(tmp_path / "run")
    assert sorted(got) == list(range(stopped + 2))
