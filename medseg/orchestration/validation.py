"""A fold's full validation: predict its held-out cases from the raw images (native geometry) with
the final checkpoint, evaluate them, and keep what find-best and the cascade read."""

from __future__ import annotations

import logging
import time

from medseg.evaluation.overlay import save_overlays
from medseg.evaluation.report import evaluate_folder, format_summary
from medseg.inference.predictor import InputCase, Stage, predict_case, read_input
from medseg.inference.probabilities import save_probabilities
from medseg.io.dataset import Dataset, load_dataset
from medseg.io.image import write_image
from medseg.networks.checkpoint import load_checkpoint
from medseg.networks.unet import build_network
from medseg.plans.schema import Configuration, Plans
from medseg.preprocessing.labels import classes_to_labels, label_dtype
from medseg.progress import track
from medseg.training.cascade import oof_segmentation
from medseg.utils import atomic_write_json
from medseg.workdir import RunDir, WorkDir

log = logging.getLogger(__name__)


def validate_fold(work: WorkDir, plans: Plans, config: Configuration, run: RunDir, val_ids: list[str], *,
                  device: str = "cpu", progress: bool = False) -> dict:
    """Predict the fold's validation cases in full and evaluate them: :func:`predict_validation`,
    then :func:`report_validation`."""
    ds = load_dataset(work.dataset_path())
    predict_s = predict_validation(work, plans, config, run, val_ids, device=device, progress=progress, ds=ds)
    return report_validation(work, plans, run, val_ids, predict_s, ds=ds)


def predict_validation(work: WorkDir, plans: Plans, config: Configuration, run: RunDir, case_ids: list[str], *,
                       device: str = "cpu", progress: bool = False, ds: Dataset | None = None) -> float:
    """Predict ``case_ids`` (the fold's validation cases, or a distributed rank's share of them) in
    full; the seconds it took.

    Writes ``val/<case>.nii.gz`` (label map in the dataset's label values, as the references) and
    ``val/<case>.npz`` (the out-of-fold probabilities, one channel per class,
    compact, with the case's QC score), which ``medseg find-best`` and the cascade read; with
    mirroring, also the unmirrored pass (free: it is one of the mirrorings) in ``val_no_mirroring/``,
    on which find-best weighs mirroring. ``ds``: the loaded dataset (read here when None)."""
    ds = ds if ds is not None else load_dataset(work.dataset_path())
    model = build_network(config.architecture, plans.input_channels(config), plans.num_classes).to(device)
    model.load_state_dict(load_checkpoint(run.final, map_location=device)["model"])
    stage = Stage(config, [model], plans.num_classes)
    out, ref = run.val, run.val_reference
    plain_out = run.val_no_mirroring if config.training.mirror_axes else None
    for d in (out, ref, plain_out):
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for cid in track(case_ids, total=len(case_ids), description="validate", enabled=progress):
        case = ds.case(cid)
        image, geometry = read_input(InputCase(cid, case.images, ".nii.gz"), len(plans.channel_names))
        # a cascade sees the previous stage's out-of-fold prediction, as in training
        prior = (oof_segmentation(work, plans.config(config.previous_stage).key, cid, plans.label_values)
                 if config.previous_stage else None)
        pred = predict_case(stage, image, geometry, device=device, prior=prior, keep_unmirrored=plain_out is not None)
        save_probabilities(out / f"{cid}.npz", pred.probabilities, pred.bbox, qc_score=pred.qc_scores[0])
        if plain_out:
            save_probabilities(plain_out / f"{cid}.npz", pred.unmirrored, pred.bbox, qc_score=pred.qc_scores[0])
        write_image(run.val_prediction(cid), classes_to_labels(pred.segmentation, plans.label_values), geometry,
                    label_dtype(plans.label_values))
        lab_link = ref / f"{cid}{case.label.name[len(cid):]}"
        if not lab_link.exists():
            lab_link.symlink_to(case.label)
    return time.perf_counter() - t0


def report_validation(work: WorkDir, plans: Plans, run: RunDir, val_ids: list[str], predict_s: float,
                      ds: Dataset | None = None) -> dict:
    """Evaluate the fold's predicted validation cases: ``val_report/`` (metrics, overlays, timing)."""
    ds = ds if ds is not None else load_dataset(work.dataset_path())
    out, ref = run.val, run.val_reference
    summary = evaluate_folder(out, ref, run.val_report, labels=plans.labels)
    save_overlays([(cid, ds.case(cid).images[0], run.val_prediction(cid), next(ref.glob(f"{cid}.*")))
                   for cid in val_ids], run.val_report / "overlays.png")
    summary["predict_seconds_per_case"] = predict_s / max(1, len(val_ids))
    atomic_write_json(run.val_report / "timing.json", {"predict_s": predict_s, "cases": len(val_ids)})
    log.info("validation (%d cases):\n%s", len(val_ids), format_summary(summary))
    return summary
