"""The overhead of the Slurm path: 2 cross-validation folds × a tiny budget, run locally one after
the other vs submitted as one job array to the test cluster of tests/slurm_cluster.py (started
here, on this machine).

    .venv/bin/python benchmarks/slurm_overhead.py [--epochs 2] [-o docs/benchmarks/slurm]

Three timings on the bundled hippocampus demo cases (20 training cases, 3d_fullres, 2 folds):
- local: ``medseg train WORK -f all`` (both folds, their validation, the out-of-fold report);
- slurm, 2 CPUs per job: the same as an array whose tasks run one after the other on the
  2-CPU node (same hardware as local: the difference is the Slurm path's overhead);
- slurm, 1 CPU per job: both folds at once, one CPU each.
Each slurm timing runs from the submission until the last job (the cross-validation report) ended.
Writes results.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import slurm_cluster  # noqa: E402

from medseg.cluster import slurm  # noqa: E402
from medseg.cluster.jobs import read_registry  # noqa: E402
from medseg.networks.checkpoint import load_checkpoint  # noqa: E402
from medseg.utils import atomic_write_json  # noqa: E402
from medseg.workdir import WorkDir  # noqa: E402

MEDSEG = [sys.executable, "-m", "medseg"]


def _run(*args, env=None) -> None:
    subprocess.run([*MEDSEG, *map(str, args)], check=True, env=env, stdout=subprocess.DEVNULL)


def _slurm_timing(base: Path, work: Path, cpus: int, epochs: int) -> float:
    shutil.copytree(base, work, symlinks=True)
    t = time.perf_counter()
    _run("train", work, "-f", "all", "--epochs", epochs, "--executor", "slurm", "--cpus-per-job", cpus, "--time", 60)
    ids = [r.job_id for r in read_registry(WorkDir(work))]
    while True:
        known = slurm.query(ids)
        states = [known[j].state if j in known else "?" for j in ids]
        if all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for s in states):
            break
        time.sleep(0.5)
    elapsed = time.perf_counter() - t
    if set(states) != {"COMPLETED"}:
        raise SystemExit(f"{work}: jobs ended {states}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("-o", "--output", type=Path, default=REPO / "docs" / "benchmarks" / "slurm")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="medseg_slurm_bench_"))
    base = tmp / "base"
    _run("plan", REPO / "medseg" / "demo_data" / "hippocampus", "-o", base, "--configs", "3d_fullres",
         "--time-budget", "5")
    ids = sorted(p.stem for p in WorkDir(base).preprocessed("3d_fullres").glob("*.json"))
    atomic_write_json(WorkDir(base).splits, [{"train": ids[1::2], "val": ids[0::2]},
                                             {"train": ids[0::2], "val": ids[1::2]}])
    local = tmp / "local"
    shutil.copytree(base, local, symlinks=True)
    t = time.perf_counter()
    _run("train", local, "-f", "all", "--epochs", args.epochs)
    local_s = time.perf_counter() - t

    cluster = slurm_cluster.start(tmp / "slurm")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        serial_s = _slurm_timing(base, tmp / "slurm_2cpu", 2, args.epochs)
        parallel_s = _slurm_timing(base, tmp / "slurm_1cpu", 1, args.epochs)
    finally:
        cluster.stop()
    same = all(torch.equal(a, b) for fold in (0, 1) for a, b in zip(
        load_checkpoint(WorkDir(local).run("3d_fullres", fold).final)["model"].values(),
        load_checkpoint(WorkDir(tmp / "slurm_2cpu").run("3d_fullres", fold).final)["model"].values(), strict=True))
    results = {"epochs": args.epochs, "folds": 2, "local_s": round(local_s, 1),
               "slurm_2cpu_per_job_s": round(serial_s, 1), "slurm_1cpu_per_job_s": round(parallel_s, 1),
               "overhead_s": round(serial_s - local_s, 1), "weights_equal_local_vs_slurm_2cpu": same,
               "cpus": os.cpu_count(), "iterations_per_epoch": json.loads(WorkDir(base).plans.read_text())
               ["configurations"]["3d_fullres"]["training"]["iterations_per_epoch"]}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| run | wall time |\n|---|---|")
    print(f"| local, one fold after the other | {local_s:.1f} s |")
    print(f"| Slurm array, 2 CPUs per job (one after the other) | {serial_s:.1f} s |")
    print(f"| Slurm array, 1 CPU per job (both at once) | {parallel_s:.1f} s |")
    print(json.dumps(results))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
