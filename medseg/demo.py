"""``medseg demo``: the whole pipeline on the bundled hippocampus subset, in a few CPU minutes."""

from __future__ import annotations

import logging
from pathlib import Path

from medseg import workflow
from medseg.evaluation.overlay import save_overlays
from medseg.evaluation.report import evaluate_folder, format_summary
from medseg.inference.predictor import predict_folder
from medseg.plans.schema import Plans
from medseg.training.loop import train_fold

log = logging.getLogger(__name__)
DEMO_DATASET = Path(__file__).parent / "demo_data" / "hippocampus"


def run_demo(output: Path, *, minutes: float = 3.0, device: str = "cpu", progress: bool = True) -> Path:
    """plan → train fold 'full' (every case) for ``minutes`` → predict the 4 held-out cases → evaluate.
    Re-running continues where it stopped (plans, preprocessed data and checkpoints are reused)."""
    output = Path(output)
    workdir = output / "model"
    log.info("[1/4] plan + preprocess %s (20 training cases)", DEMO_DATASET)
    workflow.plan(DEMO_DATASET, workdir, device=device, configs=["3d_fullres"], time_budget_min=minutes,
                  progress=progress)
    log.info(workflow.info(workdir))
    run = workdir / "runs" / "3d_fullres" / "fold_full"
    if not (run / "checkpoint_final.pt").exists():
        log.info("[2/4] train 3d_fullres on all 20 cases for %.1f min", minutes)
        train_fold(workdir, "3d_fullres", "full", time_budget_min=minutes, device=device,
                   resume=(run / "checkpoint_latest.pt").exists(), progress=progress)
    log.info("[3/4] predict the 4 held-out cases")
    pred = output / "predictions"
    predict_folder(DEMO_DATASET / "imagesTs", pred, workdir, config_name="3d_fullres", folds=["full"],
                   device=device, progress=progress)
    log.info("[4/4] evaluate against labelsTs")
    report = output / "report"
    labels = Plans.load(workdir / "plans.json").labels
    summary = evaluate_folder(pred, DEMO_DATASET / "labelsTs", report, labels=labels)
    save_overlays([(f.name[:-7], f, pred / f.name, DEMO_DATASET / "labelsTs" / f.name)
                   for f in sorted((DEMO_DATASET / "imagesTs").glob("*.nii.gz"))], report / "overlays.png")
    log.info(format_summary(summary))
    log.info("training curves: %s", run / "curves.png")
    return report
