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
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2; shift 2
    echo "=== $name (limit ${limit}s) $(date +%T)"
    timeout "$limit" "$@" 2>&1 | grep -v -e "UserWarning" -e "warn_once" >>"$OUT/log.txt"
    echo "=== $name exit ${PIPESTATUS[0]}" >>"$OUT/log.txt"
    tail -n 30 "$OUT/log.txt"
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/log.txt"
if [ "${1:-full}" = candidates ]; then
    step 150 "decode candidates" $PY scripts/gpu_decode_sweep.py --candidates --out "$OUT/candidates.json"
    step 150 "harness: gpu-quick matrix" $PY -c "import sys; from infermatrix.cli import main; sys.exit(main())" run \
        benchmarks/gpu-quick.toml --out /tmp/gpu-quick --no-isolate -q
    cp /tmp/gpu-quick/results.csv "$OUT/gpu-quick.csv" 2>/dev/null
    exit 0
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
