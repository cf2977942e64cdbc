#!/usr/bin/env bash
# Foundation benchmark: plan hippocampus, train 3d_fullres fold 0 for 30 CPU minutes, validate.
# Usage: benchmarks/hippocampus_fold0.sh [DATASET] [WORKDIR] [MINUTES]
# Results: WORKDIR/runs/3d_fullres/fold_0/{log.jsonl,curves.png,val_report/summary.json}; timings in WORKDIR/timing.txt
set -euo pipefail
DATASET=${1:-../shared/data/hippocampus}
WORKDIR=${2:-bench/hippocampus}
MINUTES=${3:-30}
mkdir -p "$WORKDIR"
t0=$(date +%s)
medseg plan "$DATASET" -o "$WORKDIR"
t1=$(date +%s)
medseg train "$WORKDIR" -c 3d_fullres -f 0 --time-budget "$MINUTES"
t2=$(date +%s)
{
  echo "plan+preprocess_s $((t1 - t0))"
  echo "train+validate_s $((t2 - t1))"
} | tee "$WORKDIR/timing.txt"
python - "$WORKDIR" <<'PY'
import json, sys, pathlib
run = pathlib.Path(sys.argv[1]) / "runs/3d_fullres/fold_0"
log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
s = json.loads((run / "val_report/summary.json").read_text())
t = json.loads((run / "val_report/timing.json").read_text())
print(f"epochs {len(log)}, iterations {sum(1 for _ in log) * json.loads((run / 'run.json').read_text())['budget']['iterations_per_epoch']}, "
      f"train loop {log[-1]['elapsed_s'] / 60:.1f} min, validation predict {t['predict_s']:.0f} s for {t['cases']} cases")
print(json.dumps({k: s[k] for k in s if k != "conventions"}, indent=1)[:3000])
PY
