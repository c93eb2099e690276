"""Per-file wall time of a test-suite run, side by side for two runs (before / after), from pytest's
JUnit XML (`python -m pytest -q tests --junitxml=FILE`: each case's setup + call + teardown).

    python tools/suite_durations.py BEFORE.xml AFTER.xml [--top 30] [--markdown]

Prints one row per test file: cases, seconds before, seconds after, and the ratio; then the totals
and the slowest cases of the second run. Module-scoped fixtures are charged to the first case that
uses them, so a file's total is what it costs the suite.
"""
from __future__ import annotations

import argparse
import collections
import xml.etree.ElementTree as ET


def cases(path: str) -> list:
    """[(file, test name, seconds, outcome)] of a JUnit XML file."""
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")
        name = next((m for m in module if m.startswith("test_")), module[-1] if module else "?")
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
        out.append((f"{name}.py", case.get("name"), float(case.get("time") or 0.0), outcome))
    return out


def per_file(rows: list) -> dict:
    files = collections.defaultdict(lambda: [0, 0.0])
    for f, _, t, outcome in rows:
        files[f][0] += outcome != "skipped"
        files[f][1] += t
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--top", type=int, default=30, help="slowest cases of the second run to list")
    ap.add_argument("--markdown", action="store_true", help="a Markdown table (docs/)")
    args = ap.parse_args()
    rb, ra = cases(args.before), cases(args.after)
    before, after = per_file(rb), per_file(ra)
    sep = " | " if args.markdown else "  "
    head = ["file", "cases before", "cases after", "s before", "s after", "after/before"]
    lines = [sep.join(head)]
    if args.markdown:
        lines = ["| " + lines[0] + " |", "|" + "---|" * len(head)]
    for f in sorted(set(before) | set(after), key=lambda k: -max(before.get(k, [0, 0])[1], after.get(k, [0, 0])[1])):
        nb, tb = before.get(f, [0, 0.0])
        na, ta = after.get(f, [0, 0.0])
        ratio = f"{ta / tb:.2f}" if tb > 0.5 else "-"
        row = [f, str(nb), str(na), f"{tb:.1f}", f"{ta:.1f}", ratio]
        lines.append(("| " + sep.join(row) + " |") if args.markdown else sep.join(row))
    tb, ta = sum(t for _, _, t, _ in rb), sum(t for _, _, t, _ in ra)
    count = lambda rows, o: sum(1 for r in rows if r[3] == o)  # noqa: E731
    total = ["**total**" if args.markdown else "total", str(count(rb, "passed")), str(count(ra, "passed")),
             f"{tb:.1f}", f"{ta:.1f}", f"{ta / tb:.2f}"]
    lines.append(("| " + sep.join(total) + " |") if args.markdown else sep.join(total))
    print("\n".join(lines))
    print(f"\nslowest {args.top} cases of {args.after}:")
    for f, name, t, _ in sorted(ra, key=lambda r: -r[2])[:args.top]:
        print(f"{'- ' if args.markdown else ''}{t:7.1f} s  {f}::{name}")


if __name__ == "__main__":
    main()
