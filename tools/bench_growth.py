"""Full-size training vs MSG vs No-Mask vs Net2Net on the same token budget and schedule (paper
Tables 4/5, Figures 3/5, at a scale this machine runs), plus the mask-strength study (Table 3).

    python tools/bench_growth.py [--quick] [--json] [--out-dir docs/benchmarks]

Every method trains the same steps x batch on the embedded corpus, one run after another in child
processes (so each has the machine to itself). Reported per method: training wall time (steps and
growth, evaluation excluded), model FLOPs, final validation loss, the training loss right before and
right after each growth with the step-to-step noise before it, and the wall-time speed-up
    (time the full-size run needs to reach the method's final validation loss) / (the method's time),
interpolating the full run's validation curve. Writes growth_cpu.json/.md/.png (growth_cpu_quick.*
with --quick) into --out-dir.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from msg_megatron.training.runs import evals, growths, read_metrics, run_pretrain, steps  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "demo_cpu.yaml")
COMMON = ["checkpoint.save=", "checkpoint.load=", "train.log_interval=1"]
FULL = {"name": "full", "over": ["growth.stages=[]"]}
METHODS = [FULL, {"name": "msg", "over": ["growth.operator=msg"]},
           {"name": "nomask", "over": ["growth.operator=nomask"]},
           {"name": "net2net", "over": ["growth.operator=net2net"]}]
SETTINGS = {
    # the demo: (128, 256, 4, 2) grows one dimension per stage to (192, 768, 6, 4) in 480 steps
    "full": {"over": ["train.eval_interval=40"], "ramps": [5, 20, 80], "ramp": 40},
    # CI: the same story at 1/8 of the steps on a smaller model
    "quick": {"over": ["model.hidden_size=96", "model.ffn_hidden_size=384", "model.num_attention_heads=6",
                       "model.kv_channels=16", "model.vocab_size=512", "model.seq_length=64", "train.steps=60",
                       "train.global_batch_size=8", "train.micro_batch_size=8", "train.warmup_steps=5",
                       "train.eval_interval=10", "train.eval_iters=2", "data.corpus_mb=0.5", "growth.ramp_steps=5",
                       "growth.stages=[{step: 0, shape: [64, 128, 4, 2]}, {step: 10, shape: [64, 384, 4, 2]}, "
                       "{step: 20, shape: [64, 384, 4, 4]}, {step: 30, shape: [96, 384, 4, 4]}, "
                       "{step: 40, shape: [96, 384, 6, 4]}]"],
              "ramps": [2], "ramp": 5},
}


def time_to_reach(curve, target):
    """Training time at which the (time, val_loss) curve first reaches `target` (linear interpolation)."""
    prev = None
    for t, v in curve:
        if v <= target:
            if prev is None:
                return t
            (t0, v0) = prev
            return t0 + (t - t0) * (v0 - target) / (v0 - v) if v0 != v else t
        prev = (t, v)
    return None


def jumps(step_recs, growth_recs):
    """For each growth at step g: training loss at g-1 and at g, and the std of the step-to-step
    change over the 10 steps before (the noise a jump must exceed to count)."""
    loss = {r["step"]: r["loss"] for r in step_recs}
    out = []
    for g in growth_recs:
        s = g["step"]
        before, after = loss.get(s - 1), loss.get(s)
        diffs = [loss[i] - loss[i - 1] for i in range(s - 10, s) if i in loss and i - 1 in loss]
        noise = statistics.pstdev(diffs) if len(diffs) > 1 else None
        out.append({"step": s, "to": g["to"], "loss_before": before, "loss_after": after,
                    "jump": after - before if None not in (before, after) else None, "noise": noise,
                    "probe_before": g["probe_loss_before"], "probe_after": g["probe_loss_after"]})
    return out


def summarise(name, recs):
    st, ev = steps(recs), evals(recs)
    return {"method": name, "train_time_s": st[-1]["train_time"], "train_flops": st[-1]["train_flops"],
            "final_val_loss": ev[-1]["val_loss"], "final_train_loss": st[-1]["loss"],
            "val_curve": [(e["train_time"], e["val_loss"]) for e in ev],
            "val_flops_curve": [(e["train_flops"], e["val_loss"]) for e in ev],
            "val_steps": [e["step"] for e in ev],
            "loss_curve": [(r["step"], r["loss"]) for r in st], "growths": jumps(st, growths(recs)),
            "growth_times": [next(r["train_time"] for r in st if r["step"] == g["step"]) for g in growths(recs)]}


def speedups(results: dict) -> None:
    """Wall-time speed-up at equal validation loss, per method against the full-size run:
    `speedup` = (time the full run needs to reach the method's final loss) / (the method's time);
    when the full run never gets that low on the same budget, `speedup_at_full_loss` = (the full
    run's time) / (time the method needs to reach the full run's final loss), a lower bound of the
    first (the full run would need more than its whole budget)."""
    full = results["full"]
    for name, r in results.items():
        if name == "full":
            continue
        t_full = time_to_reach(full["val_curve"], r["final_val_loss"])
        r["full_time_to_same_loss_s"] = t_full
        r["speedup"] = t_full / r["train_time_s"] if t_full is not None else None
        t_method = time_to_reach(r["val_curve"], full["final_val_loss"])
        r["time_to_full_loss_s"] = t_method
        r["speedup_at_full_loss"] = full["train_time_s"] / t_method if t_method else None
        r["flops_ratio"] = full["train_flops"] / r["train_flops"]
        # the same at equal loss in model FLOPs (deterministic; wall time on a shared VM varies ~10%)
        f_full = time_to_reach(full["val_flops_curve"], r["final_val_loss"])
        f_method = time_to_reach(r["val_flops_curve"], full["final_val_loss"])
        r["flops_speedup"] = (f_full / r["train_flops"] if f_full is not None
                              else (full["train_flops"] / f_method if f_method else None))
        # the loss change at each growth minus the full run's on the same two batches (same data order)
        full_loss = dict(full["loss_curve"])
        for g in r["growths"]:
            s = g["step"]
            if g["jump"] is not None and s in full_loss and s - 1 in full_loss:
                g["excess_jump"] = g["jump"] - (full_loss[s] - full_loss[s - 1])


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _run(overrides, run_dir, reuse):
    """A run's records: re-read when `reuse` and the run finished (its final evaluation is logged)."""
    if reuse and os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        recs = read_metrics(run_dir)
        if recs and "val_loss" in recs[-1]:
            return recs
    return run_pretrain(CONFIG, overrides, run_dir)


def run_all(mode: str, work: str, log, reuse: bool = False) -> dict:
    setting = SETTINGS[mode]
    base = COMMON + setting["over"]
    results = {}
    for m in METHODS:
        log(f"[bench] {m['name']} ...")
        t0 = time.time()
        recs = _run(base + m["over"], os.path.join(work, m["name"]), reuse)
        results[m["name"]] = summarise(m["name"], recs)
        log(f"[bench] {m['name']}: {results[m['name']]['train_time_s']:.1f} s training "
            f"({time.time() - t0:.0f} s with evaluation), val loss {results[m['name']]['final_val_loss']:.4f}")
    speedups(results)
    ramps = []
    for ramp in sorted(set(setting["ramps"] + [setting["ramp"]])):
        if ramp == setting["ramp"]:
            r = results["msg"]
        else:
            log(f"[bench] msg with ramp_steps={ramp} ...")
            r = summarise("msg", _run(base + ["growth.operator=msg", f"growth.ramp_steps={ramp}"],
                                      os.path.join(work, f"ramp{ramp}"), reuse))
        ramps.append({"ramp_steps": ramp, "final_val_loss": r["final_val_loss"], "train_time_s": r["train_time_s"]})
    return {"mode": mode, "config": os.path.relpath(CONFIG, REPO), "overrides": base, "methods": results,
            "ramp_study": ramps, "date": time.strftime("%Y-%m-%d"), "commit": commit(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}"}


def markdown(res: dict) -> str:
    m = res["methods"]
    lines = [f"# Growth benchmark ({res['mode']}): full vs MSG vs No-Mask vs Net2Net",
             "", f"{res['date']}, commit {res['commit']}, {res['machine']}; config `{res['config']}` with "
             f"`{' '.join(res['overrides'])}`.", "",
             "| method | training time (s) | model FLOPs | final val loss | full-size time to that loss (s) | "
             "time to the full run's final loss (s) | wall-time speed-up at equal loss | FLOPs speed-up at equal loss | "
             "FLOPs saved (same budget) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v, f: "never" if v is None else format(v, f)  # noqa: E731
    for name in ("full", "msg", "nomask", "net2net"):
        r = m[name]
        if name == "full":
            lines.append(f"| full | {r['train_time_s']:.1f} | {r['train_flops']:.3g} | {r['final_val_loss']:.4f} | "
                         f" | {r['train_time_s']:.1f} | 1.00x | 1.00x | |")
            continue
        if r.get("speedup") is not None:
            sp = f"{r['speedup']:.2f}x"
        elif r.get("speedup_at_full_loss") is not None:
            sp = f">= {r['speedup_at_full_loss']:.2f}x (full never reaches it)"
        else:
            sp = "< 1 (never reaches the full run's loss)"
        lines.append(f"| {name} | {r['train_time_s']:.1f} | {r['train_flops']:.3g} | {r['final_val_loss']:.4f} | "
                     f"{fmt(r.get('full_time_to_same_loss_s'), '.1f')} | {fmt(r.get('time_to_full_loss_s'), '.1f')} | "
                     f"{sp} | {fmt(r.get('flops_speedup'), '.2f')}x | {r['flops_ratio']:.2f}x |")
    lines += ["", "Loss at each growth (training loss at the step before and the step after; noise = std of the "
              "step-to-step change over the 10 steps before; excess = jump minus the full-size run's change between the "
              "same two batches, which removes the batches' own difficulty; probe = loss on one fixed batch just "
              "before/after the growth):", "",
              "| method | step | to | loss before | loss after | jump | full run's change on the same batches | "
              "excess jump | excess / noise | probe before -> after |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for name in ("msg", "nomask", "net2net"):
        for g in m[name]["growths"]:
            ex = g.get("excess_jump")
            ratio = ex / g["noise"] if (ex is not None and g["noise"]) else float("nan")
            lines.append(f"| {name} | {g['step']} | {tuple(g['to'])} | {g['loss_before']:.4f} | {g['loss_after']:.4f} | "
                         f"{g['jump']:+.4f} | {g['jump'] - ex:+.4f} | {ex:+.4f} | {ratio:+.1f} | "
                         f"{g['probe_before']:.4f} -> {g['probe_after']:.4f} |")
    lines += ["", "Mask strength (Table 3): MSG with several ramp lengths, validation loss at the last step:", "",
              "| ramp_steps | final val loss | training time (s) |", "|---:|---:|---:|"]
    for r in res["ramp_study"]:
        lines.append(f"| {r['ramp_steps']} | {r['final_val_loss']:.4f} | {r['train_time_s']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"full": "k", "msg": "tab:blue", "nomask": "tab:orange", "net2net": "tab:green"}
    for name, r in res["methods"].items():
        ts, vs = zip(*r["val_curve"])
        ax1.plot(ts, vs, "o-", color=colors[name], label=name, markersize=3)
        st, ls = zip(*r["loss_curve"])
        k = max(1, len(ls) // 60)  # light smoothing for readability
        sm = [sum(ls[max(0, i - k):i + 1]) / len(ls[max(0, i - k):i + 1]) for i in range(len(ls))]
        ax2.plot(st, sm, color=colors[name], label=name, linewidth=1)
    msg = res["methods"]["msg"]
    for g, t in zip(msg["growths"], msg["growth_times"]):
        ax2.axvline(g["step"], color="gray", linestyle=":", linewidth=0.8)
        ax1.axvline(t, color="gray", linestyle=":", linewidth=0.8)
    ax1.set_xlabel("training wall time (s)")
    ax1.set_ylabel("validation loss")
    ax1.set_title("validation loss vs wall time (dotted: MSG growths)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss (smoothed)")
    ax2.set_title("training loss vs step (dotted: growths)")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small model and 60 steps (CI, ~2 min)")
    ap.add_argument("--json", action="store_true", help="print the JSON result")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "docs", "benchmarks"))
    ap.add_argument("--work-dir", default="", help="where the runs go (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="re-read finished runs in --work-dir instead of rerunning")
    ap.add_argument("--from-json", default="", help="re-derive the report and plot from a saved result")
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "full"
    log = (lambda *_: None) if args.json else print
    if args.from_json:
        with open(args.from_json) as f:
            res = json.load(f)
        speedups(res["methods"])
    else:
        res = run_all(mode, args.work_dir or tempfile.mkdtemp(prefix="msg-bench-growth-"), log, args.reuse)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, "growth_cpu" + ("_quick" if args.quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(res))
    plot(res, stem + ".png")
    if args.json:
        print(json.dumps(res))
    else:
        print(markdown(res))
        print(f"wrote {stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
