"""Where a training step's time goes: torch.profiler over a few steps of any config, top kernels.

    python tools/profile_step.py CONFIG [overrides...] [--steps 3] [--top 25]
    python tools/profile_step.py --gpu-bench [overrides...]   # bench_parallel.py's ~1.7B GPU config

Runs the real trainer (single process) for one warm-up step, then profiles `--steps` steps and
prints the operators with the largest self time on the device (CUDA time on a GPU, CPU time
otherwise), with their share of the profiled total.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=None)
    ap.add_argument("--gpu-bench", action="store_true", help="profile tools/bench_parallel.py's GPU config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    from msg_megatron.config import load_config
    from msg_megatron.training.trainer import Trainer

    if args.gpu_bench:
        if not torch.cuda.is_available():  # the 1.7B model would fill a CPU machine's memory
            ap.error(f"--gpu-bench needs a visible CUDA device (torch {torch.__version__} sees none); "
                     f"on a CPU give a CONFIG file instead")
        import os
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_parallel import GPU_CONFIG

        # argparse takes the first override for CONFIG
        args.overrides = GPU_CONFIG + ([args.config] if args.config else []) + args.overrides
        args.config = None
    elif args.config is None:
        ap.error("give a CONFIG file or --gpu-bench")
    cfg = load_config(args.config, args.overrides + ["checkpoint.save=", "logging.wandb=disabled"])
    trainer = Trainer(cfg)
    trainer.train_step()
    gpu = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            trainer.train_step()
        if gpu:
            torch.cuda.synchronize()
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, key) for e in events)
    print(f"{args.steps} steps, total self {'CUDA' if gpu else 'CPU'} time {total / 1e6:.3f} s")
    for e in sorted(events, key=lambda e: getattr(e, key), reverse=True)[:args.top]:
        print(f"{getattr(e, key) / total:6.1%} {getattr(e, key) / 1e3 / args.steps:9.2f} ms/step  {e.count // args.steps:5d}x  {e.key[:90]}")


if __name__ == "__main__":
    main()
