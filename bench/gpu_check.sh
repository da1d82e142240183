#!/usr/bin/env bash
# bench/gpu_check.sh: the one command to run on a lent GPU machine.
#
#   device tool:  run(command="BENCH_GIT_COMMIT=<sha> bash bench/gpu_check.sh", timeout_s=560)
#                 (<sha> = `git rev-parse HEAD` here, pasted in: the machine's own git
#                 checkout is not this one, so without it the results name the wrong commit)
#   with peers:   bash bench/fetch_peer_wheels.sh here first, then
#                 run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560)
#
# What it does (about 8.5 minutes at most, 10.5 with GPU_CHECK_TUNE=1 unless the other limits
# are lowered; nothing fetched from any network, nothing built: the GPU path is pure Python,
# run from this checkout with PYTHONPATH=$PWD and MMKERNELS_NO_EXT=1):
#   1. prints nvidia-smi, clocks and versions                       -> $OUT/env.txt
#   2. installs carried wheels from .whl/ into /tmp/site, if any     (pip --no-index)
#   3. python3 -m pytest -m gpu --maxfail=8 -q tests   (limit GPU_CHECK_TEST_TIMEOUT s, 150; with
#      GPU_CHECK_FAMILIES, only the tests of those families: -k "experts or ...") -> $OUT/tests.log
#      then checks that every bench provider (mmkernels, open_clip, inf_cl) computes
#      the reference's loss and gradients at small sizes on the GPU
#      (pytest tests/bench/test_agreement.py -k agrees; limit GPU_CHECK_AGREE_TIMEOUT s, 100)  -> appended to tests.log
#   4. python3 -m bench --quick --device cuda (limit GPU_CHECK_BENCH_TIMEOUT s, 210; every family, or only
#      those in GPU_CHECK_FAMILIES, comma-separated, e.g. "cross_attention,experts") -> $OUT/bench.log
#      and moves its results.json, results.md and plot.png to the top of $OUT; the dispatch-table
#      rows the run measured (python -m bench.dispatch_table) are appended to bench.log
#      (the device tool brings back at most 8 files, at most $OUT/a/b/file deep).
#   5. python3 -m bench.profile_gpu (limit GPU_CHECK_PROFILE_TIMEOUT s, 45; the cases of GPU_CHECK_FAMILIES
#      only, when set): device time per kernel -> $OUT/profile.md (rewritten after each case)
#   6. only with GPU_CHECK_TUNE=1: python3 -m bench.tune_gpu (limit GPU_CHECK_TUNE_TIMEOUT s, 120) -> $OUT/tune.md
#      (GPU_CHECK_TUNE_ONLY=cross_attention,experts limits and orders the sweeps; tune.md keeps every
#      family finished before a timeout)
#   7. only with GPU_CHECK_TUNE=1, when the experts sweep finished: python3 -m bench --quick --family
#      experts with the fastest settings it found (limit GPU_CHECK_TUNED_BENCH_TIMEOUT s, 120)
#      -> appended to $OUT/tune.md
#   8. only with GPU_CHECK_SANITIZE=1 (and not GPU_CHECK_TUNE=1: no time, and a ninth file):
#      bash bench/gpu_sanitize.sh, compute-sanitizer memcheck and racecheck over one small case of
#      every Triton kernel, with what is left of GPU_CHECK_TOTAL s (550) up to 115 s; skipped when
#      under 60 s are left (then lower GPU_CHECK_BENCH_TIMEOUT, set GPU_CHECK_FAMILIES, or run
#      bench/gpu_sanitize.sh alone, about 2 minutes)              -> $OUT/sanitizer.md
# The bench runs even when the tests fail. Exit status, a sum of: 1 GPU tests
# failed or timed out; 2 bench failed (an mmkernels measurement errored, or the
# bench crashed); 4 a bench provider disagrees with the reference; 8 the sanitizer
# found an error, a sanitized case failed or a step timed out (an unavailable sanitizer is not).
# Commit what it wrote under bench/results/<date>-<gpu>/.
#
# Outside the device tool, OUT defaults to bench/out/gpu_check. For a dry run
# of the script's plumbing on a machine without a GPU:
#   GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUT=${OUT:-$PWD/bench/out/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
TEST_T=${GPU_CHECK_TEST_TIMEOUT:-150}
AGREE_T=${GPU_CHECK_AGREE_TIMEOUT:-100}
BENCH_T=${GPU_CHECK_BENCH_TIMEOUT:-210}
PROF_T=${GPU_CHECK_PROFILE_TIMEOUT:-45}
TUNE_T=${GPU_CHECK_TUNE_TIMEOUT:-120}
TUNED_T=${GPU_CHECK_TUNED_BENCH_TIMEOUT:-120}
export PYTHONUNBUFFERED=1 MMKERNELS_NO_EXT=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
elapsed() { echo $(( $(date +%s) - T0 )); }

# 1. the machine ------------------------------------------------------------
{
  echo "== gpu_check $(date -u +%FT%TZ) on $(uname -srm)"
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit \
    --format=csv 2>/dev/null || true
  "$PY" - <<'PYEOF'
import sys
import torch
print(f"python {sys.version.split()[0]} | torch {torch.__version__} (CUDA {torch.version.cuda}) | cuda available: {torch.cuda.is_available()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as exc:
    print(f"triton not importable: {exc}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
PYEOF
} 2>&1 | tee "$OUT/env.txt"

# 2. carried wheels (peers), never the network ------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "== installing carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')" | tee -a "$OUT/env.txt"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      2>&1 | tee -a "$OUT/env.txt"; then
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  else
    echo "wheel install failed: the peers will be skipped" | tee -a "$OUT/env.txt"
  fi
else
  echo "== no .whl/ carried: open_clip and inf_cl will be skipped (bench/fetch_peer_wheels.sh)" | tee -a "$OUT/env.txt"
fi
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/env.txt"
import importlib
for name in ("mmkernels", "open_clip", "inf_cl"):
    try:
        mod = importlib.import_module(name)
        print(f"import {name}: ok {getattr(mod, '__version__', '')}")
    except Exception as exc:
        print(f"import {name}: {type(exc).__name__}: {exc}")
PYEOF

# 3. GPU tests ---------------------------------------------------------------
# GPU_CHECK_FAMILIES (e.g. "experts" or "cross_attention,experts") also narrows the tests and the
# agreement check to those families: pytest -k "experts or ..." (the test files and the
# agreement tests carry their family's name)
FAM_K=""
[ -n "${GPU_CHECK_FAMILIES:-}" ] && FAM_K=$(echo "$GPU_CHECK_FAMILIES" | sed 's/ //g; s/,/ or /g')
TEST_K=()
[ -n "$FAM_K" ] && TEST_K=(-k "$FAM_K")
TEST_RC=0
if [ -d tests ]; then
  echo "== [$(elapsed) s] pytest -m gpu --maxfail=8 -q tests (limit ${TEST_T} s)"
  timeout -k 10 "$TEST_T" "$PY" -m pytest -m gpu --maxfail=8 -q -rfE --durations=8 -p no:cacheprovider \
    ${TEST_K[@]+"${TEST_K[@]}"} tests 2>&1 | tee "$OUT/tests.log"
  TEST_RC=${PIPESTATUS[0]}
  case $TEST_RC in
    0) echo "GPU tests: passed" ;;
    5) echo "GPU tests: none collected (pytest exit 5)"; TEST_RC=0 ;;
    124 | 137) echo "GPU tests: TIMED OUT after ${TEST_T} s" ;;
    *) echo "GPU tests: FAILED (pytest exit $TEST_RC)" ;;
  esac
else
  echo "== no tests/ folder: GPU tests skipped" | tee "$OUT/tests.log"
fi

# 3b. the bench's providers compute the same function as the reference (small sizes)
AGREE_K="agrees${FAM_K:+ and ($FAM_K)}"
echo "== [$(elapsed) s] pytest tests/bench/test_agreement.py -k \"$AGREE_K\" on $DEVICE (limit ${AGREE_T} s)"
BENCH_DEVICE=$DEVICE timeout -k 10 "$AGREE_T" "$PY" -m pytest tests/bench/test_agreement.py -k "$AGREE_K" -q -p no:cacheprovider \
  2>&1 | tee -a "$OUT/tests.log"
AGREE_RC=${PIPESTATUS[0]}
[ "$AGREE_RC" -eq 5 ] && AGREE_RC=0
[ "$AGREE_RC" -ne 0 ] && echo "bench providers: DISAGREE with the reference or failed (exit $AGREE_RC)"

# 4. quick benchmark ---------------------------------------------------------------
echo "== [$(elapsed) s] python -m bench --quick --device $DEVICE (limit ${BENCH_T} s)"
FAMILY_ARGS=()
[ -n "${GPU_CHECK_FAMILIES:-}" ] && FAMILY_ARGS=(--family "$GPU_CHECK_FAMILIES")
timeout -k 15 "$BENCH_T" "$PY" -m bench --quick --device "$DEVICE" --out "$OUT/bench" ${FAMILY_ARGS[@]+"${FAMILY_ARGS[@]}"} \
  --time-budget $((BENCH_T > 60 ? BENCH_T - 40 : BENCH_T / 2)) 2>&1 | tee "$OUT/bench.log"
BENCH_RC=${PIPESTATUS[0]}
for f in results.json results.md plot.png; do
  if [ -f "$OUT/bench/$f" ]; then mv "$OUT/bench/$f" "$OUT/$f"; else echo "missing: bench/$f"; fi
done
rm -rf "$OUT/bench"
# the dispatch-table rows this run measured (commit the run, then regenerate the tables here with
# python -m bench --dispatch-table bench/results/<run> --write)
[ -f "$OUT/results.json" ] && { echo "== dispatch-table rows measured by this run"; \
  "$PY" -m bench.dispatch_table "$OUT" 2>&1 | tail -n 60; } >>"$OUT/bench.log"

# 5. where the time goes: per-kernel device time of a few cases (informative, never fails the check)
if [ "$DEVICE" = cuda ]; then
  echo "== [$(elapsed) s] python -m bench.profile_gpu (limit ${PROF_T} s)"
  echo "== profile_gpu (stderr)" >>"$OUT/bench.log"
  PROF_ARGS=()  # the families of GPU_CHECK_FAMILIES only (case names start with their family)
  [ -n "${GPU_CHECK_FAMILIES:-}" ] && PROF_ARGS=(--case "$GPU_CHECK_FAMILIES")
  timeout -k 5 "$PROF_T" "$PY" -m bench.profile_gpu --out "$OUT/profile.md" ${PROF_ARGS[@]+"${PROF_ARGS[@]}"} >/dev/null \
    2>>"$OUT/bench.log" \
    || echo "profile_gpu: failed or timed out (its stderr is at the end of bench.log)"
fi

# 6. optional (GPU_CHECK_TUNE=1): tile sweeps for the heuristics -> $OUT/tune.md. The whole script
#    then needs about 9.5 minutes: lower the other limits or run `python -m bench.tune_gpu` alone.
if [ "$DEVICE" = cuda ] && [ "${GPU_CHECK_TUNE:-0}" = 1 ]; then
  echo "== [$(elapsed) s] python -m bench.tune_gpu (limit ${TUNE_T} s)"
  echo "== tune_gpu (stderr)" >>"$OUT/bench.log"
  TUNE_ARGS=()
  [ -n "${GPU_CHECK_TUNE_ONLY:-}" ] && TUNE_ARGS=(--only "$GPU_CHECK_TUNE_ONLY")
  TUNED_FILE=$(mktemp --suffix=.json)
  timeout -k 5 "$TUNE_T" "$PY" -m bench.tune_gpu --out "$OUT/tune.md" --save "$TUNED_FILE" \
    ${TUNE_ARGS[@]+"${TUNE_ARGS[@]}"} >/dev/null 2>>"$OUT/bench.log" \
    || echo "tune_gpu: failed or timed out (its stderr is at the end of bench.log)"
  # 7. the experts bench again with the fastest tiles and chunks the sweep found (their
  #    mmkernels.tuning file from tune_gpu --save), appended to tune.md: the tuned
  #    speed measured in the same call, before any heuristic is changed
  if [ -s "$TUNED_FILE" ]; then
    echo "== [$(elapsed) s] python -m bench --quick --family experts with the tuned settings (limit ${TUNED_T} s)"
    TUNED_OUT=$(mktemp -d)
    ( export MMKERNELS_TUNING_FILE="$TUNED_FILE"
      timeout -k 10 "$TUNED_T" "$PY" -m bench --quick --device "$DEVICE" --family experts --out "$TUNED_OUT" \
        --time-budget $((TUNED_T > 60 ? TUNED_T - 30 : TUNED_T / 2)) >>"$OUT/bench.log" 2>&1 ) \
      || echo "tuned experts bench: failed or timed out (see bench.log)"
    { echo; echo "# bench experts with the tuned settings"; echo; echo '```json'; cat "$TUNED_FILE"; echo '```'; echo
      cat "$TUNED_OUT/results.md" 2>/dev/null || echo "(no results.md: see bench.log)"; } >>"$OUT/tune.md"
    rm -rf "$TUNED_OUT"
  fi
  rm -f "$TUNED_FILE"
fi

# 8. optional (GPU_CHECK_SANITIZE=1): compute-sanitizer over every Triton kernel -> $OUT/sanitizer.md
SAN_RC=0
if [ "${GPU_CHECK_SANITIZE:-0}" = 1 ]; then
  SAN_LEFT=$(( ${GPU_CHECK_TOTAL:-550} - $(elapsed) ))
  [ "$SAN_LEFT" -gt 115 ] && SAN_LEFT=115
  if [ "${GPU_CHECK_TUNE:-0}" = 1 ]; then
    echo "== gpu_sanitize skipped: not beside GPU_CHECK_TUNE=1 (run bash bench/gpu_sanitize.sh alone)"
  elif [ "$SAN_LEFT" -lt 60 ]; then
    echo "== gpu_sanitize skipped: ${SAN_LEFT} s left of GPU_CHECK_TOTAL (run bash bench/gpu_sanitize.sh alone)"
  else
    echo "== [$(elapsed) s] bash bench/gpu_sanitize.sh (budget ${SAN_LEFT} s)"
    OUT="$OUT" GPU_SANITIZE_DEVICE="$DEVICE" GPU_SANITIZE_BUDGET="$SAN_LEFT" PYTHON="$PY" bash bench/gpu_sanitize.sh
    SAN_RC=$?
  fi
fi

RC=0
[ "$TEST_RC" -ne 0 ] && RC=1
[ "$BENCH_RC" -ne 0 ] && RC=$((RC + 2))
[ "$AGREE_RC" -ne 0 ] && RC=$((RC + 4))
[ "$SAN_RC" -ne 0 ] && RC=$((RC + 8))
echo "== gpu_check done in $(elapsed) s: tests exit $TEST_RC, providers-agree exit $AGREE_RC, bench exit $BENCH_RC," \
  "sanitizer exit $SAN_RC -> exit $RC"
echo "== files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $RC
