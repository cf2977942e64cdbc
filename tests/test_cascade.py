"""The low-resolution stage and the cascade: planning, priors without leakage, prior augmentation,
training and prediction end to end on the real BraTS subset."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medseg import workflow
from medseg.planning.planner import LOWRES_MIN_REDUCTION, lowres_spacing
from medseg.plans.schema import Plans
from medseg.training.cascade import augment_prior


def test_lowres_spacing_coarsens_the_fine_axes_first():
    seen = []

    def covers(spacing, shape):
        seen.append(list(spacing))
        return np.prod(shape) <= 40 * 40 * 40

    s = lowres_spacing([3.0, 0.8, 0.8], [40, 300, 300], covers)
    assert s is not None
    assert all(v[0] == 3.0 for v in seen if max(v[1:]) < 3.0)  # the out-of-plane axis waits
    assert s[1] == s[2] and s[0] >= 3.0


def test_lowres_dropped_when_not_clearly_smaller():
    assert lowres_spacing([1.0, 1.0, 1.0], [100, 100, 100], lambda s, shape: True) is None  # one 10% step
    s = lowres_spacing([1.0, 1.0, 1.0], [100, 100, 100], lambda s, shape: np.prod(shape) < 1e6 / LOWRES_MIN_REDUCTION)
    assert s is not None


def test_prior_augmentation_changes_masks_but_keeps_one_hot():
    prior = np.zeros((8, 2, 24, 24, 24), np.float32)
    prior[:, 0, 4:12, 4:12, 4:12] = 1
    prior[:, 1, 14:20, 14:20, 14:20] = 1
    prior[:, 1, 2:4, 20:22, 2:4] = 1  # a small extra component that may be removed
    out = augment_prior(prior, np.random.default_rng(0))
    assert out.shape == prior.shape and set(np.unique(out)) <= {0.0, 1.0}
    assert (out.sum(axis=1) <= 1).all()  # classes never overlap
    assert not np.array_equal(out, prior)  # with 8 samples, something changed
    again = augment_prior(prior, np.random.default_rng(0))
    assert np.array_equal(out, again)


@pytest.mark.slow
def test_brats_cascade_plan_train_predict(shared_data_dir, tmp_path):
    """A 0.5 GB budget forces a low-resolution stage on 240x240x155 BraTS; lowres (2 folds) then the
    cascade (fold 0) train for a few iterations, and predict runs both stages on a raw case."""
    from medseg.inference.predictor import predict_folder
    from medseg.orchestration.crossval import parse_folds, train_folds
    from medseg.preprocessing.pipeline import load_properties, preprocess_label

    ds = shared_data_dir / "brats-subset"
    wd = tmp_path / "wd"
    workflow.plan(ds, wd, configs=["3d_fullres", "3d_lowres"], memory_gb=0.5, throughput=1e11, time_budget_min=5,
                  num_workers=2, preprocess=False)
    plans = Plans.load(wd / "plans.json")
    assert list(plans.configurations) == ["3d_fullres", "3d_lowres", "3d_cascade_fullres"]
    low, casc = plans.configurations["3d_lowres"], plans.configurations["3d_cascade_fullres"]
    assert min(low.spacing) > max(plans.configurations["3d_fullres"].spacing)
    assert casc.previous_stage == "3d_lowres" and casc.spacing == plans.configurations["3d_fullres"].spacing
    assert plans.input_channels(casc) == 2 + 4
    assert "3d_lowres" in workflow.info(wd) and "previous stage" not in low.memory.decision
    for c in plans.configurations.values():  # a few iterations, no mirroring: this tests the plumbing
        c.training.epochs, c.training.iterations_per_epoch, c.training.val_iterations = 1, 1, 1
        c.training.mirror_axes, c.training.time_budget_min = [], None
    plans.save(wd / "plans.json")
    workflow.preprocess(wd, num_workers=2)
    assert sorted(p.name for p in (wd / "preprocessed").iterdir()) == ["3d_fullres", "3d_lowres"]

    # two folds instead of five (splits.json is the user's to edit): the plumbing is the same, half the work
    from medseg.training.splits import make_splits

    ids = sorted(p.stem for p in (wd / "preprocessed" / "3d_lowres").glob("*.json"))
    (wd / "splits.json").write_text(json.dumps(make_splits(ids, seed=0, n_folds=2)))
    assert parse_folds(wd, "3d_lowres", "all") == [0, 1]
    train_folds(wd, "3d_lowres", parse_folds(wd, "3d_lowres", "all"))
    train_folds(wd, "3d_cascade_fullres", [0])
    # every case's prior is the out-of-fold prediction of the lowres fold that held it out
    splits = json.loads((wd / "splits.json").read_text())
    for k, split in enumerate(splits):
        for cid in split["val"]:
            assert (wd / "runs" / "3d_lowres" / f"fold_{k}" / "val" / f"{cid}.nii.gz").exists()
            prior = np.load(wd / "priors" / "3d_lowres" / f"{cid}.npy")
            seg = np.load(wd / "preprocessed" / "3d_fullres" / f"{cid}_seg.npy")
            assert prior.shape == seg.shape and prior.dtype == np.int8
            oof = nib.load(wd / "runs" / "3d_lowres" / f"fold_{k}" / "val" / f"{cid}.nii.gz").get_fdata()
            props = load_properties(wd / "preprocessed" / "3d_fullres", cid)
            assert np.array_equal(prior[0], preprocess_label(oof.astype(np.int16), props, casc, [0, 1, 2, 3, 4]))
    assert (wd / "runs" / "3d_cascade_fullres" / "fold_0" / "val_report" / "summary.json").exists()

    case = splits[0]["val"][0]
    (tmp_path / "in").mkdir()
    for ch in (0, 1):
        (tmp_path / "in" / f"{case}_{ch:04d}.nii.gz").symlink_to(ds / "imagesTr" / f"{case}_{ch:04d}.nii.gz")
    written = predict_folder(tmp_path / "in", tmp_path / "out", wd, config_name="3d_cascade_fullres", tta=False)
    src = nib.load(ds / "imagesTr" / f"{case}_0000.nii.gz")
    out = nib.load(written[0])
    assert out.shape == src.shape and np.allclose(out.affine, src.affine)
    assert set(np.unique(np.asanyarray(out.dataobj))) <= {0, 1, 2, 3, 4}
