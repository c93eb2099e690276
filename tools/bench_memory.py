"""Peak host memory (RSS) per process by phase, on CPU/gloo, for every layout, side by side.

    python tools/bench_memory.py [--layouts dp1 dp2 dp2-do dp4 dp4-do tp2 pp2] [--size 120M|tiny] [--json]

Each layout runs under torchrun. In every process the kernel's own peak-RSS counter (VmHWM) is
reset at the start of each phase (`echo 5 > /proc/self/clear_refs`, after `malloc_trim` returned
what earlier phases freed) and read at its end, so each phase's peak is exact, not sampled:
  build     fresh model + optimizer (stage 0: half the layers)
  probe     growth.schedule=auto's probe of the full depth from the 6-layer stage (training/auto_growth.py:
            grown from the check's checkpoint, three steps, the checkpoint loaded back), against the training
            step at the full depth (the candidate's own)
  grow      online growth to the full depth (MSG, AdamW state grown)
  train     three training steps at the full shape: the reference peak
  save      a checkpoint of the full model
  load      a fresh process resuming that checkpoint (the model is built by the load)
  train2    two steps after the load (that process's own reference)
  msg-grow  offline growth (streamed) of the 12-layer checkpoint to twice its depth in the layout's
            own processes (the DP ranks share the layers); at DP1 also of the 6-layer one
  export    msg-export-megatron of the 12-layer checkpoint (with its AdamW state) in one process
            (it streams one layer at a time), against the layout's training step
  import    msg-import-megatron of that export in the layout's own processes (each its shard)
  eval      msg-eval --tasks msg_offline (lm-evaluation-harness, --limit 8) of the 12-layer checkpoint in
            the layout's own processes (each its shard; a 512-piece tokenizer of the embedded corpus put
            beside it, since the benchmark trains on synthetic tokens), against the training step and
            against the load phase (a process resuming the checkpoint for training)
Ratios are to the training-step peak of the same process; B/param is the phase's peak over the
RSS before the model existed, per parameter of the process's shard. `opt MB` is the optimizer's own
state per process (fp32 masters when they are copies, AdamW moments): it should fall as 1/DP with
the distributed optimizer (`-do`).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LAYOUTS = {  # name -> (tensor, pipeline, data-parallel, distributed optimizer)
    "dp1": (1, 1, 1, False), "dp2": (1, 1, 2, False), "dp2-do": (1, 1, 2, True),
    "dp4": (1, 1, 4, False), "dp4-do": (1, 1, 4, True), "tp2": (2, 1, 1, False), "pp2": (1, 2, 1, False),
}
SIZES = {  # final (hidden, ffn, heads, layers), vocabulary: Llama-style, ~123M parameters untied
    "120M": ((768, 2048, 12, 12), 24576),
    "tiny": ((64, 128, 4, 4), 512),
}


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


class Phases:
    """Per-phase peak RSS of this process from the kernel's high-water mark, reset per phase."""

    def __init__(self):
        self.peaks, self.base = {}, _rss_kib()

    def __call__(self, name):
        import contextlib

        @contextlib.contextmanager
        def phase():
            # memory freed by earlier phases goes back to the kernel first, so a phase's peak is its own
            # (glibc keeps freed blocks otherwise, and they would count here)
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := current RSS
            yield
            self.peaks[name] = _hwm_kib()

        return phase()


def config(size: str, tp: int, pp: int, do: bool, save: str, load: str = ""):
    from msg_megatron.config import load_config

    (h, f, a, layers), vocab = SIZES[size]
    half = [h, f, a, layers // 2]
    over = [f"model.vocab_size={vocab}", f"model.hidden_size={h}", f"model.ffn_hidden_size={f}",
            f"model.num_attention_heads={a}", f"model.num_layers={layers}", f"model.kv_channels={h // a}",
            "model.seq_length=128", "model.norm=rmsnorm", "model.activation=swiglu",
            "model.position_embedding=rope", "model.tie_embeddings=false",
            "growth.stages=[{step: 0, shape: %s}, {step: 2, shape: %s}]" % (half, [h, f, a, layers]),
            "growth.ramp_steps=2", "data.corpus=synthetic", "train.steps=8", "train.micro_batch_size=1",
            "train.global_batch_size=4", "train.log_interval=1000", "train.eval_interval=0",
            "logging.wandb=disabled", f"logging.run_dir={save}/run", f"checkpoint.save={save}",
            f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"parallel.distributed_optimizer={str(do).lower()}"]
    if load:
        over.append(f"checkpoint.load={load}")
    return load_config(None, over)


def optimizer_bytes(opt) -> int:
    """The optimizer's own tensors in this process: AdamW state, and fp32 masters that are copies."""
    total = 0
    for group in opt.adamw.param_groups:
        for q in group["params"]:
            st = opt.adamw.state.get(q, {})
            total += sum(v.numel() * v.element_size() for v in st.values() if hasattr(v, "numel") and v.dim())
    return total


def local_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from msg_megatron.model import update_masks
    from msg_megatron.training.auto_growth import AutoSchedule
    from msg_megatron.training.trainer import Trainer

    torch.set_num_threads(1)
    tp, pp, _, do = LAYOUTS[args.layout]
    ph = Phases()
    if args.worker == "train":
        with ph("build"):
            t = Trainer(config(args.size, tp, pp, do, args.dir), log_enabled=False)
        for _ in range(2):
            update_masks(t.model, t.step, t.cfg.growth.ramp_steps)
            t.train_step()
            t.step += 1
        with ph("save-half"):  # the 6-layer checkpoint (for msg-grow), before the growth
            t.save()
        with ph("probe"):  # auto's probe of the full depth from this checkpoint, then loading it back
            auto_cfg = copy.deepcopy(t.cfg)
            auto_cfg.growth.stages = auto_cfg.growth.stages[:t.stage + 1]
            auto_cfg.growth.auto.probe_steps, shape, path = 3, t.model.shape, t._last_saved_path
            auto = AutoSchedule(auto_cfg, {"check": {"step": t.step, "from": os.path.basename(path),
                                                     "consumed": t.consumed_samples, "current": {}}})
            auto._probe(t, t.cfg.model.shape, path, shape)
            auto._load(t, shape, path)
        with ph("grow"):
            t.grow(1)
        with ph("train"):
            for _ in range(3):
                update_masks(t.model, t.step, t.cfg.growth.ramp_steps)
                t.train_step()
                t.step += 1
        with ph("save"):
            t.save()
    else:  # load
        with ph("load"):
            t = Trainer(config(args.size, tp, pp, do, args.dir + "-resumed", load=args.load), log_enabled=False)
        with ph("train2"):
            for _ in range(2):
                update_masks(t.model, t.step, t.cfg.growth.ramp_steps)
                t.train_step()
                t.step += 1
    out = {"peaks_kib": ph.peaks, "base_kib": ph.base, "params": local_params(t.model),
           "opt_bytes": optimizer_bytes(t.optimizer)}
    world = dist.get_world_size()
    parts = [None] * world
    dist.all_gather_object(parts, out)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(parts))


def cli_worker(args) -> None:
    """One CLI (msg-grow, msg-export-megatron, msg-import-megatron) in this process (one of its
    torchrun processes), its peak from the kernel's high-water mark; rank 0 prints every process's."""
    import importlib

    import torch.distributed as dist

    base = _rss_kib()
    importlib.import_module(f"msg_megatron.{args.tool}")._main(args.rest)
    out = {"peak_kib": _hwm_kib(), "base_kib": base}
    parts = [out]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, out)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print("RESULT " + json.dumps(parts))


def _tokenizer(tmp: str) -> str:
    """A 512-piece sentencepiece model of the embedded corpus (for msg-eval's tasks)."""
    from msg_megatron.data.prepare import prepare_embedded

    return os.path.join(prepare_embedded(os.path.join(tmp, "data"), 0.3, 512, 0.05, log=lambda *_: None),
                        "tokenizer.model")


def _torchrun(n: int, argv, env) -> str:  # the RESULT line's JSON
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(port),
           os.path.abspath(__file__)] + argv
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{r.stderr[-4000:]}")
    return [line for line in r.stdout.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--size", default="120M", choices=list(SIZES))
    ap.add_argument("--no-msg-grow", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-megatron-lm", action="store_true", help="skip msg-export/import-megatron")
    ap.add_argument("--no-eval", action="store_true", help="skip msg-eval --tasks")
    ap.add_argument("--worker", choices=["train", "load", "cli"], help=argparse.SUPPRESS)
    ap.add_argument("--tool", default="grow", help=argparse.SUPPRESS)
    ap.add_argument("--layout", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--load", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "cli":
        return cli_worker(args)
    if args.worker:
        return worker(args)
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.layouts:
            tp, pp, dp, do = LAYOUTS[name]
            n = tp * pp * dp
            ck = os.path.join(tmp, name)
            common = ["--layout", name, "--size", args.size, "--dir", ck]
            a = json.loads(_torchrun(n, ["--worker", "train"] + common, env))
            b = json.loads(_torchrun(n, ["--worker", "load", "--load", os.path.join(ck, "step_000005")] + common, env))
            for rank, (ra, rb) in enumerate(zip(a, b)):
                ref, ref2 = ra["peaks_kib"]["train"], rb["peaks_kib"]["train2"]
                row = {"layout": name, "rank": rank, "params": ra["params"], "opt_mb": ra["opt_bytes"] / 2**20,
                       "train_mb": ref / 1024}
                for ph, v, r, base in [(k, v, ref, ra["base_kib"]) for k, v in ra["peaks_kib"].items()] + \
                        [(k, v, ref2, rb["base_kib"]) for k, v in rb["peaks_kib"].items()]:
                    row[ph] = {"mb": v / 1024, "ratio": v / r, "b_per_param": (v - base) * 1024 / ra["params"]}
                rows.append(row)
            if not args.no_msg_grow:  # DP1: both depths; other layouts: 12 -> 24 layers in that layout
                (h, f, a_, layers), _ = SIZES[args.size]
                runs = ((("step_000002", layers), ("step_000005", 2 * layers)) if name == "dp1"
                        else (("step_000005", 2 * layers),))
                for src, depth in runs:
                    out = os.path.join(tmp, f"grown-{name}-{depth}")
                    g = json.loads(_torchrun(n, ["--worker", "cli", "--tool", "grow", "--", "--load",
                                                 os.path.join(ck, src), "--shape",
                                                 f"{h},{f},{a_},{depth}", "--save", out, "--no-verify",
                                                 "--tensor", str(tp), "--pipeline", str(pp)], env))
                    for rank, gr in enumerate(g):
                        ref = next(r for r in rows if r["layout"] == name and r["rank"] == rank)["train_mb"]
                        rows.append({"layout": name, "rank": rank, "msg-grow": f"{depth // 2}->{depth} layers",
                                     "peak_mb": gr["peak_kib"] / 1024, "ref_train_mb": ref})
            if not args.no_megatron_lm:  # one process exports; the layout's processes import
                mlm, back = os.path.join(tmp, f"mlm-{name}"), os.path.join(tmp, f"back-{name}")
                e = json.loads(_torchrun(1, ["--worker", "cli", "--tool", "export_megatron", "--", "--load",
                                             os.path.join(ck, "step_000005"), "--out", mlm, "--no-verify",
                                             "--tensor", str(tp), "--pipeline", str(pp)], env))
                i = json.loads(_torchrun(n, ["--worker", "cli", "--tool", "import_megatron", "--", "--load", mlm,
                                             "--save", back, "--tensor", str(tp), "--pipeline", str(pp)], env))
                for tool, res in (("export", e), ("import", i)):
                    for rank, gr in enumerate(res):
                        ref = next(r for r in rows if r["layout"] == name and r["rank"] == rank)["train_mb"]
                        rows.append({"layout": name, "rank": rank, "tool": tool, "peak_mb": gr["peak_kib"] / 1024,
                                     "ref_train_mb": ref})
            if not args.no_eval:  # lm-eval's tasks on the checkpoint, each process holding its shard
                step = os.path.join(ck, "step_000005")
                shutil.copy(_tokenizer(tmp), os.path.join(step, "tokenizer.model"))
                ev = json.loads(_torchrun(n, ["--worker", "cli", "--tool", "eval", "--", "--load", step, "--tasks",
                                              "msg_offline", "--limit", "8", "--no-verify", "--tensor", str(tp),
                                              "--pipeline", str(pp), "--json"], env))
                for rank, gr in enumerate(ev):
                    row = next(r for r in rows if r["layout"] == name and r["rank"] == rank)
                    rows.append({"layout": name, "rank": rank, "tool": "eval", "peak_mb": gr["peak_kib"] / 1024,
                                 "ref_train_mb": row["train_mb"], "ref_load_mb": row["load"]["mb"]})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"# peak RSS per process (MB) and ratio to the training-step peak; {platform.node()}, "
          f"{os.cpu_count()} cores, size {args.size}")
    cols = ["build", "probe", "grow", "train", "save", "load", "train2"]
    print(f"{'layout':8} {'rank':>4} {'params':>11} {'opt MB':>8} " + " ".join(f"{c:>15}" for c in cols))
    for r in rows:
        if "msg-grow" in r:
            print(f"{r['layout']:8} {r['rank']:>4} msg-grow {r['msg-grow']}: peak {r['peak_mb']:.0f} MB "
                  f"({r['peak_mb'] / r['ref_train_mb']:.2f}x this layout's training step)")
            continue
        if r.get("tool") == "eval":
            print(f"{r['layout']:8} {r['rank']:>4} msg-eval --tasks: peak {r['peak_mb']:.0f} MB "
                  f"({r['peak_mb'] / r['ref_train_mb']:.2f}x this rank's training step, "
                  f"{r['peak_mb'] / r['ref_load_mb']:.2f}x its load for training)")
            continue
        if "tool" in r:
            print(f"{r['layout']:8} {r['rank']:>4} msg-{r['tool']}-megatron: peak {r['peak_mb']:.0f} MB "
                  f"({r['peak_mb'] / r['ref_train_mb']:.2f}x this rank's training step)")
            continue
        cells = [f"{r[c]['mb']:7.0f} {r[c]['ratio']:5.2f}x " if c in r else f"{'-':>15}" for c in cols]
        print(f"{r['layout']:8} {r['rank']:>4} {r['params']:>11,} {r['opt_mb']:>8.0f} " + " ".join(cells))


if __name__ == "__main__":
    main()
