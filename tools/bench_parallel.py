"""Step time under tensor / pipeline parallelism, side by side, and MFU on one GPU.

    python tools/bench_parallel.py [--steps 12] [--json]        # CPU: (1,1,1), (2,1,1), (1,2,1)
    python tools/bench_parallel.py --recompute none,selective,full  # + each train.recompute, side by side
    python tools/bench_parallel.py --sequence-parallel --virtual-pipeline 2  # + SP at TP2, V=2 at PP2
    python tools/bench_parallel.py --gpu [--steps 30]           # one GPU: ~1B model, bf16, MFU
    python tools/bench_parallel.py --gpu --compare              # + eager ops, + bf16 autocast, side by side
    python tools/bench_parallel.py --gpu --recompute none,selective,full  # MFU under each recompute mode
    python tools/bench_parallel.py --gpu --layout 2,2 --sequence-parallel --virtual-pipeline 2  # 4 GPUs

CPU mode runs the same small fixed-shape config (synthetic tokens, no growth) at each layout under
torchrun (gloo) and reports the median step time, its ratio to the single-process run, and the
communication share: the time spent inside torch.distributed calls (collectives, and waits on
pipeline sends/receives) divided by the training time, measured on every rank by wrapping those
calls, averaged over ranks, and the peak activation memory of one more step (the largest over
ranks): autograd's saved tensors, counted per storage while alive (training/activation_memory.py),
next to msg-plan's formula for it (training/sizes.activation_bytes, fp32). `--sequence-parallel`
adds a run with parallel.sequence_parallel at each TP > 1 layout, `--virtual-pipeline V` one with
parallel.virtual_pipeline=V at each PP > 1 layout.
On 2 CPU cores, TP/PP cannot be faster than one process; the figures show what the parallel
machinery costs.

GPU mode trains a ~1.7B-parameter GPT (hidden 2048, ffn 8192, 16 heads of 128, 24 layers,
sequence 2048, vocabulary 32768, SwiGLU/RMSNorm/RoPE) in bf16 (bf16 parameters, fp32 masters; pass
`train.precision=bf16-autocast` to compare with fp32 parameters under autocast) on synthetic tokens
with the real trainer, and prints tokens/s, achieved TFLOP/s and MFU (training/flops.py) from its
metrics. Extra `key=value` arguments override the config. `--compare` runs the same model three
times (fused elementwise ops; `train.fusion=eager`; fp32 parameters under `bf16-autocast` with eager
ops, the configuration of the first H100 measurement) and prints them side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CPU_CONFIG = ["model.vocab_size=2048", "model.hidden_size=256", "model.ffn_hidden_size=1024",
              "model.num_attention_heads=8", "model.num_layers=4", "model.seq_length=128", "data.corpus=synthetic",
              "train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_interval=0", "train.eval_iters=1",
              "train.log_interval=1", "train.warmup_steps=1", "logging.wandb=disabled", "checkpoint.save="]
GPU_CONFIG = ["model.vocab_size=32768", "model.hidden_size=2048", "model.ffn_hidden_size=8192",
              "model.num_attention_heads=16", "model.kv_channels=128", "model.num_layers=24",
              "model.seq_length=2048", "model.norm=rmsnorm", "model.activation=swiglu",
              "model.position_embedding=rope", "model.tie_embeddings=false", "data.corpus=synthetic",
              "train.precision=bf16", "train.global_batch_size=16", "train.micro_batch_size=4",
              "train.eval_interval=0", "train.eval_iters=1", "train.log_interval=1", "train.warmup_steps=2",
              "logging.wandb=disabled", "checkpoint.save="]

GPU_VARIANTS = [("bf16 params, fused elementwise (default)", ["train.fusion=compile"]),
                ("bf16 params, eager elementwise", ["train.fusion=eager"]),
                ("fp32 params + bf16 autocast, eager", ["train.precision=bf16-autocast", "train.fusion=eager"])]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _install_comm_timer():
    """Wrap torch.distributed's collectives and p2p calls; returns the accumulator dict."""
    import torch.distributed as dist

    acc = {"seconds": 0.0}

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if kwargs.get("async_op"):
                out = _TimedWork(out, acc)
            acc["seconds"] += time.perf_counter() - t0
            return out
        return wrapper

    def timed_batch(fn):
        def wrapper(ops):
            t0 = time.perf_counter()
            reqs = [_TimedWork(r, acc) for r in fn(ops)]
            acc["seconds"] += time.perf_counter() - t0
            return reqs
        return wrapper

    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter_tensor",
                 "_reduce_scatter_base", "broadcast", "barrier", "send", "recv"):
        if hasattr(dist, name):
            setattr(dist, name, timed(getattr(dist, name)))
    dist.batch_isend_irecv = timed_batch(dist.batch_isend_irecv)
    # the interleaved schedule's unbatched p2p (torch's P2POp only accepts torch's own isend, so the
    # posting function of megatron's p2p module is wrapped instead), timed until its requests are waited on
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    unbatched = p2p._p2p_ops

    def timed_unbatched(**kwargs):
        t0 = time.perf_counter()
        reqs = {k: _TimedWork(r, acc) for k, r in unbatched(**kwargs).items()}
        acc["seconds"] += time.perf_counter() - t0
        return reqs

    p2p._p2p_ops = timed_unbatched
    return acc


class _TimedWork:
    def __init__(self, work, acc):
        self.work, self.acc = work, acc

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.work.wait(*args, **kwargs)
        self.acc["seconds"] += time.perf_counter() - t0
        return out

    def __getattr__(self, name):
        return getattr(self.work, name)


def worker(config_overrides, out_path):
    import torch.distributed as dist

    acc = _install_comm_timer()
    from msg_megatron.config import load_config
    from msg_megatron.training.trainer import Trainer

    cfg = load_config(None, config_overrides)
    trainer = Trainer(cfg)
    acc["seconds"] = 0.0  # setup collectives are not part of training
    times = []
    while trainer.step < cfg.train.steps:
        rec = trainer._record(trainer.train_step(), sync=True)
        times.append(rec["step_time"])
        trainer.step += 1
        last = rec
    comm = acc["seconds"]
    share = comm / sum(times)
    import torch

    from msg_megatron.training.activation_memory import SavedActivations

    with SavedActivations(trainer.model) as meter:  # one more step: the activations it holds at its peak
        trainer.train_step()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t = torch.tensor([share], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    act = torch.tensor([meter.peak], dtype=torch.float64, device=dev)
    dist.all_reduce(act, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        skip = min(2, len(times) - 1)  # warm-up steps
        with open(out_path, "w") as f:
            json.dump({"median_step_s": statistics.median(times[skip:]), "comm_share": float(t) / dist.get_world_size(),
                       "tokens_per_s": last["tokens_per_s"], "tflops_per_gpu": last["tflops_per_gpu"],
                       "mfu": last.get("mfu"), "world": dist.get_world_size(),
                       "peak_activation_bytes": float(act)}, f)


def run_layout(tp, pp, steps, overrides, tmp, tag=""):
    tag = "".join(ch if ch.isalnum() else "_" for ch in tag)
    out = os.path.join(tmp, f"tp{tp}pp{pp}{tag}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp * pp), "--master_port",
           str(_port()), os.path.abspath(__file__), "--worker", out, "--"] + overrides + [
        f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"train.steps={steps}", f"logging.run_dir={tmp}/run{tp}{pp}{tag}"]
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise SystemExit(f"layout TP={tp} PP={pp} failed:\n{r.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--compare", action="store_true", help="GPU: also eager ops and bf16 autocast")
    ap.add_argument("--recompute", default="none", help="CPU: comma-separated train.recompute modes to run at each "
                    "layout, side by side (e.g. none,selective,full)")
    ap.add_argument("--sequence-parallel", action="store_true",
                    help="CPU: also run each TP > 1 layout with parallel.sequence_parallel=true")
    ap.add_argument("--virtual-pipeline", type=int, default=1,
                    help="CPU: also run each PP > 1 layout with parallel.virtual_pipeline=V (interleaved 1F1B)")
    ap.add_argument("--layout", default="1,1", help="GPU: TP,PP of the runs (TP x PP GPUs; default 1,1)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.worker:
        return worker(args.overrides, args.worker)
    if args.gpu:
        import torch

        if not torch.cuda.is_available():  # the 1.7B model would fill a CPU machine's memory
            ap.error(f"--gpu needs a visible CUDA device (torch {torch.__version__} sees none); "
                     f"without --gpu this script runs the CPU layouts")
        gpu_tp, gpu_pp = (int(x) for x in args.layout.split(","))
        if torch.cuda.device_count() < gpu_tp * gpu_pp:
            ap.error(f"--layout {args.layout} needs {gpu_tp * gpu_pp} GPUs; {torch.cuda.device_count()} visible")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        if args.gpu:
            variants = GPU_VARIANTS if args.compare else GPU_VARIANTS[:1]
            if args.recompute != "none":  # the default variant under each train.recompute mode
                name, extra = GPU_VARIANTS[0]
                variants = [(f"{name}, recompute={m}", extra + [f"train.recompute={m}"])
                            for m in args.recompute.split(",")]
            base_name, base_extra = variants[0]
            if args.sequence_parallel:
                variants.append((f"{base_name}, sequence parallel", base_extra + ["parallel.sequence_parallel=true"]))
            if args.virtual_pipeline > 1:
                variants.append((f"{base_name}, virtual pipeline {args.virtual_pipeline}",
                                 base_extra + [f"parallel.virtual_pipeline={args.virtual_pipeline}"]))
            res = {name: run_layout(gpu_tp, gpu_pp, args.steps or 30, GPU_CONFIG + extra + args.overrides, tmp,
                                    str(i)) for i, (name, extra) in enumerate(variants)}
            if args.json:
                print(json.dumps({"commit": commit, "gpu": res}))
                return
            first = next(iter(res.values()))
            print(f"~1.7B GPT (2048, 8192, 16x128, 24 layers), seq 2048, TP {gpu_tp} x PP {gpu_pp}, commit {commit}")
            print(f"{'variant':44s} {'tokens/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'step (s)':>9s} {'speed':>6s}")
            for name, r in res.items():
                mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
                print(f"{name:44s} {r['tokens_per_s']:9.0f} {r['tflops_per_gpu']:8.0f} {mfu:>6s} "
                      f"{r['median_step_s']:9.3f} {first['median_step_s'] / r['median_step_s']:5.2f}x")
            return
        layouts = [(1, 1), (2, 1), (1, 2)]
        modes = args.recompute.split(",")
        bad = [m for m in modes if m not in ("none", "selective", "full")]
        if bad:
            ap.error(f"--recompute {','.join(bad)}: use none, selective or full (comma-separated)")
        results = {}
        for tp, pp in layouts:
            for label, extra in _cpu_variants(tp, pp, modes, args.sequence_parallel, args.virtual_pipeline):
                r = run_layout(tp, pp, args.steps or 12, CPU_CONFIG + extra + args.overrides, tmp, label)
                r["formula_activation_bytes"] = _formula(tp, pp, CPU_CONFIG + extra + args.overrides)
                results[f"tp{tp}pp{pp}", label] = r
    base = results["tp1pp1", modes[0]]["median_step_s"]
    if args.json:
        print(json.dumps({"commit": commit, "cpu": {f"{k[0]}/{k[1]}": v for k, v in results.items()}}))
        return
    print(f"CPU, gloo, fixed shape (256, 1024, 8, 4), seq 128, batch 8, commit {commit}")
    print(f"{'layout':10s} {'variant':>14s} {'processes':>9s} {'step (s)':>9s} {'vs 1x1':>7s} {'comm share':>11s} "
          f"{'act. peak MB':>13s} {'vs none':>8s} {'formula MB':>11s}")
    for (name, label), r in results.items():
        ref = results.get((name, modes[0]), r)["peak_activation_bytes"]
        print(f"{name:10s} {label:>14s} {r['world']:9d} {r['median_step_s']:9.3f} {r['median_step_s'] / base:6.2f}x "
              f"{r['comm_share']:10.1%} {r['peak_activation_bytes'] / 1e6:13.1f} "
              f"{r['peak_activation_bytes'] / ref:7.2f}x {r['formula_activation_bytes'] / 1e6:11.1f}")


def _cpu_variants(tp, pp, modes, sequence_parallel, virtual_pipeline):
    """(label, overrides) of the runs at one layout: each recompute mode, then SP / interleaving."""
    out = [(m, [f"train.recompute={m}"]) for m in modes]
    if sequence_parallel and tp > 1:
        out.append(("sequence par.", ["parallel.sequence_parallel=true"]))
    if virtual_pipeline > 1 and pp > 1:
        out.append((f"virtual pp {virtual_pipeline}", [f"parallel.virtual_pipeline={virtual_pipeline}"]))
    return out


def _formula(tp, pp, overrides):
    """msg-plan's activation estimate (training/sizes.activation_bytes) for this run, fp32."""
    from msg_megatron.config import load_config
    from msg_megatron.model.gpt import padded_vocab_size
    from msg_megatron.training.sizes import activation_bytes, activation_settings

    cfg = load_config(None, overrides + [f"parallel.tensor={tp}", f"parallel.pipeline={pp}"])
    return activation_bytes(cfg.model, cfg.model.shape, padded_vocab_size(cfg.model), tp, pp,
                            cfg.train.micro_batch_size, elem=4, **activation_settings(cfg, 0, 1))


if __name__ == "__main__":
    main()
