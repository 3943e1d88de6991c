#!/usr/bin/env bash
# A re-queueable Slurm batch job: fit a mixture with checkpointing. If the job is pre-empted
# or hits its wall-time limit, Slurm re-queues it and the same command resumes from the last
# completed iteration (same final result as an uninterrupted run).
#
#   sbatch workflows/slurm-fit.sh /data/pixels.zarr 8
#
#SBATCH --job-name=dask-em-fit
#SBATCH --requeue
#SBATCH --nodes=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=04:00:00
#SBATCH --signal=B:TERM@60
set -euo pipefail
DATA=${1:?usage: slurm-fit.sh DATA.zarr N_COMPONENTS}
K=${2:?usage: slurm-fit.sh DATA.zarr N_COMPONENTS}
OUT=${OUT:-$PWD/dask-em-$(basename "$DATA" .zarr)-k$K}
mkdir -p "$OUT"

dask-em fit "$DATA" --n-components "$K" --output "$OUT/model.zarr" \
    --checkpoint-dir "$OUT/checkpoint" --json \
    --n-workers 4 --threads-per-worker 4 --memory-limit 14GiB > "$OUT/summary.json"
dask-em predict "$OUT/model.zarr" "$DATA" --output "$OUT/labels.zarr" --n-workers 4 --threads-per-worker 4
