#!/usr/bin/env bash
# fused_lstm on a CUDA GPU: builds the extension for that GPU, runs the GPU tests, the persistent kernel and the
# benchmark's gpu preset against torch.nn.LSTM (cuDNN), each stage under its own time limit and all of them
# under one deadline, and prints a summary last: the stages, the test counts and the per-shape speedups.
# compute-sanitizer runs as a call of its own.
#
#   bash benchmarks/device_check.sh [DIR]                    build, tests, persistent, bench: 8 minutes at most
#   STAGES=sanitizer bash benchmarks/device_check.sh [DIR]   compute-sanitizer (memcheck, racecheck) alone
#   DRY_RUN=1 bash benchmarks/device_check.sh                the plan: stages, commands, limits and their sum
#
# Needs a CUDA GPU visible to torch, and torch with CUDA, nvcc, ninja, pybind11 and pytest installed; no network:
# the build is `pip install --no-build-isolation --no-deps --no-index -e .` against the torch that is installed.
#
# Stages, run in this order whatever order STAGES names them in:
#   build       builds fused_lstm in place for this GPU's architecture only (TORCH_CUDA_ARCH_LIST = its sm),
#               keeps ptxas's register and spill report, and checks that the extension imports with CUDA
#   tests       pytest -m cuda over the test files that hold CUDA tests (tests/test_cuda.py,
#               tests/test_persistent.py and any other with tests marked `cuda`), with a junit XML; not the CPU op
#               tests (tests/test_ops.py, tests/test_cell_op.py: CI runs those), nor the compute-sanitizer tests
#   persistent  the benchmark with FUSED_LSTM_PERSISTENT=1 on small-batch shapes that fit the persistent kernel
#   bench       the benchmark's gpu preset in the modes BENCH_MODES; it runs last of these and also gets the time
#               the earlier stages left unused; stopped by its limit, it still writes the rows it measured
#   sanitizer   not a default stage: the compute-sanitizer tests of tests/test_cuda.py (memcheck and racecheck of
#               a small script through the standard and the persistent kernels). A short probe decides first,
#               before any build: no compute-sanitizer, or one that refuses the device ("Device not supported",
#               error 999), is a SKIP with its reason, not a failure
# A call without the build stage builds first when fused_lstm is not built with CUDA here or is older than its
# sources (e.g. STAGES=sanitizer on a fresh machine); the plan counts that build.
#
# Time: a stage runs under `timeout` with its limit (SIGTERM, then SIGKILL GRACE=10 s later). The limits, plus
# GRACE a stage, plus 40 s for the environment, the probes and the summary, must fit TOTAL_LIMIT, or the script
# does not start (exit 2). While it runs, no stage starts with less than 15 s left before the deadline. Whatever
# runs the script should allow it TOTAL_LIMIT seconds: stopped from outside, it leaves its raw logs unpacked.
#
# Environment:
#   STAGES            the stages (default "build tests persistent bench"; "sanitizer" as a call of its own)
#   TOTAL_LIMIT       the deadline in seconds (default 480)
#   BUILD_LIMIT TEST_LIMIT PERSISTENT_LIMIT BENCH_LIMIT SANITIZER_LIMIT
#                     each stage's limit in seconds (defaults 120, 140, 40, 80, 240)
#   BENCH_MODES       the benchmark's modes (default infer,train,train_weights)
#   COMPUTE_SANITIZER the compute-sanitizer to use (default: on PATH, else in $CUDA_HOME/bin or /usr/local/cuda/bin)
#   PYTHON            the Python that has torch (default python3)
#   DRY_RUN=1         print the plan and exit 0 without running anything (no GPU needed)
#   OUT               the results folder when DIR is not given
#   COMMIT            the commit to record where the tree is not a git checkout (default: git rev-parse HEAD)
#
# Results go to DIR, else $OUT, else benchmarks/results/<date>-gpu-<card>-<commit>/ (./device-results when no GPU
# is visible), as at most 8 files: env.txt (card, driver, CUDA, torch and Python versions, date, commit),
# summary.txt (what is printed last), tests.xml and sanitizer.xml (junit XML), results.json and results.md (the
# gpu preset), persistent.json (the persistent kernel's rows) and logs.tgz (every stage's log, ptxas's report,
# the benchmarks' csv, markdown and speedup.png). A call whose STAGES is not the default names its env, summary
# and logs after its stages (e.g. summary-sanitizer.txt), so two calls can share one folder.
# Exit status: 0 when every stage passed or was skipped; 1 when one failed, timed out or could not start, or no
# GPU is visible; 2 for an unknown stage, a limit that is not a number, or a plan that does not fit the deadline.
set -uo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")/.."
START=$(date +%s)
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
export PYTHONUNBUFFERED=1

ORDER="build tests persistent bench sanitizer"
DEFAULT_STAGES="build tests persistent bench"
STAGES=${STAGES:-$DEFAULT_STAGES}
TOTAL_LIMIT=${TOTAL_LIMIT:-480}
BUILD_LIMIT=${BUILD_LIMIT:-120}
TEST_LIMIT=${TEST_LIMIT:-140}
PERSISTENT_LIMIT=${PERSISTENT_LIMIT:-50}
BENCH_LIMIT=${BENCH_LIMIT:-80}
SANITIZER_LIMIT=${SANITIZER_LIMIT:-240}
BENCH_MODES=${BENCH_MODES:-infer,train,train_weights}
GRACE=10            # seconds between a stage's SIGTERM and its SIGKILL
BEFORE_RESERVE=20   # environment, probes
AFTER_RESERVE=20    # summary, packing the logs
MIN_STAGE=15        # no stage starts with less than this left
PROBE_LIMIT=60      # the compute-sanitizer probe, out of the sanitizer stage's limit

for var in TOTAL_LIMIT BUILD_LIMIT TEST_LIMIT PERSISTENT_LIMIT BENCH_LIMIT SANITIZER_LIMIT; do
  if ! [[ ${!var} =~ ^[0-9]+$ ]] || [ "${!var}" -eq 0 ]; then
    echo "device_check: $var must be a positive whole number of seconds, got '${!var}'" >&2
    exit 2
  fi
done
declare -A LIMIT=([build]=$BUILD_LIMIT [tests]=$TEST_LIMIT [persistent]=$PERSISTENT_LIMIT [bench]=$BENCH_LIMIT
                  [sanitizer]=$SANITIZER_LIMIT)
read -ra STAGE_LIST <<< "$STAGES"  # no glob expansion of what STAGES holds
for s in "${STAGE_LIST[@]}"; do
  if [ -z "${LIMIT[$s]+set}" ]; then
    echo "device_check: unknown stage '$s' in STAGES='$STAGES' (stages: $ORDER)" >&2
    exit 2
  fi
done
RUN=""
for s in $ORDER; do [[ " ${STAGE_LIST[*]} " == *" $s "* ]] && RUN+="$s "; done
RUN=${RUN% }
if [ -z "$RUN" ]; then
  echo "device_check: STAGES is empty (stages: $ORDER)" >&2
  exit 2
fi
in_run() { [[ " $RUN " == *" $1 "* ]]; }
# A call that does not build but needs the extension may have to build first: the plan counts it.
MAYBE_BUILD=0
in_run build || MAYBE_BUILD=1
SFX=""
[ "$RUN" != "$DEFAULT_STAGES" ] && SFX="-${RUN// /-}"

# -- the commands ------------------------------------------------------------------------------------------------
ARCH="<sm>"  # placeholders for the plan; the real values come with the environment
RAW="<results>/raw$SFX"
GPU_TEST_FILES=$(
  { echo tests/test_cuda.py; echo tests/test_persistent.py; grep -l -E 'mark\.cuda\b' tests/test_*.py 2>/dev/null; } |
    awk '!seen[$0]++' | while read -r f; do [ -f "$f" ] && echo "$f"; done | tr '\n' ' '
)
GPU_TEST_FILES=${GPU_TEST_FILES% }
# Every persistent shape fits both persistent kernels (forward and backward: the stage trains) on an H100/H200
# in both dtypes; FUSED_LSTM_PERSISTENT=1 makes a shape they decline an error. The backward kernel stages the
# step's [N, 4H] gate gradients next to its W_hh slice, so fp32 fits up to N*H of about 8K (tests/
# test_device_check.py asks the kernels' own plan, under the CUDA emulator's H100 profile). The last shape has a
# projection (proj_size 128: W_hr on chip next to W_hh, two grid barriers per step).
PERSISTENT_SHAPES="--shape 100,1,256,256 --shape 100,8,512,512 --shape 100,16,512,512 --shape 100,32,256,256 \
--shape 100,8,256,512,1,0,0,128"
CHECK_BUILT_PY="import json, fused_lstm; i = fused_lstm.build_info(); print('build_info:', json.dumps(i, default=str)); \
raise SystemExit(0 if i.get('cuda_available') else 'fused_lstm was built without CUDA kernels this GPU can run')"

q() { if [ "$DRY_RUN" = 1 ]; then echo "$1"; else printf %q "$1"; fi; }
set_commands() {  # after ARCH and RAW are known
  local raw
  raw=$(q "$RAW")
  CMD[build]="FUSED_LSTM_CUDA=1 TORCH_CUDA_ARCH_LIST=$(q "$ARCH") MAX_JOBS=$(nproc) $PYTHON -m pip install -v \
--no-build-isolation --no-deps --no-index --disable-pip-version-check -e . && $PYTHON -c \"$CHECK_BUILT_PY\""
  CMD[tests]="$PYTHON -m pytest -v -p no:cacheprovider -rfE --durations=10 --continue-on-collection-errors -m cuda \
-k 'not compute_sanitizer' --junitxml=$raw/tests.xml $GPU_TEST_FILES"
  CMD[persistent]="FUSED_LSTM_PERSISTENT=1 $PYTHON -m fused_lstm.benchmark --device cuda $PERSISTENT_SHAPES \
--modes infer,train --dtypes fp32,bf16 --min-time 0.1 --out $raw/persistent"
  CMD[bench]="$PYTHON -m fused_lstm.benchmark --preset gpu --device cuda --modes $BENCH_MODES --min-time 0.1 \
--out $raw/bench"
  CMD[sanitizer]="PATH=$(q "${SANITIZER_DIR:-<compute-sanitizer folder>}"):\$PATH $PYTHON -m pytest -v \
-p no:cacheprovider -rfE -m cuda -k compute_sanitizer --junitxml=$raw/sanitizer.xml tests/test_cuda.py"
}
declare -A CMD STATUS TAKEN USED_LIMIT

# -- the plan ----------------------------------------------------------------------------------------------------
plan_stages=$RUN
[ "$MAYBE_BUILD" = 1 ] && plan_stages="build $RUN"
planned_sum=0
for s in $plan_stages; do planned_sum=$(( planned_sum + LIMIT[$s] )); done
n_planned=$(wc -w <<< "$plan_stages")
planned_total=$(( planned_sum + n_planned * GRACE + BEFORE_RESERVE + AFTER_RESERVE ))
print_plan() {
  echo "fused_lstm device check: stages '$RUN', deadline ${TOTAL_LIMIT}s"
  set_commands
  for s in $plan_stages; do
    local note=""
    [ "$s" = build ] && [ "$MAYBE_BUILD" = 1 ] && note=", only if fused_lstm is not built with CUDA here or is older than its sources"
    [ "$s" = bench ] && note=", plus what the earlier stages leave unused"
    [ "$s" = sanitizer ] && note=", a ${PROBE_LIMIT}s probe of compute-sanitizer included"
    echo "== [$s] (limit ${LIMIT[$s]}s$note): ${CMD[$s]}"
  done
  echo "plan: limits ${planned_sum}s + ${GRACE}s stop grace x ${n_planned} stages + $(( BEFORE_RESERVE + AFTER_RESERVE ))s for" \
       "the environment, probes and summary = ${planned_total}s of the ${TOTAL_LIMIT}s deadline" \
       "($(( TOTAL_LIMIT - planned_total ))s to spare)"
  in_run sanitizer || echo "compute-sanitizer is not in these stages: run it as a call of its own, STAGES=sanitizer"
}

if [ "$planned_total" -gt "$TOTAL_LIMIT" ]; then
  print_plan
  echo "device_check: the plan does not fit: ${planned_total}s > the ${TOTAL_LIMIT}s deadline; lower a limit or raise TOTAL_LIMIT" >&2
  exit 2
fi
if [ "$DRY_RUN" = 1 ]; then
  print_plan
  if [ $# -ge 1 ]; then echo "results: $1"; elif [ -n "${OUT:-}" ]; then echo "results: $OUT";
  else echo "results: benchmarks/results/<date>-gpu-<card>-<commit>/"; fi
  echo "dry run: nothing was run"
  exit 0
fi

# -- environment -------------------------------------------------------------------------------------------------
ENV_TEXT=$(
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  if git rev-parse HEAD > /dev/null 2>&1; then
    echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ' (uncommitted changes)')"
  else
    echo "commit: ${COMMIT:-unknown} (not a git checkout)"
  fi
  echo "stages: $RUN (deadline ${TOTAL_LIMIT}s)"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  else
    echo "gpu: none (no nvidia-smi)"
  fi
  "$PYTHON" - 2>&1 <<'PY'
import platform
print("python:", platform.python_version())
try:
    import torch
except Exception as exc:
    print("torch: cannot import:", exc)
    raise SystemExit(0)
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "cudnn:", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device: %s sm_%d%d, %d SMs, %.0f GiB" % (p.name, p.major, p.minor, p.multi_processor_count,
                                                    p.total_memory / 2**30))
    print("card:", p.name)
    print("arch: %d.%d" % (p.major, p.minor))
PY
  echo "nvcc: $(nvcc --version 2>&1 | tail -n 1)"
)
CARD=$(sed -n 's/^card: //p' <<< "$ENV_TEXT")
ARCH=$(sed -n 's/^arch: //p' <<< "$ENV_TEXT")

if [ $# -ge 1 ]; then
  case $1 in /*) RESULTS=$1 ;; *) RESULTS=$CALLER_DIR/$1 ;; esac
elif [ -n "${OUT:-}" ]; then
  RESULTS=$OUT
elif [ -n "$CARD" ]; then
  slug=$(tr 'A-Z' 'a-z' <<< "$CARD" | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
  short=$(git rev-parse --short HEAD 2>/dev/null || echo "${COMMIT:-unknown}" | cut -c 1-7)
  RESULTS=benchmarks/results/$(date -u +%Y-%m-%d)-gpu-$slug-$short
else
  RESULTS=device-results
fi
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd)
RAW=$RESULTS/raw$SFX
rm -rf "$RAW" && mkdir -p "$RAW"
grep -v -E '^(card|arch): ' <<< "$ENV_TEXT" > "$RAW/env.txt"
cat "$RAW/env.txt"

# -- ending: stage table, summary (printed last), the results folder ------------------------------------------------
finish() {
  local s rc=0
  for s in $ORDER; do
    [ -n "${STATUS[$s]+set}" ] || continue
    printf '%s\t%s\t%s\t%s\n' "$s" "${STATUS[$s]}" "${TAKEN[$s]:-}" "${USED_LIMIT[$s]:-}" >> "$RAW/stages.tsv"
    case ${STATUS[$s]} in ok|SKIP*) ;; *) rc=1 ;; esac
  done
  [ -f "$RAW/build.log" ] && { grep -E "registers|spill|smem" "$RAW/build.log" | sed 's/^ *//' > "$RAW/ptxas.txt" || true; }
  local summary=$RESULTS/summary$SFX.txt
  if ! "$PYTHON" benchmarks/device_summary.py "$RAW" > "$summary" 2> "$RAW/summary-error.log"; then
    { echo; echo "================ fused_lstm device check: summary (device_summary.py failed: see logs)";
      cat "$RAW/stages.tsv" 2>/dev/null; } > "$summary"
  fi
  cp "$RAW/env.txt" "$RESULTS/env$SFX.txt"
  for f in tests.xml sanitizer.xml; do [ -f "$RAW/$f" ] && cp "$RAW/$f" "$RESULTS/$f"; done
  [ -f "$RAW/bench/results.json" ] && cp "$RAW/bench/results.json" "$RESULTS/results.json"
  [ -f "$RAW/bench/results.md" ] && cp "$RAW/bench/results.md" "$RESULTS/results.md"
  [ -f "$RAW/persistent/results.json" ] && cp "$RAW/persistent/results.json" "$RESULTS/persistent.json"
  if tar czf "$RESULTS/logs$SFX.tgz" -C "$RESULTS" "raw$SFX" 2>/dev/null; then rm -rf "$RAW"; fi
  echo
  echo "results: $RESULTS: $(cd "$RESULTS" && ls | tr '\n' ' ')"
  cat "$summary"
  exit $rc
}

# -- stages ------------------------------------------------------------------------------------------------------
PLANNED_END=$BEFORE_RESERVE  # seconds since the start by which the stages run so far were planned to end

run_stage() {  # run_stage NAME [EXTRA_SECONDS]: runs CMD[NAME] under its limit, records its status
  local name=$1 extra=${2:-0}
  local limit=$(( LIMIT[$name] - extra ))
  local elapsed=$(( $(date +%s) - START ))
  if [ "$name" = bench ] && [ "$PLANNED_END" -gt "$elapsed" ]; then
    limit=$(( limit + PLANNED_END - elapsed ))  # the time the earlier stages left unused
  fi
  PLANNED_END=$(( PLANNED_END + LIMIT[$name] + GRACE ))
  local left=$(( TOTAL_LIMIT - elapsed - GRACE - AFTER_RESERVE ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt "$MIN_STAGE" ]; then
    STATUS[$name]="NOT STARTED: ${left}s left before the ${TOTAL_LIMIT}s deadline"
    echo "== [$name] ${STATUS[$name]}"
    return
  fi
  USED_LIMIT[$name]=$limit
  echo "== [$name] (limit ${limit}s): ${CMD[$name]}"
  local t0=$(date +%s)
  # A plain pipeline, so the log is complete when the stage returns.
  timeout --kill-after=$GRACE "$limit" bash -c "${CMD[$name]}" 2>&1 | tee -a "$RAW/$name.log"
  local rc=${PIPESTATUS[0]}
  TAKEN[$name]=$(( $(date +%s) - t0 + extra ))
  if [ "$rc" -eq 0 ]; then STATUS[$name]=ok
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then STATUS[$name]="TIMEOUT after ${limit}s"
  else STATUS[$name]="FAILED (rc $rc)"; fi
  echo "== [$name] ${STATUS[$name]} in ${TAKEN[$name]}s"
}

NOT_SUPPORTED='Device not supported|[Ee]rror:? 999\b|error code 999\b|\(999\)'

# compute-sanitizer first: when it cannot run here, the call ends in seconds, before any build.
PROBE_SECONDS=0
if in_run sanitizer; then
  SANITIZER=${COMPUTE_SANITIZER:-}
  if [ -z "$SANITIZER" ]; then
    SANITIZER=$(command -v compute-sanitizer || true)
    for home in "${CUDA_HOME:-}" /usr/local/cuda; do
      [ -z "$SANITIZER" ] && [ -n "$home" ] && [ -x "$home/bin/compute-sanitizer" ] && SANITIZER=$home/bin/compute-sanitizer
    done
  fi
  if [ -z "$SANITIZER" ] || ! [ -x "$SANITIZER" ]; then
    STATUS[sanitizer]="SKIP: compute-sanitizer not found (${SANITIZER:-not on PATH, nor in \$CUDA_HOME/bin or /usr/local/cuda/bin})"
  else
    SANITIZER_DIR=$(dirname "$SANITIZER")
    echo "== [sanitizer] probe (limit ${PROBE_LIMIT}s): $SANITIZER --tool memcheck on a small torch CUDA program"
    t0=$(date +%s)
    { "$SANITIZER" --version 2>&1 | grep -i version | tail -n 1 | sed 's/^/compute-sanitizer: /'; } >> "$RAW/env.txt"
    timeout --kill-after=5 "$PROBE_LIMIT" "$SANITIZER" --tool memcheck --report-api-errors no "$PYTHON" -c \
      "import torch; x = torch.ones(8, device='cuda'); torch.cuda.synchronize(); print('sanitizer probe ok', float(x.sum()))" \
      > "$RAW/sanitizer-probe.log" 2>&1
    probe_rc=$?
    PROBE_SECONDS=$(( $(date +%s) - t0 ))
    refusal=$(grep -m 1 -E "$NOT_SUPPORTED" "$RAW/sanitizer-probe.log" | sed 's/^[= ]*//' | cut -c 1-160)
    if [ -n "$refusal" ]; then
      STATUS[sanitizer]="SKIP: compute-sanitizer refuses this device: $refusal"
    elif [ "$probe_rc" -eq 124 ] || [ "$probe_rc" -eq 137 ]; then
      STATUS[sanitizer]="TIMEOUT: its probe took over ${PROBE_LIMIT}s"
    elif ! grep -q "sanitizer probe ok" "$RAW/sanitizer-probe.log"; then
      echo "== [sanitizer] the probe failed (rc $probe_rc), running the tests anyway: $(tail -n 3 "$RAW/sanitizer-probe.log" | tr '\n' ' ' | cut -c 1-300)"
    fi
    TAKEN[sanitizer]=$PROBE_SECONDS
  fi
  [ -n "${STATUS[sanitizer]+set}" ] && echo "== [sanitizer] ${STATUS[sanitizer]}"
fi

TODO=""
for s in $RUN; do [ -n "${STATUS[$s]+set}" ] || TODO+="$s "; done
TODO=${TODO% }
[ -z "$TODO" ] && finish

if [ -z "$ARCH" ]; then
  echo "no CUDA device visible to torch: nothing to check" | tee -a "$RAW/env.txt"
  for s in $TODO; do STATUS[$s]="NOT STARTED: no CUDA device visible to torch"; done
  finish
fi
set_commands

if [ "$MAYBE_BUILD" = 1 ]; then
  so=$(ls fused_lstm/_C*.so 2>/dev/null | head -n 1)
  if [ -z "$so" ] || [ -n "$(find csrc setup.py -newer "$so" -type f 2>/dev/null | head -n 1)" ] ||
     ! "$PYTHON" -c "import fused_lstm, sys; sys.exit(0 if fused_lstm.build_info()['cuda_available'] else 1)" > /dev/null 2>&1; then
    echo "== fused_lstm is not built with CUDA here, or is older than its sources: building first"
    TODO="build $TODO"
  fi
fi

for s in $TODO; do
  if [ "$s" != build ] && [ -n "${STATUS[build]+set}" ] && [ "${STATUS[build]}" != ok ]; then
    STATUS[$s]="NOT STARTED: the build did not succeed"
    echo "== [$s] ${STATUS[$s]}"
    continue
  fi
  if [ "$s" = sanitizer ]; then
    run_stage sanitizer "$PROBE_SECONDS"
    refusal=$(grep -m 1 -E "$NOT_SUPPORTED" "$RAW/sanitizer.log" 2>/dev/null | sed 's/^[= ]*//' | cut -c 1-160)
    [ -n "$refusal" ] && STATUS[sanitizer]="SKIP: compute-sanitizer refuses this device: $refusal"
  else
    run_stage "$s"
  fi
done
finish
