#!/bin/bash
# Run one benchmark matrix as a Slurm job array: task K of N runs shard K/N.
#
#   sbatch --array=1-8 examples/slurm-array.sh my_matrix.toml results/sweep
#   # when every task has ended (whatever its status), merge the shards:
#   sbatch --dependency=afterany:<ARRAY_JOB_ID> --wrap \
#       "infermatrix merge results/sweep/shard-* --out results/sweep/merged"
#
# The array must be 1-N (N = SLURM_ARRAY_TASK_COUNT). A requeued (preempted) task
# resumes its shard's folder: cases already recorded are not run again.
#SBATCH --job-name=infermatrix
#SBATCH --gres=gpu:1             # drop for a CPU-only matrix
#SBATCH --cpus-per-task=8
#SBATCH --exclusive              # no other job's load on the timed cores
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --output=infermatrix-%A_%a.out
set -euo pipefail

MATRIX=${1:-default}
OUT=${2:-results/slurm-$SLURM_ARRAY_JOB_ID}
K=$SLURM_ARRAY_TASK_ID
N=$SLURM_ARRAY_TASK_COUNT

# activate the environment infermatrix is installed in, e.g.
# source .venv/bin/activate

# exit status 1 means some cases failed (their records are kept); 2 is bad input
infermatrix run "$MATRIX" --shard "$K/$N" --out "$OUT/shard-$K" --resume --quiet || [ $? -eq 1 ]
