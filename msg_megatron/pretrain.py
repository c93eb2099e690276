"""msg-pretrain CONFIG [section.field=value ...]: train, growing through the configured stages."""
from __future__ import annotations

import argparse
import json
import sys

from .cli import run_cli
from .config import load_config


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="msg-pretrain", description=__doc__)
    ap.add_argument("config", help="YAML config (see configs/)")
    ap.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.steps=50")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from .training.trainer import Trainer

    from .parallel import is_logging_rank
    from .training.trainer import PREEMPTED_EXIT, RELAYOUT_EXIT

    result = Trainer(cfg).run()
    if is_logging_rank():
        print(json.dumps({"final": result}))
    if result.get("preempted"):
        return PREEMPTED_EXIT
    return RELAYOUT_EXIT if result.get("relayout") else 0


def main(argv=None) -> None:
    sys.exit(run_cli("msg-pretrain", _main, argv))


if __name__ == "__main__":  # the guard matters: dist_checkpointing's writer spawns processes
    main()
