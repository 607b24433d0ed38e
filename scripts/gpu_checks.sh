#!/usr/bin/env bash
# Every GPU check of the kernels and the GPU matrix in one call. Each step has its
# own time limit so a slow one cannot starve the rest. Logs, JSON and run folders go
# to $OUT (default ./gpu-out).
#
#     bash scripts/gpu_checks.sh            # full: the kernels' CUDA tests (pytest
#         tests/kernels, compiled kernels, fp16/bf16 at model shapes, the decode merge
#         over repeated calls), the decode config sweep, then `infermatrix run gpu`
#         (benchmarks/gpu.toml: every figure of the GPU tables, through the harness)
#     bash scripts/gpu_checks.sh candidates # quick: the decode kernel's CUDA tests, the
#         decode candidates against SDPA and the read roofline, then benchmarks/gpu-quick.toml
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
harness() {  # harness NAME SECONDS MATRIX [RUN OPTIONS...]: `infermatrix run MATRIX` into $OUT/MATRIX
    local name=$1 limit=$2 matrix=$3; shift 3
    rm -rf "${OUT:?}/$matrix"  # this script's own output, like log.txt: `run` refuses a folder holding records
    step "$limit" "$name" $PY -m infermatrix.cli run "$matrix" --out "$OUT/$matrix" "$@"
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/log.txt"
if [ "${1:-full}" = candidates ]; then
    step 150 "decode kernel CUDA tests" $PY -m pytest -q -p no:cacheprovider tests/kernels/test_decode_attention_triton.py
    step 150 "decode candidates" $PY scripts/gpu_decode_sweep.py --candidates --out "$OUT/candidates.json"
    harness "harness: gpu-quick matrix" 150 gpu-quick --no-isolate -q
    finish
fi
# Untuned tiles (INFERMATRIX_TRITON_AUTOTUNE=0): the tests compile far fewer kernels.
step 300 "kernel CUDA tests (untuned tiles)" env INFERMATRIX_TRITON_AUTOTUNE=0 $PY -m pytest -q -p no:cacheprovider \
    -m "not slow" tests/kernels
step 240 "serving and speculative decoding CUDA tests" $PY -m pytest -q -p no:cacheprovider -m "not slow" \
    -k cuda tests/test_serving.py tests/test_speculative.py
step 240 "decode config sweep" $PY scripts/gpu_decode_sweep.py --out "$OUT/sweep.json" --best "$OUT/best.json"
harness "harness: gpu matrix" 900 gpu
finish
