"""Writes the offline evaluation tasks' data (msg_megatron/tasks/*.jsonl) from text that ships with
Python, so no task downloads anything. Deterministic: the same Python release writes the same files
(the committed ones were written by CPython 3.11.7). Run: python tools/make_eval_tasks.py

- msg_zen: multiple choice, the ending of each aphorism of the Zen of Python (`this`) among its own
  and three other aphorisms' endings.
- msg_nextline: multiple choice, the next line of held-out standard-library code after six lines,
  among it and three other lines of the same file (lines of 12 to 48 characters: a continuation
  fits a short context).
- msg_complete: generation, the rest of a held-out code line (greedy, until the newline; exact match).
- msg_prose_bpb: bits per byte (rolling log-likelihood) on IDLE's text files (idlelib/*.txt: prose
  the embedded corpus, made of .py sources and pydoc topics, does not contain).
- msg_code_bpb: bits per byte on held-out standard-library modules.

Held-out code: modules whose validation hash (data/corpus.py split_documents) is below 1% put
them in the validation split for any data.valid_fraction >= 0.01 (default 0.02): an embedded-corpus
run never trains on them.
"""
from __future__ import annotations

import codecs
import contextlib
import io
import json
import os
import random
import re
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from msg_megatron.data.corpus import _stable_hash  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "msg_megatron" / "tasks"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
HELD_OUT = 100  # of 10_000: 1%


def held_out_modules():
    mods = []
    for path in sorted(STDLIB.rglob("*.py")):
        rel = path.relative_to(STDLIB).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/", "test/", "idlelib/idle_test/")):
            continue
        if _stable_hash("valid:stdlib:" + rel) % 10_000 >= HELD_OUT:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text.encode()) >= 1500:
            mods.append((rel, text))
    return mods


def write(name, rows):
    with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{name}: {len(rows)} rows")


def zen(rng):
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    lines = [ln for ln in codecs.decode(this.s, "rot13").splitlines()[2:] if ln.strip()]
    cut = []
    for ln in lines:
        words = ln.split(" ")
        k = max(1, len(words) // 2)
        cut.append((" ".join(words[:k]), " " + " ".join(words[k:])))
    rows = []
    for i, (head, tail) in enumerate(cut):
        others = rng.sample([t for j, (_, t) in enumerate(cut) if j != i and t != tail], 3)
        choices = others + [tail]
        rng.shuffle(choices)
        rows.append({"context": "The Zen of Python, by Tim Peters\n\n" + head, "choices": choices,
                     "label": choices.index(tail)})
    return rows


def code_lines(text):
    return text.splitlines()


def nextline(rng, mods, n=120):
    rows = []
    for rel, text in mods:
        lines = code_lines(text)
        good = [i for i in range(6, len(lines)) if 12 <= len(lines[i].strip()) and len(lines[i]) <= 48]
        pool = sorted({lines[i] for i in good})
        for i in rng.sample(good, min(12, len(good))):
            others = rng.sample([p for p in pool if p != lines[i]], 3)
            choices = others + [lines[i]]
            rng.shuffle(choices)
            rows.append({"context": "\n".join(lines[i - 6:i]) + "\n", "choices": choices,
                         "label": choices.index(lines[i]), "source": rel})
    rng.shuffle(rows)
    return rows[:n]


def complete(rng, mods, n=60):
    rows = []
    for rel, text in mods:
        lines = code_lines(text)
        good = [i for i in range(4, len(lines)) if 16 <= len(lines[i].strip()) <= 60]
        for i in rng.sample(good, min(6, len(good))):
            line = lines[i]
            indent = len(line) - len(line.lstrip())
            cut = indent + (len(line) - indent) // 2
            rows.append({"context": "\n".join(lines[i - 4:i]) + "\n" + line[:cut], "target": line[cut:],
                         "source": rel})
    rng.shuffle(rows)
    return rows[:n]


def prose():
    rows = []
    for path in sorted((STDLIB / "idlelib").glob("*.txt")):
        paras = re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))
        chunk = ""
        for p in paras:
            chunk = (chunk + "\n\n" + p) if chunk else p
            if len(chunk) >= 600:
                rows.append({"text": chunk, "source": f"idlelib/{path.name}"})
                chunk = ""
        if len(rows) >= 40:
            break
    return rows[:40]


def code(mods, per_module=2, size=2000):
    """The first `per_module` pieces of about `size` characters of each module, cut at blank lines."""
    rows = []
    for rel, text in mods:
        piece, kept = "", 0
        for block in re.split(r"(?<=\n)\n", text):
            piece += block + "\n"
            if len(piece) >= size and kept < per_module:
                rows.append({"text": piece.rstrip("\n") + "\n", "source": rel})
                piece, kept = "", kept + 1
    return rows


def main():
    rng = random.Random(20261203)
    mods = held_out_modules()
    write("msg_zen", zen(rng))
    write("msg_nextline", nextline(rng, mods))
    write("msg_complete", complete(rng, mods))
    write("msg_prose_bpb", prose())
    write("msg_code_bpb", code(mods))


if __name__ == "__main__":
    main()
