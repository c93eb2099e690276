#!/bin/bash
# Submit a whole growth schedule whose stages change the parallel layout as a chain of jobs:
#
#   launch/slurm/chain_stages.sh CONFIG [sbatch options...] [-- overrides...]
#   e.g. launch/slurm/chain_stages.sh configs/flm_101b_a800.yaml --nodes=24 --ntasks-per-node=8 --time=2-00:00:00
#
# For each run of stages at one TP/PP layout (msg-plan CONFIG --jobs): a pretrain job that trains
# until the next layout change (it saves and exits 76, which pretrain.sbatch reports as success),
# then a grow job (grow_stage.sbatch) that grows the checkpoint to the next stage's shape and
# reshards it, then the next pretrain job, each `--dependency=afterok` on the one before. Preempted
# jobs requeue themselves and keep their ids, so the chain waits for them.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 CONFIG [sbatch options...] [-- section.field=value ...]" >&2
    exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
CONFIG=$1
shift
SBATCH_OPTS=()
OVERRIDES=()
while [ $# -gt 0 ]; do
    if [ "$1" = "--" ]; then shift; OVERRIDES=("$@"); break; fi
    SBATCH_OPTS+=("$1")
    shift
done
PYTHON=${MSG_PYTHON:-python}
JOBS=$("$PYTHON" -m msg_megatron.plan "$CONFIG" "${OVERRIDES[@]}" --jobs 2>/dev/null) || {
    "$PYTHON" -m msg_megatron.plan "$CONFIG" "${OVERRIDES[@]}" --jobs >/dev/null; exit 2; }
prev_job="" prev_save=""
while read -r stage tp pp shape save; do
    dep=()
    if [ -n "$prev_job" ]; then
        grow=$(sbatch --parsable "${SBATCH_OPTS[@]}" --dependency=afterok:"$prev_job" \
               "$HERE/grow_stage.sbatch" "$CONFIG" "$prev_save" "$shape" "$tp" "$pp" "$save")
        echo "stage $stage: grow job $grow ($prev_save -> $save, $shape at TP$tp PP$pp)"
        dep=(--dependency=afterok:"$grow")
    fi
    job=$(sbatch --parsable "${SBATCH_OPTS[@]}" "${dep[@]}" "$HERE/pretrain.sbatch" "$CONFIG" "${OVERRIDES[@]}" \
          "parallel.tensor=$tp" "parallel.pipeline=$pp" "checkpoint.save=$save" "checkpoint.load=auto")
    echo "stage $stage: pretrain job $job (TP$tp PP$pp, checkpoints in $save)"
    prev_job=$job prev_save=$save
done <<< "$JOBS"
