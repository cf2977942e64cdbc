#!/usr/bin/env python
"""Fine-tuning against training from scratch, on the real hippocampus dataset.

    .venv/bin/python benchmarks/finetune.py [--data ../shared/data/hippocampus] [--work /tmp/finetune_bench]
                                            [--pretrain-minutes 5] [--minutes 2] [--freeze-encoder-epochs 0]

The training cases are split in two halves (sorted ids, alternating). Half A is planned on its own
and one model is trained on all of it (fold ``full``, ``--pretrain-minutes``). Half B is planned
with ``--plans-from`` A (the same network, so that only the initial weights differ) into two work
directories, and fold 0 of each is trained for ``--minutes``: once from A's weights
(``--init-from``), once from scratch. Both validate on the same held-out fold-0 cases of B.
Results: ``docs/benchmarks/finetune/results.json`` and the table printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_cli import medseg

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks" / "finetune"


def half(data: Path, out: Path, which: int) -> int:
    """MSD dataset ``out`` holding every other training case of ``data`` (copied files)."""
    meta = json.loads((data / "dataset.json").read_text())
    cases = sorted(meta["training"], key=lambda e: e["image"])[which::2]
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for entry in cases:
        for key in ("image", "label"):
            target = out / entry[key]
            if not target.exists():
                shutil.copy2(data / entry[key], target)
    (out / "dataset.json").write_text(json.dumps({**meta, "training": cases, "numTraining": len(cases),
                                                   "test": [], "numTest": 0}, indent=1))
    return len(cases)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hippocampus")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "finetune_bench")
    ap.add_argument("--pretrain-minutes", type=float, default=5.0)
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--freeze-encoder-epochs", type=int, default=0)
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    n_a, n_b = half(args.data, w / "half_a", 0), half(args.data, w / "half_b", 1)
    results: dict = {"command": "python benchmarks/finetune.py " + " ".join(sys.argv[1:]),
                     "date": time.strftime("%Y-%m-%d %H:%M"), "cases": {"a": n_a, "b": n_b},
                     "pretrain_minutes": args.pretrain_minutes, "minutes": args.minutes,
                     "freeze_encoder_epochs": args.freeze_encoder_epochs, "runs": {}}
    pre = w / "pretrained"
    if not (pre / "runs" / "3d_fullres" / "fold_full" / "checkpoint_final.pt").exists():
        shutil.rmtree(pre, ignore_errors=True)
        medseg("plan", w / "half_a", "-o", pre, "--configs", "3d_fullres", "--time-budget", args.pretrain_minutes,
               log=w / "plan_pretrained.log")
        results["pretrain_s"] = medseg("train", pre, "-c", "3d_fullres", "-f", "full", "--time-budget",
                                       args.pretrain_minutes, "--no-validation", log=w / "train_pretrained.log")
    from medseg.plans.schema import Plans
    from medseg.workdir import WorkDir

    for name in ("finetuned", "scratch"):
        work = w / name
        shutil.rmtree(work, ignore_errors=True)
        medseg("plan", w / "half_b", "-o", work, "--plans-from", pre, log=w / f"plan_{name}.log")
        extra = (["--init-from", f"{pre}:3d_fullres:full", "--freeze-encoder-epochs", args.freeze_encoder_epochs]
                 if name == "finetuned" else [])
        train_s = medseg("train", work, "-c", "3d_fullres", "-f", "0", "--time-budget", args.minutes, *extra,
                         log=w / f"train_{name}.log")
        key = Plans.load(WorkDir(work).plans).config("3d_fullres").key
        run = WorkDir(work).run(key, 0)
        summary = json.loads((run.val_report / "summary.json").read_text())
        log = [json.loads(line) for line in run.log.read_text().splitlines()]
        results["runs"][name] = {"train_s": round(train_s, 1), "epochs": len(log),
                                 "dice_fg": summary["foreground_mean"]["dice"],
                                 "dice": {v["name"]: v["dice"]["mean"] for v in summary["classes"].values()},
                                 "hd95_fg": summary["foreground_mean"]["hd95_mm"],
                                 "pseudo_dice_first_epoch": log[0]["pseudo_dice"], "val_cases": summary["n_cases"],
                                 "init_from": json.loads(run.run_json.read_text()).get("init_from")}
        DOCS.mkdir(parents=True, exist_ok=True)
        (DOCS / "results.json").write_text(json.dumps(results, indent=1))
    print("| start | epochs | pseudo-Dice after epoch 1 | Dice fg | " +
          " | ".join(f"Dice {k}" for k in results["runs"]["scratch"]["dice"]) + " | HD95 fg (mm) |")
    for name, r in results["runs"].items():
        print(f"| {name} | {r['epochs']} | {r['pseudo_dice_first_epoch']:.3f} | {r['dice_fg']:.4f} | "
              + " | ".join(f"{v:.4f}" for v in r["dice"].values()) + f" | {r['hd95_fg']:.2f} |")


if __name__ == "__main__":
    main()
