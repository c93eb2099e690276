"""msg-plan CONFIG [overrides...] [--mfu 0.5] [--gpu A800] [--json]: what each growth stage costs.

Per stage: parameters (exactly the instantiated model's), training FLOPs per token (the trainer's
MFU formula), tokens (steps x global batch x sequence), the layout (TP, PP, DP from parallel.gpus),
memory per GPU and GPU-hours at a given MFU; for the whole schedule, the FLOPs saved against
training the final shape on the same tokens. Memory per GPU, in train.precision (bf16: as megatron,
  weights 2 B/param, fp32 main gradients 4 B/param, fp32 master weights + Adam moments 12 B/param
  divided by DP with the distributed optimizer; fp32: 4 + 4 + 8), on the most loaded pipeline stage (the first: the
  embedding and PP micro-batches in flight under 1F1B), activations with flash attention (no s^2
  term), per layer and micro-batch of b sequences
      2*s*b*(6h + ((3a + 3g)*d + a + F_in + F*(2 if SwiGLU else 1)) / TP) bytes,
  F_in = 2F for SwiGLU's fc1 else F, g query groups (g = a under MHA) (MaskedGPT's saved tensors;
  measured within 6% on CPU by tests/test_recompute.py); sequence parallelism divides the 6h by
  TP, train.recompute=full keeps only a recomputed layer's input, V interleaved chunks put
  2(PP-1) + (V-1)PP + 1 chunk forwards in flight (training/sizes.activation_bytes). The pipeline
  bubble per stage is (PP - 1) / (V m + PP - 1) for m micro-batches per data-parallel rank. Besides the training step, the peak of a save, a load and the
  growth into each stage (training/phase_memory.py); a phase over the GPU's memory is a warning
  with what to change. Estimates for planning, not measurements.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import List

from .cli import run_cli
from .config import Config, Shape, StageConfig, load_config
from .config.candidates import auto_candidates, probe_warnings, reachable_shapes
from .config.candidates import first_check as first_check_step
from .dry_run import DryRunError, dry_run
from .model.gpt import padded_vocab_size
from .training.flops import PEAK_TFLOPS, flops_per_token
from .training.runs import read_metrics
from .training.sizes import activation_settings, count_params, kv_cache_bytes, stage_memory

GIB = 1024 ** 3
GPU_MEMORY_GIB = {"H200": 141, "H100": 80, "A800": 80, "A100": 80}
CHECKPOINT_BYTES_PER_PARAM = 12  # what a save writes: fp32 weights + AdamW's two fp32 moments


def plan(cfg: Config, mfu: float, gpu: str, distributed_optimizer: bool = True, tflops_per_gpu: float = None,
         storage_gbps: float = 10.0, price_per_gpu_hour: float = None) -> dict:
    """`tflops_per_gpu`: an achieved rate per process (a run's, --from-run on CPU) instead of peak x
    MFU; `storage_gbps`: the shared filesystem's aggregate GB/s, for the msg-grow jobs between
    layouts (they read the checkpoint and write the grown one); `price_per_gpu_hour`: the cost line."""
    vocab = padded_vocab_size(cfg.model)
    sched = cfg.schedule()
    peak = PEAK_TFLOPS.get(gpu)
    if peak is None:
        raise ValueError(f"--gpu {gpu} is not in the peak table ({', '.join(PEAK_TFLOPS)})")
    rate = (tflops_per_gpu if tflops_per_gpu else peak * mfu) * 1e12  # FLOP/s per GPU (process)
    stages = []
    for i, (step, shape) in enumerate(sched):
        end = sched[i + 1][0] if i + 1 < len(sched) else cfg.train.steps
        tp, pp = cfg.layout(i)
        gpus = cfg.parallel.gpus or tp * pp
        if gpus % (tp * pp):
            raise ValueError(f"parallel.gpus={gpus} is not a multiple of stage {i}'s tensor x pipeline = {tp * pp}")
        dp = gpus // (tp * pp)
        gbs = cfg.batch_size(i)
        tokens = (end - step) * gbs * cfg.model.seq_length
        fpt = flops_per_token(cfg.model, shape, vocab)
        flops = fpt * tokens
        # the growth into this stage runs at this stage's layout: online, or msg-grow after a relayout
        growth = ("online" if cfg.layout(i) == cfg.layout(i - 1) else "msg-grow") if i else None
        settings = activation_settings(cfg, i, dp)
        micro, vpp = settings["micro_batches"], settings["virtual_pipeline"]  # (micro-batches per DP rank)
        mem = stage_memory(cfg.model, shape, vocab, tp, pp, dp, cfg.train.micro_batch_size, distributed_optimizer,
                           cfg.train.precision, sched[i - 1][1] if i else None, growth or "online", **settings)
        stages.append({"stage": i, "steps": [step, end], "shape": list(shape.as_tuple()),
                       "micro_batches": micro, "bubble": pipeline_bubble(pp, micro, vpp), "virtual_pipeline": vpp,
                       "params": count_params(cfg.model, shape, vocab), "flops_per_token": fpt, "tokens": tokens,
                       "query_groups": cfg.model.groups(shape),
                       "kv_cache_gib_per_sequence": kv_cache_bytes(cfg.model, shape) / GIB,
                       "global_batch_size": gbs, "tensor": tp, "pipeline": pp, "data": dp, "gpus": gpus,
                       "flops": flops, "gpu_hours": flops / rate / 3600, "days": flops / (rate * gpus) / 86400,
                       "tokens_per_day": rate * gpus / fpt * 86400, "tokens_per_gpu_s": rate / fpt,
                       # fp32 weights (bf16 parameters: their fp32 masters) and the two AdamW moments
                       "checkpoint_bytes": CHECKPOINT_BYTES_PER_PARAM * count_params(cfg.model, shape, vocab),
                       "memory_gib": {k: v / GIB for k, v in mem.items() if k not in ("params_per_gpu", "phases")},
                       "phase_peak_gib": {k: v / GIB for k, v in mem["phases"].items()},
                       "growth": growth})
    for prev, st in zip(stages, stages[1:]):  # an offline msg-grow job: read the checkpoint, write the grown one
        hours = (prev["checkpoint_bytes"] + st["checkpoint_bytes"]) / (storage_gbps * 1e9) / 3600
        st["growth_job_hours"] = hours if st["growth"] == "msg-grow" else 0.0
        st["growth_job_gpu_hours"] = st["growth_job_hours"] * st["gpus"]
    tokens = sum(s["tokens"] for s in stages)
    final_fpt = flops_per_token(cfg.model, sched[-1][1], vocab)
    total = sum(s["flops"] for s in stages)
    gpu_hours = sum(s["gpu_hours"] for s in stages)
    job_hours = sum(s.get("growth_job_hours", 0.0) for s in stages)
    job_gpu_hours = sum(s.get("growth_job_gpu_hours", 0.0) for s in stages)
    cap = GPU_MEMORY_GIB.get(gpu)
    over = [f"stage {st['stage']}: {ph} needs {v:.1f} GiB per GPU, more than the {gpu}'s {cap} GiB"
            for st in stages for ph, v in st["phase_peak_gib"].items() if cap and v > cap]
    return {"gpu": gpu, "gpu_memory_gib": cap, "over_memory": over, "family": cfg.model.family,
            "sequence_parallel": cfg.parallel.sequence_parallel, "recompute": cfg.train.recompute,
            "peak_tflops": peak, "mfu": rate / (peak * 1e12), "tflops_per_gpu": rate / 1e12,
            "rate_from": "observed TFLOP/s" if tflops_per_gpu else "MFU",
            "distributed_optimizer": distributed_optimizer, "storage_gbps": storage_gbps,
            "stages": stages, "tokens": tokens, "flops": total, "gpu_hours": gpu_hours, "growth_job_hours": job_hours,
            "days": sum(s["days"] for s in stages) + job_hours / 24, "price_per_gpu_hour": price_per_gpu_hour,
            "cost": (gpu_hours + job_gpu_hours) * price_per_gpu_hour if price_per_gpu_hour else None,
            "final_shape_flops": final_fpt * tokens, "flops_saving": 1 - total / (final_fpt * tokens),
            "speedup_flops": final_fpt * tokens / total}


def plan_auto(cfg: Config, *args, **kwargs) -> dict:
    """msg-plan of a growth.schedule=auto config: its stages are decided during the run, so the plan is
    two fixed schedules that bound it, the probes' largest cost, and what cannot be known ahead.
    `upper` grows straight to the model section at the first check (a kept probe's stage is at its check's
    step; the table shows it: its last stage has the largest memory any stage can have), `lower` never
    grows past the given stages."""
    a, t = cfg.growth.auto, cfg.train
    last = cfg.growth.stages[-1]
    first_check = first_check_step(cfg)  # (once the masks of the last growth are all 1)
    first_decision = first_check + a.probe_steps
    fixed = dataclasses.replace(cfg.growth, schedule="fixed")
    lower = plan(dataclasses.replace(cfg, growth=fixed), *args, **kwargs)
    grown = dataclasses.replace(fixed, stages=list(fixed.stages) + [
        StageConfig(step=first_check, shape=list(cfg.model.shape.as_tuple()))])
    res = plan(dataclasses.replace(cfg, growth=grown), *args, **kwargs)
    checks = len(range(first_check, t.steps - a.probe_steps, a.check_interval))
    start = Shape(*last.shape)
    candidates = len(auto_candidates(a, start, cfg.model.shape))  # (the most a check probes: the first one)
    final = res["stages"][-1]
    probe_flops = checks * candidates * a.probe_steps * final["flops_per_token"] * final["global_batch_size"] \
        * cfg.model.seq_length
    # a check runs only while all probes stay within max_probe_share of the run's FLOPs had it not grown after
    # it, a lower bound of the run's FLOPs: so probes <= share x (training + probes) whatever the run decides
    if a.max_probe_share < 1:
        probe_flops = min(probe_flops, a.max_probe_share / (1 - a.max_probe_share) * res["flops"])
    rate_per_s = final["flops"] / (final["gpu_hours"] * 3600) if final["gpu_hours"] else 0.0  # (one GPU's FLOP/s)
    res["auto"] = {
        "first_check": first_check, "first_decision": first_decision, "checks_max": checks,
        "candidates_first_check": candidates, "probe_steps": a.probe_steps, "max_probe_share": a.max_probe_share,
        "flops_range": [lower["flops"], res["flops"]], "gpu_hours_range": [lower["gpu_hours"], res["gpu_hours"]],
        "days_range": [lower["days"], res["days"]], "probe_flops_max": probe_flops,
        "probe_gpu_hours_max": probe_flops / rate_per_s / 3600 if rate_per_s else None,
        "reachable_shapes": [list(s.as_tuple()) for s in reachable_shapes(a, start, cfg.model.shape)],
        "cannot_predict": "when the run grows and into which shapes (each check decides from the measured rates); "
                          "msg-schedule --from-auto writes the stages a run chose as a fixed schedule",
        "warnings": probe_warnings(cfg),
    }
    return res


def auto_table(res: dict) -> str:
    a = res["auto"]
    ph = f" ({a['probe_gpu_hours_max']:.3g} GPU-hours)" if a["probe_gpu_hours_max"] is not None else ""
    return "\n".join([
        "growth.schedule=auto: the stages are decided during the run. Planned: the table below grows straight to the "
        f"model section at the first check (step {a['first_check']}, kept at step {a['first_decision']}), so its last "
        "stage has the largest memory "
        f"any stage can have ({len(a['reachable_shapes'])} reachable shapes, all checked against the layout);",
        f"training FLOPs between {a['flops_range'][0]:.3g} (never grows) and {a['flops_range'][1]:.3g} (grows at step "
        f"{a['first_check']}), {a['gpu_hours_range'][0]:.3g}-{a['gpu_hours_range'][1]:.3g} GPU-hours, "
        f"{a['days_range'][0]:.1f}-{a['days_range'][1]:.1f} days;",
        f"probes: at most {a['checks_max']} checks (every growth.auto.check_interval steps from step "
        f"{a['first_check']}), each at most {a['candidates_first_check']} candidates x {a['probe_steps']} steps, at most "
        f"{a['probe_flops_max']:.3g} FLOPs{ph} (at the final shape's cost, and within growth.auto.max_probe_share="
        f"{a['max_probe_share']:g} of the run's FLOPs: probes beyond it are skipped), plus two checkpoint saves per "
        "check (its step and its window's end) and one load per candidate probed, one more where none is kept;",
        f"not predictable: {a['cannot_predict']}.", *[f"warning: {w}" for w in a["warnings"]], "", table(res)])


def pipeline_bubble(pp: int, micro_batches: int, virtual_pipeline: int = 1) -> float:
    """The idle fraction of a 1F1B pipeline step: (PP - 1) / (m + PP - 1) for m micro-batches; with
    V chunks per rank (megatron's interleaved schedule) the fill and drain are 1/V as long:
    (PP - 1) / (V m + PP - 1) (tests/test_plan.py runs both schedules' dependency graphs)."""
    return (pp - 1) / (virtual_pipeline * micro_batches + pp - 1)


def job_segments(cfg: Config) -> List[dict]:
    """Consecutive stages that run at the same TP/PP layout form one job; a new layout starts a new
    job after an offline grow + reshard (the trainer saves and exits 76 at that boundary). Job k
    saves into checkpoint.save (k = 0) or checkpoint.save + `_stage<first stage>`."""
    jobs = []
    for i in range(len(cfg.schedule())):
        layout = cfg.layout(i)
        if not jobs or jobs[-1]["layout"] != layout:
            save = cfg.checkpoint.save if i == 0 else f"{cfg.checkpoint.save.rstrip('/')}_stage{i}"
            jobs.append({"first_stage": i, "layout": layout, "save": save,
                         "shape": list(cfg.schedule()[i][1].as_tuple())})
    return jobs


def observed_rate(run_dir: str) -> tuple:
    """("mfu", median MFU) of a run's logged steps (GPU runs log `mfu`), else ("tflops", median
    achieved model TFLOP/s per process: a CPU run, or a GPU missing from the peak table); the first
    10% are warm-up."""
    import statistics

    recs = read_metrics(run_dir)
    for key, kind in (("mfu", "mfu"), ("tflops_per_gpu", "tflops")):
        vals = [r[key] for r in recs if key in r]
        if vals:
            return kind, statistics.median(vals[len(vals) // 10:])
    raise ValueError(f"`{run_dir}/metrics.jsonl` has no `mfu` or `tflops_per_gpu` values (no logged training step); "
                     "pass --mfu")


def table(res: dict) -> str:
    rate = (f"{res['tflops_per_gpu']:.3g} TFLOP/s per process as observed (not the GPU's: its days are this "
            "machine's)" if res.get("rate_from") == "observed TFLOP/s" else f"{res['mfu']:.0%} MFU")
    lines = [f"{res['gpu']} ({res['peak_tflops']:.0f} TFLOP/s bf16) at {rate}, "
             f"{'distributed' if res['distributed_optimizer'] else 'replicated'} optimizer"
             + (", sequence parallel" if res.get("sequence_parallel") else "")
             + f", recompute {res.get('recompute', 'none')}",
             "| stage | steps | shape (h, f, a, L) | params | TP x PP x DP | bubble | tokens | FLOPs/token | GPU-hours | "
             "days | GiB/GPU (w+g+opt+act) |", "|---|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for s in res["stages"]:
        m = s["memory_gib"]
        lines.append(f"| {s['stage']} | {s['steps'][0]}-{s['steps'][1]} | {tuple(s['shape'])} | "
                     f"{s['params'] / 1e9:.2f}B | {s['tensor']} x {s['pipeline']} x {s['data']}"
                     f"{' (V=%d)' % s['virtual_pipeline'] if s.get('virtual_pipeline', 1) > 1 else ''} | {s['bubble']:.1%} | "
                     f"{s['tokens'] / 1e9:.2f}B | {s['flops_per_token']:.3g} | {s['gpu_hours']:,.0f} | {s['days']:.1f} | "
                     f"{m['total']:.1f} = {m['weights']:.1f}+{m['grads']:.1f}+{m['optimizer']:.1f}+{m['activations']:.1f} |")
    lines += ["", "peak GiB per GPU by phase (the growth into a stage runs at its layout; "
              f"{res['gpu']}: {res['gpu_memory_gib']} GiB):",
              "| stage | train | save | load | growth into it |", "|---|---:|---:|---:|---|"]
    for s in res["stages"]:
        p = s["phase_peak_gib"]
        grow = f"{p['grow']:.1f} ({s['growth']})" if "grow" in p else "-"
        lines.append(f"| {s['stage']} | {p['train']:.1f} | {p['save']:.1f} | {p['load']:.1f} | {grow} |")
    lines += ["", f"throughput, checkpoints and growth jobs (msg-grow reads and writes at {res['storage_gbps']:g} GB/s, "
              "--storage-gbps):", "| stage | tokens/day | tokens/GPU-s | checkpoint on disk | growth into it |",
              "|---|---:|---:|---:|---|"]
    for s in res["stages"]:
        grow = "-" if not s["growth"] else ("online (in the run)" if s["growth"] == "online" else
                                            f"msg-grow job {s['growth_job_hours'] * 60:.0f} min on {s['gpus']} GPUs")
        lines.append(f"| {s['stage']} | {s['tokens_per_day'] / 1e9:.2f}B | {s['tokens_per_gpu_s']:,.0f} | "
                     f"{s['checkpoint_bytes'] / 1e12:.2f} TB | {grow} |")
    if res.get("family") != "bert":  # (an encoder keeps no KV cache)
        lines.append("\ninference KV cache per sequence of model.seq_length tokens (bf16): " + ", ".join(
            f"stage {s['stage']} {s['kv_cache_gib_per_sequence']:.2f} GiB ({s['query_groups']} key/value heads)"
            for s in res["stages"]))
    for msg in res["over_memory"]:
        lines.append(f"WARNING {msg}: raise tensor/pipeline parallelism or parallel.gpus for that stage, use "
                     "parallel.distributed_optimizer=true, lower train.micro_batch_size, or recompute activations "
                     "(train.recompute=full, train.recompute_num_layers)")
    lines.append(f"\ntotal: {res['tokens'] / 1e9:.2f}B tokens, {res['flops']:.3g} FLOPs, {res['gpu_hours']:,.0f} "
                 f"GPU-hours, {res['days']:.1f} days (training, and {res['growth_job_hours']:.1f} h of msg-grow jobs)"
                 + (f", cost {res['cost']:,.0f} at {res['price_per_gpu_hour']:g} per GPU-hour" if res["cost"] else "")
                 + f"; the final shape on the same tokens: {res['final_shape_flops']:.3g} FLOPs -> the "
                 f"schedule saves {res['flops_saving']:.1%} ({res['speedup_flops']:.2f}x fewer FLOPs)")
    return "\n".join(lines)


def _main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(prog="msg-plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation assumed (default: --from-run's "
                    "observed MFU, else 0.5)")
    ap.add_argument("--from-run", default="", help="a run directory whose metrics.jsonl gives the observed MFU (a "
                    "CPU run: its achieved TFLOP/s per process, planning for that machine)")
    ap.add_argument("--storage-gbps", type=float, default=10.0, help="the shared filesystem's aggregate GB/s, for the "
                    "msg-grow jobs between layouts (default 10)")
    ap.add_argument("--price-per-gpu-hour", type=float, default=None, help="adds the schedule's cost")
    ap.add_argument("--gpu", default="A800", help=f"peak-FLOPs table entry: {', '.join(PEAK_TFLOPS)} (default A800)")
    ap.add_argument("--no-distributed-optimizer", action="store_true",
                    help="plan memory with AdamW state replicated over data parallelism even when the config sets "
                    "parallel.distributed_optimizer")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--dry-run", action="store_true",
                    help="build every stage's ranks for real on meta tensors under torch's fake process group at "
                    "the real world size: checkpoint coverage, memory from the tensors built (msg_megatron/dry_run.py)")
    ap.add_argument("--ranks", default="edges", help="--dry-run: the ranks whose memory is reported: edges (first "
                    "and last of every TP, PP and DP coordinate), all (the checkpoint coverage is then checked over "
                    "every rank), or R1,R2,...; one DP replica and every DP rank of the first and last pipeline "
                    "stage's first TP coordinate are built besides, for the coverage")
    ap.add_argument("--jobs", action="store_true", help="print one line per job of a layout-changing schedule: "
                    "FIRST_STAGE TENSOR PIPELINE H,F,A,L SAVE_DIR (what launch/slurm/chain_stages.sh reads)")
    args = ap.parse_args(argv)
    if args.jobs:
        cfg = load_config(args.config, args.overrides)
        if not cfg.checkpoint.save:
            raise ValueError("checkpoint.save is empty: a multi-job schedule passes checkpoints between jobs")
        for j in job_segments(cfg):
            print(j["first_stage"], j["layout"][0], j["layout"][1], ",".join(map(str, j["shape"])), j["save"])
        return 0
    tflops = None
    if args.mfu is None and args.from_run:
        kind, value = observed_rate(args.from_run)
        args.mfu, tflops = (value, None) if kind == "mfu" else (None, value)
    if args.mfu is None and tflops is None:
        args.mfu = 0.5
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu {args.mfu} must be in (0, 1]")
    if args.storage_gbps <= 0 or (args.price_per_gpu_hour is not None and args.price_per_gpu_hour < 0):
        raise ValueError("--storage-gbps must be positive and --price-per-gpu-hour not negative")
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        try:
            res = dry_run(cfg, args.ranks, GPU_MEMORY_GIB.get(args.gpu), log=(lambda *_: None) if args.json else print)
        except DryRunError as e:  # what would fail on the cluster: its own exit status
            print(f"msg-plan: dry run failed: {e}", file=sys.stderr)
            return 3
        print(json.dumps(res) if args.json else f"[dry-run] every stage built and covered in {res['seconds']:.0f} s, "
                                           f"peak RSS {res['peak_rss_bytes'] / 1024 ** 3:.2f} GiB")
        return 0
    auto = cfg.growth.schedule == "auto"
    res = (plan_auto if auto else plan)(
        cfg, args.mfu or 0.5, args.gpu, cfg.parallel.distributed_optimizer and not args.no_distributed_optimizer,
        tflops_per_gpu=tflops, storage_gbps=args.storage_gbps, price_per_gpu_hour=args.price_per_gpu_hour)
    print(json.dumps(res) if args.json else (auto_table if auto else table)(res))
    return 0


def main(argv=None) -> None:
    sys.exit(run_cli("msg-plan", _main, argv))


if __name__ == "__main__":
    main()
