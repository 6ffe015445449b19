#!/usr/bin/env bash
# GPU readiness check, sized for a GPU machine lent for 15 minutes: every step has its own
# timeout and the whole run a hard budget (default 540 s).
#
#   scripts/gpu-check.sh [--quick] [--dry-run] [--budget SECONDS] [--out DIR]
#   make gpu-check ARGS="--quick"
#
# On a CUDA machine (a `pip install -e .[gpu,dev]` environment, the demo built or
# $GUARDSERVE_HOME carried over) it runs:
#   gpu-kernels       pytest tests/test_kernels_cuda.py: the compiled Triton kernels == torch reference
#   kernels-interp    pytest tests/test_kernels.py: the same contract under Triton's interpreter
#   logits-bench      python -m guardserve.benchmarks.logits --quick (the filter's per-step cost)
#   gpu-kernel-bench  Triton vs the torch reference on CUDA tensors, timed and checked equal
#   demo              guardserve demo build (cached: seconds)
#   gpu-steering      guardserve serve --steering: refused on Model Runner V2, steered on the V1 runner
#   gpu-serving       python -m guardserve.benchmarks.serving, a quick setting
# writing JSON and logs to bench/results/gpu/ and a summary (summary.json, summary.md).
#
# Without CUDA (or with --dry-run) it is a dry run: it prints the GPU steps it would run,
# runs the CPU parts (the kernels under TRITON_INTERPRET=1 against the reference, the quick
# logit benchmark) and writes its summary to bench/results/gpu/dry-run/. It exits 0 when the
# steps it ran passed.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-}
if [[ -z $PY ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
HELPER=("$PY" scripts/gpu_check.py)

QUICK=0
DRY=0
BUDGET=540
OUT=
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) QUICK=1 ;;
        --dry-run) DRY=1 ;;
        --budget) BUDGET=$2; shift ;;
        --out) OUT=$2; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ $DRY == 0 ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "[gpu-check] no CUDA device here: dry run (GPU steps listed, CPU parts run)"
    DRY=1
fi
MODE=gpu
[[ $DRY == 1 ]] && MODE=dry-run
if [[ -z $OUT ]]; then
    OUT=bench/results/gpu
    [[ $DRY == 1 ]] && OUT=bench/results/gpu/dry-run
fi
mkdir -p "$OUT"
rm -f "$OUT/steps.jsonl"
START=$SECONDS
QFLAG=()
[[ $QUICK == 1 ]] && QFLAG=(--quick)
echo "[gpu-check] mode $MODE, budget ${BUDGET} s, quick=$QUICK, results in $OUT"

# Each step: its own timeout, cut to what is left of the budget (10 s kept for the summary);
# with under 20 s left it is skipped. The helper enforces the timeout on the step's whole
# process group (servers included), and `timeout` here is the last resort.
FAILED=0
step() {  # step NAME TIMEOUT CMD...
    local name=$1 t=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START) - 10))
    (( t > left )) && t=$left
    if (( t < 20 )); then
        echo "[gpu-check] $name: skipped, budget spent"
        printf '{"step": "%s", "status": "skipped (budget)", "timeout_s": 0}\n' "$name" >> "$OUT/steps.jsonl"
        FAILED=1
        return
    fi
    timeout -k 10 $((t + 40)) "${HELPER[@]}" step "$OUT" "$name" "$t" -- "$@" || FAILED=1
}
plan() {  # plan NAME TIMEOUT WHAT
    "${HELPER[@]}" plan "$OUT" "$1" "$2" "$3"
}

"${HELPER[@]}" env "$OUT" >/dev/null || FAILED=1

if [[ $QUICK == 1 ]]; then T_KERN=120; T_LOGITS=90; T_KBENCH=60; T_DEMO=60; T_STEER=200; T_SERVE=150
else T_KERN=150; T_LOGITS=120; T_KBENCH=90; T_DEMO=90; T_STEER=240; T_SERVE=240; fi
# Serving benchmark: a quick setting. With --quick, eager engines (no CUDA-graph capture at start-up).
SERVE_ARGS=(--quick --out "$OUT/serving.json")
[[ $QUICK == 1 ]] && SERVE_ARGS=(--quick --requests 6 --out "$OUT/serving.json" -- --enforce-eager)

if [[ $MODE == gpu ]]; then
    step gpu-kernels "$T_KERN" "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py
    step kernels-interp "$T_KERN" env TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py
    step logits-bench "$T_LOGITS" "$PY" -m guardserve.benchmarks.logits --quick --out "$OUT/logits.json"
    step gpu-kernel-bench "$T_KBENCH" "${HELPER[@]}" kernel-bench "$OUT/kernels_cuda.json" "${QFLAG[@]}"
    step demo "$T_DEMO" "$PY" -m guardserve demo build
    step gpu-steering "$T_STEER" "${HELPER[@]}" steering "$OUT/steering_serve.json" "${QFLAG[@]}"
    step gpu-serving "$T_SERVE" "$PY" -m guardserve.benchmarks.serving "${SERVE_ARGS[@]}"
else
    plan gpu-kernels "$T_KERN" "pytest tests/test_kernels_cuda.py (compiled Triton kernels on CUDA == torch reference)"
    plan gpu-kernel-bench "$T_KBENCH" "scripts/gpu_check.py kernel-bench $OUT/kernels_cuda.json ${QFLAG[*]} (Triton vs torch reference on CUDA, timed)"
    plan demo "$T_DEMO" "guardserve demo build (cached: seconds; the GPU steps below need it)"
    plan gpu-steering "$T_STEER" "scripts/gpu_check.py steering $OUT/steering_serve.json ${QFLAG[*]} (guardserve serve --steering: refused on Model Runner V2; VLLM_USE_V2_MODEL_RUNNER=0: up, targets registered, requests answered)"
    plan gpu-serving "$T_SERVE" "python -m guardserve.benchmarks.serving ${SERVE_ARGS[*]}"
    step kernels-interp "$T_KERN" env TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py
    step logits-bench "$T_LOGITS" "$PY" -m guardserve.benchmarks.logits --quick --out "$OUT/logits.json"
fi

WALL=$((SECONDS - START))
"${HELPER[@]}" summary "$OUT" "$MODE" --budget "$BUDGET" --wall "$WALL" || FAILED=1
echo "[gpu-check] $MODE done in ${WALL} s; summary: $OUT/summary.md"
exit $FAILED
