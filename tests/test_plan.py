"""msg-plan: parameter counts equal the built model's numel (every architecture variant), FLOPs per
token equal megatron's formula 72 L h^2 (1 + s/(6h) + V/(12 h L)) (Narayanan et al. 2021) where it
applies (GELU, ffn = 4h, heads x head_dim = h), and the FLM-101B preset reproduces the published
stage sizes, layouts and token budgets."""
import itertools
import json

import pytest
from conftest import run_cli, tiny_model_cfg

from msg_megatron.config import Shape
from msg_megatron.model import build_model
from msg_megatron.model.gpt import padded_vocab_size
from msg_megatron.training.flops import flops_per_token
from msg_megatron.training.sizes import count_params


@pytest.mark.parametrize("norm,act,pos,tie,bias", list(itertools.product(
    ["layernorm", "rmsnorm"], ["gelu", "swiglu"], ["learned", "rope"], [True, False], [True, False])))
def test_parameter_count_equals_numel(norm, act, pos, tie, bias):
    cfg = tiny_model_cfg(norm=norm, activation=act, position_embedding=pos, tie_embeddings=tie, add_bias_linear=bias)
    for shape in (Shape(32, 64, 4, 2), Shape(48, 96, 6, 5)):
        model = build_model(cfg, shape)
        assert count_params(cfg, shape, padded_vocab_size(cfg)) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("activation, bias, binary_head", [("gelu", True, True), ("swiglu", False, False)])
def test_bert_parameter_count_equals_numel(activation, bias, binary_head):
    cfg = tiny_model_cfg(family="bert", activation=activation, add_bias_linear=bias, binary_head=binary_head)
    for shape in (Shape(32, 64, 4, 2), Shape(48, 96, 6, 5)):
        model = build_model(cfg, shape)
        assert count_params(cfg, shape, padded_vocab_size(cfg)) == sum(p.numel() for p in model.parameters())


def test_flops_per_token_is_megatrons_formula():
    cfg = tiny_model_cfg(vocab_size=50257, seq_length=1024, kv_channels=64)
    h, n, s, v = 768, 12, 1024, padded_vocab_size(cfg)
    expect = 72 * n * h * h * (1 + s / (6 * h) + v / (12 * h * n))
    assert flops_per_token(cfg, Shape(h, 4 * h, 12, n), v) == pytest.approx(expect, rel=1e-12)


def test_flm_101b_plan():
    r = run_cli(["msg_megatron.plan", "configs/flm_101b_a800.yaml", "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    st = res["stages"]
    assert [round(s["params"] / 1e9, 2) for s in st] == [16.02, 50.93, 101.70]
    for s, published in zip(st, (16e9, 51e9, 101e9)):  # within 3% of the published sizes
        assert abs(s["params"] - published) <= 0.03 * published
    assert [(s["tensor"], s["pipeline"], s["data"]) for s in st] == [(2, 1, 96), (4, 2, 24), (4, 4, 12)]
    assert [s["global_batch_size"] for s in st] == [2304, 2304, 2160]
    assert [round(s["tokens"] / 1e9, 2) for s in st] == [245.37, 39.64, 26.54]
    assert all(s["memory_gib"]["total"] < 80 for s in st)  # fits an 80 GiB A800 with micro-batch 1
    assert [s["micro_batches"] for s in st] == [24, 96, 180]  # per DP rank: 2304 / 96, 2304 / 24, 2160 / 12
    assert [s["bubble"] for s in st] == [0.0, 1 / 97, 3 / 183]
    assert 0.6 < res["flops_saving"] < 0.8
    r = run_cli(["msg_megatron.plan", "configs/flm_101b_a800.yaml"])
    assert r.returncode == 0 and "schedule saves" in r.stdout and "4 x 4 x 12" in r.stdout


@pytest.mark.parametrize("config", ["configs/gpt2_sch1g.yaml", "configs/gpt2_sch_new.yaml", "configs/demo_cpu.yaml"])
def test_every_paper_schedule_plans(config):
    """Each stage of the plan is the config's stage (steps, shape, batch), and the FLOPs saving is
    1 - sum over stages of tokens x FLOPs/token at the stage's shape / (all tokens x the final
    shape's), recomputed here from the config (within 1e-12)."""
    from msg_megatron.config import load_config

    r = run_cli(["msg_megatron.plan", config, "--json", "--gpu", "A100"])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    cfg = load_config(config, [])
    sched, vocab = cfg.schedule(), padded_vocab_size(cfg.model)
    ends = [step for step, _ in sched[1:]] + [cfg.train.steps]
    assert len(res["stages"]) == len(sched) >= 2
    total = tokens = 0
    for i, ((start, shape), end, st) in enumerate(zip(sched, ends, res["stages"])):
        assert st["steps"] == [start, end] and st["shape"] == list(shape.as_tuple()), (i, st["steps"], st["shape"])
        n = (end - start) * cfg.batch_size(i) * cfg.model.seq_length
        assert st["tokens"] == n
        total, tokens = total + n * flops_per_token(cfg.model, shape, vocab), tokens + n
    want = 1 - total / (tokens * flops_per_token(cfg.model, sched[-1][1], vocab))
    assert 0 < want and res["flops_saving"] == pytest.approx(want, rel=1e-12)


def test_bad_plan_arguments():
    r = run_cli(["msg_megatron.plan", "configs/demo_cpu.yaml", "--gpu", "V100"])
    assert r.returncode == 2 and "peak table" in r.stderr


def test_mfu_from_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": i, "loss": 1.0, "mfu": 0.4}) for i in range(20)))
    r = run_cli(["msg_megatron.plan", "configs/demo_cpu.yaml", "--json", "--from-run", str(run)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["mfu"] == pytest.approx(0.4)
    # a CPU run logs no MFU (no peak to divide by): its achieved TFLOP/s per process plans this machine
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": i, "loss": 1.0, "tflops_per_gpu": 0.02})
                                                for i in range(20)))
    r = run_cli(["msg_megatron.plan", "configs/demo_cpu.yaml", "--json", "--from-run", str(run)])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["tflops_per_gpu"] == pytest.approx(0.02) and res["rate_from"] == "observed TFLOP/s"
    for st in res["stages"]:  # the hours follow from that rate
        assert st["gpu_hours"] == pytest.approx(st["flops"] / 0.02e12 / 3600, rel=1e-12)
    r = run_cli(["msg_megatron.plan", "configs/demo_cpu.yaml", "--from-run", str(run)])
    assert r.returncode == 0 and "0.02 TFLOP/s per process as observed" in r.stdout
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "val_loss": 1.0}))
    r = run_cli(["msg_megatron.plan", "configs/demo_cpu.yaml", "--from-run", str(run)])
    assert r.returncode == 2 and "no `mfu` or `tflops_per_gpu` values" in r.stderr


def test_the_plan_totals_days_checkpoints_growth_jobs_and_cost():
    """FLM-101B on 192 A800s: days, tokens per day and per GPU-second, the checkpoint on disk per
    stage (12 B per parameter: ~1.2 TB at 101B), the msg-grow jobs between layouts at the storage
    rate, and the cost; each recomputed here from the plan's own per-stage numbers."""
    r = run_cli(["msg_megatron.plan", "configs/flm_101b_a800.yaml", "--json", "--price-per-gpu-hour", "2",
                 "--storage-gbps", "20"])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    st = res["stages"]
    assert [round(s["checkpoint_bytes"] / 1e12, 2) for s in st] == [0.19, 0.61, 1.22]
    for s in st:
        assert s["checkpoint_bytes"] == 12 * s["params"]
        assert s["tokens_per_day"] * s["days"] == pytest.approx(s["tokens"], rel=1e-9)
        assert s["tokens_per_gpu_s"] * s["gpu_hours"] * 3600 == pytest.approx(s["tokens"], rel=1e-9)
    jobs = [(a["checkpoint_bytes"] + b["checkpoint_bytes"]) / 20e9 / 3600 for a, b in zip(st, st[1:])]
    assert [s["growth_job_hours"] for s in st[1:]] == pytest.approx(jobs, rel=1e-12)  # both stages change layout
    assert res["days"] == pytest.approx(sum(s["days"] for s in st) + sum(jobs) / 24, rel=1e-12)
    assert 20 < res["days"] < 23  # (FLM-101B reports 21.54 days at 160-165 TFLOP/s per GPU)
    assert res["cost"] == pytest.approx(2 * (res["gpu_hours"] + sum(j * 192 for j in jobs)), rel=1e-12)
    r = run_cli(["msg_megatron.plan", "configs/flm_101b_a800.yaml", "--price-per-gpu-hour", "2"])
    assert "days (training, and" in r.stdout and "cost " in r.stdout and "1.22 TB" in r.stdout


def _simulated_1f1b_bubble(p: int, m: int, f: float = 1.0, b: float = 2.0) -> float:
    """The idle fraction of megatron's 1F1B schedule, by running its dependency graph: stage s does
    min(p - s - 1, m) warm-up forwards, then alternates forward/backward, then the remaining
    backwards; F(s, i) waits for F(s - 1, i), B(s, i) for B(s + 1, i)."""
    orders = []
    for s in range(p):
        warm = min(p - s - 1, m)
        ops = [("F", i) for i in range(warm)]
        for i in range(m - warm):
            ops += [("F", warm + i), ("B", i)]
        ops += [("B", i) for i in range(m - warm, m)]
        orders.append(ops)
    done, clock, pos = {}, [0.0] * p, [0] * p
    while any(pos[s] < len(orders[s]) for s in range(p)):
        for s in range(p):
            while pos[s] < len(orders[s]):
                kind, i = orders[s][pos[s]]
                dep = ("F", s - 1, i) if kind == "F" and s else ("B", s + 1, i) if kind == "B" and s < p - 1 else None
                if dep is not None and dep not in done:
                    break
                start = max(clock[s], done.get(dep, 0.0))
                clock[s] = done[(kind, s, i)] = start + (f if kind == "F" else b)
                pos[s] += 1
    return 1 - m * (f + b) / max(clock)


@pytest.mark.parametrize("p, m", [(1, 8), (2, 4), (4, 8), (4, 180), (8, 16)])
def test_pipeline_bubble_is_the_simulated_1f1b_schedules(p, m):
    from msg_megatron.plan import pipeline_bubble

    assert pipeline_bubble(p, m) == pytest.approx(_simulated_1f1b_bubble(p, m), abs=1e-12)


def _interleaved_orders(p: int, m: int, v: int) -> list:
    """Each rank's op order in megatron's interleaved 1F1B (schedules.py): forward virtual
    micro-batch k is (micro-batch, chunk) from get_schedule_table (groups of p micro-batches, each
    run through chunk 0, then 1, ...), backwards in the same table with the chunks reversed; rank r
    runs min(2(p - r - 1) + (v - 1)p, m v) warm-up forwards, then forward/backward pairs, then the
    remaining backwards."""
    table = [(i, c) for g0 in range(0, m, p) for c in range(v) for i in range(g0, min(g0 + p, m))]
    n, orders = m * v, []
    for r in range(p):
        warm = min(2 * (p - r - 1) + (v - 1) * p, n)
        fw = [("F", i, c) for i, c in table]
        bw = [("B", i, v - 1 - c) for i, c in table]
        ops = fw[:warm]
        for k in range(n - warm):
            ops += [fw[warm + k], bw[k]]
        orders.append(ops + bw[n - warm:])
    return orders


def _simulated_interleaved_bubble(p: int, m: int, v: int, f: float = 1.0, b: float = 2.0) -> float:
    """The idle fraction of the interleaved schedule by its dependency graph: virtual stage u = c p + r
    (chunk c of rank r, 1/v of the stage's work); F(u, i) waits for F(u - 1, i), B(u, i) for B(u + 1, i)
    (the last virtual stage's for its own forward)."""
    orders = _interleaved_orders(p, m, v)
    done, clock, pos, last = {}, [0.0] * p, [0] * p, p * v - 1
    progress = True
    while progress:
        progress = False
        for r in range(p):
            while pos[r] < len(orders[r]):
                kind, i, c = orders[r][pos[r]]
                u = c * p + r
                dep = (("F", u - 1, i) if u else None) if kind == "F" else (("B", u + 1, i) if u < last else ("F", u, i))
                if dep is not None and dep not in done:
                    break
                start = max(clock[r], done.get(dep, 0.0))
                clock[r] = done[(kind, u, i)] = start + (f if kind == "F" else b) / v
                pos[r] += 1
                progress = True
    assert all(pos[r] == len(orders[r]) for r in range(p)), "the simulated schedule deadlocked"
    return 1 - m * (f + b) / max(clock)


@pytest.mark.parametrize("p, m, v", [(2, 4, 2), (2, 8, 2), (4, 8, 2), (4, 16, 4), (3, 6, 3), (4, 180, 2)])
def test_interleaved_bubble_is_the_simulated_schedules(p, m, v):
    from msg_megatron.plan import pipeline_bubble

    assert pipeline_bubble(p, m, v) == pytest.approx(_simulated_interleaved_bubble(p, m, v), abs=1e-12)
    assert pipeline_bubble(p, m, v) < pipeline_bubble(p, m)  # what interleaving is for


@pytest.mark.parametrize("p, m, v", [(2, 2, 2), (2, 8, 2), (4, 4, 2), (4, 16, 2), (4, 16, 4)])
def test_interleaved_activation_count_is_the_schedules_peak(p, m, v):
    """activation_bytes's chunk forwards in flight on the first rank = the most forwards whose
    backward has not run, in the schedule's own order."""
    from msg_megatron.training.sizes import activation_bytes

    ops, held, peak = _interleaved_orders(p, m, v)[0], 0, 0
    for kind, _, _ in ops:
        held += 1 if kind == "F" else -1
        peak = max(peak, held)
    cfg = tiny_model_cfg()
    shape = Shape(48, 96, 6, p * v * 2)  # 2 layers per chunk
    one = activation_bytes(cfg, Shape(48, 96, 6, 2), 128, 1, 1, 1, elem=4) - 4 * 16 * 128  # a chunk, no logits
    got = activation_bytes(cfg, shape, 128, 1, p, 1, elem=4, virtual_pipeline=v, micro_batches=m)
    assert got == pytest.approx(peak * one)


def test_an_auto_schedule_plans_its_bounds():
    """msg-plan on growth.schedule=auto: the two fixed schedules that bound it (never growing; growing to the
    model section at the first check, whose table it prints), the probes' most FLOPs counted by hand, and
    what it cannot predict."""
    from msg_megatron.config import load_config
    from msg_megatron.plan import plan

    auto = ["growth.schedule=auto", "growth.stages=[{step: 0, shape: [128, 256, 4, 2]}]", "growth.auto.check_interval=48",
            "growth.auto.probe_steps=16", "growth.auto.max_probe_share=1"]
    r = run_cli(["msg_megatron.plan", "configs/demo_cpu.yaml", *auto, "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    a = res["auto"]
    never = plan(load_config("configs/demo_cpu.yaml", ["growth.stages=[]", "model.hidden_size=128",
                                                       "model.ffn_hidden_size=256", "model.num_attention_heads=4",
                                                       "model.num_layers=2"]), 0.5, "A800")
    grown = plan(load_config("configs/demo_cpu.yaml", ["growth.stages=[{step: 0, shape: [128, 256, 4, 2]}, "
                                                       "{step: 48, shape: [192, 768, 6, 4]}]"]), 0.5, "A800")
    assert a["first_check"] == 48 and a["first_decision"] == 64
    assert a["flops_range"] == pytest.approx([never["flops"], grown["flops"]], rel=1e-12)
    assert res["stages"][-1]["memory_gib"] == grown["stages"][-1]["memory_gib"]
    checks = len(range(48, 480 - 16, 48))  # 48, 96, ..., 432: 9
    assert a["checks_max"] == checks == 9 and a["candidates_first_check"] == 4 and len(a["reachable_shapes"]) == 15
    assert a["probe_flops_max"] == pytest.approx(checks * 4 * 16 * grown["stages"][-1]["flops_per_token"] * 16 * 128)
    # growth.auto.max_probe_share bounds the probes at share / (1 - share) of the run's FLOPs without them
    from msg_megatron.plan import plan_auto

    shared = plan_auto(load_config("configs/demo_cpu.yaml", auto + ["growth.auto.max_probe_share=0.2"]), 0.5, "A800")
    assert shared["auto"]["probe_flops_max"] == pytest.approx(0.25 * grown["flops"], rel=1e-12)
    # 16-step probes of a 40-step ramp end inside the growth's transient: warned of; 40-step ones are not
    assert len(a["warnings"]) == 1 and "probe_steps=16 is shorter than growth.ramp_steps=40" in a["warnings"][0]
    covered = plan_auto(load_config("configs/demo_cpu.yaml", auto + ["growth.auto.probe_steps=40"]), 0.5, "A800")
    assert covered["auto"]["warnings"] == []
    text = run_cli(["msg_megatron.plan", "configs/demo_cpu.yaml", *auto]).stdout
    assert "not predictable: when the run grows and into which shapes" in text and "msg-schedule --from-auto" in text
    assert "warning: growth.auto.probe_steps=16" in text
