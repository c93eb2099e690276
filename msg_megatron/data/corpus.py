"""The embedded default corpus: license-clean text already on every machine with Python.

Documents are the standard library's `.py` sources and the pydoc topic texts (`pydoc_data`),
about 12 MB in all; nothing is downloaded. Selection and the validation split are deterministic
(by a hash of the document name), so every machine builds the same corpus.
"""
from __future__ import annotations

import json
import os
import sysconfig
import zlib
from pathlib import Path
from typing import Iterable, Iterator, List, Tuple

Doc = Tuple[str, str]


def _stable_hash(name: str) -> int:
    return zlib.crc32(name.encode())


def embedded_documents() -> List[Doc]:
    """All candidate documents as (name, text), in a deterministic order."""
    docs: List[Doc] = []
    try:
        from pydoc_data.topics import topics

        docs += [(f"pydoc:{k}", v) for k, v in sorted(topics.items())]
    except ImportError:  # some distributions strip pydoc_data; the sources suffice
        pass
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append((f"stdlib:{rel}", text))
    if not docs:
        raise RuntimeError(f"no embedded corpus found under {stdlib}; use msg-preprocess on your own text "
                           "and set data.corpus to its output directory")
    return docs


def select_documents(docs: List[Doc], max_bytes: int) -> List[Doc]:
    """Up to `max_bytes` of text, picked in hash order so small budgets still mix prose and code."""
    chosen, total = [], 0
    for name, text in sorted(docs, key=lambda d: _stable_hash(d[0])):
        if total >= max_bytes:
            break
        chosen.append((name, text))
        total += len(text.encode())
    return chosen


def split_documents(docs: List[Doc], valid_fraction: float) -> Tuple[List[Doc], List[Doc]]:
    """Hold out documents (not tokens) for validation: no window spans both splits."""
    cut = int(valid_fraction * 10_000)
    train = [d for d in docs if _stable_hash("valid:" + d[0]) % 10_000 >= cut]
    valid = [d for d in docs if _stable_hash("valid:" + d[0]) % 10_000 < cut]
    if valid_fraction > 0 and not valid and len(train) > 1:
        valid, train = train[-1:], train[:-1]
    if not train and valid:  # (a tiny corpus whose documents all hashed to validation: train comes first)
        train, valid = valid[:1], valid[1:]
    return train, valid


def _utf8_problem(path: str, raw: bytes, e: UnicodeDecodeError, first_line: int = 1) -> str:
    """`path:line: invalid UTF-8 (byte 0xNN at column c)` for a decoding error in `raw`."""
    line_start = raw.rfind(b"\n", 0, e.start) + 1
    line = first_line + raw.count(b"\n", 0, e.start)
    return f"{path}:{line}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start - line_start + 1})"


def read_user_documents(paths: Iterable[str], json_key: str = "text", skip_invalid: bool = False,
                        warn=None) -> Iterator[Doc]:
    """Plain-text files (one document each) and JSONL files (one document per line's `json_key`),
    either gzip'd (`.gz`); JSONL is streamed line by line.

    Text must be UTF-8: an undecodable line (JSONL) or file (text) is an error naming the file and
    line, or with `skip_invalid` is skipped and reported through `warn`; a file with NUL bytes is
    taken for binary and refused."""
    def undecodable(msg: str, skipped: str) -> None:
        if not skip_invalid:
            raise ValueError(msg + "; fix the file, or pass --skip-invalid to skip what cannot be decoded")
        if warn:
            warn(f"{msg}: {skipped} skipped")

    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"input file `{p}` does not exist")
        if os.path.isdir(p):
            raise ValueError(f"input `{p}` is a directory; pass the files in it (e.g. {p}/*.txt)")
        kind = p[:-3] if p.endswith(".gz") else p
        with _open(p) as f:
            if kind.endswith((".jsonl", ".json")):
                # streamed line by line: a corpus-scale file is never held whole
                for i, line in enumerate(f):
                    doc = _json_line(p, i, line.rstrip(b"\n"), json_key, undecodable)
                    if doc is not None:
                        yield doc
                continue
            raw = f.read()
        if b"\0" in raw:
            raise ValueError(f"input file `{p}` holds NUL bytes: a binary file, not text; pass text or .jsonl files")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            undecodable(_utf8_problem(p, raw, e), "the file")
            continue
        yield p, text


def _open(path: str):
    """A file as bytes, gunzipped when it ends in .gz (a truncated or non-gzip file: a clear error)."""
    if not path.endswith(".gz"):
        return open(path, "rb")
    import gzip

    return _GzipLines(gzip.open(path, "rb"), path)


class _GzipLines:
    """gzip.open's file, its errors named with the file."""

    def __init__(self, f, path):
        self.f, self.path = f, path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def _wrap(self, fn):
        import gzip
        import zlib

        try:
            return fn()
        except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise ValueError(f"input file `{self.path}` is not a readable gzip file ({e}); re-compress it or pass it "
                             "uncompressed") from None

    def __iter__(self):
        it = iter(self.f)
        while True:
            line = self._wrap(lambda: next(it, None))
            if line is None:
                return
            yield line

    def read(self):
        return self._wrap(self.f.read)


def _json_line(p: str, i: int, line: bytes, json_key: str, undecodable):
    """(name, text) of JSONL line i of `p`, None for a blank or skipped line."""
    if b"\0" in line:
        raise ValueError(f"input file `{p}` holds NUL bytes: a binary file, not text; pass text or .jsonl files")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        undecodable(_utf8_problem(p, line, e, i + 1), "the line")
        return None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}:{i + 1}: not valid JSON ({e.msg}); each line must be an object") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{p}:{i + 1}: a JSON {type(obj).__name__}, not an object; each line must be "
                         f"an object with the text in `{json_key}`")
    if json_key not in obj or not isinstance(obj[json_key], str):
        raise ValueError(f"{p}:{i + 1}: no string field `{json_key}`; pass --json-key with the "
                         "name of the text field")
    return f"{p}:{i + 1}", obj[json_key]
