"""msg-schedule --from-auto CKPT [--output FILE] [--json]: the schedule a growth.schedule=auto run
decided, written as a fixed one, so a larger or repeated run trains it without probes.

The output is the run's config as its checkpoint saved it, with growth.schedule=fixed and
growth.stages = the stages the run grew through up to that checkpoint (each decision is also in the
run's metrics.jsonl, event auto_decision). A fixed schedule ends at its model section: if the run
stopped short of the model section's shape, the model section is set to the last shape reached and a
note says so (raise it and append stages to grow further). checkpoint.save/load are cleared (a new run
must not resume the auto run's directory). CKPT: a step checkpoint, or a save directory (its latest).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys

import yaml

from .checkpoint.dist import CheckpointError, read_meta
from .cli import run_cli
from .config import config_from_dict


def fixed_schedule(meta: dict) -> tuple:
    """(the fixed config as a dict, notes) from an auto run's checkpoint metadata."""
    cfg = copy.deepcopy(meta["config"])
    g = cfg["growth"]
    if g.get("schedule") != "auto":
        raise CheckpointError(f"checkpoint `{meta['path']}` is not of a growth.schedule=auto run (its schedule is "
                              f"{g.get('schedule', 'fixed')}): its growth.stages are the schedule already")
    notes = []
    stages = [{k: v for k, v in st.items() if v is not None} for st in g["stages"]]
    m = cfg["model"]
    final = [m["hidden_size"], m["ffn_hidden_size"], m["num_attention_heads"], m["num_layers"]]
    if stages[-1]["shape"] != final:
        h, f, a, layers = stages[-1]["shape"]
        notes.append(f"the run reached {stages[-1]['shape']} (step {meta['state']['step']}), not the model section "
                     f"{final}: the model section is set to {stages[-1]['shape']}")
        m.update(hidden_size=h, ffn_hidden_size=f, num_attention_heads=a, num_layers=layers)
        if m.get("num_query_groups"):  # (the grouping is fixed; the groups grow with the heads)
            m["num_query_groups"] = a // (final[2] // m["num_query_groups"])
    g["schedule"], g["stages"] = "fixed", stages
    cfg["checkpoint"].update(save="", load="")
    config_from_dict(copy.deepcopy(cfg))  # (it loads as a config: checked like any other)
    return cfg, notes


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="msg-schedule", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-auto", required=True, metavar="CKPT", help="a checkpoint of a growth.schedule=auto run")
    ap.add_argument("--output", default="", help="write the config here (default: print it)")
    ap.add_argument("--json", action="store_true", help="print the stages as JSON instead of the config")
    args = ap.parse_args(argv)
    cfg, notes = fixed_schedule(read_meta(args.from_auto))
    for n in notes:
        print(f"msg-schedule: note: {n}", file=sys.stderr)
    text = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    if args.json:
        print(json.dumps({"stages": cfg["growth"]["stages"], "notes": notes}))
    elif not args.output:
        print(text, end="")
    return 0


def main(argv=None) -> None:
    sys.exit(run_cli("msg-schedule", _main, argv))


if __name__ == "__main__":
    main()
