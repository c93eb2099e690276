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
    r = run_cli(["msg_megatron.plan", "configs/demo_cpu.yaml"] + SMALL + ["--dry-run", "--ranks", "all", "--json"])
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
import sys
from msg_megatron.config import load_config
from msg_megatron import dry_run as d
real = d.build_rank
def build_rank(cfg, shape):  # rank 1 also writes rank 0's first piece (a test-only overlap)
    import torch.distributed as dist
    model, opt, pieces = real(cfg, shape)
    if dist.get_rank() == 1:
        pieces = pieces + [p for p in pieces if p[0] == "model.embedding.weight"][:1]
    return model, opt, pieces
d.build_rank = build_rank
cfg = load_config("configs/demo_cpu.yaml", sys.argv[1:])
d.dry_run(cfg, "edges")
"""


def test_an_overlap_is_reported_with_its_key():
    import subprocess

    from conftest import REPO

    r = subprocess.run([sys.executable, "-c", SCRIPT] + SMALL, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode != 0
    assert "model.embedding.weight" in r.stderr and "is written twice" in r.stderr, r.stderr[-2000:]


def test_a_stage_over_the_gpus_memory_is_reported():
    big = [o for o in SMALL if not o.startswith(("model.vocab_size", "parallel.gpus"))] + [
        "model.vocab_size=200000000", "parallel.gpus=4"]  # 200M vocabulary rows on 4 GPUs: stage 1 needs ~115 GiB
    big = [o.replace("tensor: 4", "tensor: 2") for o in big]
    r = run_cli(["msg_megatron.plan", "configs/demo_cpu.yaml"] + big + ["--dry-run", "--gpu", "A800"])
    assert r.returncode == 3, r.stderr[-2000:]
    assert "stage 1 (64, 128, 8, 8), rank" in r.stderr and "need more than the GPU's 80 GiB" in r.stderr, r.stderr[-2000:]


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
    r = run_cli(["msg_megatron.plan", "configs/demo_cpu.yaml"] + cfg + ["--dry-run", "--gpu", "A800", "--ranks", "0"])
    assert r.returncode == 3, r.stderr[-2000:]
    assert "stage 0 (16384, 65536, 128, 8), rank 0" in r.stderr and "80 GiB" in r.stderr, r.stderr[-2000:]
