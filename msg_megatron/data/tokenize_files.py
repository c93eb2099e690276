"""Documents -> a megatron indexed dataset (`PREFIX.bin` + `PREFIX.idx`), tokenized by N worker
processes, at corpus scale.

Documents stream through (never a whole corpus in memory); workers tokenize batches of them and the
writer appends the batches in input order with megatron-core's own IndexedDatasetBuilder, each
document followed by the tokenizer's end-of-document id (Megatron-LM's preprocess_data.py
--append-eod); or, with `sentences` (BERT's masked-LM data), one sequence per sentence
(mlm_data.split_sentences), a document being its run of sentences, without an end-of-document id
(Megatron-LM's --split-sentences). The output is therefore byte-identical for any number of workers. It is written
under temporary names and renamed (.bin, then .idx) when complete: a crash never leaves a dataset
that looks whole. Progress (documents, tokens, tokens/s) goes to `log` every `log_every` seconds.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from .mlm_data import split_sentences
from .tokenizer import load_tokenizer

_BATCH_CHARS = 1 << 20  # text per task sent to a worker (about 1 MB)
_worker_tok = None
_worker_sentences = False


def _init_worker(path: str, sentences: bool = False, pooled: bool = True) -> None:
    """Load the tokenizer for _encode. `pooled` (a pool worker process): one torch thread each, the
    workers are the parallelism. In-process (workers=1, e.g. the embedded corpus prepared by the
    trainer itself) torch's threads are left alone: setting them here slowed the training that
    followed in the same process by 1.5x on 2 cores."""
    global _worker_tok, _worker_sentences
    if pooled:
        torch.set_num_threads(1)
    _worker_tok, _worker_sentences = load_tokenizer(path), sentences


def _encode(texts: List[str]) -> List[Tuple[np.ndarray, List[int]]]:
    """Each document's tokens and its sequence lengths (one sequence, or one per sentence)."""
    if not _worker_sentences:
        eod = _worker_tok.eod
        out = [np.asarray(_worker_tok.encode(t) + [eod], dtype=np.int64) for t in texts]
        return [(ids, [len(ids)]) for ids in out]
    docs = []
    for t in texts:
        ids = [x for x in (_worker_tok.encode(s) for s in split_sentences(t)) if x]
        flat = np.asarray([i for x in ids for i in x], dtype=np.int64)
        docs.append((flat, [len(x) for x in ids]))
    return docs


def _batches(docs: Iterable[Tuple[str, str]], chars: int = _BATCH_CHARS) -> Iterator[List[str]]:
    batch, size = [], 0
    for _, text in docs:
        batch.append(text)
        size += len(text)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def token_dtype(vocab_size: int):
    """megatron-core's choice of token dtype for a vocabulary (what Megatron-LM writes)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def write_indexed(docs: Iterable[Tuple[str, str]], tokenizer_path: str, prefix: str, workers: int = 1,
                  log: Optional[Callable[[str], None]] = None, log_every: float = 5.0, sentences: bool = False) -> dict:
    """Tokenize (name, text) documents into `prefix`.bin/.idx; returns {documents, tokens, sequences,
    seconds}. `sentences`: a sequence per sentence (documents without one are skipped)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tok = load_tokenizer(tokenizer_path)
    dtype = token_dtype(tok.vocab_size)
    bin_tmp, idx_tmp = prefix + ".bin.tmp", prefix + ".idx.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    builder = IndexedDatasetBuilder(bin_tmp, dtype=dtype)
    n_docs = n_tokens = n_seq = 0
    start = last = time.perf_counter()
    pool = None
    try:
        if workers > 1:
            # (spawn: the writer's torch and megatron state is not forked into the workers)
            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                initargs=(tokenizer_path, sentences))
            encoded = pool.imap(_encode, _batches(docs), chunksize=1)  # (in input order: identical output)
        else:
            _init_worker(tokenizer_path, sentences, pooled=False)
            encoded = map(_encode, _batches(docs))
        for arrays in encoded:
            for ids, lengths in arrays:
                if not lengths:  # (sentences: a document without any)
                    continue
                builder.add_document(torch.from_numpy(ids), lengths)
                n_tokens += len(ids)
                n_docs += 1
                n_seq += len(lengths)
            now = time.perf_counter()
            if log and now - last >= log_every:
                log(f"[preprocess] {prefix}: {n_docs:,} documents, {n_tokens:,} tokens, "
                    f"{n_tokens / (now - start):,.0f} tokens/s")
                last = now
        builder.finalize(idx_tmp)
    except BaseException:
        for f in (bin_tmp, idx_tmp):
            if os.path.exists(f):
                os.remove(f)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    os.replace(bin_tmp, prefix + ".bin")
    os.replace(idx_tmp, prefix + ".idx")  # (last: the index names a complete token file)
    seconds = time.perf_counter() - start
    if log:
        log(f"[preprocess] {prefix}: {n_docs:,} documents, {n_tokens:,} tokens in {seconds:.1f} s "
            f"({n_tokens / max(seconds, 1e-9):,.0f} tokens/s)")
    return {"documents": n_docs, "tokens": n_tokens, "sequences": n_seq, "seconds": seconds}
