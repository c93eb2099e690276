"""The data path at corpus scale on this machine, side by side with what training needs.

    python tools/bench_data.py [--tokens 1e9] [--corpora 3] [--seq 2048] [--dir DIR] [--quick] [--json OUT]

1. Writes a synthetic blend: `--corpora` Megatron-LM prefixes of `--tokens` tokens in all (random
   documents of 50-4000 tokens, uint16), weights 0.5 / 0.3 / 0.2 ...
2. **Index build** in a fresh process: msg-megatron's data (megatron's GPTDataset per corpus and its
   BlendedDataset, data/gpt_data.py) for one pass over the blend at `--seq`: wall time and the
   process's peak RSS (VmHWM), then the same process opening the cached indices again.
3. **Loader speed**: samples/s drawn the way the trainer draws them (micro-batches of consecutive
   sample numbers at random positions of the run), against the samples/s the GPT-2 preset's step
   consumes on this machine (configs/gpt2_full.yaml's model, one forward+backward of a micro-batch,
   timed): the ratio must be >= 20.
4. **Dataset memory per rank**: in fresh processes, the anonymous (private) RSS the dataset objects
   hold, opened from the cache with 1000 samples read, freed heap returned (malloc_trim), against
   the former loader (the mapped files are page cache, shared by a node's ranks, and RssFile also
   counts torch's library pages as they fault in, so it is not reported), `TokenWindows` (a full permutation of every
   window in each process, kept below verbatim for this comparison), over the same corpora.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _trimmed(key: str) -> int:
    """_status after returning freed heap to the OS (malloc_trim): what is still held."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return _status(key)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


# ---- the former loader (msg_megatron/data/loader.py before issue 20), for the RSS comparison ----
class TokenWindows:
    def __init__(self, prefix: str, seq_length: int, seed: int = 1234):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ds = IndexedDataset(prefix, mmap=True)
        self.tokens = np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r")
        self.seq_length, self.seed = seq_length, seed
        self.num_samples = (len(self.tokens) - 1) // seq_length
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng(self.seed + 7919 * epoch)
            self._perm, self._perm_epoch = rng.permutation(self.num_samples), epoch
        return self._perm

    def window(self, sample: int) -> np.ndarray:
        epoch, i = divmod(sample, self.num_samples)
        start = int(self._order(epoch)[i]) * self.seq_length
        return np.asarray(self.tokens[start:start + self.seq_length + 1], dtype=np.int64)


# ---- 1. the corpora ----
def write_corpus(prefix: str, tokens: int, seed: int, vocab: int = 50257) -> None:
    """`tokens` random tokens in documents of 50-4000 tokens (EOD 0), written straight to .bin/.idx in
    megatron's format (its _IndexWriter), in chunks."""
    from megatron.core.datasets.indexed_dataset import _IndexWriter

    rng = np.random.default_rng(seed)
    lengths = []
    total = 0
    while total < tokens:
        n = rng.integers(50, 4000, 65536)
        lengths.append(n)
        total += int(n.sum())
    lengths = np.concatenate(lengths)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), tokens) + 1]
    with open(prefix + ".bin", "wb") as f:
        left = int(lengths.sum())
        while left:
            n = min(left, 1 << 24)
            chunk = rng.integers(1, vocab, n, dtype=np.uint16)
            f.write(chunk.tobytes())
            left -= n
    with _IndexWriter(prefix + ".idx", np.uint16) as w:
        w.write(lengths.astype(np.int32).tolist(), None, list(range(len(lengths) + 1)))


# ---- 2./3./4. measured in fresh processes ----
CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
spec = json.loads(sys.argv[2])
from bench_data import _status, _trimmed
import numpy as np
import torch
import megatron.core  # (imports first: the figures below are the datasets', not megatron's import)
from megatron.core.datasets import blended_dataset, gpt_dataset, indexed_dataset  # noqa: F401
base_rss = _trimmed("RssAnon")
if spec["what"] == "ours":
    import torch
    torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % spec["port"], rank=0, world_size=1)
    from msg_megatron.config import load_config
    from msg_megatron.data.gpt_data import build_samples
    cfg = load_config(None, spec["overrides"])
    torch.ones(1).sum()  # (torch's lazy first-op allocations, before the baseline)
    base_rss = _trimmed("RssAnon")
    t0 = time.perf_counter()
    train, _, _ = build_samples(cfg, 0, spec["cache"], train=True)
    build_s = time.perf_counter() - t0
    peak = _status("VmHWM")
    rng = np.random.default_rng(0)
    firsts = rng.integers(0, train.num_samples - spec["mbs"], spec["draws"] // spec["mbs"])
    t0 = time.perf_counter()
    for f in firsts:
        train.batch(int(f), spec["mbs"])
    per_s = len(firsts) * spec["mbs"] / (time.perf_counter() - t0)
    for i in range(1000):
        train.window(int(rng.integers(0, train.num_samples)))
    print(json.dumps({"build_s": build_s, "build_peak_rss": peak, "samples": train.num_samples,
                      "samples_per_s": per_s, "rss_added": _trimmed("RssAnon") - base_rss}))
elif spec["what"] == "tokenwindows":
    from bench_data import TokenWindows
    torch.ones(1).sum()
    base_rss = _trimmed("RssAnon")
    ws = [TokenWindows(p, spec["seq"]) for p in spec["prefixes"]]
    rng = np.random.default_rng(0)
    for i in range(1000):
        w = ws[i % len(ws)]
        w.window(int(rng.integers(0, w.num_samples)))
    print(json.dumps({"rss_added": _trimmed("RssAnon") - base_rss, "windows": sum(w.num_samples for w in ws)}))
else:  # the GPT-2 preset's consumption: one micro-batch forward + backward
    import torch
    torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % spec["port"], rank=0, world_size=1)
    from msg_megatron.config import load_config
    from msg_megatron.model import build_model
    from msg_megatron.parallel import initialize_parallel
    cfg = load_config(os.path.join(sys.argv[1], "..", "configs", "gpt2_full.yaml"), [])
    initialize_parallel(1, 1, 1)
    model = build_model(cfg.model, cfg.model.shape)
    b = spec["mbs"]
    tokens = torch.randint(0, cfg.model.vocab_size, (b, cfg.model.seq_length + 1))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        model(tokens[:, :-1], tokens[:, 1:]).mean().backward()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"micro_batch": b, "seconds": min(times[1:]), "samples_per_s": b / min(times[1:]),
                      "seq_length": cfg.model.seq_length}))
"""


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(spec: dict) -> dict:
    spec = dict(spec, port=_port())
    r = subprocess.run([sys.executable, "-c", CHILD, os.path.join(REPO, "tools"), json.dumps(spec)],
                       capture_output=True, text=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="2"))
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=float, default=1e9)
    ap.add_argument("--corpora", type=int, default=3)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--dir", default="")
    ap.add_argument("--quick", action="store_true", help="3e7 tokens (CI)")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args()
    tokens = int(3e7 if args.quick else args.tokens)
    work = args.dir or tempfile.mkdtemp(prefix="bench-data-")
    os.makedirs(work, exist_ok=True)
    weights = [0.5, 0.3, 0.2][: args.corpora] if args.corpora <= 3 else [1.0] * args.corpora
    prefixes = [os.path.join(work, f"corpus{i}_text_document") for i in range(args.corpora)]
    t0 = time.perf_counter()
    for i, p in enumerate(prefixes):
        if not (os.path.exists(p + ".idx") and os.path.getsize(p + ".bin") >= 2 * tokens // args.corpora):
            write_corpus(p, tokens // args.corpora, seed=i)
    write_s = time.perf_counter() - t0
    mbs, gbs = 4, 256
    steps = max(tokens // args.seq // gbs, 1)
    blend = "[" + ", ".join(f"{w}, {p}" for w, p in zip(weights, prefixes)) + "]"
    overrides = ["model.vocab_size=50257", "model.hidden_size=768", "model.ffn_hidden_size=3072",
                 "model.num_attention_heads=12", "model.num_layers=12", f"model.seq_length={args.seq}",
                 "growth.stages=[]", f"train.steps={steps}", f"train.global_batch_size={gbs}",
                 f"train.micro_batch_size={mbs}", f"data.paths={blend}", "data.tokenizer=unused.model",
                 f"data.index_cache={work}/index-cache", "data.split=99,1,0"]
    cache = os.path.join(work, "index-cache")
    if os.path.isdir(cache):
        import shutil

        shutil.rmtree(cache)
    spec = {"what": "ours", "overrides": overrides, "cache": work, "mbs": mbs, "draws": 20_000}
    built = child(spec)  # builds the indices
    reopened = child(spec)  # a rank that finds them cached
    old = child({"what": "tokenwindows", "prefixes": prefixes, "seq": args.seq})
    gpt2 = child({"what": "gpt2", "mbs": 2})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip() or "unknown"
    res = {"date": time.strftime("%Y-%m-%d"), "commit": commit,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
           "tokens": tokens, "corpora": args.corpora, "weights": weights, "seq_length": args.seq,
           "write_s": write_s, "build": built, "reopen": reopened, "tokenwindows": old, "gpt2_step": gpt2,
           "loader_vs_gpt2": reopened["samples_per_s"] / gpt2["samples_per_s"]}
    gib, mib = 1024 ** 3, 1024 ** 2
    print(f"blend of {args.corpora} corpora, {tokens / 1e9:.2f}B tokens, seq {args.seq}, {built['samples']:,} samples "
          f"(written in {write_s:.0f} s)")
    print(f"index build (megatron GPTDataset + BlendedDataset, rank 0): {built['build_s']:.1f} s, peak RSS "
          f"{built['build_peak_rss'] / gib:.2f} GiB; reopened from the cache: {reopened['build_s']:.2f} s")
    print(f"loader: {reopened['samples_per_s']:,.0f} samples/s vs the GPT-2 preset's step consuming "
          f"{gpt2['samples_per_s']:.2f} samples/s ({gpt2['micro_batch']} x {gpt2['seq_length']} in {gpt2['seconds']:.2f} s): "
          f"{res['loader_vs_gpt2']:,.0f}x (>= 20x needed)")
    print(f"dataset memory per rank (anonymous RSS held, 1000 samples read): {reopened['rss_added'] / mib:.2f} MiB vs "
          f"TokenWindows {old['rss_added'] / mib:.2f} MiB ({old['windows']:,} windows permuted in memory, 8 B each: "
          f"{8 * 300e9 / args.seq / gib:.2f} GiB per rank at 300B tokens)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
