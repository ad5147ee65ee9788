#!/usr/bin/env bash
# One-shot GPU check for a machine with a CUDA GPU and no network (torch with CUDA, nvcc, ninja, pybind11
# and pytest already installed): builds fused_lstm in place for this GPU's architecture only, runs the
# CUDA tests, runs the benchmark's gpu preset against torch.nn.LSTM (cuDNN), the persistent kernel on a few
# small-batch shapes, and compute-sanitizer last; writes logs and results to DIR (default ./device-results)
# and prints a short summary last. Every stage has a time limit and the whole script a deadline, so it never
# hangs and never runs past the device tool's 10 minutes; a failing stage does not stop the later ones.
# Exit status: non-zero if any stage that ran failed or timed out, or no GPU is visible.
#
#   bash benchmarks/device_check.sh [DIR]
#
# Environment:
#   STAGES          stages to run, in order (default: "build tests bench persistent sanitizer"); e.g. a second
#                   call on a still-warm machine can run STAGES=sanitizer alone (the in-place build is kept)
#   TOTAL_LIMIT     the script's deadline in seconds (default 570); a stage gets at most what is left
#   BUILD_LIMIT, TEST_LIMIT, BENCH_LIMIT, PERSISTENT_LIMIT, SANITIZER_LIMIT: per-stage limits in seconds
#   DRY_RUN=1       print each stage's command and limit without running anything (no GPU needed)
# DIR receives more files than the device tool brings back (8): a caller with that limit runs it on a
# scratch folder and packs it, e.g. `bash benchmarks/device_check.sh /tmp/dc; tar czf $OUT/dc.tgz -C /tmp dc;
# cp /tmp/dc/results.md /tmp/dc/speedup.png $OUT/`.
set -uo pipefail
cd "$(dirname "$0")/.."
SCRIPT_START=$(date +%s)
OUT_DIR=${1:-device-results}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
export PYTHONUNBUFFERED=1
STAGES=${STAGES:-build tests bench persistent sanitizer}
# Expected on an H100 (estimates: nothing here has run on a GPU yet): build ~1.5 min, tests ~2, benchmark
# ~3, persistent ~0.5, sanitizer whatever is left (racecheck is slow). A benchmark stopped by its limit
# still writes the rows it measured; pytest -v logs each test as it finishes, so a stopped test stage
# still shows which tests passed.
TOTAL_LIMIT=${TOTAL_LIMIT:-570}
BUILD_LIMIT=${BUILD_LIMIT:-150}
TEST_LIMIT=${TEST_LIMIT:-170}
BENCH_LIMIT=${BENCH_LIMIT:-180}
PERSISTENT_LIMIT=${PERSISTENT_LIMIT:-45}
SANITIZER_LIMIT=${SANITIZER_LIMIT:-300}
# A stage is not started with less than this left before the deadline.
MIN_STAGE_SECONDS=20
declare -A STATUS SECONDS_TAKEN

stage() {  # stage NAME LIMIT LOG CMD...
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$(( TOTAL_LIMIT - ($(date +%s) - SCRIPT_START) - 10 ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt "$MIN_STAGE_SECONDS" ]; then
    STATUS[$name]="no time left"
    echo "== [$name] not started: ${left}s left before the ${TOTAL_LIMIT}s deadline"
    return
  fi
  echo "== [$name] (limit ${limit}s): $*"
  if [ "$DRY_RUN" = 1 ]; then
    STATUS[$name]="dry run"
    return
  fi
  local t0=$(date +%s)
  # A plain pipeline, so the log is complete when the stage returns.
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$log"
  local rc=${PIPESTATUS[0]}
  SECONDS_TAKEN[$name]=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then STATUS[$name]=ok; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then STATUS[$name]="TIMEOUT"; else STATUS[$name]="FAILED (rc $rc)"; fi
  echo "== [$name] ${STATUS[$name]} in ${SECONDS_TAKEN[$name]}s"
}

wants() { [[ " $STAGES " == *" $1 "* ]]; }

# -- environment -------------------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "stages: $STAGES (deadline ${TOTAL_LIMIT}s)"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  else
    echo "gpu: none (no nvidia-smi)"
  fi
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
  if [ "$DRY_RUN" != 1 ]; then
    echo "no CUDA device visible to torch: nothing to check" | tee -a "$OUT_DIR/env.txt"
    exit 1
  fi
  ARCH=9.0
fi
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc > /dev/null; then
  export CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
fi

# -- build for this GPU only ---------------------------------------------------------------------------
if wants build; then
  stage build "$BUILD_LIMIT" build.log env FUSED_LSTM_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
    "$PYTHON" setup.py build_ext --inplace
  [ -f "$OUT_DIR/build.log" ] && { grep -E "registers|spill|smem" "$OUT_DIR/build.log" | sed 's/^ *//' > "$OUT_DIR/ptxas.txt" || true; }
fi

# -- CUDA tests (plus the op checks on this torch version); compute-sanitizer is its own stage ---------
if wants tests; then
  TEST_FILES=$(ls tests/test_cuda.py tests/test_persistent.py 2>/dev/null)
  stage tests "$TEST_LIMIT" tests.log "$PYTHON" -m pytest -v -p no:cacheprovider -rfEs --junitxml="$OUT_DIR/tests.xml" \
    -k "not compute_sanitizer" $TEST_FILES tests/test_ops.py tests/test_cell_op.py
fi

# -- benchmark: gpu preset against torch.nn.LSTM -------------------------------------------------------
# infer, train and train_weights only: fwd and bwd would not fit the device time a session gets.
if wants bench; then
  stage bench "$BENCH_LIMIT" bench.log "$PYTHON" -m fused_lstm.benchmark --preset gpu --device cuda \
    --modes infer,train,train_weights --out "$OUT_DIR"
fi

# -- the persistent kernel (opt-in until measured) on small-batch shapes, against the same cuDNN -------
# FUSED_LSTM_PERSISTENT=1 makes an unsupported shape an error, so every shape here must fit the kernel's
# shared memory on an H100/H200 in both dtypes (fp32, batch 16, H=1024: 8 units per block, 193 KB of 227).
if wants persistent; then
  stage persistent "$PERSISTENT_LIMIT" bench-persistent.log env FUSED_LSTM_PERSISTENT=1 "$PYTHON" -m fused_lstm.benchmark \
    --device cuda --shape 100,1,256,256 --shape 100,8,512,512 --shape 100,16,1024,1024 --shape 100,64,512,512 \
    --modes infer,train --dtypes fp32,bf16 --out "$OUT_DIR/persistent"
fi

# -- compute-sanitizer (memcheck, then racecheck) on every kernel, last: it is the slowest -------------
if wants sanitizer; then
  stage sanitizer "$SANITIZER_LIMIT" sanitizer.log "$PYTHON" -m pytest -v -p no:cacheprovider -rfEs \
    --junitxml="$OUT_DIR/sanitizer.xml" -k compute_sanitizer tests/test_cuda.py
fi

# -- summary (last, so it is what a truncated log still shows: per-shape speedups, then the stages) ------
echo
for results in "$OUT_DIR/results.json" "$OUT_DIR/persistent/results.json"; do
  [ -f "$results" ] && "$PYTHON" - "$results" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
print("--", sys.argv[1])
for r in data["results"]:
    shape = "T=%d N=%d I=%d H=%d%s" % (r["T"], r["N"], r["I"], r["H"], " cell" if r.get("cell") else "")
    if r["layers"] > 1 or r["bidirectional"] or r["packed"]:
        shape += " L%d%s%s" % (r["layers"], " bi" if r["bidirectional"] else "", " packed" if r["packed"] else "")
    speed = "%.2fx" % r["speedup"] if r.get("speedup") else "-"
    print("%-34s %-5s %-13s %7s %s" % (shape, r["dtype"], r["mode"], speed, r["status"]))
for key, s in data["summary"]["speedup"].items():
    print("geomean %-20s %.2fx over %d" % (key, s["geomean_speedup"], s["count"]))
PY
done
echo "================ fused_lstm device check: $(grep -m1 '^gpu:' "$OUT_DIR/env.txt" || true)"
for log in tests.log sanitizer.log; do
  [ -f "$OUT_DIR/$log" ] && tail -n 1 "$OUT_DIR/$log" | sed "s/^/$log: /"
done
printf "%-10s %-16s %6s\n" stage status seconds
for s in $STAGES; do printf "%-10s %-16s %6s\n" "$s" "${STATUS[$s]:-skipped}" "${SECONDS_TAKEN[$s]:-}"; done
for s in $STAGES; do
  case "${STATUS[$s]:-}" in ok|"dry run") ;; *) exit 1 ;; esac
done
exit 0
