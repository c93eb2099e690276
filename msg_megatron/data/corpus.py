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
    """Plain-text files (one document each) and JSONL files (one document per line's `json_key`).

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
        with open(p, "rb") as f:
            raw = f.read()
        if b"\0" in raw:
            raise ValueError(f"input file `{p}` holds NUL bytes: a binary file, not text; pass text or .jsonl files")
        if p.endswith((".jsonl", ".json")):
            for i, line in enumerate(raw.split(b"\n")):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    undecodable(_utf8_problem(p, line, e, i + 1), "the line")
                    continue
                if not text.strip():
                    continue
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
                yield f"{p}:{i + 1}", obj[json_key]
        else:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                undecodable(_utf8_problem(p, raw, e), "the file")
                continue
            yield p, text
