#!/usr/bin/env bash
# A nightly data-warehouse step (cron, Airflow BashOperator, ...): fit on tonight's export
# against an existing Dask cluster, score it, and fail the step on bad input (exit 2) or
# internal errors (exit 1). Re-running after a crash resumes from the checkpoint.
#
#   SCHEDULER_FILE=/shared/sched.json workflows/nightly.sh /exports/2026-11-22/features.zarr
set -euo pipefail
DATA=${1:?usage: nightly.sh DATA.zarr}
RUN=${RUN_DIR:-/tmp/dask-em-nightly}/$(basename "$(dirname "$DATA")")
mkdir -p "$RUN"
dask-em fit "$DATA" --n-components "${K:-12}" --covariance-type diag --output "$RUN/model.zarr" \
    --checkpoint-dir "$RUN/checkpoint" --scheduler-file "${SCHEDULER_FILE:?set SCHEDULER_FILE}" \
    --json --quiet > "$RUN/fit.json"
dask-em score "$RUN/model.zarr" "$DATA" --scheduler-file "$SCHEDULER_FILE" > "$RUN/score.json"
