"""torchrun worker for test_agree: each rank's view differs (as two nodes' views of a shared
filesystem can); writes what every helper of parallel/agree.py returned on this rank as JSON to
OUT_DIR/rank<r>.json (a file per rank: torchrun interleaves the ranks' stdout)."""
import json
import os
import sys

from msg_megatron.parallel import initialize_parallel
from msg_megatron.parallel.agree import differs_from_rank0, first_error, on_rank0

RANK = int(os.environ["RANK"])
initialize_parallel(1, 1)
out = {"rank": RANK}
out["on_rank0"] = on_rank0(lambda: f"seen by rank {RANK}")
try:
    on_rank0(lambda: 1 / 0)
except ZeroDivisionError as e:
    out["raised"] = str(e)
out["first_error"] = first_error(None if RANK == 0 else f"rank {RANK} failed")
out["same"] = differs_from_rank0("step_000010", "latest")
out["differs"] = differs_from_rank0(f"step_0000{10 + RANK}", "latest")

# a rank that cannot see the checkpoint rank 0 resolved: every rank fails, naming it
from msg_megatron.checkpoint.dist import CheckpointError  # noqa: E402
from msg_megatron.training.starts import agreed_meta  # noqa: E402

if RANK == 1:  # this rank's view lacks the save directory (a node without the shared filesystem)
    real_isdir, real_exists = os.path.isdir, os.path.exists
    os.path.isdir = lambda p: not str(p).startswith(sys.argv[1]) and real_isdir(p)
    os.path.exists = lambda p: not str(p).startswith(sys.argv[1]) and real_exists(p)
try:
    agreed_meta(sys.argv[1])
except CheckpointError as e:
    out["agreed_meta"] = str(e)
with open(os.path.join(sys.argv[2], f"rank{RANK}.json"), "w") as f:
    json.dump(out, f)
