"""Full-size training vs MSG vs No-Mask vs Net2Net on the same token budget and schedule (paper
Tables 4/5, Figures 3/5, at a scale this machine runs), plus the mask-strength study (Table 3).

    python tools/bench_growth.py [--family gpt|bert] [--quick] [--cap 3] [--json] [--out-dir docs/benchmarks]

Every method trains the same steps x batch on the embedded corpus (GPT: configs/demo_cpu.yaml; BERT:
configs/bert_demo_cpu.yaml, masked-LM loss), one run after another in child processes (so each has
the machine to itself). The full-size run goes last and **continues past the budget**: the same run
(its learning rate decays over the budget, train.decay_steps, then stays at min_lr, as the paper's
GPT baseline continued), stopped once its validation loss reaches the lowest final loss of the
growth methods, or at --cap x the budget. Its first `budget` steps are exactly the budget run (same
data order, same LR), so the table reports it at the budget; the continuation measures
    speed-up = (time the full-size run needs to reach the method's final validation loss) / (the method's time)
as a ratio (interpolating the full run's validation curve), or, where the full run does not get
there within the cap, "> cap time / method time" (stated as a bound, with the cap). The same in model
FLOPs. Also per method: training wall time (steps and growth, evaluation excluded), the training
loss right before and right after each growth with the step-to-step noise before it. Writes
growth_cpu[_bert][_quick].json/.md/.png into --out-dir.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from msg_megatron.config import load_config  # noqa: E402
from msg_megatron.training.runs import current, evals, growths, read_metrics, run_pretrain, steps  # noqa: E402

COMMON = ["checkpoint.save=", "checkpoint.load=", "train.log_interval=1"]
GROWN = [{"name": "msg", "over": ["growth.operator=msg"]}, {"name": "auto", "over": ["growth.operator=msg"]},
         {"name": "nomask", "over": ["growth.operator=nomask"]},
         {"name": "net2net", "over": ["growth.operator=net2net"]}]
_QUICK_SHAPES = ["growth.stages=[{step: 0, shape: [64, 128, 4, 2]}, {step: 10, shape: [64, 384, 4, 2]}, "
                 "{step: 20, shape: [64, 384, 4, 4]}, {step: 30, shape: [96, 384, 4, 4]}, "
                 "{step: 40, shape: [96, 384, 6, 4]}]"]
_QUICK = ["model.hidden_size=96", "model.ffn_hidden_size=384", "model.num_attention_heads=6", "model.kv_channels=16",
          "model.vocab_size=512", "model.seq_length=64", "train.steps=60", "train.global_batch_size=8",
          "train.micro_batch_size=8", "train.warmup_steps=5", "train.eval_interval=10", "train.eval_iters=2",
          "data.corpus_mb=0.5", "growth.ramp_steps=5"] + _QUICK_SHAPES
# GPT's stages chosen by msg-gridsearch, not by hand (2026-12-02, docs/benchmarks.md "Choosing stages"):
#   msg-gridsearch configs/demo_cpu.yaml checkpoint.save= --schedule 128,256,4,2 --steps 100
# each round grows the dimension whose grown model has the best gamma (eq. 21): heads, ffn, hidden, then layers
GPT_STAGES = ("growth.stages=[{step: 0, shape: [128, 256, 4, 2]}, {step: 96, shape: [128, 256, 6, 2]}, "
              "{step: 192, shape: [128, 768, 6, 2]}, {step: 288, shape: [192, 768, 6, 2]}, "
              "{step: 384, shape: [192, 768, 6, 4]}]")
# BERT's likewise (2026-12-02): msg-gridsearch configs/bert_demo_cpu.yaml checkpoint.save= --schedule 128,256,4,2
#   --steps 100 grows heads, hidden, ffn, then layers (the demo config keeps its hand-written order)
BERT_STAGES = ("growth.stages=[{step: 0, shape: [128, 256, 4, 2]}, {step: 96, shape: [128, 256, 6, 2]}, "
               "{step: 192, shape: [192, 256, 6, 2]}, {step: 288, shape: [192, 768, 6, 2]}, "
               "{step: 384, shape: [192, 768, 6, 4]}]")
# MSG auto (growth.schedule=auto): the same start shape and model section as the gridsearch schedule, the run
# deciding the rest; a check every stage length of the fixed schedule (96 of 480 steps): the run trains a 12-step
# window, then candidates are probed over it cheapest first, each only while the checks cost at most 15% of the
# run's FLOPs (the first check's cheapest probe is ~3%). Its rate is per second (growth.auto.cost=time), as the
# benchmark's: per FLOP (the default, reproducible) the small model stays ahead at every check on this CPU, where a
# step's time is far from proportional to its FLOPs. (48-step windows, about the ramp's 40, were tried on BERT:
# with the machine's speed steady no candidate won at step 96 either, and the probes cost a third of the run.)
AUTO = ["growth.schedule=auto", "growth.stages=[{step: 0, shape: [128, 256, 4, 2]}]", "growth.auto.check_interval=96",
        "growth.auto.probe_steps=12", "growth.auto.window=48", "growth.auto.cost=time",
        "growth.auto.max_probe_share=0.15"]
_QUICK_AUTO = ["growth.schedule=auto", "growth.stages=[{step: 0, shape: [64, 128, 4, 2]}]",
               "growth.auto.check_interval=20", "growth.auto.probe_steps=4", "growth.auto.window=8",
               "growth.auto.max_probe_share=0.3"]
METHODS = ("msg", "auto", "nomask", "net2net")  # the growth methods, in the order they run and are reported
FAMILIES = {
    # the demos: (128, 256, 4, 2) grows one dimension per stage to (192, 768, 6, 4) in 480 steps;
    # quick (CI): the same story at 1/8 of the steps on a smaller model
    "gpt": {"config": "demo_cpu.yaml", "stem": "growth_cpu",
            "full": {"over": ["train.eval_interval=40", GPT_STAGES], "ramps": [5, 20, 80], "ramp": 40, "auto": AUTO},
            "quick": {"over": _QUICK, "ramps": [2], "ramp": 5, "tasks": ["train.eval_tasks_limit=4"],
                      "auto": _QUICK_AUTO}},
    "bert": {"config": "bert_demo_cpu.yaml", "stem": "growth_cpu_bert",
             # appendix D: BERT's grown runs reset the LR to its peak at the 1st and 2nd growth
             "full": {"over": ["train.eval_interval=40", BERT_STAGES], "grown": ["growth.lr_reset_stages=[1, 2]"],
                      "ramps": [5], "ramp": 40, "auto": AUTO},
             "quick": {"over": _QUICK + ["data.corpus_mb=1"], "ramps": [2], "ramp": 5, "auto": _QUICK_AUTO}},
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


def summarise(name, recs, budget=None):
    """A run's figures; `budget` (the full-size run): those of its first `budget` steps, and its
    whole validation curve, past the budget, as `val_curve_ext` / `val_flops_curve_ext`."""
    recs = current(recs)  # (MSG auto: the steps of a kept probe replace the run's own window)
    ext, every = evals(recs), recs
    if budget is not None:
        recs = [r for r in recs if r.get("step", 0) < budget or ("val_loss" in r and r["step"] == budget)]
    st, ev = steps(recs), evals(recs)
    out = {}
    if budget is not None:
        out = {"budget_steps": budget, "val_curve_ext": [(e["train_time"], e["val_loss"]) for e in ext],
               "val_flops_curve_ext": [(e["train_flops"], e["val_loss"]) for e in ext],
               "ext_steps": ext[-1]["step"], "ext_time_s": ext[-1]["train_time"], "ext_flops": ext[-1]["train_flops"]}
    # downstream scores at the budget (the run's end; the full run's step `budget`): lm-eval's tasks (GPT),
    # masked-LM accuracy (BERT)
    end = budget if budget is not None else st[-1]["step"] + 1
    out["score_curve"] = _score_curve(every)
    out["scores"] = next((sc for step, _, sc in out["score_curve"] if step == end), {})
    return {**out, "method": name, "train_time_s": st[-1]["train_time"], "train_flops": st[-1]["train_flops"],
            "final_val_loss": ev[-1]["val_loss"], "final_train_loss": st[-1]["loss"],
            "val_curve": [(e["train_time"], e["val_loss"]) for e in ev],
            "val_flops_curve": [(e["train_flops"], e["val_loss"]) for e in ev],
            "val_steps": [e["step"] for e in ev],
            "loss_curve": [(r["step"], r["loss"]) for r in st], "growths": jumps(st, growths(recs)),
            "growth_times": [next(r["train_time"] for r in st if r["step"] == g["step"]) for g in growths(recs)],
            **auto_figures(recs)}


def auto_figures(recs) -> dict:
    """growth.schedule=auto's decisions (step, the run's gamma, each probed candidate's gamma and margin in
    standard errors, the choice and the step it grew at) and its checks' spans of training time (their
    saves, probes and loads; a kept probe's steps are the run's), with what the checks cost: the share of
    the training time lost to them (saves, loads, the probes that lost, the window a kept probe replaced)."""
    dec = [{"step": r["step"], "gamma": r["gamma"], "gamma_se": r["gamma_se"], "unit": r["unit"], "choice": r["choice"],
            "grown_at": r.get("grown_at"), "not_probed": r.get("not_probed", []),
            "candidates": [(c["shape"], c["gamma"], c["sigma"]) for c in r["candidates"]],
            # each probe's transient (training/rates.py gap_profile; absent from records before 2026-12-04)
            "gaps": [(c["shape"], c["gap_quarters"], c["late_delta"], c["late_delta_se"])
                     for c in r["candidates"] if "gap_quarters" in c]}
           for r in recs if r.get("event") == "auto_decision"]
    spans = [(r["train_time_start"], r["train_time_end"]) for r in recs if r.get("event") == "auto_probes"]
    if not dec and not spans:
        return {}
    spent = max([r["probe_time_s"] for r in recs if r.get("event") == "auto_decision"], default=0.0)
    parts = {k: sum(r.get(k, 0.0) for r in recs if r.get("event") in ("auto_check", "auto_probes"))
             for k in ("save_s", "window_s", "grow_s", "train_s", "load_s")}
    return {"decisions": dec, "probe_spans": spans, "probe_time_s": spent, "probe_parts_s": parts,
            "probe_share": spent / steps(recs)[-1]["train_time"],
            # checks skipped by growth.auto.max_probe_share: (step, the probes' share of the FLOPs had it checked)
            "skipped": [(r["step"], r["probe_share_if_checked"]) for r in recs if r.get("event") == "auto_skipped"]}


def _score_curve(recs) -> list:
    """[(step, train_flops, {metric: value})] of a run's downstream scores: lm-eval's tasks (GPT,
    `tasks/<task>/<metric>` records) and masked-LM accuracy (BERT, with its validation loss)."""
    out = {}
    for r in recs:
        sc = {k[len("tasks/"):]: v for k, v in r.items() if k.startswith("tasks/")}
        if "mlm_accuracy" in r:
            sc["mlm_accuracy"] = r["mlm_accuracy"]
        if sc:
            out.setdefault(r["step"], [r["step"], r["train_flops"], {}])[2].update(sc)
    return [tuple(v) for _, v in sorted(out.items())]


def equal_flops_scores(results: dict) -> None:
    """The full-size run's downstream scores where its FLOPs equal MSG's whole run's (the scored step
    nearest to them): the paper's comparison at equal compute."""
    full, target = results["full"], results["msg"]["train_flops"]
    curve = [c for c in full.get("score_curve", []) if c[0] <= full["budget_steps"]]
    if curve:
        step, flops, sc = min(curve, key=lambda c: abs(c[1] - target))
        full["scores_at_msg_flops"] = {"step": step, "train_flops": flops, "scores": sc}


def speedups(results: dict) -> None:
    """Speed-up at equal validation loss, per method against the full-size run, as a measured ratio:
    `speedup` = (time the full run, continued past the budget, needs to reach the method's final
    loss) / (the method's time); where it does not within the cap, `speedup_bound` = (the full run's
    time at the cap) / (the method's time), a lower bound. `flops_speedup` (`flops_bound`): the same
    in model FLOPs (deterministic; wall time on a shared VM varies ~10%). `speedup_at_full_loss`:
    the budget run's time over the method's time to reach the budget run's final loss."""
    full = results["full"]
    for name, r in results.items():
        if name == "full":
            continue
        t_full = time_to_reach(full["val_curve_ext"], r["final_val_loss"])
        r["full_time_to_same_loss_s"] = t_full
        r["speedup"] = t_full / r["train_time_s"] if t_full is not None else None
        r["speedup_bound"] = full["ext_time_s"] / r["train_time_s"] if t_full is None else None
        t_method = time_to_reach(r["val_curve"], full["final_val_loss"])
        r["time_to_full_loss_s"] = t_method
        r["speedup_at_full_loss"] = full["train_time_s"] / t_method if t_method else None
        r["flops_ratio"] = full["train_flops"] / r["train_flops"]
        f_full = time_to_reach(full["val_flops_curve_ext"], r["final_val_loss"])
        r["flops_speedup"] = f_full / r["train_flops"] if f_full is not None else None
        r["flops_bound"] = full["ext_flops"] / r["train_flops"] if f_full is None else None
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


def _run(config, overrides, run_dir, reuse, stop=None):
    """A run's records: re-read when `reuse` and the run finished (its final evaluation is logged,
    or, for a run with `stop`, the records say it stopped)."""
    if reuse and os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        recs = read_metrics(run_dir)
        if recs and evals(recs) and (stop is None or stop(recs) or _at_end(recs, overrides)):
            return recs
    return run_pretrain(config, overrides, run_dir, stop=stop)


def _at_end(recs, overrides) -> bool:
    last = [o for o in overrides if o.startswith("train.steps=")][-1]
    return evals(recs)[-1]["step"] >= int(last.split("=")[1])


def run_all(family: str, mode: str, work: str, log, reuse: bool = False, cap: float = 3.0, extras: bool = True) -> dict:
    """Every method once, one after another (growth methods, then the full-size run). `extras`: also the
    downstream scores and the mask-strength study (deterministic: a repeat leaves them out)."""
    fam = FAMILIES[family]
    config = os.path.join(REPO, "configs", fam["config"])
    setting = fam[mode]
    base = COMMON + setting["over"]
    grown = setting.get("grown", [])  # settings of the growth runs only (BERT: appendix D's LR resets)
    budget = load_config(config, base).train.steps
    # downstream scores of each method's model at the budget (evaluation time is not training time); BERT's is its
    # masked-LM accuracy on the validation batches, logged with every evaluation
    tasks = ["train.eval_tasks=[msg_offline]", f"train.eval_tasks_interval={budget}",
             "train.eval_tasks_at_ramp_end=false"] + setting.get("tasks", []) if family == "gpt" and extras else []
    results = {}

    def report(name, t0):
        r = results[name]
        log(f"[bench] {name}: {r['train_time_s']:.1f} s training ({time.time() - t0:.0f} s with evaluation), "
            f"val loss {r['final_val_loss']:.4f}")

    for m in GROWN:
        log(f"[bench] {m['name']} ...")
        t0 = time.time()
        over = list(m["over"])
        if m["name"] == "auto":  # (its probes return through the checkpoint of each check: a fresh save directory;
            # no periodic saves, which the other methods do not make either)
            ck = os.path.join(work, "auto", "ck")
            if not reuse:
                shutil.rmtree(ck, ignore_errors=True)
            over += setting["auto"] + [f"checkpoint.save={ck}", "checkpoint.keep=1", "train.save_interval=0"]
        results[m["name"]] = summarise(m["name"], _run(config, base + tasks + grown + over,
                                                       os.path.join(work, m["name"]), reuse))
        report(m["name"], t0)
    # the full-size run last: continued past the budget until it reaches every method's final loss
    target = min(r["final_val_loss"] for r in results.values())
    cap_steps = int(round(cap * budget))
    log(f"[bench] full ... (continued past {budget} steps until val loss <= {target:.4f}, at most {cap_steps})")
    t0 = time.time()
    def reached(recs):  # (never before the budget: the budget's own figures come from the same run)
        if tasks and not any(r.get("step") == budget and any(k.startswith("tasks/") for k in r) for r in recs):
            return False  # (nor before its downstream scores at the budget are logged)
        ev = evals(recs)
        return bool(ev) and ev[-1]["step"] >= budget and any(e["val_loss"] <= target for e in ev)

    at_msg_flops = []
    if tasks:  # also score the full run where its FLOPs equal MSG's whole run's (equal compute)
        from msg_megatron.model.gpt import padded_vocab_size
        from msg_megatron.training.flops import flops_per_token

        c = load_config(config, base)
        per_step = flops_per_token(c.model, c.model.shape, padded_vocab_size(c.model)) * \
            c.train.global_batch_size * c.model.seq_length
        at_msg_flops = [f"train.eval_tasks_steps=[{max(1, round(results['msg']['train_flops'] / per_step))}]"]
    recs = _run(config, base + tasks + at_msg_flops + ["growth.stages=[]", f"train.steps={cap_steps}",
                                                       f"train.decay_steps={budget}"],
                os.path.join(work, "full"), reuse, stop=reached)
    results["full"] = summarise("full", recs, budget)
    report("full", t0)
    f = results["full"]
    log(f"[bench] full continued to step {f['ext_steps']} ({f['ext_time_s']:.1f} s): "
        + ("reached" if reached(recs) else f"did not reach {target:.4f} within the cap"))
    speedups(results)
    equal_flops_scores(results)
    ramps = []
    for ramp in sorted(set(setting["ramps"] + [setting["ramp"]])) if extras else []:
        if ramp == setting["ramp"]:
            r = results["msg"]
        else:
            log(f"[bench] msg with ramp_steps={ramp} ...")
            r = summarise("msg", _run(config, base + grown + ["growth.operator=msg", f"growth.ramp_steps={ramp}"],
                                      os.path.join(work, f"ramp{ramp}"), reuse))
        ramps.append({"ramp_steps": ramp, "final_val_loss": r["final_val_loss"], "train_time_s": r["train_time_s"]})
    return {"family": family, "mode": mode, "config": os.path.relpath(config, REPO), "overrides": base,
            "budget_steps": budget, "cap_steps": cap_steps, "methods": results,
            "ramp_study": ramps, "date": time.strftime("%Y-%m-%d"), "commit": commit(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}"}


def _continuation(res: dict) -> str:
    """How far the full-size run went: within its budget, continued, or stopped at the cap."""
    m, f = res["methods"], res["methods"]["full"]
    target = min(m[n]["final_val_loss"] for n in METHODS if n in m)
    head = (f"The full-size run is reported at the budget ({res['budget_steps']} steps); the speed-ups compare "
            f"each method with the time the full run took to reach that method's final validation loss")
    if f["ext_steps"] <= res["budget_steps"]:
        return (f"{head}. It reached the growth methods' lowest final loss ({target:.4f}) within its budget, so "
                "every ratio is read off its own validation curve (no continuation was needed).")
    reached = min(v for _, v in f["val_curve_ext"]) <= target
    return (f"{head}: it was continued past the budget (the same run, learning rate at min_lr after it) to step "
            f"{f['ext_steps']} ({f['ext_time_s']:.1f} s of training; cap {res['cap_steps']} steps), "
            + (f"where it reached the growth methods' lowest final loss ({target:.4f})." if reached else
               f"without reaching the growth methods' lowest final loss ({target:.4f}): the speed-ups it does "
               "not reach are bounds (>), against the time to the cap."))


def markdown(res: dict) -> str:
    m = res["methods"]
    f = m["full"]
    lines = [f"# Growth benchmark ({res.get('family', 'gpt')}, {res['mode']}): full vs MSG vs No-Mask vs Net2Net",
             "", f"{res['date']}, commit {res['commit']}, {res['machine']}; config `{res['config']}` with "
             f"`{' '.join(res['overrides'])}`.", "",
             _continuation(res), "",
             "| method | training time (s) | model FLOPs | final val loss | full-size time to that loss (s) | "
             "wall-time speed-up at equal loss | FLOPs speed-up at equal loss | FLOPs saved (same budget) | "
             "time to the full budget run's loss (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v, f: "never" if v is None else format(v, f)  # noqa: E731
    for name in ("full",) + METHODS:
        if name not in m:
            continue
        r = m[name]
        if name == "full":
            lines.append(f"| full (at the budget) | {r['train_time_s']:.1f} | {r['train_flops']:.3g} | "
                         f"{r['final_val_loss']:.4f} | {r['train_time_s']:.1f} | 1.00x | 1.00x | | {r['train_time_s']:.1f} |")
            continue
        if r.get("speedup") is not None:
            sp = f"**{r['speedup']:.2f}x**"
        else:
            sp = f"> {r['speedup_bound']:.2f}x (full did not reach it by step {f['ext_steps']})"
        fsp = (f"{r['flops_speedup']:.2f}x" if r.get("flops_speedup") is not None
               else f"> {r['flops_bound']:.2f}x")
        lines.append(f"| {name} | {r['train_time_s']:.1f} | {r['train_flops']:.3g} | {r['final_val_loss']:.4f} | "
                     f"{fmt(r.get('full_time_to_same_loss_s'), '.1f')} | {sp} | {fsp} | {r['flops_ratio']:.2f}x | "
                     f"{fmt(r.get('time_to_full_loss_s'), '.1f')} |")
    lines += ["", "Loss at each growth (training loss at the step before and the step after; noise = std of the "
              "step-to-step change over the 10 steps before; excess = jump minus the full-size run's change between the "
              "same two batches, which removes the batches' own difficulty; probe = loss on one fixed batch just "
              "before/after the growth):", "",
              "| method | step | to | loss before | loss after | jump | full run's change on the same batches | "
              "excess jump | excess / noise | probe before -> after |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for name in (n for n in METHODS if n in m):
        for g in m[name]["growths"]:
            ex = g.get("excess_jump")
            ratio = ex / g["noise"] if (ex is not None and g["noise"]) else float("nan")
            lines.append(f"| {name} | {g['step']} | {tuple(g['to'])} | {g['loss_before']:.4f} | {g['loss_after']:.4f} | "
                         f"{g['jump']:+.4f} | {g['jump'] - ex:+.4f} | {ex:+.4f} | {ratio:+.1f} | "
                         f"{g['probe_before']:.4f} -> {g['probe_after']:.4f} |")
    keys = sorted({k for name in m for k in m[name].get("scores", {})
                   if k.endswith(("/acc", "/bits_per_byte", "/exact_match", "mlm_accuracy"))})
    if keys:
        lines += ["", "Downstream scores of each method's model at the budget (the full-size run at its budget step; "
                  + ("lm-evaluation-harness on the shipped offline tasks, msg_megatron/tasks: accuracy higher is "
                     "better, bits per byte lower" if res.get("family", "gpt") == "gpt" else
                     "masked-LM accuracy on the validation batches") + "):", "",
                  "| method | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for name in ("full",) + tuple(n for n in METHODS if n in m):
            sc = m[name].get("scores", {})
            lines.append(f"| {name} | " + " | ".join(f"{sc[k]:.4f}" if k in sc else "-" for k in keys) + " |")
        eq = f.get("scores_at_msg_flops")
        if eq:
            lines.append(f"| full at MSG's FLOPs (step {eq['step']}, {eq['train_flops']:.3g}) | "
                         + " | ".join(f"{eq['scores'][k]:.4f}" if k in eq["scores"] else "-" for k in keys) + " |")
    auto = m.get("auto", {})
    if auto.get("decisions") is not None:
        unit = auto["decisions"][0]["unit"] if auto["decisions"] else ""
        lines += ["", f"MSG auto (growth.schedule=auto): its decisions ({unit}; at each check the run trains its "
                  "window, then candidates are probed from the check's step cheapest first and the first whose "
                  "gain over the run exceeds the margin (sigma: standard errors) is kept, grown at the check's "
                  f"step). The checks cost {auto['probe_time_s']:.1f} s, {auto['probe_share']:.1%} of its training "
                  "time (" + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in auto.get("probe_parts_s", {}).items())
                  + ": the checks' saves, the run's window where a probe replaced it, growing the candidates, "
                  "their steps (a kept probe's count as the run's), loading checkpoints)."
                  + (" Checks skipped by growth.auto.max_probe_share: " + ", ".join(
                      f"step {st} (would have made the probes {sh:.1%} of the run's FLOPs)"
                      for st, sh in auto["skipped"])
                     + "." if auto.get("skipped") else ""), "",
                  "| decision step | the run's gamma | probed, cheapest first: gamma (sigma) | not probed (share) "
                  "| grew to (at step) |", "|---:|---:|---|---|---|"]
        for d in auto["decisions"]:
            cands = ", ".join(f"{tuple(sh)} {g:.4g} ({sg:+.1f})" for sh, g, sg in d["candidates"])
            lines.append(f"| {d['step']} | {d['gamma']:.4g} +- {d['gamma_se']:.2g} | {cands} | "
                         + (", ".join(str(tuple(x)) for x in d.get("not_probed") or []) or "-") + " | "
                         + (f"{tuple(d['choice'])} (at {d.get('grown_at')})" if d['choice'] else '-') + " |")
        gaps = [(d["step"], g) for d in auto["decisions"] for g in d.get("gaps", [])]
        if gaps:
            lines += ["", "Each probe's transient: its training loss minus the run's on the same batches, averaged by "
                      "quarter of the probe, and that gap's slope per step over the probe's second half (a grown "
                      "copy first falls behind, then gains: docs/benchmarks.md, 2026-12-04):", "",
                      "| decision step | candidate | gap by quarter | slope, second half |", "|---:|---|---|---|"]
            for st, (sh, quarters, late, se) in gaps:
                slope = (f"{late:+.5f} +- {se:.5f}" if late is not None and math.isfinite(late)
                         else "- (a probe under 6 steps, or diverged)")
                lines.append(f"| {st} | {tuple(sh)} | {' '.join(f'{q:+.4f}' for q in quarters)} | {slope} |")
    if res.get("repeats"):
        lines += ["", repeats_markdown(res)]
    lines += ["", "Mask strength (Table 3): MSG with several ramp lengths, validation loss at the last step:", "",
              "| ramp_steps | final val loss | training time (s) |", "|---:|---:|---:|"]
    for r in res["ramp_study"]:
        lines.append(f"| {r['ramp_steps']} | {r['final_val_loss']:.4f} | {r['train_time_s']:.1f} |")
    return "\n".join(lines) + "\n"


def repeat_row(methods: dict) -> dict:
    """What a repeat keeps of each method: its speed-ups, time, final loss (and auto's growths)."""
    keep = ("speedup", "speedup_bound", "train_time_s", "final_val_loss", "flops_speedup", "flops_bound", "probe_share")
    out = {"full": {"train_time_s": methods["full"]["train_time_s"]}}
    for name, r in methods.items():
        if name != "full":
            out[name] = {k: r.get(k) for k in keep}
            if "decisions" in r:
                out[name]["grew"] = [(d["step"], d["choice"]) for d in r["decisions"] if d["choice"]]
    return out


def repeat_summary(runs: list) -> dict:
    """Per method over the repeats: each run's wall-time speed-up at equal loss (a ratio, or its bound where
    the full run did not get there), their median and spread, and the FLOPs speed-up (the same every time:
    the losses are deterministic; only the wall clock moves)."""
    out = {}
    for name in METHODS:
        rows = [r[name] for r in runs if name in r]
        if not rows:
            continue
        sp = [x["speedup"] if x.get("speedup") is not None else x.get("speedup_bound") for x in rows]
        out[name] = {"speedups": sp, "bounds": [x.get("speedup") is None for x in rows],
                     "median": statistics.median(sp), "min": min(sp), "max": max(sp),
                     "train_time_s": [x["train_time_s"] for x in rows],
                     "final_val_loss": [x.get("final_val_loss") for x in rows],
                     "flops_speedups": [x.get("flops_speedup") or x.get("flops_bound") for x in rows],
                     "grew": [x["grew"] for x in rows if "grew" in x],
                     "probe_share": [x["probe_share"] for x in rows if "probe_share" in x]}
    return out


def repeats_markdown(res: dict) -> str:
    rs = res["repeat_summary"]
    n = len(res["repeats"])
    lines = [f"Repeats: every method run {n} times, interleaved (each repeat runs them all in turn, the full-size run "
             "last); wall-time speed-up at equal validation loss per repeat, the median and the spread. The losses "
             "are the same in every repeat (only the wall clock differs) except where MSG auto decides on measured "
             "seconds (growth.auto.cost=time): its decisions, and so its losses, may differ between repeats.", "",
             "| method | speed-up per repeat | median | min-max | FLOPs speed-up per repeat | "
             "final val loss per repeat | training time per repeat (s) |", "|---|---|---:|---|---|---|---|"]
    for name, r in rs.items():
        per = ", ".join(("> " if b else "") + f"{v:.2f}x" for v, b in zip(r["speedups"], r["bounds"]))
        fl = ", ".join(f"{v:.2f}x" for v in r.get("flops_speedups", [r.get("flops_speedup")]) if v is not None)
        vl = ", ".join(f"{v:.4f}" for v in r.get("final_val_loss", []) if v is not None)
        lines.append(f"| {name} | {per} | **{r['median']:.2f}x** | {r['min']:.2f}-{r['max']:.2f}x | {fl} | {vl} | "
                     f"{', '.join(f'{t:.1f}' for t in r['train_time_s'])} |")
    grew = rs.get("auto", {}).get("grew")
    if grew:
        lines += ["", "MSG auto's growths per repeat: " + "; ".join(
            ", ".join(f"step {st}: {tuple(sh)}" for st, sh in g) or "none" for g in grew)]
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"full": "k", "msg": "tab:blue", "auto": "tab:purple", "nomask": "tab:orange", "net2net": "tab:green"}
    for name, r in res["methods"].items():
        ts, vs = zip(*r.get("val_curve_ext", r["val_curve"]))  # (the full run past its budget too)
        ax1.plot(ts, vs, "o-", color=colors[name], label=name, markersize=3)
        st, ls = zip(*r["loss_curve"])
        k = max(1, len(ls) // 60)  # light smoothing for readability
        sm = [sum(ls[max(0, i - k):i + 1]) / len(ls[max(0, i - k):i + 1]) for i in range(len(ls))]
        ax2.plot(st, sm, color=colors[name], label=name, linewidth=1)
    msg = res["methods"]["msg"]
    for g, t in zip(msg["growths"], msg["growth_times"]):
        ax2.axvline(g["step"], color="gray", linestyle=":", linewidth=0.8)
        ax1.axvline(t, color="gray", linestyle=":", linewidth=0.8)
    auto = res["methods"].get("auto", {})
    for i, (a, b) in enumerate(auto.get("probe_spans", [])):  # MSG auto's probes, inside its training time
        ax1.axvspan(a, b, color=colors["auto"], alpha=0.15, label="auto's probes" if i == 0 else None)
    for g, t in zip(auto.get("growths", []), auto.get("growth_times", [])):
        ax2.axvline(g["step"], color=colors["auto"], linestyle=":", linewidth=0.8)
        ax1.axvline(t, color=colors["auto"], linestyle=":", linewidth=0.8)
    ax1.set_xlabel("training wall time (s)")
    ax1.set_ylabel("validation loss")
    if "budget_steps" in res:
        ax1.axvline(res["methods"]["full"]["train_time_s"], color="k", linestyle="--", linewidth=0.8)
    ax1.set_title("val loss vs wall time (dotted: growths; shaded: auto's probes; dashed: full budget)",
                  fontsize=9)
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss (smoothed)")
    ax2.set_title("training loss vs step (dotted: growths)")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="gpt", choices=sorted(FAMILIES), help="the demo to grow (default gpt)")
    ap.add_argument("--quick", action="store_true", help="a small model and 60 steps (CI, ~2 min)")
    ap.add_argument("--cap", type=float, default=3.0,
                    help="the full-size run continues to at most CAP x the budget's steps (default 3)")
    ap.add_argument("--json", action="store_true", help="print the JSON result")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "docs", "benchmarks"))
    ap.add_argument("--work-dir", default="", help="where the runs go (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="re-read finished runs in --work-dir instead of rerunning")
    ap.add_argument("--from-json", default="", help="re-derive the report and plot from a saved result")
    ap.add_argument("--repeats", type=int, default=1, help="run every method this many times, interleaved, and "
                    "report the median wall-time speed-up and its spread (the first repeat also scores downstream "
                    "and runs the ramp study)")
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "full"
    if args.cap < 1:
        ap.error(f"--cap {args.cap}: the full-size run needs at least its budget (1)")
    log = (lambda *_: None) if args.json else print
    if args.from_json:
        with open(args.from_json) as f:
            res = json.load(f)
        speedups(res["methods"])
    else:
        if args.repeats < 1:
            ap.error(f"--repeats {args.repeats}: run at least once")
        work = args.work_dir or tempfile.mkdtemp(prefix="msg-bench-growth-")
        res = run_all(args.family, mode, work if args.repeats == 1 else os.path.join(work, "rep0"), log, args.reuse,
                      args.cap)
        if args.repeats > 1:
            runs = [res["methods"]]
            for k in range(1, args.repeats):
                log(f"[bench] repeat {k + 1} of {args.repeats}")
                runs.append(run_all(args.family, mode, os.path.join(work, f"rep{k}"), log, args.reuse, args.cap,
                                    extras=False)["methods"])
            res["repeats"] = [repeat_row(r) for r in runs]
            res["repeat_summary"] = repeat_summary(res["repeats"])
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, FAMILIES[res.get("family", "gpt")]["stem"] + ("_quick" if res["mode"] == "quick" else ""))
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
