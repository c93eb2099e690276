#!/bin/bash
# msg-megatron on one machine with torchrun: the local counterpart of slurm/pretrain.sbatch.
#
#   launch/local.sh NPROC CONFIG [section.field=value ...]
#   e.g. launch/local.sh 4 configs/demo_cpu.yaml parallel.tensor=2 parallel.pipeline=2
#
# checkpoint.load=auto is added unless given, so re-running after an interruption resumes; exit
# status 75 means "saved after SIGTERM/SIGUSR1, run again to continue", 76 "the next stage needs
# another layout: msg-grow --tensor/--pipeline, then run again at that layout".
set -uo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 NPROC CONFIG [section.field=value ...]" >&2
    exit 2
fi
NPROC=$1 CONFIG=$2
shift 2
OVERRIDES=("$@")
case " ${OVERRIDES[*]:-} " in
    *" checkpoint.load="*) ;;
    *) OVERRIDES+=("checkpoint.load=auto") ;;
esac
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${MSG_PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    -m msg_megatron.pretrain "$CONFIG" "${OVERRIDES[@]}"
