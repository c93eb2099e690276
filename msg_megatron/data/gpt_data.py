"""Training and validation samples through megatron-core's datasets: GPTDataset per corpus, megatron's
BlendedDataset per mixture, resumable by the number of samples consumed.

- **A corpus** (one prefix's train or validation documents; `data.split` divides each prefix by
  documents with megatron's own rounding) is a sequence of epochs, epoch e a megatron `GPTDataset`
  of one epoch shuffled with seed + e (document-aware sample index, built once into the index
  cache and memory-mapped by every rank). Its sample k is epoch k // n's sample k % n: what a
  sample is never depends on how long the run is, so extending train.steps keeps the order.
- **A mixture**: the stages that train on the same blend form a segment; its samples are megatron's
  `BlendedDataset` over the segment's corpora (its blending indices, also cached and mapped), where
  each corpus continues from the samples earlier segments drew from it. The greedy blending of
  megatron's `build_blending_indices` is prefix-stable, so a longer segment only appends samples.
- **Sample numbers**: global sample s (the trainer's consumed-sample count, DP ranks reading
  disjoint contiguous ranges) falls in the segment whose stages consumed it; nothing else is state.

Global rank 0 builds every index into a temporary directory and renames the files into
`data.index_cache` (a crash never leaves a partial index that looks complete), every other rank
waits at megatron's barrier and maps them; rank 0 then maps them too instead of keeping its
in-memory copies (at 300B tokens the indices are GBs).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..config.blend_syntax import Blend, parse_blend, parse_split
from ..parallel import barrier, is_logging_rank
from .blends import check_prefix
from .errors import DataError

_HUGE = 1 << 62  # a corpus's length for megatron's BlendedDataset: epochs repeat without end


class _DatasetTokenizer:
    """What megatron's GPTDatasetConfig reads of a tokenizer: the EOD id and the vocabulary size (no
    `pad`: megatron then pads with -1, which no token equals)."""

    def __init__(self, eod: int, vocab_size: int):
        self.eod, self.vocab_size = eod, vocab_size
        self.unique_identifiers = {"class": "msg-megatron", "eod": eod, "vocab_size": vocab_size}


class _IndexCache:
    """megatron's `path_to_cache`, written atomically: rank 0 builds into a temporary directory,
    then each file is renamed into place with the description (what megatron's cache check reads
    first) last."""

    def __init__(self, path: str):
        self.path = path

    def build(self, make):
        """make(path_to_cache, building) on every rank: rank 0 first with building=True into a
        temporary directory, then every rank with building=False from the final cache (a cache
        hit: mapped, not held). A rank that finds the files missing was given a cache directory
        rank 0 does not write to: named, with the fix."""
        built = None
        if is_logging_rank():  # (global rank 0: where megatron's GPTDataset builds)
            os.makedirs(self.path, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".building-", dir=self.path)
            try:
                built = len(make(tmp, True))
                names = sorted(os.listdir(tmp), key=lambda n: n.endswith("description.txt"))
                for name in names:
                    os.replace(os.path.join(tmp, name), os.path.join(self.path, name))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        try:
            out = make(self.path, False)
        except FileNotFoundError as e:
            raise DataError(f"the dataset index cache `{self.path}` lacks `{os.path.basename(e.filename or '')}`, which "
                            "global rank 0 built there: data.index_cache must be a directory every node sees (a "
                            "shared filesystem)") from None
        if built is not None and len(out) != built:  # (a tripwire: opening what was just renamed must hit)
            raise DataError(f"the dataset index cache `{self.path}` changed while this run opened it ({len(out)} "
                            f"samples, {built} built); is another job writing it?")
        return out


def split_range(n: int, fractions: Optional[List[float]], which) -> Tuple[int, int]:
    """Documents [beg, end) of split `which` (megatron's Split) under data.split `fractions` with
    megatron's rounding (blended_megatron_dataset_builder); None: the whole file."""
    if not fractions:
        return 0, n
    lo = sum(fractions[:which.value])
    return int(round(lo * n)), int(round((lo + fractions[which.value]) * n))


def split_key(fractions: Optional[List[float]], split: str) -> str:
    """The split string megatron's cache key holds (a whole file as its split: the key says which;
    the document range is what counts)."""
    return (",".join(f"{f:.6g}" for f in fractions) if fractions
            else "1,0,0" if split == "train" else "0,1,0")


def _config(cfg, cache: str, tok: _DatasetTokenizer, seed: int, prefix: str, split: str):
    """megatron's dataset config for one prefix; `split` (train,valid,test) is part of the cache key."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(random_seed=seed, sequence_length=cfg.model.seq_length, blend=([prefix], None),
                            split=split, path_to_cache=cache, tokenizer=tok, reset_position_ids=False,
                            reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
                            mmap_bin_files=True)


class Corpus:
    """One prefix's documents of one split as epochs of megatron GPTDatasets (see the module doc)."""

    def __init__(self, prefix: str, split: str, fractions: Optional[List[float]], cfg, cache: _IndexCache,
                 tok: _DatasetTokenizer):
        from megatron.core.datasets.gpt_dataset import GPTDataset
        from megatron.core.datasets.utils import Split

        self.prefix, self.split, self.cfg, self.cache, self.tok = os.path.realpath(prefix), split, cfg, cache, tok
        self.split_key = split_key(fractions, split)
        conf = _config(cfg, cache.path, tok, cfg.train.seed, self.prefix, self.split_key)
        self.low = GPTDataset.build_low_level_dataset(self.prefix, conf)  # the IndexedDataset, memory-mapped
        self.which = {"train": Split.train, "valid": Split.valid}[split]
        self.documents = split_range(self.low.sequence_lengths.shape[0], fractions, self.which)
        self.epochs: list = []
        self.ensure(1)
        self.n = len(self.epochs[0])

    def _epoch(self, e: int):
        from megatron.core.datasets.gpt_dataset import GPTDataset

        def make(path, building):
            conf = _config(self.cfg, path, self.tok, self.cfg.train.seed + e, self.prefix, self.split_key)
            # megatron reads the document indices only to build; opened from the cache it keeps them
            # unused: a zero-stride stand-in of the same length (4 B per document per epoch otherwise)
            beg, end = self.documents
            docs = (np.arange(beg, end, dtype=np.int32) if building
                    else np.broadcast_to(np.zeros(1, dtype=np.int32), (end - beg,)))
            return GPTDataset(self.low, self.prefix, docs, None, self.which, conf)
        return self.cache.build(make)

    def ensure(self, epochs: int) -> None:
        """Build epochs up to `epochs` (every rank, in the same order: rank 0 first)."""
        while len(self.epochs) < epochs:
            self.epochs.append(self._epoch(len(self.epochs)))

    def __getitem__(self, k: int) -> np.ndarray:
        e, j = divmod(int(k), self.n)
        item = self.epochs[e][j]  # megatron's sample: tokens and labels, shifted by one
        return np.concatenate([item["tokens"].numpy(), item["labels"][-1:].numpy()])

    @property
    def identity(self) -> dict:
        return {"prefix": self.prefix, "split": self.split, "range": self.split_key}


class _Continued:
    """A corpus seen from sample `start` on, as a dataset of megatron's BlendedDataset."""

    def __init__(self, corpus: Corpus, start: int):
        self.corpus, self.start = corpus, start
        self.index_split = corpus.epochs[0].index_split
        self.unique_identifiers = dict(corpus.identity, start=start, epoch_samples=corpus.n)

    def __len__(self) -> int:
        return _HUGE

    def __getitem__(self, k: int) -> dict:
        return {"text": self.corpus[self.start + k]}


class Segment:
    """`size` samples from `blend`'s corpora (each continuing at `starts`), megatron-blended."""

    def __init__(self, corpora: List[Corpus], weights: List[float], starts: List[int], size: int, cfg,
                 cache: _IndexCache, tok: _DatasetTokenizer):
        from megatron.core.datasets.blended_dataset import BlendedDataset

        self.corpora, self.starts, self.size = corpora, starts, size
        if len(corpora) == 1:
            self.blended, self.draws = None, [size]
        else:
            views = [_Continued(c, s) for c, s in zip(corpora, starts)]
            self.blended = cache.build(lambda path, _: BlendedDataset(
                views, weights, size, _config(cfg, path, tok, cfg.train.seed, corpora[0].prefix, corpora[0].split_key)))
            self.draws = _counts(self.blended.dataset_index, len(corpora))

    def __getitem__(self, i: int) -> np.ndarray:
        if self.blended is None:
            return self.corpora[0][self.starts[0] + i]
        return self.blended[i]["text"]


def _counts(index, n: int, chunk: int = 1 << 22) -> List[int]:
    """How often each of n values occurs in a mapped index, a chunk at a time (at 300B tokens the
    index has ~146M entries: a whole-array bincount would hold 1.2 GB of int64 on every rank)."""
    out = np.zeros(n, dtype=np.int64)
    for start in range(0, len(index), chunk):
        out += np.bincount(np.asarray(index[start:start + chunk]), minlength=n)
    return out.tolist()


class Samples:
    """Global sample numbers -> token windows [seq_length + 1] over segments (the trainer's interface:
    `batch`, `sequential`, `num_samples`); `masked` (BERT): masked-LM samples [6, seq_length]
    (mlm_data.FIELDS)."""

    def __init__(self, segments: List[Tuple[int, Segment]], seq_length: int, num_samples: int,
                 masked: bool = False):
        self.segments, self.seq_length, self.num_samples, self.masked = segments, seq_length, num_samples, masked
        self._firsts = [first for first, _ in segments]

    def locate(self, sample: int) -> Tuple[int, int]:
        k = int(np.searchsorted(self._firsts, sample, side="right")) - 1
        first, seg = self.segments[k]
        if sample - first >= seg.size:
            raise IndexError(f"sample {sample} is past the {first + seg.size} samples the data was built for "
                             "(train.steps x the batch sizes); this is a bug")
        return k, sample - first

    def window(self, sample: int) -> np.ndarray:
        k, i = self.locate(sample)
        return self.segments[k][1][i]  # (int64 already: megatron's tokens)

    def batch(self, first_sample: int, size: int) -> torch.Tensor:
        """Samples first_sample .. first_sample+size-1 as a [size, seq_length + 1] tensor (masked:
        [size, 6, seq_length])."""
        return torch.from_numpy(np.stack([self.window(first_sample + k) for k in range(size)]))

    def describe(self) -> str:
        """One line: samples, segments, and each corpus's epochs."""
        epochs = {}
        for _, seg in self.segments:
            for c in seg.corpora:
                epochs[c.prefix] = len(c.epochs)
        what = f"masked-LM samples of {self.seq_length}" if self.masked else f"samples of {self.seq_length + 1}"
        return (f"{self.num_samples:,} {what} tokens in {len(self.segments)} segment(s); "
                + ", ".join(f"{os.path.basename(p)}: {e} epoch(s)" for p, e in epochs.items()))

    def sequential(self, size: int, max_batches: int):
        """The first batches of the samples in order (validation), at most `max_batches`."""
        for b in range(min(self.num_samples // size, max_batches)):
            yield self.batch(b * size, size)


def stage_sample_starts(cfg) -> List[int]:
    """The global sample number at which each growth stage's first step begins, and the run's end."""
    sched = cfg.schedule()
    starts, samples = [], 0
    for i, (step, _) in enumerate(sched):
        starts.append(samples)
        end = sched[i + 1][0] if i + 1 < len(sched) else cfg.train.steps
        samples += max(end - step, 0) * cfg.batch_size(i)
    return starts + [samples]


def stage_blends(cfg) -> List[Blend]:
    """The training blend of each stage: its own `data`, else the previous stage's, else data.paths."""
    current = parse_blend(cfg.data.paths, "data.paths")
    out = []
    for i, st in enumerate(cfg.growth.stages or [None]):
        own = parse_blend(st.data, f"growth.stages[{i}].data") if st is not None else []
        current = own or current
        out.append(current)
    return out


def data_identity(config: dict) -> dict:
    """What decides which sample a sample number is, from a config dict (this run's, or the one a
    checkpoint saved): the sources, split, sequence length and seed, and with per-stage data the
    stages' data, steps and batch sizes (they place the switches)."""
    d, t = config.get("data", {}), config.get("train", {})
    stages = config.get("growth", {}).get("stages", [])
    out = {"corpus": d.get("corpus"), "corpus_mb": d.get("corpus_mb"), "valid_fraction": d.get("valid_fraction"),
           "paths": d.get("paths"), "split": d.get("split", "969,30,1"), "valid_paths": d.get("valid_paths"),
           "seq_length": config.get("model", {}).get("seq_length"), "seed": t.get("seed")}
    if any(st.get("data") for st in stages):
        out["stages"] = [(st.get("step"), st.get("global_batch_size") or t.get("global_batch_size"), st.get("data"))
                         for st in stages]
    return out


def build_samples(cfg, eod: int, cache_dir: str, train_prefixes: Optional[Blend] = None,
                  valid_prefixes: Optional[Blend] = None, train: bool = True, mlm=None
                  ) -> Tuple[Optional[Samples], Optional[Samples], Optional[str]]:
    """(training samples over the whole schedule or None when not `train`, validation samples or
    None, why there are none).

    With data.paths: the stages' blends, split by data.split (or validation from data.valid_paths).
    Otherwise `train_prefixes` / `valid_prefixes` (a prepared directory's train and valid files),
    each used whole. `mlm` (BERT: sources._mlm_corpora's factory, (prefix, split, fractions, index
    cache) -> an mlm_data.MLMCorpus, Corpus's interface): each corpus gives masked-LM samples from
    sentence-level files; blends, splits, per-stage data and resumption are the same."""
    d = cfg.data
    cache = _IndexCache(d.index_cache or os.path.join(cache_dir, "index-cache"))
    tok = _DatasetTokenizer(eod, cfg.model.vocab_size)
    if d.paths:
        blends = stage_blends(cfg)
        valid_blend = parse_blend(d.valid_paths, "data.valid_paths")
        fractions = None if valid_blend else parse_split(d.split)
        if not valid_blend and fractions[1] > 0:
            valid_blend = blends[0]  # (the first stage's: its own data, else data.paths)
            valid_split = fractions
        else:
            valid_split = None
        train_split = fractions
    else:
        blends = [train_prefixes] * max(len(cfg.growth.stages), 1)
        valid_blend, train_split, valid_split = valid_prefixes or [], None, None
    checked = {}
    for where, blend in ([("data.paths", b) for b in blends] * train + [("data.valid_paths", valid_blend)]):
        for _, prefix in blend:
            checked[prefix] = check_prefix(prefix, where, cfg.model.vocab_size)
    corpora: Dict[str, Corpus] = {}

    def corpus(prefix: str, split: str, fractions) -> Corpus:
        key = (os.path.realpath(prefix), split)
        if key not in corpora:
            if not checked[prefix]["tokens"]:  # (numpy cannot map an empty file)
                raise DataError(f"`{prefix}.bin` holds no tokens (an empty split: the corpus has too few documents "
                                "to hold some out); use a larger corpus")
            if mlm is not None:
                c = mlm(prefix, split, fractions, cache)
            else:
                c = Corpus(prefix, split, fractions, cfg, cache, tok)
            if c.n < 1:
                raise DataError(f"`{prefix}` ({split} split{'' if fractions is None else f' of data.split={d.split}'}) "
                                f"holds fewer tokens than one sample of model.seq_length + 1 = {cfg.model.seq_length + 1}"
                                "; use more data, another split or a shorter model.seq_length")
            corpora[key] = c
        return corpora[key]

    samples = _train_samples(cfg, blends, train_split, corpus, cache, tok, mlm is not None) if train else None
    if not valid_blend:
        return samples, None, "there is no validation split"
    try:
        vs = [corpus(p, "valid", valid_split) for _, p in valid_blend]
    except DataError as e:  # too small to hold a sample: no validation loss, said by the caller
        return samples, None, str(e)
    weights = [w for w, _ in valid_blend]
    size = min(int(c.n / w) for c, w in zip(vs, weights))  # one pass: no validation sample drawn twice
    valid = Samples([(0, Segment(vs, weights, [0] * len(vs), size, cfg, cache, tok))], cfg.model.seq_length, size,
                    masked=mlm is not None)
    return samples, valid, None


def _train_samples(cfg, blends: List[Blend], train_split, corpus, cache: _IndexCache,
                   tok: _DatasetTokenizer, masked: bool) -> Samples:
    """The schedule's training samples: segments of stages with equal blends (see the module doc)."""
    bounds = stage_sample_starts(cfg)
    groups: List[Tuple[int, int, Blend]] = []  # (first sample, end sample, blend) of consecutive equal blends
    for i, blend in enumerate(blends):
        if groups and groups[-1][2] == blend:
            groups[-1] = (groups[-1][0], bounds[i + 1], blend)
        else:
            groups.append((bounds[i], bounds[i + 1], blend))
    drawn: Dict[Tuple[str, str], int] = {}
    segments = []
    for first, end, blend in groups:
        if end <= first:
            continue
        cs = [corpus(p, "train", train_split) for _, p in blend]
        keys = [(c.prefix, "train") for c in cs]
        seg = Segment(cs, [w for w, _ in blend], [drawn.get(k, 0) for k in keys], end - first, cfg, cache, tok)
        for k, c, n in zip(keys, cs, seg.draws):
            drawn[k] = drawn.get(k, 0) + n
            c.ensure(math.ceil(drawn[k] / c.n))
        segments.append((first, seg))
    return Samples(segments, cfg.model.seq_length, bounds[-1], masked)
