"""Masked LayerNorm/RMSNorm speed, side by side in one run.

    python tools/bench_masked_norm.py [--rows 4096] [--hidden 1024 4096] [--json]

For each hidden size, forward+backward time (median) of: the CPU extension (`cpu-ext`), the
pure-PyTorch masked norm (`torch`), and the unmasked `torch.nn.functional.layer_norm` /
RMSNorm on the same shape. Targets (issue 5): cpu-ext >= 2x faster than torch-masked, and
<= 1.3x the time of the unmasked norm. With `--gpu` (needs a CUDA build and a GPU): achieved memory
bandwidth of the CUDA kernels (bytes that must move / time) as a fraction of the device's
spec-sheet peak, next to torch's fused unmasked layer_norm and a copy of the same tensor, for
hidden 1024-16384, bf16.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from msg_megatron.ops import masked_norm as mn


def timed(fn, x, repeats):
    out = []
    for _ in range(repeats):
        x.grad = None
        t0 = time.perf_counter()
        y = fn(x)
        y.backward(torch.ones_like(y))
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


# Spec-sheet DRAM bandwidth (GB/s) by device-name fragment, for the "% of peak" column.
PEAK_GBS = {"H200": 4800, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
            "A100 80GB": 2039, "A100": 1555, "A800": 2039}


def peak_bandwidth() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_GBS.items() if k in name), None)


def gpu_bandwidth(tokens: int, hiddens, repeats: int = 30, dtype=torch.bfloat16):
    """Per hidden size: GB/s of the masked LayerNorm/RMSNorm kernels (fwd: read x + write y; bwd:
    read x, dy + write dx), of torch's unmasked fused layer_norm on the same shape, and of a copy."""
    out = []
    for d in hiddens:
        x = torch.randn(tokens, d, device="cuda", dtype=dtype)
        dy = torch.randn_like(x)
        m = torch.ones(d, device="cuda")
        m[d * 3 // 4:] = 0.5  # mid-ramp mask: the kernels do the same work for any mask
        w, b = torch.randn(d, device="cuda"), torch.randn(d, device="cuda")
        wt, bt = w.to(dtype), b.to(dtype)

        def cuda_time(fn):
            fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / repeats

        ops = torch.ops.msg_ops
        nbytes = x.numel() * x.element_size()
        row = {"hidden": d, "tokens": tokens}
        y, mean, rstd = ops.masked_layer_norm_fwd(x, m, w, b, 1e-5)
        row["ln_fwd"] = 2 * nbytes / cuda_time(lambda: ops.masked_layer_norm_fwd(x, m, w, b, 1e-5)) / 1e9
        row["ln_bwd"] = 3 * nbytes / cuda_time(lambda: ops.masked_layer_norm_bwd(dy, x, m, w, mean, rstd)) / 1e9
        y, mean, rstd = ops.masked_rms_norm_fwd(x, m, w, 1e-5)
        row["rms_fwd"] = 2 * nbytes / cuda_time(lambda: ops.masked_rms_norm_fwd(x, m, w, 1e-5)) / 1e9
        row["rms_bwd"] = 3 * nbytes / cuda_time(lambda: ops.masked_rms_norm_bwd(dy, x, m, w, mean, rstd)) / 1e9
        if d <= 2048:  # the opt-in warp-per-row kernels (MSG_NORM_WARP_ROWS=1) on the same tensors
            os.environ["MSG_NORM_WARP_ROWS"] = "1"
            try:
                row["warp_ln_fwd"] = 2 * nbytes / cuda_time(lambda: ops.masked_layer_norm_fwd(x, m, w, b, 1e-5)) / 1e9
                row["warp_ln_bwd"] = 3 * nbytes / cuda_time(
                    lambda: ops.masked_layer_norm_bwd(dy, x, m, w, mean, rstd)) / 1e9
                row["warp_rms_fwd"] = 2 * nbytes / cuda_time(lambda: ops.masked_rms_norm_fwd(x, m, w, 1e-5)) / 1e9
                row["warp_rms_bwd"] = 3 * nbytes / cuda_time(
                    lambda: ops.masked_rms_norm_bwd(dy, x, m, w, mean, rstd)) / 1e9
            finally:
                del os.environ["MSG_NORM_WARP_ROWS"]
        # torch's own fused (unmasked) LayerNorm, same shape and dtype, as the bar to match
        xr = x.detach().requires_grad_()
        wr, br = wt.detach().requires_grad_(), bt.detach().requires_grad_()
        yr = F.layer_norm(xr, (d,), wr, br, 1e-5)
        row["torch_ln_fwd"] = 2 * nbytes / cuda_time(lambda: F.layer_norm(x, (d,), wt, bt, 1e-5)) / 1e9
        row["torch_ln_bwd"] = 3 * nbytes / cuda_time(
            lambda: torch.autograd.grad(yr, [xr, wr, br], dy, retain_graph=True)) / 1e9
        row["copy"] = 2 * nbytes / cuda_time(lambda: x.clone()) / 1e9
        out.append(row)
        del x, dy, y, xr, yr
        torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--hidden", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="measure the CUDA kernels' bandwidth instead")
    ap.add_argument("--tokens", type=int, default=32768, help="rows for --gpu (tokens per micro-batch)")
    args = ap.parse_args()
    if args.gpu:
        if mn.backend("cuda") != "cuda":
            ap.error(f"--gpu needs a visible CUDA device and the CUDA extension (backend here: "
                     f"{mn.backend('cuda')}, torch {torch.__version__}); without --gpu this script compares "
                     f"the CPU implementations")
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        peak = peak_bandwidth()
        rows = gpu_bandwidth(args.tokens, [1024, 2048, 4096, 8192, 12288, 16384])
        if args.json:
            print(json.dumps({"device": torch.cuda.get_device_name(), "peak_gbs": peak, "commit": commit, "rows": rows}))
            return
        print(f"{torch.cuda.get_device_name()} (spec peak {peak} GB/s), bf16, {args.tokens} tokens, commit {commit}")
        print("GB/s (% of spec peak); copy = x.clone() on the same tensor")
        print(f"{'hidden':>6s} " + " ".join(f"{k:>14s}" for k in
              ("ln_fwd", "ln_bwd", "rms_fwd", "rms_bwd", "torch_ln_fwd", "torch_ln_bwd", "copy")))
        def line(r, keys):  # GB/s (% of peak) per key
            return f"{r['hidden']:6d} " + " ".join(
                f"{r[k]:7.0f} {f'({r[k] / peak:.0%})' if peak else '':>6s}" for k in keys)

        for r in rows:
            print(line(r, ("ln_fwd", "ln_bwd", "rms_fwd", "rms_bwd", "torch_ln_fwd", "torch_ln_bwd", "copy")))
        warp = [r for r in rows if "warp_ln_fwd" in r]
        if warp:
            print("warp-per-row kernels (MSG_NORM_WARP_ROWS=1), same shapes:")
            for r in warp:
                print(line(r, ("warp_ln_fwd", "warp_ln_bwd", "warp_rms_fwd", "warp_rms_bwd")))
        print("target: masked kernels >= 80% of peak bandwidth")
        return
    if mn.backend("cpu") != "cpu-ext":
        raise SystemExit(f"CPU extension unavailable ({mn.extension_status()}); build it first")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = []
    for kind in ("layernorm", "rmsnorm"):
        for d in args.hidden:
            x = torch.randn(args.rows, d, requires_grad=True)
            w = torch.randn(d, requires_grad=True)
            b = torch.randn(d, requires_grad=True)
            m = torch.cat([torch.ones(d * 3 // 4), torch.linspace(0, 1, d - d * 3 // 4)])  # mid-ramp
            if kind == "layernorm":
                fns = {"cpu-ext": lambda x: mn.masked_layer_norm(x, m, w, b, 1e-5),
                       "torch-masked": lambda x: mn.masked_layer_norm_torch(x, m, w, b, 1e-5),
                       "unmasked": lambda x: F.layer_norm(x, (d,), w, b, 1e-5)}
            else:
                fns = {"cpu-ext": lambda x: mn.masked_rms_norm(x, m, w, 1e-5),
                       "torch-masked": lambda x: mn.masked_rms_norm_torch(x, m, w, 1e-5),
                       "unmasked": lambda x: mn.masked_rms_norm_torch(x, None, w, 1e-5)}
            for fn in fns.values():
                timed(fn, x, 2)  # warm-up
            t = {k: [] for k in fns}
            for _ in range(3):  # interleave rounds so noise hits all alike
                for k, fn in fns.items():
                    t[k].append(timed(fn, x, args.repeats))
            med = {k: min(v) for k, v in t.items()}
            results.append({"norm": kind, "rows": args.rows, "hidden": d, "ms": {k: round(v * 1e3, 3) for k, v in med.items()},
                            "speedup_vs_torch_masked": round(med["torch-masked"] / med["cpu-ext"], 2),
                            "ratio_vs_unmasked": round(med["cpu-ext"] / med["unmasked"], 2)})
    if args.json:
        print(json.dumps({"commit": commit, "threads": torch.get_num_threads(), "results": results}))
        return
    print(f"forward+backward, {args.rows} rows, {torch.get_num_threads()} threads, commit {commit}")
    print(f"{'norm':10s} {'hidden':>6s} {'cpu-ext':>9s} {'torch-masked':>13s} {'unmasked':>9s} {'speed-up':>9s} {'vs unmasked':>12s}")
    for r in results:
        ms = r["ms"]
        print(f"{r['norm']:10s} {r['hidden']:6d} {ms['cpu-ext']:8.2f}ms {ms['torch-masked']:12.2f}ms "
              f"{ms['unmasked']:8.2f}ms {r['speedup_vs_torch_masked']:8.2f}x {r['ratio_vs_unmasked']:11.2f}x")
    print("targets: speed-up >= 2x, vs unmasked <= 1.3x")


if __name__ == "__main__":
    main()
