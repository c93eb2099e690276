#!/usr/bin/env bash
# Everything that needs a GPU, in one place: build the CUDA extension, run the GPU tests, and the
# two GPU benchmarks (masked-norm bandwidth, issue 5; training MFU, issue 3). For a machine whose
# Python has torch with CUDA but maybe not this package's other dependencies installed.
#
#   tools/gpu_session.sh [build] [test] [norm] [mfu] [profile] [grow] [recompute] [parallel]   (default: all, in that order)
#
# recompute: training MFU of the ~1.7B model with train.recompute none / selective / full.
# parallel: MFU at TP2 x PP2 plain, with sequence parallelism and with virtual_pipeline=2 (needs 4
# GPUs; skipped with a message on fewer).
#
# grow: msg-grow streamed on the GPU (its default device there), tensor for tensor against the
# whole-model growth (tests/test_stream_grow.py; CPU CI runs the same on the CPU).
#
# Logs go to $OUT (default ./gpu-results), one file per step, and the step's tail is printed.
# On a lent device with a 10-minute limit per command, run it as two calls:
#   tools/gpu_session.sh build test norm        then        tools/gpu_session.sh build mfu profile
# (build is quick when nothing changed, and a fresh machine needs it).
# Without network access, fetch megatron-core first on a machine that has it and bring it along:
#   pip download --no-deps megatron-core==0.16.1 -d .whl
# this script installs any wheel in .whl/ into a private site directory (no dependencies, no
# network) and puts it and the repository on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test norm mfu profile grow recompute parallel)
for step in "${steps[@]}"; do  # a typo fails before anything is installed or built
  case "$step" in
    build|test|norm|mfu|profile|grow|recompute|parallel) ;;
    *) echo "gpu_session.sh: unknown step '$step' (build, test, norm, mfu, profile, grow, recompute, parallel)" >&2; exit 2 ;;
  esac
done
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/msg-site .whl/*.whl
  export PYTHONPATH="/tmp/msg-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import sys, torch; ok = torch.cuda.is_available(); print(torch.__version__, torch.cuda.get_device_name() if ok else 'no CUDA device'); sys.exit(0 if ok else 1)" \
  || { echo "gpu_session.sh: needs torch with a visible CUDA device" >&2; exit 2; }
arch="$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"

status=0
run() {  # run NAME CMD...: log to $OUT/NAME.log, print its tail, remember failures
  local name="$1"; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  echo "=== $name: exit $rc in $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
}
for step in "${steps[@]}"; do
  case "$step" in
    build) run build env TORCH_CUDA_ARCH_LIST="$arch" python3 setup.py build_ext --inplace ;;
    test) run test python3 -m pytest -q -p no:cacheprovider tests/test_norm_cuda.py tests/test_masked_norm.py \
            tests/test_norm_extension.py tests/test_fusion.py tests/test_bf16.py ;;
    norm) run norm python3 tools/bench_masked_norm.py --gpu ;;
    mfu) run mfu python3 tools/bench_parallel.py --gpu --compare ;;
    profile) run profile python3 tools/profile_step.py --gpu-bench --steps 2 --top 30 ;;
    recompute) run recompute python3 tools/bench_parallel.py --gpu --recompute none,selective,full ;;
    parallel)
      if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 4 ]; then
        run parallel python3 tools/bench_parallel.py --gpu --layout 2,2 --sequence-parallel --virtual-pipeline 2
      else
        echo "[parallel] skipped: TP2 x PP2 needs 4 GPUs" | tee "$OUT/parallel.log"
      fi ;;
    grow) run grow python3 -m pytest -q -p no:cacheprovider tests/test_stream_grow.py -k "writes_what or peak" ;;
  esac
done
exit $status
