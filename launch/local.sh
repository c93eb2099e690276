#!/bin/bash
# msg-megatron on one machine with torchrun: the local counterpart of slurm/pretrain.sbatch.
#
#   launch/local.sh NPROC CONFIG [section.field=value ...]
#   e.g. launch/local.sh 4 configs/demo_cpu.yaml parallel.tensor=2 parallel.pipeline=2
#
# checkpoint.load=auto is added unless given, so re-running after an interruption resumes; exit
# status 75 means "saved after SIGTERM/SIGUSR1, run again to continue", 76 "the next stage needs
# another layout: msg-grow --tensor/--pipeline, then run again at that layout".
#
# SIGTERM/SIGUSR1 to this script reach every worker (torchrun forwards them; SIGUSR1 only when listed
# in TORCHELASTIC_SIGNALS_TO_HANDLE, set here), which save at the next step boundary and exit 75.
# torchrun kills workers that have not exited TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds after the
# signal (torch's default, 30 s, is shorter than a large save: 600 here). torchrun itself exits 1
# after a signal or any worker's non-zero exit, so this script exits with the workers' own status
# when they all agree (each writes it to MSG_EXIT_STATUS_DIR), else with torchrun's.
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
export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
# a bad input is one line before any worker starts (under torchrun: once per host, and torchrun's traceback)
"${MSG_PYTHON:-python}" -m msg_megatron.pretrain --check "$NPROC" "$CONFIG" "${OVERRIDES[@]}" || exit $?
MSG_EXIT_STATUS_DIR=$(mktemp -d)
export MSG_EXIT_STATUS_DIR
trap 'rm -rf "$MSG_EXIT_STATUS_DIR"' EXIT

"${MSG_PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    -m msg_megatron.pretrain "$CONFIG" "${OVERRIDES[@]}" &
PID=$!
for sig in TERM USR1 INT HUP; do
    trap "kill -s $sig $PID 2>/dev/null" "$sig"
done
# (a trapped signal interrupts `wait`; wait again until torchrun has exited)
while :; do
    wait "$PID"
    rc=$?
    kill -0 "$PID" 2>/dev/null || break
done

shopt -s nullglob
files=("$MSG_EXIT_STATUS_DIR"/rank*)
if [ "${#files[@]}" -eq "$NPROC" ]; then
    codes=$(sort -u "${files[@]}")
    if [ "$(printf '%s\n' "$codes" | wc -l)" -eq 1 ]; then
        rc=$codes
    fi
fi
exit "$rc"
