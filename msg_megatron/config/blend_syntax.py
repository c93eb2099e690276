"""The syntax of a blend of prepared corpora, as Megatron-LM writes it (`data.paths`,
`data.valid_paths`, `growth.stages[i].data`, `data.split`): parsed when the config loads.

- one prefix: `/data/en_text_document` (its `.bin` and `.idx`);
- Megatron-LM's list, a weight before each prefix: `[0.7, /data/en_text_document, 0.3, /data/zh_text_document]`
  (or the same as one string, `"0.7 /data/en 0.3 /data/zh"`, as on Megatron-LM's command line);
- a list of mappings: `[{weight: 0.7, prefix: /data/en_text_document}, ...]`.
Weights are relative (normalised to sum to 1). The files are checked when a run starts
(data/blends.check_prefix).
"""
from __future__ import annotations

from typing import List, Tuple

Blend = List[Tuple[float, str]]  # [(weight, prefix)], weights summing to 1

_FORM = "write one prefix, [weight, prefix, weight, prefix, ...] or [{weight: W, prefix: P}, ...]"


def _weight(value, where: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{where}: weight {value!r} is not a number; {_FORM}")
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: weight {value!r} is not a number; {_FORM}") from None
    if not w > 0 or w != w or w == float("inf"):
        raise ValueError(f"{where}: weight {value!r} must be a positive number; drop the corpus or give it a "
                         "weight > 0")
    return w


def _prefix(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {value!r} is not a dataset prefix (a path without .bin/.idx); {_FORM}")
    p = value.strip()
    for ext in (".bin", ".idx"):  # a common slip: the file instead of its prefix
        if p.endswith(ext):
            raise ValueError(f"{where}: `{p}` names the {ext} file; give the prefix `{p[:-len(ext)]}`")
    return p


def parse_blend(value, where: str) -> Blend:
    """The blend `value` means ([] for none), weights normalised; ValueError naming `where` and the fix."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        parts = value.split()
        value = parts if len(parts) > 1 else [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: {value!r} is not a blend; {_FORM}")
    items = list(value)
    if all(isinstance(v, dict) for v in items):
        pairs = []
        for i, v in enumerate(items):
            unknown = sorted(set(v) - {"weight", "prefix"})
            if unknown or "prefix" not in v or ("weight" not in v and len(items) > 1):
                raise ValueError(f"{where}[{i}]: {v!r} needs exactly the keys `weight` and `prefix`"
                                 + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
            pairs.append((_weight(v.get("weight", 1.0), f"{where}[{i}].weight"), _prefix(v["prefix"], f"{where}[{i}].prefix")))
    elif len(items) == 1:
        pairs = [(1.0, _prefix(items[0], f"{where}[0]"))]
    else:
        if len(items) % 2:
            raise ValueError(f"{where}: {len(items)} entries are not weight/prefix pairs; {_FORM}")
        pairs = [(_weight(items[i], f"{where}[{i}]"), _prefix(items[i + 1], f"{where}[{i + 1}]"))
                 for i in range(0, len(items), 2)]
    seen = set()
    for _, p in pairs:
        if p in seen:
            raise ValueError(f"{where}: `{p}` appears twice; give it one weight (the sum)")
        seen.add(p)
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


def parse_split(value: str, where: str = "data.split") -> List[float]:
    """Megatron-LM's train,valid,test split (`969,30,1`, or fractions) as three fractions."""
    try:
        parts = [float(x) for x in str(value).replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"{where}={value!r}: write three numbers, train,valid,test, e.g. 969,30,1") from None
    if len(parts) == 1:
        parts += [0.0, 0.0]
    if len(parts) != 3 or any(p < 0 for p in parts) or parts[0] <= 0:
        raise ValueError(f"{where}={value!r}: write three non-negative numbers train,valid,test with train > 0, "
                         "e.g. 969,30,1")
    total = sum(parts)
    return [p / total for p in parts]
