#!/usr/bin/env bash
# Benchmark BASE_REF and the working tree with the same matrix on this machine,
# in one job, then gate NEW against BASE. Used by .github/workflows/bench-gate.yml;
# runs the same way locally:  scripts/gate_pr.sh origin/main ci results/pr
#
# Both runs use the installed environment; the base code is put first on
# PYTHONPATH from a git worktree, so only the code under test differs.
set -euo pipefail
base_ref=${1:?usage: gate_pr.sh BASE_REF [MATRIX] [OUT_DIR] [gate options...]}
matrix=${2:-ci}
out=${3:-results/gate-$(date +%Y%m%d-%H%M%S)}
shift $(( $# < 3 ? $# : 3 ))
python=${PYTHON:-python}

worktree=$(mktemp -d)
trap 'git worktree remove --force "$worktree" >/dev/null 2>&1 || true' EXIT
git worktree add --quiet --detach "$worktree" "$base_ref"

mkdir -p "$out"
out=$(realpath "$out")
# The matrix file may exist only in the head: resolve it once, run both with it.
if [ -f "$matrix" ]; then matrix=$(realpath "$matrix"); fi
echo "== base ($base_ref)"
(cd "$worktree" && PYTHONPATH="$worktree" "$python" -m infermatrix.cli run "$matrix" --out "$out/base" -q)
echo "== head"
"$python" -m infermatrix.cli run "$matrix" --out "$out/head" -q
echo "== gate"
"$python" -m infermatrix.cli gate "$out/base" "$out/head" "$@"
