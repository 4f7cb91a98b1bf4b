#!/usr/bin/env bash
# The GPU check (issue 12): one command, on a bare GPU machine with no network, that builds the
# CUDA kernels, proves they are there, runs the CUDA tests and measures the GPU path.
#
#   bash benchmarks/gpu_check.sh [--out-dir DIR] [--dry-run] [--step NAME]
#
# Steps, each time-boxed (`timeout`; the whole run within GPU_CHECK_BUDGET seconds, default 470,
# so it ends within 8 minutes), each one's log in DIR; a step that fails or hangs still leaves the
# others' results, except that nothing runs after a failed build or device check (every CUDA test
# would be skipped and the benchmark would have no kernels to measure):
#   env      the machine: GPU, driver, Python, torch and its CUDA
#   build    KNOTS_EXT_CUDA=1 pip install --no-build-isolation --no-deps --no-index -e . with the
#            CUDA architectures of the GPU (CUDAARCHS, default 90: sm_90 code + compute_90 PTX, the
#            H100 / H200); KNOTS_EXT_CUDA=1 makes a build without nvcc fail instead of going CPU-only
#   check    outside pytest: the installed knots_ext is this tree's, was built with its CUDA
#            kernels and sees a CUDA device, and torch sees it too (so a silent CPU-only build, whose
#            CUDA tests would all be skipped, fails the check)
#   tests    python -m pytest -m cuda tests (CUDA == CPU for every kernel and merge method)
#   bench    python benchmarks/bench_gpu.py --out-dir DIR: gpu_results.json and gpu_results.md
# DIR (default benchmarks/) gets gpu_results.json, gpu_results.md, gpu_check_summary.txt and
# gpu_check_{build,check,tests,bench}.log (+ gpu_check_tests.xml). Exit status: 0 when every step
# passed, 1 otherwise, 2 for bad arguments. PYTHON (default python3) is the interpreter used.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT_DIR="$ROOT/benchmarks"
DRY_RUN=0
ONLY=""
BUDGET="${GPU_CHECK_BUDGET:-470}"
ARCHS="${CUDAARCHS:-90}"
STEPS="env build check tests bench"

usage_error() {
    echo "gpu_check.sh: error: $1 (usage: gpu_check.sh [--out-dir DIR] [--dry-run] [--step NAME])" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --out-dir) [ $# -ge 2 ] || usage_error "--out-dir needs a folder"; OUT_DIR="$2"; shift 2 ;;
        --out-dir=*) OUT_DIR="${1#--out-dir=}"; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --step) [ $# -ge 2 ] || usage_error "--step needs a name"; ONLY="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done
[ -n "$OUT_DIR" ] || usage_error "--out-dir is empty"
if [ -n "$ONLY" ] && [[ " $STEPS " != *" $ONLY "* ]]; then usage_error "unknown step '$ONLY' (one of: $STEPS)"; fi
case "$OUT_DIR" in /*) ;; *) OUT_DIR="$PWD/$OUT_DIR" ;; esac
cd "$ROOT" || exit 1
ulimit -n 65536 2>/dev/null || true  # the n = 1000 merges open 1000 adapter files

# name, time box in seconds, command (one shell string: what --dry-run prints is what runs)
CHECK_PY='import os, torch, knots_ext
info = knots_ext.build_info()
print("knots_ext", knots_ext.__file__, info)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
problems = []
if not os.path.realpath(knots_ext.__file__).startswith(os.path.realpath(os.getcwd()) + os.sep):
    problems.append("the knots_ext imported is not this tree'"'"'s (" + knots_ext.__file__ + ")")
if not info["cuda_compiled"]:
    problems.append("knots_ext was built without its CUDA kernels")
if info["cuda_devices"] < 1:
    problems.append("knots_ext sees no CUDA device")
if not torch.cuda.is_available():
    problems.append("torch sees no CUDA device")
if problems:
    raise SystemExit("gpu_check: " + "; ".join(problems))
print("GPU:", torch.cuda.get_device_name(0))'
step_box() {
    case "$1" in env) echo 30 ;; build) echo 200 ;; check) echo 60 ;; tests) echo 150 ;; bench) echo 240 ;; esac
}
step_command() {
    case "$1" in
        env) echo "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available())'; nproc" ;;
        build) echo "CUDAARCHS=$ARCHS KNOTS_EXT_CUDA=1 $PY -m pip install -v --no-build-isolation --no-deps --no-index -e ." ;;
        check) echo "$PY -c \"\$CHECK_PY\"" ;;
        tests) echo "$PY -m pytest -q -rs -m cuda -p no:cacheprovider --continue-on-collection-errors --junitxml=$OUT_DIR/gpu_check_tests.xml tests" ;;
        bench) echo "$PY benchmarks/bench_gpu.py --out-dir $OUT_DIR --merge-repeats 1" ;;
    esac
}

if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_check.sh --dry-run: would run, in $ROOT, within $BUDGET s in all, logs and results in $OUT_DIR:"
    for s in ${ONLY:-$STEPS}; do
        echo "  [$s] timeout $(step_box "$s")s: $(step_command "$s")"
    done
    echo "  check's Python (outside pytest):"
    echo "$CHECK_PY" | sed 's/^/      /'
    echo "  the benchmark's plan (bench_gpu.py --dry-run):"
    "$PY" benchmarks/bench_gpu.py --dry-run --out-dir "$OUT_DIR" --merge-repeats 1 | sed 's/^/  /'
    exit 0
fi

mkdir -p "$OUT_DIR" || exit 1
SUMMARY="$OUT_DIR/gpu_check_summary.txt"
: > "$SUMMARY"
DEADLINE=$((SECONDS + BUDGET))
FAILED=0
export CHECK_PY

run_step() {
    local name="$1" box left limit start rc log status
    box=$(step_box "$name")
    left=$((DEADLINE - SECONDS))
    limit=$((box < left ? box : left))
    log="$OUT_DIR/gpu_check_$name.log"
    if [ "$limit" -lt 5 ]; then
        status="SKIPPED (no time left of the $BUDGET s budget)"
        rc=124
    else
        echo "== [$name] (timeout ${limit}s): $(step_command "$name")"
        start=$SECONDS
        timeout -k 10 "$limit" bash -c "$(step_command "$name")" > "$log" 2>&1
        rc=$?
        case $rc in
            0) status="ok" ;;
            124|137) status="TIMED OUT after ${limit}s" ;;
            *) status="FAILED (exit $rc)" ;;
        esac
        status="$status in $((SECONDS - start))s"
        tail -n 25 "$log"
    fi
    echo "[$name] $status" | tee -a "$SUMMARY"
    [ "$rc" = 0 ] || FAILED=1
    return "$rc"
}

if [ -n "$ONLY" ]; then
    run_step "$ONLY"
    exit $((FAILED ? 1 : 0))
fi
run_step env
if run_step build && run_step check; then
    run_step tests
    run_step bench
else
    echo "[tests] SKIPPED: no CUDA build or no device (see above)" | tee -a "$SUMMARY"
    echo "[bench] SKIPPED: no CUDA build or no device (see above)" | tee -a "$SUMMARY"
fi
echo "== summary (also in $SUMMARY)"
cat "$SUMMARY"
[ -f "$OUT_DIR/gpu_results.md" ] && cat "$OUT_DIR/gpu_results.md"
exit $((FAILED ? 1 : 0))
