"""The shapes a schedule may grow to next (msg-gridsearch --schedule; the self-adaptive schedule's
candidates): from the current shape toward the model section's, each dimension not yet at its final
size grown to it, alone or, with `combine` > 1, together with others in one stage (combinations of
dimensions in one growth: the paper grows one at a time and names several at once as unexplored).
"""
from __future__ import annotations

import itertools
from typing import List

from ..config import Shape


def next_shapes(current: Shape, final: Shape, combine: int = 1) -> List[Shape]:
    """Every shape that grows 1..`combine` of the dimensions where `current` is below `final` to their
    final sizes, the others kept: single dimensions first (hidden, ffn, heads, layers order), then pairs,
    and so on. Empty when `current` is `final`."""
    if combine < 1:
        raise ValueError(f"combine={combine}: grow at least one dimension per stage (1: one at a time)")
    cur, fin = current.as_tuple(), final.as_tuple()
    if any(c > f for c, f in zip(cur, fin)):
        raise ValueError(f"{current} is larger than the final shape {final} in some dimension: growth only adds")
    todo = [i for i in range(4) if cur[i] != fin[i]]
    out = []
    for k in range(1, min(combine, len(todo)) + 1):
        for dims in itertools.combinations(todo, k):
            out.append(Shape(*(fin[i] if i in dims else cur[i] for i in range(4))))
    return out
