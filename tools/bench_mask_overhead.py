"""Step time of a masked model mid-ramp and after folding, against the same shape with no masks.

    python tools/bench_mask_overhead.py [--hidden 256 --ffn 1024 --heads 8 --layers 4 --seq 256 --batch 8]

Three models of the same final shape and weights, timed side by side in one run (interleaved
repeats, median of each): `plain` is built at the final shape (its masks were never active),
`mid-ramp` is grown from a smaller shape in every dimension with all masks at 0.5, `folded` is
the grown model after its ramp ended. Targets (issue 2): folded <= 1.02x plain, mid-ramp <= 1.15x.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import torch

from msg_megatron.config import ModelConfig, Shape, TrainConfig
from msg_megatron.growth.operators import grow_model
from msg_megatron.model import build_model, update_masks
from msg_megatron.parallel import initialize_parallel
from msg_megatron.optim.optimizer import build_optimizer


def step_time(model, opt, tokens, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.ddp(tokens[:, :-1], tokens[:, 1:]).mean().backward()
        opt.finish_grad_sync()
        opt.step(1e-3)
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--norm", default="layernorm")
    ap.add_argument("--activation", default="gelu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    initialize_parallel()
    final = Shape(args.hidden, args.ffn, args.heads, args.layers)
    small = Shape(args.hidden * 3 // 4, args.ffn // 2, args.heads // 2, max(1, args.layers // 2))
    mcfg = ModelConfig(vocab_size=2048, hidden_size=final.hidden, ffn_hidden_size=final.ffn,
                       num_attention_heads=final.heads, num_layers=final.layers, kv_channels=final.hidden // final.heads,
                       seq_length=args.seq, norm=args.norm, activation=args.activation)
    tcfg = TrainConfig()
    grown, _ = grow_model(build_model(mcfg, small), final, step=0)
    update_masks(grown, 50, 100)  # every new entry at 0.5: the masked path everywhere
    folded, _ = grow_model(build_model(mcfg, small), final, step=0)
    update_masks(folded, 100, 100)  # ramp over: folded
    plain = build_model(mcfg, final)
    models = {"plain": plain, "mid-ramp": grown, "folded": folded}
    opts = {k: build_optimizer(m.train(), tcfg) for k, m in models.items()}
    tokens = torch.randint(0, 2048, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    times = {k: [] for k in models}
    for k in models:  # warm-up
        step_time(models[k], opts[k], tokens, 1)
    names = list(models)
    for r in range(args.rounds):  # interleave, rotating the order, so noise and order effects hit all alike
        for k in names[r % 3:] + names[:r % 3]:
            times[k] += step_time(models[k], opts[k], tokens, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"shape": list(final.as_tuple()), "grown_from": list(small.as_tuple()), "seq": args.seq,
              "batch": args.batch, "threads": torch.get_num_threads(), "commit": commit,
              "step_s": {k: round(v, 5) for k, v in med.items()},
              "ratio_mid_ramp": round(med["mid-ramp"] / med["plain"], 3),
              "ratio_folded": round(med["folded"] / med["plain"], 3)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"shape {final} (grown from {small}), batch {args.batch} x seq {args.seq}, "
              f"{result['threads']} threads, commit {commit}")
        for k in models:
            print(f"  {k:9s} {med[k] * 1e3:8.1f} ms/step   {med[k] / med['plain']:.3f}x plain")
        print(f"targets: folded <= 1.02x ({'met' if result['ratio_folded'] <= 1.02 else 'MISSED'}), "
              f"mid-ramp <= 1.15x ({'met' if result['ratio_mid_ramp'] <= 1.15 else 'MISSED'})")


if __name__ == "__main__":
    main()
