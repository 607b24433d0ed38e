#!/usr/bin/env bash
# Every GPU check and measurement of the Triton kernels in one call. Each step
# has its own time limit so a slow one cannot starve the rest. Logs and JSON go
# to $OUT (default ./gpu-out).
#
#     bash scripts/gpu_checks.sh            # full (~4 minutes on an H200): correctness
#         of both kernels, the decode sweep, the prefill and decode tables with the
#         decode config the sweep chose, the block-sparse kernel on CUDA, head dim 64
#     bash scripts/gpu_checks.sh candidates # ~2 minutes: the decode candidates against
#         SDPA and the read roofline, then benchmarks/gpu-quick.toml through the harness
#
# A failed step (non-zero exit, or past its limit) is printed as `FAILED: <step>` and
# the rest still run; the last line lists the failed steps and the exit status is 1.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
steps=0
failed=()
step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2 status; shift 2
    steps=$((steps + 1))
    echo "=== $name (limit ${limit}s) $(date +%T)"
    timeout "$limit" "$@" 2>&1 | grep -v -e "UserWarning" -e "warn_once" >>"$OUT/log.txt"
    status=${PIPESTATUS[0]}  # the command's, not grep's
    echo "=== $name exit $status" >>"$OUT/log.txt"
    tail -n 30 "$OUT/log.txt"
    if [ "$status" -ne 0 ]; then
        local why="exit $status"
        [ "$status" -eq 124 ] && why="timed out after ${limit}s"
        echo "FAILED: $name ($why)"
        failed+=("$name")
    fi
}
finish() {  # the verdict of all steps: exit 1 when any failed
    if [ ${#failed[@]} -eq 0 ]; then
        echo "gpu_checks: all $steps steps passed"
        exit 0
    fi
    local names
    names=$(printf '%s; ' "${failed[@]}")
    echo "gpu_checks: ${#failed[@]} of $steps steps FAILED: ${names%; }"
    exit 1
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/log.txt"
if [ "${1:-full}" = candidates ]; then
    step 150 "decode candidates" $PY scripts/gpu_decode_sweep.py --candidates --out "$OUT/candidates.json"
    rm -rf "$OUT/gpu-quick"  # this script's own output, like log.txt: `run` refuses a folder holding records
    step 150 "harness: gpu-quick matrix" $PY -c "import sys; from infermatrix.cli import main; sys.exit(main())" run \
        benchmarks/gpu-quick.toml --out "$OUT/gpu-quick" --no-isolate -q
    finish
fi
step 100 "correctness of both kernels (untuned tiles)" env INFERMATRIX_TRITON_AUTOTUNE=0 $PY \
    scripts/gpu_attention_benchmark.py --parts checks --json "$OUT/checks.json"
step 240 "decode sweep" $PY scripts/gpu_decode_sweep.py --out "$OUT/sweep.json" --best "$OUT/best.json"
best=()
[ -f "$OUT/best.json" ] && best=(--decode-config "$OUT/best.json")
step 170 "prefill D128 (autotuned) and decode tables" $PY scripts/gpu_attention_benchmark.py --parts prefill,decode \
    --head-dims 128 "${best[@]}" --json "$OUT/bench128.json"
step 80 "block-sparse on CUDA" $PY scripts/block_sparse_benchmark.py --device cuda --seq 8192 \
    --densities 0.1 0.3 --heads 32 --head-dim 128
step 50 "prefill D64 (untuned tile)" env INFERMATRIX_TRITON_AUTOTUNE=0 $PY scripts/gpu_attention_benchmark.py \
    --parts prefill --head-dims 64 --json "$OUT/bench64.json"
finish
