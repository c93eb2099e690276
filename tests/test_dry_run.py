"""msg-plan --dry-run (msg_megatron/dry_run.py): a schedule's ranks built on meta tensors under
torch's fake process group, each in a fresh process (the dry run owns torch.distributed).

- A small schedule at world size 32 (TP2 x PP2 x DP8, then a re-layout to TP4 x PP2 x DP4 with
  every dimension grown, layers doubled; distributed optimizer, bf16, SwiGLU, GQA): every rank
  builds, every checkpoint key is covered exactly once, msg-grow's plan maps every tensor of the
  second stage, and the memory from the tensors built equals msg-plan's formula within 5% (the
  difference is megatron's bucket padding, reported).
- An overlap injected into one rank's checkpoint pieces is reported with the key and both ranks;
  a stage over the GPU's memory is reported with the stage, the rank and both figures.
"""
import json
import sys

import pytest
from conftest import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # processes: the full tier

SMALL = ["model.vocab_size=512", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=8",
         "model.num_query_groups=4", "model.num_layers=8", "model.kv_channels=16", "model.seq_length=64",
         "model.norm=rmsnorm", "model.activation=swiglu", "model.position_embedding=rope",
         "parallel.gpus=32", "parallel.distributed_optimizer=true", "train.precision=bf16", "train.steps=20",
         "train.global_batch_size=64", "train.micro_batch_size=2",
         "growth.stages=[{step: 0, shape: [32, 64, 4, 4], tensor: 2, pipeline: 2}, "
         "{step: 10, shape: [64, 128, 8, 8], tensor: 4, pipeline: 2}]"]


def test_small_schedule_at_world_32_builds_covers_and_counts():
    r = run_cli(["msg_megatron.plan", "configs/demo_cpu.yaml"] + SMALL + ["--dry-run", "--ranks", "all", "--json"],
                process=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert [s["layout"] for s in res["stages"]] == [[2, 2, 8], [4, 2, 4]]
    growth = res["stages"][1]
    assert growth["growth_kind"] == "msg-grow" and growth["growth_into"]["copies"] > 0
    for st in res["stages"]:
        assert st["ranks_built"] == 32 and st["ranks_reported"] == list(range(32))
        assert st["checkpoint_keys"] > 0
        assert abs(st["real_vs_formula"] - 1) <= 0.05, st
        pp0 = [m for m in st["memory"].values() if m["coordinates"][2] == 0]  # (the formula's stage: the first)
        assert max(m["params"] for m in pp0) > 0


SCRIPT = r"""
import json, sys
from msg_megatron.config import load_config
from msg_megatron import dry_run as d
real = d.build_rank
FAULT, RANK = None, None
def build_rank(cfg, shape, measure_save=False):  # a test-only fault in one rank's pieces
    import torch.distributed as dist
    model, opt, pieces, extra = real(cfg, shape, measure_save)
    if dist.get_rank() == RANK:  # its largest piece written twice, or lost
        big = max(pieces, key=lambda p: p[3][0] * (p[3][1] if len(p[3]) > 1 else 1))
        FOUND.append(big[0])
        pieces = pieces + [big] if FAULT == "overlap" else [p for p in pieces if p is not big]
    return model, opt, pieces, extra
d.build_rank = build_rank
cfg = load_config("configs/demo_cpu.yaml", sys.argv[2:])
out = []
for fault in json.loads(sys.argv[1]):  # one process, one dry run per fault
    FAULT, RANK, FOUND = fault[0], fault[1], []
    try:
        d.dry_run(cfg, "edges", log=lambda *_: None)
        out.append([None, None])
    except d.DryRunError as e:
        out.append([FOUND[0], str(e)])
print(json.dumps(out))
"""


FAULTS = [("overlap", 1, "is written twice"),  # rank 1 = (tp 1, dp 0): in the DP replica, not a whole coordinate
          ("overlap", 4, "is written twice"),  # rank 4 = (tp 0, dp 2) of the first coordinate
          ("gap", 2, "a gap in what the ranks write")]  # (tp 0, dp 1) of the first coordinate


def test_a_fault_in_the_pieces_is_reported_with_its_key():
    """At world 32 with `edges`, 20 of the 32 ranks are built (one DP replica, every DP rank of the first
    and last pipeline stage's first TP coordinate): a piece written twice or missing, on a replica rank
    or a coordinate's, is reported with its key."""
    import subprocess

    from conftest import REPO

    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([f[:2] for f in FAULTS])] + SMALL,
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    for (fault, rank, words), (key, message) in zip(FAULTS, json.loads(r.stdout.strip().splitlines()[-1])):
        assert key is not None, (fault, rank, "not reported")
        assert f"`{key}`" in message and words in message, (fault, rank, message)


def test_a_stage_over_the_gpus_memory_is_reported():
    big = [o for o in SMALL if not o.startswith(("model.vocab_size", "parallel.gpus"))] + [
        "model.vocab_size=200000000", "parallel.gpus=4"]  # 200M vocabulary rows on 4 GPUs: stage 1 needs ~115 GiB
    big = [o.replace("tensor: 4", "tensor: 2") for o in big]
    r = run_cli(["msg_megatron.plan", "configs/demo_cpu.yaml"] + big + ["--dry-run", "--gpu", "A800"], process=True)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "stage 1 (64, 128, 8, 8), rank" in r.stderr and "more than the GPU's 80 GiB" in r.stderr, r.stderr[-2000:]


LOST_LAYER = r"""
import sys
from msg_megatron.config import load_config
from msg_megatron import dry_run as d
real = d.stage_groups
def stage_groups(old, new, depth_init):  # msg-grow's plan losing new layer 5 (test-only)
    groups = real(old, new, depth_init)
    for g in groups:
        g.new = g.new._replace(layers=tuple(x for x in g.new.layers if x != 5))
    return groups
d.stage_groups = stage_groups
d.dry_run(load_config("configs/demo_cpu.yaml", sys.argv[1:]), "edges")
"""


def test_a_relayout_that_loses_a_tensor_is_reported():
    """msg-grow's plan for SMALL's re-layout, made to lose a layer, is caught before any job runs."""
    import subprocess

    from conftest import REPO

    stages = SMALL
    r = subprocess.run([sys.executable, "-c", LOST_LAYER] + stages, capture_output=True, text=True, timeout=300,
                       cwd=REPO)
    assert r.returncode != 0
    assert "growth into stage 1: new layer 5 is built by 0 ranks' plans" in r.stderr, r.stderr[-2000:]


def test_real_tensors_over_the_gpu_while_the_formula_fits():
    """msg-plan's formula splits every parameter over TP, but learned positions (and norms, biases)
    are whole on every TP rank: 2.1B of them here (131072 positions x 16384). The formula says the
    stage fits an 80 GiB GPU; the tensors built need ~100 GiB, and the dry run refuses it."""
    cfg = ["model.vocab_size=1024", "model.hidden_size=16384", "model.ffn_hidden_size=65536",
           "model.num_attention_heads=128", "model.kv_channels=128", "model.num_layers=8",
           "model.seq_length=131072", "model.norm=layernorm", "model.activation=gelu",
           "model.position_embedding=learned", "parallel.tensor=8", "parallel.gpus=8",
           "parallel.sequence_parallel=true", "parallel.distributed_optimizer=true", "train.precision=bf16",
           "train.recompute=full", "train.micro_batch_size=1", "train.global_batch_size=8", "growth.stages=[]"]
    r = run_cli(["msg_megatron.plan", "configs/demo_cpu.yaml"] + cfg + ["--json", "--gpu", "A800"])
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads(r.stdout)
    assert not plan["over_memory"] and plan["stages"][0]["phase_peak_gib"]["train"] < 80  # the formula: fits
    r = run_cli(["msg_megatron.plan", "configs/demo_cpu.yaml"] + cfg + ["--dry-run", "--gpu", "A800", "--ranks", "0"],
                process=True)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "stage 0 (16384, 65536, 128, 8), rank 0" in r.stderr and "80 GiB" in r.stderr, r.stderr[-2000:]


REAL = ["model.vocab_size=512", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=8",
        "model.num_query_groups=4", "model.num_layers=4", "model.kv_channels=16", "model.seq_length=32",
        "model.norm=rmsnorm", "model.activation=swiglu", "model.position_embedding=rope", "parallel.tensor=2",
        "parallel.pipeline=2", "parallel.gpus=8", "parallel.distributed_optimizer=true", "train.precision=bf16",
        "train.steps=4", "train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_interval=0",
        "data.corpus=synthetic", "logging.wandb=disabled",
        "growth.stages=[{step: 0, shape: [32, 64, 4, 2]}, {step: 2, shape: [64, 128, 8, 4]}]"]

OBSERVE = r"""
import json, sys
import torch.distributed as dist
from msg_megatron.config import load_config
from msg_megatron import dry_run as d
seen, real = {}, d.build_rank
def build_rank(cfg, shape, measure_save=False):  # (observes the pieces each rank builds)
    model, opt, pieces, extra = real(cfg, shape, measure_save)
    seen.setdefault(str(shape.as_tuple()), {})[str(dist.get_rank())] = sorted(pieces)
    return model, opt, pieces, extra
d.build_rank = build_rank
res = d.dry_run(load_config("configs/demo_cpu.yaml", sys.argv[1:]), "all", log=lambda *_: None)
print(json.dumps([{str(r): dict(m, pieces=seen[str(tuple(st["shape"]))][str(r)]) for r, m in st["memory"].items()}
                  for st in res["stages"]]))
"""


def test_memory_and_pieces_equal_the_real_trainers_on_gloo(tmp_path):
    """TP2 x PP2 x DP2 (8 gloo processes), distributed optimizer, bf16, SwiGLU, GQA, an online growth of
    every dimension: per rank and stage, the real trainer's tensors after a step (AdamW's moments
    allocated by its step; after the growth, the grown model's) hold exactly the parameters, weight,
    gradient and optimizer bytes, bucket padding and largest tensor that the dry run counts on meta
    tensors, and write exactly the same checkpoint pieces."""
    import subprocess

    from conftest import REPO, pooled
    from dry_run_ranks import step_grow_step

    real = pooled(8, step_grow_step, ["configs/demo_cpu.yaml"] + REAL +
                  [f"logging.run_dir={tmp_path}/run", f"checkpoint.save={tmp_path}/ck"], timeout=300)[0]
    real = json.loads(json.dumps(real))  # (the pieces as the dry run's JSON gives them: lists)
    d = subprocess.run([sys.executable, "-c", OBSERVE] + REAL, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert d.returncode == 0, d.stderr[-3000:]
    dry = json.loads(d.stdout.strip().splitlines()[-1])
    keys = ("params", "weights", "grads", "optimizer", "bucket_padding_elements", "replicated_params",
            "largest_tensor")
    assert len(real) == len(dry) == 2
    for stage, (want, got) in enumerate(zip(real, dry)):
        assert sorted(want) == sorted(got) == [str(r) for r in range(8)]
        for rank in want:
            assert {k: got[rank][k] for k in keys} == {k: want[rank][k] for k in keys}, (stage, rank)
            assert got[rank]["pieces"] == want[rank]["pieces"], (stage, rank)


def test_the_flm_preset_dry_runs():
    """The FLM-101B preset (192 ranks per stage: TP2 x DP96, TP4 x PP2 x DP24, TP4 x PP4 x DP12, two
    re-layouts by msg-grow): every stage builds, the checkpoint is covered, every tensor of each
    re-layout is mapped, the tensors built equal msg-plan's formula within 0.1% (bucket padding), every
    phase fits an 80 GiB A800 with the formula's activations, and the dry run stays under 4 GiB of RSS.
    (Its time, printed, was 68 s on this 2-core machine: the issue's bound is 3 minutes.)"""
    r = run_cli(["msg_megatron.plan", "configs/flm_101b_a800.yaml", "--dry-run", "--json", "--gpu", "A800"],
                timeout=600, process=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert [s["layout"] for s in res["stages"]] == [[2, 1, 96], [4, 2, 24], [4, 4, 12]]
    assert [s["growth_kind"] for s in res["stages"]] == [None, "msg-grow", "msg-grow"]
    for st in res["stages"]:
        assert st["world"] == 192 and st["checkpoint_keys"] > 1000, st["checkpoint_keys"]
        assert abs(st["real_vs_formula"] - 1) < 1e-3, st["real_vs_formula"]
        assert st["phases_real"]["train"] + st["activations_formula"] < 80 * 1024 ** 3
        for ph, v in st["phases_real"].items():
            assert abs(v / st["phases_formula"][ph] - 1) < 1e-3, (st["stage"], ph)
    assert res["peak_rss_bytes"] < 4 * 1024 ** 3, res["peak_rss_bytes"]
    print(f"FLM dry run: {res['seconds']:.0f} s, peak RSS {res['peak_rss_bytes'] / 1024 ** 3:.2f} GiB")
