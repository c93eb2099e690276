"""msg-gridsearch CONFIG --candidates H,F,A,L [H,F,A,L ...] | --schedule H,F,A,L [--steps N] [overrides...]:
pick intermediate shapes, or build a whole growth schedule from them.

The paper's schedule construction (section 3.2.1): train each candidate structure briefly with the
config's other settings (same data, batch, LR schedule: its warmup and decay length are kept, so a
short run sees the schedule's early part) and compare the pre-training rate
    gamma = d loss / d t = (d loss / d step) * (d step / d t) = alpha * tau        (eq. 21)
measured by least squares over the second half of each run (training loss against training wall
time). A small model has the better tau, a large one the better alpha; the table shows both, so a
schedule can start from the structure that learns fastest per second and grow when it slows down.

--schedule START builds a one-dimension-per-stage schedule (the paper's Sch1 form) from START to
the config's model shape: in each round every dimension not yet at its final size is tried grown to
it (one candidate each, trained as above), and the candidate with the best gamma becomes the next
stage, until the final shape. --combine N also tries every 2..N of those dimensions grown together
in one stage (config/candidates.py), so a round may take several dimensions at once. This is
section 3.2.1's procedure made mechanical: it finds its rules (i)-(iii) rather than assuming them
(a deeper model costs tau: it comes late). Stage durations split train.steps equally, the
remainder to the first stage (the paper: "roughly equal ... slightly emphasizing the early
stages"). Prints the growth.stages block to paste into the config.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import List

from .cli import run_cli
from .config import Shape, load_config
from .grow import parse_shape
from .config.candidates import next_shapes
from .training.rates import fit_slope
from .training.runs import run_pretrain, steps as step_records


def _slope(xs: List[float], ys: List[float]) -> float:
    return fit_slope(xs, ys)[0]


def rates(step_records: List[dict]) -> dict:
    """alpha (loss drop per step), tau (steps per second), gamma (loss drop per second, eq. 21) and
    gamma's standard error (the step-to-step noise of the training loss) over the second half of a run;
    also the loss drop per PFLOP of model compute (train_flops) and its standard error."""
    half = step_records[len(step_records) // 2:]
    if len(half) < 3:
        raise ValueError("too few logged steps to fit a rate; raise --steps or lower train.log_interval")
    steps = [r["step"] for r in half]
    times = [r["train_time"] for r in half]
    losses = [r["loss"] for r in half]
    alpha = -_slope(steps, losses)
    tau = (steps[-1] - steps[0]) / max(times[-1] - times[0], 1e-9)
    slope, se = fit_slope(times, losses)
    # the same rate per model FLOP: no wall clock in it, so the same on any machine and in any rerun (what a
    # reproducible schedule decision can use; wall-time gamma is what the machine at hand delivers)
    flops = [r.get("train_flops") for r in half]
    per_flop = fit_slope(flops, losses) if all(f is not None for f in flops) else (float("nan"), float("nan"))
    tail = step_records[-min(10, len(step_records)):]
    return {"alpha": alpha, "tau": tau, "gamma": -slope, "gamma_se": se,
            "gamma_per_pflop": -per_flop[0] * 1e15, "gamma_per_pflop_se": per_flop[1] * 1e15,
            "final_loss": sum(r["loss"] for r in tail) / len(tail),
            "time": step_records[-1]["train_time"], "params": step_records[-1]["params"],
            "tokens_per_s": sum(r["tokens_per_s"] for r in half) / len(half)}


def search(config: str, candidates, steps: int, overrides: List[str], out_dir: str, log=print) -> List[dict]:
    cfg = load_config(config, overrides)
    head_dim = cfg.model.head_dim
    decay = cfg.train.decay_steps or cfg.train.steps
    results = []
    for shape in candidates:
        h, f, a, n = shape.as_tuple()
        over = list(overrides) + [
            f"model.hidden_size={h}", f"model.ffn_hidden_size={f}", f"model.num_attention_heads={a}",
            f"model.num_layers={n}", f"model.kv_channels={head_dim}", "growth.stages=[]", "growth.lr_reset_stages=[]",
            f"train.steps={steps}", f"train.decay_steps={decay}", "train.eval_interval=0", "train.save_interval=0",
            "train.log_interval=1", "checkpoint.save=", "checkpoint.load="]
        run_dir = os.path.join(out_dir, "x".join(str(v) for v in shape.as_tuple()))
        log(f"[gridsearch] {shape}: {steps} steps -> {run_dir}")
        recs = run_pretrain(config, over, run_dir)
        res = dict(rates(step_records(recs)), shape=list(shape.as_tuple()))
        log(f"[gridsearch] {shape}: gamma {res['gamma']:.4f} +- {res['gamma_se']:.4f} loss/s, "
            f"alpha {res['alpha']:.5f} loss/step, tau {res['tau']:.2f} steps/s, loss {res['final_loss']:.3f}")
        results.append(res)
    return results


def build_schedule(config: str, start: Shape, steps: int, overrides: List[str], out_dir: str, log=print,
                   combine: int = 1) -> dict:
    """{rounds: [the candidates' results of each round, the chosen one marked], stages: [(step, shape)]}."""
    cfg = load_config(config, overrides)
    final = Shape(cfg.model.hidden_size, cfg.model.ffn_hidden_size, cfg.model.num_attention_heads,
                  cfg.model.num_layers)
    if any(s > f for s, f in zip(start.as_tuple(), final.as_tuple())):
        raise ValueError(f"--schedule {start} is larger than the config's model shape {final} in some dimension; the "
                         "model section is the final shape a schedule grows to")
    if start == final:
        raise ValueError(f"--schedule {start} is the config's model shape: there is nothing to grow")
    shapes, rounds, current = [start], [], start
    while current != final:
        grown = next_shapes(current, final, combine)
        if len(grown) == 1:  # the last dimension: nothing to choose
            current = grown[0]
        else:
            results = search(config, grown, steps, overrides, out_dir, log)
            best = max(results, key=lambda r: r["gamma"])
            best["chosen"] = True
            # how far the winner is ahead of the runner-up, in units of their combined noise
            second = max(r["gamma"] for r in results if r is not best)
            noise = (best["gamma_se"] ** 2 + max(r["gamma_se"] for r in results if r is not best) ** 2) ** 0.5
            best["margin_sigma"] = (best["gamma"] - second) / noise if noise > 0 else float("inf")
            rounds.append(results)
            current = Shape(*best["shape"])
            log(f"[gridsearch] round {len(rounds)}: grow to {current} (best gamma, "
                f"{best['margin_sigma']:.1f} sigma ahead of the next"
                + ("; within the noise: another run may choose differently)" if best["margin_sigma"] < 2 else ")"))
        shapes.append(current)
    total = cfg.train.steps
    span = total // len(shapes)
    first = total - span * (len(shapes) - 1)
    stages = [(0 if i == 0 else first + span * (i - 1), s) for i, s in enumerate(shapes)]
    return {"rounds": rounds, "stages": [(st, list(s.as_tuple())) for st, s in stages]}


def stages_yaml(stages) -> str:
    return "growth:\n  stages:\n" + "\n".join(f"    - {{step: {st}, shape: [{', '.join(map(str, sh))}]}}"
                                              for st, sh in stages)


def table(results: List[dict]) -> str:
    lines = ["| shape (h, f, a, L) | params | tok/s | alpha (loss/step) | tau (step/s) | gamma (loss/s) +- s.e. | "
             "loss/PFLOP | loss at end |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    best = max(r["gamma"] for r in results)
    for r in sorted(results, key=lambda r: -r["gamma"]):
        mark = " **chosen**" if r.get("chosen") else " **best**" if r["gamma"] == best else ""
        lines.append(f"| {tuple(r['shape'])}{mark} | {r['params'] / 1e6:.2f}M | {r['tokens_per_s']:.0f} | "
                     f"{r['alpha']:.5f} | {r['tau']:.2f} | {r['gamma']:.4f} +- {r['gamma_se']:.4f} | "
                     f"{r['gamma_per_pflop']:.4g} | {r['final_loss']:.3f} |")
    return "\n".join(lines)


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="msg-gridsearch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="section.field=value, applied to every candidate")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--candidates", nargs="+", help="shapes hidden,ffn,heads,layers")
    what.add_argument("--schedule", default="", help="START shape: build a schedule from it to the config's model shape")
    ap.add_argument("--steps", type=int, default=100, help="training steps per candidate (default 100)")
    ap.add_argument("--combine", type=int, default=1, help="with --schedule: also try growing up to N dimensions "
                    "together in one stage (default 1: one at a time, the paper's form)")
    ap.add_argument("--out", default="", help="directory for the candidates' runs (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="msg-gridsearch-")
    log = (lambda *_: None) if args.json else print
    if args.combine < 1 or (args.combine > 1 and not args.schedule):
        raise ValueError(f"--combine {args.combine}: give N >= 1 dimensions per stage, with --schedule")
    if args.schedule:
        res = build_schedule(args.config, parse_shape(args.schedule, "--schedule"), args.steps, args.overrides, out,
                             log, args.combine)
        if args.json:
            print(json.dumps(res))
        else:
            for i, results in enumerate(res["rounds"]):
                print(f"\nround {i + 1}:\n{table(results)}")
            print(f"\n{stages_yaml(res['stages'])}")
        return 0
    candidates = [parse_shape(c, "--candidates entry") for c in args.candidates]
    results = search(args.config, candidates, args.steps, args.overrides, out, log)
    print(json.dumps(results) if args.json else table(results))
    return 0


def main(argv=None) -> None:
    sys.exit(run_cli("msg-gridsearch", _main, argv))


if __name__ == "__main__":
    main()
