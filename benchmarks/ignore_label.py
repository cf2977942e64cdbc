#!/usr/bin/env python
"""Sparse annotation with the ignore label, on the real hippocampus dataset: fold 0 of 3d_fullres
trained on the full labels and on labels whose slices are mostly unannotated, at the same budget.

    .venv/bin/python benchmarks/ignore_label.py [--data ../shared/data/hippocampus] [--work /tmp/ignore_bench]
                                                [--minutes 5] [--fraction 0.7]

The sparse copy of the dataset declares ``"3": "ignore"`` and, in every label map, sets a random
``--fraction`` of the slices along the last axis (per case, seed 0) to 3: no loss term, metric or
patch centre sees them. Both work directories are planned with the same budget (the CPU planner is
load-independent, so the plans must agree: checked), train fold 0 for ``--minutes`` wall-clock
minutes and validate; the held-out fold-0 predictions of *both* runs are then evaluated against
the *full* labels of the original dataset. Results: ``docs/benchmarks/ignore_label/results.json``
and the table printed (pasted into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from bench_cli import medseg

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks" / "ignore_label"
IGNORE = 3


def make_sparse(data: Path, out: Path, fraction: float, seed: int = 0) -> dict:
    """A copy of the MSD dataset ``data`` in ``out`` with ``fraction`` of each label's slices ignored."""
    meta = json.loads((data / "dataset.json").read_text())
    labels = {int(k): v for k, v in meta["labels"].items()}
    if IGNORE in labels:
        raise SystemExit(f"{data}: label {IGNORE} is taken")
    meta["labels"] = {**meta["labels"], str(IGNORE): "ignore"}
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(data / "imagesTr", out / "imagesTr", dirs_exist_ok=True)
    (out / "labelsTr").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    kept = annotated = total = 0
    for entry in meta["training"]:
        src = data / entry["label"]
        img = nib.load(src)
        arr = np.asarray(img.dataobj).astype(np.uint8)
        n = arr.shape[-1]
        ignored = rng.choice(n, int(round(fraction * n)), replace=False)
        before = int((arr > 0).sum())
        arr[..., ignored] = IGNORE
        kept += int(((arr > 0) & (arr != IGNORE)).sum())
        annotated += before
        total += arr.size
        nib.save(nib.Nifti1Image(arr, img.affine, img.header), out / entry["label"])
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    return {"fraction_slices_ignored": fraction, "foreground_voxels_kept": kept / max(annotated, 1),
            "voxels": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hippocampus")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ignore_bench")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--fraction", type=float, default=0.7)
    args = ap.parse_args()

    from medseg.evaluation import evaluate_folder
    from medseg.plans.schema import Plans
    from medseg.training.splits import fold_case_ids
    from medseg.workdir import WorkDir

    args.work.mkdir(parents=True, exist_ok=True)
    sparse_data = args.work / "sparse_dataset"
    sparse = make_sparse(args.data, sparse_data, args.fraction)
    results: dict = {"command": "python benchmarks/ignore_label.py " + " ".join(sys.argv[1:]),
                     "date": time.strftime("%Y-%m-%d %H:%M"), "minutes": args.minutes, "sparse": sparse, "runs": {}}
    plans = {}
    for name, data in (("full", args.data), ("sparse", sparse_data)):
        work = args.work / name
        shutil.rmtree(work, ignore_errors=True)
        plan_s = medseg("plan", data, "-o", work, "--configs", "3d_fullres", "--time-budget", args.minutes,
                        log=args.work / f"plan_{name}.log")
        train_s = medseg("train", work, "-c", "3d_fullres", "-f", "0", "--time-budget", args.minutes,
                         log=args.work / f"train_{name}.log")
        p = Plans.load(WorkDir(work).plans)
        c = p.config("3d_fullres")
        plans[name] = {"patch": c.patch_size, "batch": c.batch_size, "features": c.architecture.features,
                       "iterations_per_epoch": c.training.iterations_per_epoch, "num_classes": p.num_classes}
        run = WorkDir(work).run(c.key, 0)
        _, val_ids = fold_case_ids(work, p, c, 0)
        refs = args.work / f"refs_{name}"
        shutil.rmtree(refs, ignore_errors=True)
        refs.mkdir()
        for cid in val_ids:  # the full labels of the original dataset, whichever run
            (refs / f"{cid}.nii.gz").symlink_to((args.data / "labelsTr" / f"{cid}.nii.gz").resolve())
        summary = evaluate_folder(run.val, refs, args.work / f"eval_{name}",
                                  labels={k: v for k, v in p.labels.items() if v != "ignore"})
        schedule = json.loads(run.run_json.read_text())
        results["runs"][name] = {
            "plan_s": round(plan_s, 1), "train_s": round(train_s, 1), "val_cases": len(val_ids),
            "val_ids": val_ids, "dice_fg": summary["foreground_mean"]["dice"],
            "dice": {v["name"]: v["dice"]["mean"] for v in summary["classes"].values()},
            "hd95": {v["name"]: v["hd95_mm"]["mean"] for v in summary["classes"].values()},
            "epochs": len(run.log.read_text().splitlines()), "plan": plans[name],
            "budget": schedule.get("budget")}
        DOCS.mkdir(parents=True, exist_ok=True)
        (DOCS / "results.json").write_text(json.dumps(results, indent=1))
    same = {k: plans["full"][k] == plans["sparse"][k] for k in plans["full"]}
    results["plans_equal"] = same
    (DOCS / "results.json").write_text(json.dumps(results, indent=1))
    print("| labels | epochs | Dice fg | " + " | ".join(f"Dice {k}" for k in results["runs"]["full"]["dice"]) + " |")
    for name, r in results["runs"].items():
        print(f"| {name} | {r['epochs']} | {r['dice_fg']:.4f} | " + " | ".join(f"{v:.4f}" for v in r["dice"].values())
              + " |")
    print(json.dumps(same))


if __name__ == "__main__":
    main()
