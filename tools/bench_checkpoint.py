"""Checkpoint save/load throughput and offline growth time against the raw disk, side by side.

    python tools/bench_checkpoint.py [--sizes 10M 100M 1B] [--dir /tmp/x] [--json]

For models of about 10M, 100M and 1B parameters (fp32 weights + AdamW moments: 12 bytes/param):
save (dist_checkpointing + manifest with CRC-32 + atomic rename, then `sync`), load (manifest size
check + dist_checkpointing), and `msg-grow` (load, grow every width dimension by 25%, save) as the
user runs it. The raw disk write speed is measured in the same run (a file of the checkpoint's size
written in 64 MiB blocks, then fsync, right before and right after the save: their mean); the target
is checkpoint save throughput >= 50% of it. A process's first save also starts megatron's writer
manager (once per process): timed separately on a tiny checkpoint.
Sizes whose growth would not fit in this machine's memory (old + new model with optimizer state)
skip the growth and say so.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SIZES = {  # (hidden, ffn, heads, layers) with head dim 64, vocabulary 32000
    "10M": (256, 1024, 4, 4),
    "100M": (768, 3072, 12, 12),
    "1B": (2048, 8192, 32, 18),
}


def raw_write(path: str, nbytes: int) -> float:
    """GB/s writing `nbytes` in 64 MiB blocks + fsync (the disk, not the page cache)."""
    block = os.urandom(1 << 20) * 64
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    os.remove(path)
    return nbytes / dt / 1e9


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_size(name: str, work: str, log) -> dict:
    import torch

    from msg_megatron.checkpoint.dist import load_checkpoint, save_checkpoint
    from msg_megatron.config import load_config
    from msg_megatron.model import build_model, count_parameters
    from msg_megatron.optim.optimizer import build_optimizer

    h, f, a, n = SIZES[name]
    over = [f"model.hidden_size={h}", f"model.ffn_hidden_size={f}", f"model.num_attention_heads={a}",
            f"model.num_layers={n}", "model.kv_channels=64", "model.vocab_size=32000", "model.seq_length=256",
            "logging.wandb=disabled"]
    cfg = load_config(None, over)
    model = build_model(cfg.model, cfg.model.shape)
    params = count_parameters(model)
    opt = build_optimizer(model, cfg.train)
    for p in model.parameters():  # AdamW state as after a step (moments filled, step 1)
        opt.set_state(p, {"step": 1.0, "exp_avg": torch.randn_like(p) * 1e-3,
                          "exp_avg_sq": torch.rand_like(p) * 1e-6})
    save = os.path.join(work, name)
    state = {"step": 1, "stage": 0, "consumed_samples": 0}
    raw_before = raw_write(os.path.join(work, "raw.bin"), 12 * params)
    t0 = time.perf_counter()
    path = save_checkpoint(save, model, opt, state, cfg.to_dict(), writers=cfg.checkpoint.writers)
    os.sync()
    t_save = time.perf_counter() - t0
    nbytes = dir_bytes(path)
    # the disk's speed drifts on a VM: measured right before and right after the save, averaged
    raw = (raw_before + raw_write(os.path.join(work, "raw.bin"), nbytes)) / 2
    del opt, model
    gc.collect()  # megatron's DDP wrapper holds reference cycles: free the first copy before the second
    model = build_model(cfg.model, cfg.model.shape, perform_init=False)
    opt = build_optimizer(model, cfg.train)
    t0 = time.perf_counter()
    load_checkpoint(path, model, opt)
    t_load = time.perf_counter() - t0
    del opt, model
    gc.collect()
    res = {"size": name, "shape": [h, f, a, n], "params": params, "bytes": nbytes, "save_s": t_save,
           "save_gbps": nbytes / t_save / 1e9, "load_s": t_load, "load_gbps": nbytes / t_load / 1e9,
           "raw_write_gbps": raw, "save_vs_raw": nbytes / t_save / 1e9 / raw}
    grown = (h + h // 4, f + f // 4, a + a // 4, n)  # width only: hidden, ffn, heads + 25%
    need = 12 * params * (1 + 1.25 ** 2) * 1.3
    if need > mem_available():
        res["grow"] = f"skipped: needs ~{need / 2**30:.0f} GiB (old and grown model with AdamW state), " \
                      f"{mem_available() / 2**30:.0f} GiB available"
    else:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "msg_megatron.grow", "--load", path, "--shape",
                            ",".join(map(str, grown)), "--save", os.path.join(work, f"{name}-grown"), "--no-verify",
                            "--json"], capture_output=True, text=True, cwd=REPO,
                           env=dict(os.environ, WANDB_MODE="disabled"))
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
        res["grow_s"] = time.perf_counter() - t0
        res["grow_to"] = list(grown)
        res["grown_params"] = json.loads(r.stdout.strip().splitlines()[-1])["params"]
    log(f"[bench] {name}: {params / 1e6:.0f}M params, {nbytes / 1e9:.2f} GB: save {t_save:.1f} s "
        f"({res['save_gbps']:.2f} GB/s, {res['save_vs_raw']:.0%} of raw {raw:.2f} GB/s), load {t_load:.1f} s "
        f"({res['load_gbps']:.2f} GB/s)" + (f", msg-grow {res['grow_s']:.1f} s" if "grow_s" in res else ""))
    shutil.rmtree(save, ignore_errors=True)
    shutil.rmtree(os.path.join(work, f"{name}-grown"), ignore_errors=True)
    return res


def first_save_overhead(work: str) -> float:
    """The first save in a process starts megatron's result-queue manager (a spawned Python
    process, once per process); time a tiny save to pay it here, outside the per-size rows."""
    from msg_megatron.checkpoint.dist import save_checkpoint
    from msg_megatron.config import load_config
    from msg_megatron.model import build_model

    cfg = load_config(None, ["model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_attention_heads=2",
                             "model.num_layers=1", "model.vocab_size=128", "logging.wandb=disabled"])
    model = build_model(cfg.model, cfg.model.shape)
    t0 = time.perf_counter()
    save_checkpoint(os.path.join(work, "warmup"), model, None, {"step": 0, "stage": 0, "consumed_samples": 0},
                    cfg.to_dict())
    shutil.rmtree(os.path.join(work, "warmup"), ignore_errors=True)
    return time.perf_counter() - t0


def markdown(rows, meta) -> str:
    out = [f"{meta['date']}, commit {meta['commit']}, {meta['machine']}, checkpoints in `{meta['dir']}`; "
           f"one-off writer start in a fresh process: {meta['first_save_s']:.1f} s (paid by a run's first save, "
           "not in the rows).", "",
           "| model | params | checkpoint | save | save GB/s | raw disk write GB/s | save / raw | load | load GB/s | "
           "msg-grow (+25% width) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        grow = f"{r['grow_s']:.1f} s -> {r['grown_params'] / 1e6:.0f}M" if "grow_s" in r else r["grow"]
        out.append(f"| {r['size']} {tuple(r['shape'])} | {r['params'] / 1e6:.1f}M | {r['bytes'] / 1e9:.2f} GB | "
                   f"{r['save_s']:.1f} s | {r['save_gbps']:.2f} | {r['raw_write_gbps']:.2f} | {r['save_vs_raw']:.0%} | "
                   f"{r['load_s']:.1f} s | {r['load_gbps']:.2f} | {grow} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--dir", default="", help="where checkpoints are written (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from msg_megatron.parallel import initialize_parallel

    initialize_parallel(1, 1)
    work = args.dir or tempfile.mkdtemp(prefix="msg-bench-ckpt-")
    os.makedirs(work, exist_ok=True)
    log = (lambda *_: None) if args.json else print
    first = first_save_overhead(work)
    log(f"[bench] one-off start of megatron's checkpoint writer in a process: {first:.1f} s (not in the rows)")
    rows = [bench_size(s, work, log) for s in args.sizes]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": commit or "unknown", "dir": work, "first_save_s": first,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {mem_available() / 2**30:.0f} GiB available"}
    print(json.dumps({"meta": meta, "rows": rows}) if args.json else markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
