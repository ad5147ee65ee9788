#!/usr/bin/env bash
# One-shot GPU check for a machine with a CUDA GPU and no network (torch with CUDA, nvcc, ninja, pybind11
# and pytest already installed): builds fused_lstm in place for this GPU's architecture only, runs the
# CUDA tests, runs the benchmark's gpu preset against torch.nn.LSTM (cuDNN), writes logs and results to
# DIR (default ./device-results) and prints a short summary table last. Every stage has a time limit, so
# the script never hangs; a failing stage does not stop the later ones. Exit status: non-zero if any
# stage failed.
#
#   bash benchmarks/device_check.sh [DIR]
#
# Stage limits (seconds) can be overridden: BUILD_LIMIT, TEST_LIMIT, BENCH_LIMIT, PERSISTENT_LIMIT.
# DIR receives more files than the device tool brings back (8): a caller with that limit runs it on a
# scratch folder and packs it, e.g. `bash benchmarks/device_check.sh /tmp/dc; tar czf $OUT/dc.tgz -C /tmp dc;
# cp /tmp/dc/results.md /tmp/dc/speedup.png $OUT/`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-device-results}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# The limits add up to under 10 minutes (the device tool's limit for one command); expected on an H100:
# build ~1.5 min, tests ~2, benchmark ~4, persistent ~1. A benchmark stopped by its limit still writes
# the rows it measured.
BUILD_LIMIT=${BUILD_LIMIT:-150}
TEST_LIMIT=${TEST_LIMIT:-170}
BENCH_LIMIT=${BENCH_LIMIT:-210}
PERSISTENT_LIMIT=${PERSISTENT_LIMIT:-50}
declare -A STATUS SECONDS_TAKEN

stage() {  # stage NAME LIMIT LOG CMD...
  local name=$1 limit=$2 log=$3
  shift 3
  echo "== [$name] (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT_DIR/$log") 2>&1
  local rc=$?
  SECONDS_TAKEN[$name]=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then STATUS[$name]=ok; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then STATUS[$name]="TIMEOUT"; else STATUS[$name]="FAILED (rc $rc)"; fi
  echo "== [$name] ${STATUS[$name]} in ${SECONDS_TAKEN[$name]}s"
}

# -- environment -------------------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  "$PYTHON" - <<'PY'
import sys, torch
print("python:", sys.version.split()[0])
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "cudnn:", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, "sm_%d%d" % (p.major, p.minor), p.multi_processor_count, "SMs")
PY
  nvcc --version 2>&1 | tail -1
} 2>&1 | tee "$OUT_DIR/env.txt"

ARCH=$("$PYTHON" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')" 2>/dev/null)
if [ -z "$ARCH" ]; then
  echo "no CUDA device visible to torch: nothing to check" | tee -a "$OUT_DIR/env.txt"
  exit 1
fi
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}

# -- build for this GPU only ---------------------------------------------------------------------------
stage build "$BUILD_LIMIT" build.log env FUSED_LSTM_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
  "$PYTHON" setup.py build_ext --inplace
grep -E "registers|spill|smem" "$OUT_DIR/build.log" | sed 's/^ *//' > "$OUT_DIR/ptxas.txt" || true

# -- CUDA tests (plus the op checks on this torch version) ----------------------------------------------
TEST_FILES=$(ls tests/test_cuda.py tests/test_persistent.py 2>/dev/null)
stage tests "$TEST_LIMIT" tests.log "$PYTHON" -m pytest -q -rfEs --junitxml="$OUT_DIR/tests.xml" $TEST_FILES tests/test_ops.py \
  tests/test_cell_op.py

# -- benchmark: gpu preset against torch.nn.LSTM -------------------------------------------------------
# infer, train and train_weights only: fwd and bwd would not fit the device time a session gets.
stage bench "$BENCH_LIMIT" bench.log "$PYTHON" -m fused_lstm.benchmark --preset gpu --device cuda \
  --modes infer,train,train_weights --out "$OUT_DIR"

# -- the persistent kernel (opt-in until measured) on small-batch shapes, against the same cuDNN -------------
stage persistent "$PERSISTENT_LIMIT" bench-persistent.log env FUSED_LSTM_PERSISTENT=1 "$PYTHON" -m fused_lstm.benchmark \
  --device cuda --shape 100,1,256,256 --shape 100,8,512,512 --shape 100,32,1024,1024 --shape 100,64,512,512 \
  --modes infer,train --dtypes fp32,bf16 --out "$OUT_DIR/persistent"

# -- summary (last, so it is what a truncated log still shows) -----------------------------------------
echo
echo "================ fused_lstm device check: $(head -c 200 "$OUT_DIR/env.txt" | grep -m1 '^gpu:' || true)"
printf "%-8s %-16s %6s\n" stage status seconds
for s in build tests bench persistent; do printf "%-8s %-16s %6s\n" "$s" "${STATUS[$s]:-skipped}" "${SECONDS_TAKEN[$s]:-}"; done
tail -n 3 "$OUT_DIR/tests.log" 2>/dev/null | sed 's/^/tests: /'
for table in "$OUT_DIR/results.md" "$OUT_DIR/persistent/results.md"; do
  [ -f "$table" ] && { echo "-- $table"; grep -E '^\|' "$table" | head -n 40; }
done
for s in build tests bench persistent; do [ "${STATUS[$s]:-}" = ok ] || exit 1; done
exit 0
