#!/usr/bin/env bash
# Five-fold cross-validation of several configurations at a CPU time budget, then `medseg find-best`:
# the out-of-fold table, pairwise ensembles, postprocessing and the QC calibration.
# Usage: benchmarks/crossval.sh [DATASET] [WORKDIR] [MINUTES_PER_FOLD] [CONFIGS]
# Results: WORKDIR/model.json, WORKDIR/find_best/ (candidates.csv, candidates.png, qc.csv, qc.png, report.md)
set -euo pipefail
DATASET=${1:-../shared/data/hippocampus}
WORKDIR=${2:-bench/crossval}
MINUTES=${3:-5}
CONFIGS=${4:-2d,3d_fullres}
mkdir -p "$WORKDIR"
if [ ! -f "$WORKDIR/plans.json" ]; then
  /usr/bin/time -v -o "$WORKDIR/plan.time" \
    medseg plan "$DATASET" -o "$WORKDIR" --configs "$CONFIGS" --time-budget "$MINUTES"
fi
for c in ${CONFIGS//,/ }; do
  # -f all skips finished folds and resumes an interrupted one, so the script can simply be re-run
  /usr/bin/time -v -o "$WORKDIR/train_$c.time" medseg train "$WORKDIR" -c "$c" -f all
done
medseg find-best "$WORKDIR"
