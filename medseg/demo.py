"""``medseg demo``: the whole pipeline on the bundled hippocampus subset, in a few CPU minutes."""

from __future__ import annotations

import logging
from pathlib import Path

from medseg import workflow
from medseg.evaluation.overlay import save_overlays
from medseg.evaluation.report import evaluate_folder, format_summary
from medseg.inference.predictor import predict_folder
from medseg.training.loop import train_fold
from medseg.workdir import FULL, WorkDir

log = logging.getLogger(__name__)
DEMO_DATASET = Path(__file__).parent / "demo_data" / "hippocampus"


def run_demo(output: Path, *, minutes: float = 3.0, device: str = "cpu", progress: bool = True) -> Path:
    """plan 2d and 3d_fullres → train the configuration the plan chooses for ``minutes`` on every
    case (fold 'full'; the first when it chooses two) → predict the 4 held-out cases → evaluate.
    Re-running continues where it stopped (plans, preprocessed data and checkpoints are reused)."""
    output = Path(output)
    work = WorkDir(output / "model")
    log.info("[1/4] plan + preprocess %s (20 training cases)", DEMO_DATASET)
    plans = workflow.plan(DEMO_DATASET, work.root, device=device, configs=["2d", "3d_fullres"],
                          time_budget_min=minutes, progress=progress)
    log.info(workflow.info(work.root))
    key = plans.default_configurations()[0]  # one model: the demo runs no cross-validation to ensemble with
    run = work.run(key, FULL)
    if not run.trained:
        log.info("[2/4] train %s on all 20 cases for %.1f min (the plan's choice for the budget)", key, minutes)
        train_fold(work, key, FULL, time_budget_min=minutes, device=device, resume=run.latest.exists(),
                   progress=progress)
    log.info("[3/4] predict the 4 held-out cases")
    pred = output / "predictions"
    predict_folder(DEMO_DATASET / "imagesTs", pred, work.root, config_name=key, folds=[FULL], device=device,
                   progress=progress)
    log.info("[4/4] evaluate against labelsTs")
    report = output / "report"
    summary = evaluate_folder(pred, DEMO_DATASET / "labelsTs", report, labels=plans.labels)
    save_overlays([(f.name[:-7], f, pred / f.name, DEMO_DATASET / "labelsTs" / f.name)
                   for f in sorted((DEMO_DATASET / "imagesTs").glob("*.nii.gz"))], report / "overlays.png")
    log.info(format_summary(summary))
    log.info("training curves: %s", run.curves)
    return report
