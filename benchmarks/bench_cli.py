"""A medseg command as the benchmarks run it: a subprocess of this interpreter, its output in a log
file, its wall time returned (shared by ``ignore_label.py`` and ``finetune.py``)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def medseg(*args: str | Path | float, log: Path) -> float:
    """``python -m medseg ARGS`` with stdout and stderr into ``log``; seconds taken. Raises on failure."""
    start = time.monotonic()
    with log.open("w") as f:
        subprocess.run([sys.executable, "-m", "medseg", *map(str, args)], check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.monotonic() - start
