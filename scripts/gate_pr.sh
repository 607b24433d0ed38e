#!/usr/bin/env bash
# Gate a change on benchmark regressions: BASE_REF and the working tree measured
# interleaved on this machine (`infermatrix ab`: case by case, alternating turns, each
# side importing its own code), judged on the paired per-round ratios. Used by
# .github/workflows/bench-gate.yml; runs the same way locally:
#   scripts/gate_pr.sh origin/main benchmarks/pr.toml results/pr [ab options, e.g. --fail latency_ms_p50:+3%]
# The matrix's [gate] rules judge unless ab options give others.
# Exit 0 pass, 1 regression (or a case failing in NEW only), 2 bad input.
set -euo pipefail
base_ref=${1:?usage: gate_pr.sh BASE_REF [MATRIX] [OUT_DIR] [ab options...]}
matrix=${2:-benchmarks/pr.toml}
out=${3:-results/gate-$(date +%Y%m%d-%H%M%S)}
shift $(( $# < 3 ? $# : 3 ))
python=${PYTHON:-python}
# A matrix file may exist only in the working tree: both sides read that one file.
if [ -f "$matrix" ]; then matrix=$(realpath "$matrix"); fi
exec "$python" -m infermatrix.cli ab "$base_ref" . "$matrix" --out "$out" "$@"
