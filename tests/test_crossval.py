"""Five-fold training, out-of-fold collection, find-best → model.json → predict -m, QC summary."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from helpers import make_case, make_msd_dataset, run_medseg, write_nifti

from medseg import workflow
from medseg.errors import MedsegError
from medseg.inference.predictor import predict_folder
from medseg.orchestration.crossval import parse_folds, train_folds
from medseg.orchestration.selection import find_best
from medseg.plans.schema import ChosenModel, Plans


def _tiny_two_configs(dataset, workdir):
    workflow.plan(dataset, workdir, configs=["2d", "3d_fullres"], num_workers=1, throughput=1e12, preprocess=False)
    plans = Plans.load(workdir / "plans.json")
    for key, dim in (("2d", 2), ("3d_fullres", 3)):
        c = plans.configurations[key]
        c.patch_size = [16] * dim
        c.batch_size = 2
        c.architecture.strides = [[1] * dim, [2] * dim, [2] * dim]
        c.architecture.kernel_sizes = [[3] * dim] * 3
        c.architecture.features = [4, 8, 16]
        c.training.iterations_per_epoch = 2
        c.training.val_iterations = 1
        c.training.time_budget_min = None
    plans.save(workdir / "plans.json")
    workflow.preprocess(workdir, num_workers=1)


@pytest.fixture(scope="module")
def cross_validated(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    ds = make_msd_dataset(root / "ds", n_cases=5)
    wd = root / "wd"
    _tiny_two_configs(ds, wd)
    for key in ("2d", "3d_fullres"):
        lines = train_folds(wd, key, parse_folds(wd, key, "all"), epochs=1)
        assert any("cross-validation of" in line for line in lines)
    return wd


def test_all_folds_give_out_of_fold_predictions_of_every_case(cross_validated):
    wd = cross_validated
    splits = json.loads((wd / "splits.json").read_text())
    assert len(splits) == 5
    for key in ("2d", "3d_fullres"):
        oof = wd / "runs" / key / "crossval" / "predictions"
        assert sorted(p.name.removesuffix(".npz") for p in oof.glob("*.npz")) == sorted(c for s in splits
                                                                                        for c in s["val"])
        summary = json.loads((wd / "runs" / key / "crossval" / "report" / "summary.json").read_text())
        assert summary["n_cases"] == 5
    # re-running -f all trains nothing again
    lines = train_folds(wd, "2d", parse_folds(wd, "2d", "all"), epochs=1)
    assert sum("already trained" in line for line in lines) == 5


def test_find_best_writes_model_json_and_report(cross_validated):
    chosen, report = find_best(cross_validated)
    assert (cross_validated / "model.json").exists()
    again = ChosenModel.load(cross_validated / "model.json")
    assert again == chosen
    assert set(chosen.members) <= {"2d", "3d_fullres"} and all(chosen.folds[m] == [0, 1, 2, 3, 4]
                                                               for m in chosen.members)
    table = (cross_validated / "find_best" / "candidates.csv").read_text().splitlines()
    assert len(table) == 1 + 3  # two configurations and their ensemble
    for name in ("candidates.png", "qc.png", "qc.csv", "postprocessing.json", "report.md"):
        assert (cross_validated / "find_best" / name).stat().st_size > 0
    assert "2d + 3d_fullres" in report and chosen.qc is not None


def test_find_best_decides_mirroring_on_out_of_fold_predictions_without_it(cross_validated, tmp_path):
    splits = json.loads((cross_validated / "splits.json").read_text())
    for key in ("2d", "3d_fullres"):
        for k, split in enumerate(splits):
            plain = cross_validated / "runs" / key / f"fold_{k}" / "val_no_mirroring"
            assert sorted(p.stem for p in plain.glob("*.npz")) == sorted(split["val"])
    chosen, report = find_best(cross_validated)
    inf = chosen.inference
    assert inf.dice_with_mirroring is not None and inf.dice_without_mirroring is not None
    assert inf.mirroring == (inf.dice_with_mirroring - inf.dice_without_mirroring > inf.tolerance)
    assert "without" in inf.decided and inf.decided in report
    # the Dice without mirroring is that of the unmirrored out-of-fold probabilities, recomputed here
    from medseg.evaluation.metrics import case_metrics
    from medseg.inference.probabilities import load_probabilities
    from medseg.orchestration.selection import OutOfFold

    plans = Plans.load(cross_validated / "plans.json")
    source = OutOfFold(cross_validated, plans, chosen.members)
    labels = {int(k): v for k, v in plans.labels.items()}
    per_class: dict[int, list[float]] = {k: [] for k in labels if k}
    for case in source.case_ids:
        probs = np.mean([load_probabilities(source.unmirrored_path(m, case)) for m in chosen.members], axis=0)
        ref, spacing = source.reference(case)
        for row in case_metrics(probs.argmax(0), ref, spacing, labels):
            per_class[row["class_id"]].append(row["dice"])
    expected = np.mean([np.nanmean(v) for v in per_class.values()])
    assert inf.dice_without_mirroring == pytest.approx(expected, abs=1e-9)
    # predict without --tta/--no-tta follows the decision
    image, _ = make_case(shape=(20, 24, 16), seed=12)
    write_nifti(tmp_path / "in" / "m.nii.gz", image[0])
    auto = predict_folder(tmp_path / "in", tmp_path / "auto", cross_validated)[0]
    explicit = predict_folder(tmp_path / "in", tmp_path / "explicit", cross_validated, tta=inf.mirroring)[0]
    assert np.array_equal(np.asanyarray(nib.load(auto).dataobj), np.asanyarray(nib.load(explicit).dataobj))


def test_predict_follows_model_json_and_writes_uncertainty_and_qc(cross_validated, tmp_path):
    find_best(cross_validated)
    chosen = ChosenModel.load(cross_validated / "model.json")
    image, _ = make_case(shape=(20, 24, 16), seed=11)
    write_nifti(tmp_path / "in" / "new.nii.gz", image[0])
    written = predict_folder(tmp_path / "in", tmp_path / "out", cross_validated, save_uncertainty=True, tta=False)
    assert [p.name for p in written] == ["new.nii.gz"]
    unc = nib.load(tmp_path / "out" / "new_uncertainty.nii.gz").get_fdata()
    assert unc.shape == (20, 24, 16) and 0.0 <= unc.min() and unc.max() <= 1.0 + 1e-6
    summary = json.loads((tmp_path / "out" / "predict_summary.json").read_text())
    assert summary["configurations"] == chosen.members and summary["qc_threshold"] == chosen.qc.threshold
    row = summary["cases"][0]
    assert row["case"] == "new" and 0.0 <= row["qc_score"] <= 1.0
    assert row["flagged"] == (row["qc_score"] > chosen.qc.threshold)
    # the members, folds and postprocessing of model.json, identical to running them by hand
    from medseg.inference.postprocessing import apply_postprocessing
    from medseg.inference.predictor import ensemble, find_inputs, load_stage, predict_case, read_input

    plans = Plans.load(cross_validated / "plans.json")
    case = find_inputs(tmp_path / "in", 1)[0]
    img, geo = read_input(case, 1)
    preds = [predict_case(load_stage(cross_validated, plans, m, chosen.folds[m], "cpu"), img, geo, tta=False)
             for m in chosen.members]
    seg = apply_postprocessing(ensemble(preds).segmentation, chosen.postprocessing.model_dump())
    assert np.array_equal(np.asanyarray(nib.load(written[0]).dataobj), seg)


def test_find_best_needs_complete_cross_validation(tmp_path):
    ds = make_msd_dataset(tmp_path / "ds", n_cases=5)
    _tiny_two_configs(ds, tmp_path / "wd")
    with pytest.raises(MedsegError, match="no configuration has all its cross-validation folds"):
        find_best(tmp_path / "wd")
    result = run_medseg("find-best", tmp_path / "wd")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "train" in result.stderr


def test_parse_folds(cross_validated):
    assert parse_folds(cross_validated, "2d", "all") == [0, 1, 2, 3, 4]
    assert parse_folds(cross_validated, "2d", "cv") == [0, 1, 2, 3, 4]
    assert parse_folds(cross_validated, "2d", "full") == ["full"]
    assert parse_folds(cross_validated, "2d", "0,3") == [0, 3]
    with pytest.raises(MedsegError, match="expected a fold number"):
        parse_folds(cross_validated, "2d", "x")
