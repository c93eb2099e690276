"""msg-pretrain CONFIG [section.field=value ...]: train, growing through the configured stages."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .cli import run_cli
from .config import load_config
from .parallel import is_logging_rank
from .training.run_setup import check_job
from .training.trainer import PREEMPTED_EXIT, RELAYOUT_EXIT, Trainer

EPILOG = """config fields: each is described in msg_megatron/config/schema.py (the dataclasses ModelConfig,
GrowthConfig, ParallelConfig, TrainConfig, DataConfig, CheckpointConfig, LoggingConfig) and the
commented configs/*.yaml; a wrong key or value is refused at load, naming the field.

exit status:
  0   the run finished (train.steps reached)
  2   a bad input (config, checkpoint, data, argument), with a one-line message
  74  a save found the disk full; the previous checkpoint is intact (free space, resume)
  75  preempted (SIGTERM/SIGUSR1): saved at the current step; resume with checkpoint.load=auto
  76  saved before a stage that runs at another TP/PP layout: reshard with msg-grow --tensor/--pipeline,
      then resume at that layout
"""


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="msg-pretrain", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config (see configs/)")
    ap.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.steps=50")
    ap.add_argument("--check", type=int, metavar="NPROC", default=None,
                    help="only check the config for a job of NPROC processes and exit (launch/local.sh does, once, "
                         "before torchrun: a bad input is then one line, not one per rank)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.check is not None:
        if args.check < 1:
            raise ValueError(f"--check {args.check}: give the job's number of processes")
        check_job(cfg, args.check)
        return 0

    result = Trainer(cfg).run()
    if is_logging_rank():
        print(json.dumps({"final": result}))
    if result.get("preempted"):
        return PREEMPTED_EXIT
    return RELAYOUT_EXIT if result.get("relayout") else 0


def report_exit_status(code: int) -> None:
    """With MSG_EXIT_STATUS_DIR set (launch/local.sh), write this rank's exit status there: torchrun
    itself exits 1 when it was signalled or a worker failed, so the launcher reads the workers' own
    status (75: saved after SIGTERM/SIGUSR1, 76: re-layout) from these files."""
    where = os.environ.get("MSG_EXIT_STATUS_DIR")
    if where and os.path.isdir(where):
        with open(os.path.join(where, f"rank{os.environ.get('RANK', '0')}"), "w") as f:
            f.write(f"{code}\n")


def main(argv=None) -> None:
    code = run_cli("msg-pretrain", _main, argv)
    report_exit_status(code)
    sys.exit(code)


if __name__ == "__main__":  # the guard matters: dist_checkpointing's writer spawns processes
    main()
