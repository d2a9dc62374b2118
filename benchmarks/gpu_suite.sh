#!/usr/bin/env bash
# GPU evidence in one command (about 10 minutes at most on an H100; no network needed):
#   1. nvidia-smi and versions            -> benchmarks/results/<stem>-env.txt
#   2. pip install --no-deps --no-build-isolation -e .
#   3. the whole test suite on the GPU, interpreter off (TRITON_INTERPRET=0: real bf16, `gpu` tests run)
#   4. the AOT compile gate for the live compute capability -> <stem>-aot.json
#   5. python -m lorafast bench at all shapes (BERT-base, Llama-8B; r 8 16 64; p 0 0.1; every strategy on its
#      own and what auto picked; the CPU host-cost section) -> <stem>.{json,md,png}
#   6. python -m lorafast bench --quant nf4 (QLoRA vs PEFT, BERT-base and Llama-8B attention) -> <stem>-nf4.{json,md}
# Each step runs under `timeout` and the suite goes on when one fails; a summary table ends the log
# (<stem>-suite.log). <stem> is <device>-<date>, e.g. nvidia-h100-80gb-hbm3-2026-11-23-1402.
# If $OUT is set (the device tool's return folder), the result files are copied there too.
#
# Usage:  bash benchmarks/gpu_suite.sh
# Knobs (environment): PYTHON (python3), T_INSTALL T_TESTS T_AOT T_BENCH T_QUANT (step limits in seconds),
#   SKIP_INSTALL=1 (package already installed),
#   PYTEST_ARGS (extra pytest flags, e.g. "-m 'not slow'"), BENCH_ARGS (extra bench flags, e.g.
#   "--cuda-graphs" or "--quick"), AOT_JOBS (compile processes).
set -u
cd "$(dirname "$0")/.." || exit 2

PY=${PYTHON:-python3}
T_INSTALL=${T_INSTALL:-60}
T_TESTS=${T_TESTS:-200}
T_AOT=${T_AOT:-60}
T_BENCH=${T_BENCH:-200}
T_QUANT=${T_QUANT:-60}
AOT_JOBS=${AOT_JOBS:-8}
RES=benchmarks/results
mkdir -p "$RES"

# `python -m` puts the repo root on sys.path, which makes kernels/ importable as a top-level
# `kernels` (transformers probes that name); -P (Python >= 3.11) leaves it off.
PYP="$PY"
if "$PY" -P -c pass 2>/dev/null; then PYP="$PY -P"; fi

DEVICE_SLUG=$($PY -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))" 2>/dev/null || echo no-cuda)
STEM="$DEVICE_SLUG-$(date -u +%Y-%m-%d-%H%M)"
LOG="$RES/$STEM-suite.log"
ENV_TXT="$RES/$STEM-env.txt"
SUMMARY=()
FAILED=0
SUITE_START=$(date +%s)

# step NAME LIMIT_S COMMAND...: run under timeout, output appended to the suite log.
step() {
    local name=$1 limit=$2
    shift 2
    local start rc status
    start=$(date +%s)
    echo "=== [$name] limit ${limit}s: $*" | tee -a "$LOG"
    timeout --kill-after=15 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
    SUMMARY+=("$(printf '%-8s %-24s %5ss' "$name" "$status" "$(($(date +%s) - start))")")
    echo "=== [$name] $status in $(($(date +%s) - start))s" | tee -a "$LOG"
}

echo "lorafast GPU suite $STEM (started $(date -u))" | tee "$LOG"

{
    echo "# $STEM"
    date -u
    nvidia-smi
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu --format=csv
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('device', torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
    $PY -m pip list 2>/dev/null | grep -iE '^(torch|triton|peft|transformers|pytest|pytest-benchmark|numpy) '
    git log -1 --oneline 2>/dev/null
} >"$ENV_TXT" 2>&1
SUMMARY+=("$(printf '%-8s %-24s' env "see $(basename "$ENV_TXT")")")

if [ "${SKIP_INSTALL:-0}" = 1 ]; then
    SUMMARY+=("$(printf '%-8s %-24s' install skipped)")
else
    step install "$T_INSTALL" $PY -m pip install --no-deps --no-build-isolation --no-index -e .
fi

CC=$($PY -c "import torch; major, minor = torch.cuda.get_device_capability(); print(f'{major}{minor}')" 2>/dev/null || echo 90)

PYTEST="$PYP -m pytest"
[ "$PYP" = "$PY" ] && PYTEST="pytest"  # no -P: the pytest script keeps the repo root off sys.path
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of flags
step tests "$T_TESTS" env TRITON_INTERPRET=0 $PYTEST tests -q -rs -p no:cacheprovider --durations=10 ${PYTEST_ARGS:-}

step aot "$T_AOT" $PYP -m lorafast.aot --arch "$CC" --jobs "$AOT_JOBS" --json "$RES/$STEM-aot.json"

# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
step bench "$T_BENCH" env PYTHONUNBUFFERED=1 $PYP -m lorafast bench --shapes bert llama --rank 8 16 64 \
    --dropout 0 0.1 --out "$RES" --name "$STEM" --no-progress ${BENCH_ARGS:-}

step quant "$T_QUANT" env PYTHONUNBUFFERED=1 $PYP -m lorafast bench --quant nf4 --rank 16 --out "$RES" \
    --name "$STEM-nf4" --no-progress

{
    echo
    echo "=== summary ($STEM, $(($(date +%s) - SUITE_START))s, $FAILED step(s) failed)"
    printf '%s\n' "${SUMMARY[@]}"
    if [ -f "$RES/$STEM.md" ]; then
        echo
        sed -n '1,/^## Correctness and memory/p' "$RES/$STEM.md" | head -n -1
        sed -n '/^## Correctness failures/,$p' "$RES/$STEM.md"
    fi
} | tee -a "$LOG"

if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    for f in "$RES/$STEM.json" "$RES/$STEM.md" "$RES/$STEM.png" "$RES/$STEM-nf4.json" "$RES/$STEM-nf4.md" \
        "$RES/$STEM-aot.json" "$ENV_TXT" "$LOG"; do
        [ -f "$f" ] && cp "$f" "$OUT/"
    done
    echo "copied results to \$OUT"
fi
[ "$FAILED" -eq 0 ]
