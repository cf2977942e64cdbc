#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py does the work): ≤ 8 minutes on one GPU, one JSON of figures.
#
#   bash benchmarks/gpu_check.sh RESULTS_DIR [--device cpu] [--tiny] [--only SECTION,...]
#
# Writes RESULTS_DIR/gpu_check.json and logs to stdout (tee it: docs/benchmarks.md, "GPU check").
# Python: $PYTHON, else the repository's .venv, else python3 (the GPU machine, with PYTHONPATH set
# to the installed wheels as the recipe says). Exit code: 0 when every section passed or was
# skipped, 1 when one failed, 124 when the 8-minute limit stopped it (the JSON keeps what was done).
set -euo pipefail
if [ $# -lt 1 ] || [[ $1 == -* ]]; then
    echo "usage: bash benchmarks/gpu_check.sh RESULTS_DIR [--device cpu] [--tiny]" >&2
    exit 2
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
results=$1
shift
mkdir -p "$results"
python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python=$repo/.venv/bin/python; else python=python3; fi
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$repo" PYTHONUNBUFFERED=1
exec timeout --signal=TERM --kill-after=20 "${GPU_CHECK_TIMEOUT_S:-480}" \
    "$python" "$repo/benchmarks/gpu_check.py" "$results" "$@"
