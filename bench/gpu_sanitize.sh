#!/usr/bin/env bash
# bench/gpu_sanitize.sh: compute-sanitizer memcheck and racecheck over one small case of every
# Triton kernel (python -m bench.sanitize_cases --all), within about 2 minutes.
#
#   device tool:  run(command="BENCH_GIT_COMMIT=<sha> bash bench/gpu_sanitize.sh", timeout_s=180)
#   with the GPU check:  GPU_CHECK_SANITIZE=1 bash bench/gpu_check.sh   (its last step)
#   dry run here, no GPU:  GPU_SANITIZE_DEVICE=cpu bash bench/gpu_sanitize.sh   (or --dry-run):
#                 the cases through TRITON_INTERPRET=1, the sanitizer steps "not run (dry run)"
#
# Steps, each under `timeout`, all within GPU_SANITIZE_BUDGET s (115; a step gets at most what
# is left after 15 s for each later step), run from this checkout with PYTHONPATH=$PWD and
# MMKERNELS_NO_EXT=1:
#   1. plain: python3 -m bench.sanitize_cases --all --jobs GPU_SANITIZE_JOBS (8, 1 in a dry run:
#      each case in its own process) (limit GPU_SANITIZE_PLAIN_TIMEOUT s, 50): the cases pass and
#      every kernel launches without the sanitizer; this compiles the kernels into Triton's cache
#      side by side, so the sanitized runs load them rather than compile under the sanitizer
#   2. compute-sanitizer --tool memcheck (limit GPU_SANITIZE_MEMCHECK_TIMEOUT s, 40), with
#      PYTORCH_NO_CUDA_MEMORY_CACHING=1 (each tensor its own allocation, so an access past a
#      tensor's end is outside every allocation) and --padding where the sanitizer has it
#   3. compute-sanitizer --tool racecheck (limit GPU_SANITIZE_RACECHECK_TIMEOUT s, 35): shared-
#      memory hazards, which in Triton means the kernels with dots and reductions
#   GPU_SANITIZE_TOOLS (default "memcheck racecheck") picks the tools; initcheck and synccheck
#   run too (limit GPU_SANITIZE_<TOOL>_TIMEOUT s, default 35).
# Each tool runs the whole case list in one process (one CUDA context), --error-exitcode 86,
# --print-limit 20, --target-processes application-only (the CUDA work is in the python process
# itself; its children are Triton's ptxas runs). compute-sanitizer comes from $COMPUTE_SANITIZER,
# the PATH or /usr/local/cuda*/bin; where it is missing or refuses the device (on a gVisor
# runtime: "Device not supported"), its steps read "sanitizer unavailable: <message>", which is
# recorded and does not fail the script.
#
# Writes one file, $OUT/sanitizer.md (OUT defaults to bench/out/gpu_sanitize): the date, commit,
# GPU, sanitizer and version; per step its status (pass / fail: why / timeout / sanitizer
# unavailable: message / not run), the sanitizer's error count, the cases that passed, the kernels
# launched; the first reports of each tool, the launches per kernel, the commands, and the same
# as a JSON block. Commit it beside the run's benchmark under bench/results/<date>-<gpu>/.
# Exit status, a sum of: 1 a step failed (a sanitizer error, a failing case, a kernel never
# launched); 2 a step timed out.
set -u -o pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
DEVICE=${GPU_SANITIZE_DEVICE:-cuda}
[ "${1:-}" = "--dry-run" ] && DEVICE=cpu
OUT=${OUT:-$PWD/bench/out/gpu_sanitize}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TOOLS=${GPU_SANITIZE_TOOLS:-memcheck racecheck}
RESERVE=15  # seconds kept for each later step
if [ "$DEVICE" = cpu ]; then
  # the interpreter runs the kernels on the CPU: minutes, not seconds
  BUDGET=${GPU_SANITIZE_BUDGET:-600}
  PLAIN_T=${GPU_SANITIZE_PLAIN_TIMEOUT:-400}
  JOBS=${GPU_SANITIZE_JOBS:-1}  # one process: importing torch nine times costs more than it saves
  export TRITON_INTERPRET=1
else
  BUDGET=${GPU_SANITIZE_BUDGET:-115}
  PLAIN_T=${GPU_SANITIZE_PLAIN_TIMEOUT:-50}
  JOBS=${GPU_SANITIZE_JOBS:-8}
fi
export PYTHONUNBUFFERED=1 MMKERNELS_NO_EXT=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
elapsed() { echo $(( $(date +%s) - T0 )); }
# limit DEFAULT LATER_STEPS: DEFAULT, or what the budget leaves after LATER_STEPS reserves
limit() {
  local left=$(( BUDGET - $(elapsed) - RESERVE * $2 ))
  [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}
tool_timeout() {
  local var="GPU_SANITIZE_$(echo "$1" | tr '[:lower:]' '[:upper:]')_TIMEOUT"
  case $1 in memcheck) echo "${!var:-40}" ;; *) echo "${!var:-35}" ;; esac
}
# run_step NAME LIMIT CMD...: the command under timeout, its output to NAME.log, NAME.meta
run_step() {
  local name=$1 lim=$2; shift 2
  local t=$(date +%s) rc
  echo "== [$(elapsed) s] $name (limit $lim s): $*"
  timeout -k 5 "$lim" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  printf 'rc=%s\nseconds=%s\nlimit=%s\ncommand=%s\n' "$rc" $(( $(date +%s) - t )) "$lim" "$*" >"$WORK/$name.meta"
  grep -E '^case .*: |^kernels never|^FAILED|SUMMARY' "$WORK/$name.log" | tail -n 14
  echo "== $name: exit $rc after $(( $(date +%s) - t )) s"
}
skip_step() { printf 'skip=%s\n' "$2" >"$WORK/$1.meta"; echo "== $1: $2"; }
DRIVER=("$PY" -m bench.sanitize_cases --all --device "$DEVICE")

# the sanitizer and which of its options this version has
CS=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}
if [ -z "$CS" ]; then
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer; do
    [ -x "$c" ] && { CS=$c; break; }
  done
fi
CS_VERSION=""
CS_HELP=""
if [ -n "$CS" ]; then
  CS_VERSION=$("$CS" --version 2>&1 | grep -i -m1 'version' || echo "(no --version output)")
  CS_HELP=$("$CS" --help 2>&1 || true)
fi
has_option() { grep -q -- "$1" <<<"$CS_HELP"; }

# 1. the cases without the sanitizer (the dry run's one step)
LIM=$(limit "$PLAIN_T" "$(echo $TOOLS | wc -w)")
run_step plain "$LIM" "${DRIVER[@]}" --jobs "$JOBS" --json "$WORK/plain.json"

# 2-3. each tool over every case in one process
STEPS="plain"
LATER=$(echo $TOOLS | wc -w)
for tool in $TOOLS; do
  STEPS="$STEPS $tool"
  LATER=$((LATER - 1))
  if [ "$DEVICE" = cpu ]; then
    skip_step "$tool" "not run (dry run)"
    continue
  fi
  if [ -z "$CS" ]; then
    skip_step "$tool" "sanitizer unavailable: compute-sanitizer not on the PATH nor under /usr/local/cuda*/bin"
    continue
  fi
  LIM=$(limit "$(tool_timeout "$tool")" "$LATER")
  if [ "$LIM" -lt 10 ]; then
    skip_step "$tool" "skipped: out of time (budget $BUDGET s)"
    continue
  fi
  FLAGS=(--tool "$tool" --error-exitcode 86 --print-limit 20)
  has_option --target-processes && FLAGS+=(--target-processes application-only)
  has_option --report-api-errors && FLAGS+=(--report-api-errors no)  # PyTorch's probing calls
  has_option --show-backtrace && FLAGS+=(--show-backtrace no)
  ENV=()
  if [ "$tool" = memcheck ] || [ "$tool" = initcheck ]; then
    ENV=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)
    [ "$tool" = memcheck ] && has_option --padding && FLAGS+=(--padding 4096)
  fi
  run_step "$tool" "$LIM" ${ENV[@]+"${ENV[@]}"} "$CS" "${FLAGS[@]}" "${DRIVER[@]}" --json "$WORK/$tool.json"
done

# the record
MODE=cuda
[ "$DEVICE" = cpu ] && MODE="dry run: the cases on the CPU through TRITON_INTERPRET=1, no sanitizer"
GPU=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
COMMIT=${BENCH_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
"$PY" -m bench.sanitize_report --work "$WORK" --out "$OUT/sanitizer.md" --steps "$STEPS" \
  --header "date=$(date -u +%FT%TZ)" --header "commit=$COMMIT" \
  --header "mode=$MODE" \
  --header "GPU=${GPU:-none (nvidia-smi gave nothing)}" --header "kernel=$(uname -r)" \
  --header "compute-sanitizer=${CS:-not found}${CS_VERSION:+ ($CS_VERSION)}" \
  --header "budget=$BUDGET s, used $(elapsed) s"
RC=$?
echo "== gpu_sanitize done in $(elapsed) s -> $OUT/sanitizer.md (exit $RC)"
exit $RC
