#!/usr/bin/env bash
# U-Net variants at an equal CPU time budget: plan hippocampus with every variant, train fold 0 of
# each for MINUTES of wall clock (the time budget binds, not an epoch count), validate on fold 0's
# held-out cases, and tabulate Dice, HD95, parameters, samples/s, peak memory and predict s/case.
# Usage: benchmarks/variants.sh [DATASET] [WORKDIR] [MINUTES] [VARIANTS]
# Results: WORKDIR/variants.{md,json,png}; per run WORKDIR/runs/3d_fullres_<variant>/fold_0/
set -euo pipefail
DATASET=${1:-../shared/data/hippocampus}
WORKDIR=${2:-bench/variants}
MINUTES=${3:-20}
VARIANTS=${4:-plain,residual,attention,se,reversible,graph}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORKDIR"
if [ ! -f "$WORKDIR/plans.json" ]; then
  /usr/bin/time -v -o "$WORKDIR/plan.time" \
    medseg plan "$DATASET" -o "$WORKDIR" --configs 3d_fullres --variants "$VARIANTS" --time-budget "$MINUTES"
fi
for v in ${VARIANTS//,/ }; do
  key=3d_fullres; [ "$v" = plain ] || key=3d_fullres_$v
  if [ -f "$WORKDIR/runs/$key/fold_0/val_report/summary.json" ]; then continue; fi
  resume=(); [ -d "$WORKDIR/runs/$key/fold_0" ] && resume=(--resume)
  # a generous epoch cap: the wall-clock budget ends every run and drives its learning-rate schedule
  /usr/bin/time -v -o "$WORKDIR/train_$v.time" \
    medseg train "$WORKDIR" -c "$key" -f 0 --time-budget "$MINUTES" --epochs 1000 "${resume[@]}"
done
python "$HERE/variants_report.py" "$WORKDIR" --variants "$VARIANTS" --minutes "$MINUTES"
