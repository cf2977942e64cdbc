"""The ignore label (nnU-Net v2's convention for sparse annotation): a label named ``ignore``, the
highest value, marks unannotated voxels. It is no network class; its voxels take part in no loss
term and no metric, and no patch is centred on them."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from test_training import _tiny_plan

from medseg.errors import DatasetError
from medseg.evaluation.metrics import case_metrics
from medseg.inference.predictor import predict_folder
from medseg.io.dataset import load_dataset
from medseg.plans.schema import Plans, label_values
from medseg.preprocessing.labels import labels_to_classes
from medseg.preprocessing.pipeline import ANNOTATED, load_class_locations
from medseg.training.loop import train_fold
from medseg.training.losses import DeepSupervisionLoss, GroupDiceCELoss
from medseg.workdir import WorkDir

IGNORE = 3


def _sparse(dataset, slices=(0, 1, 2, 3, 4, 5, 6, 7, 8)):
    """The synthetic dataset with label 3 'ignore' on ``slices`` of the last axis of every label map."""
    meta = json.loads((dataset / "dataset.json").read_text())
    meta["labels"][str(IGNORE)] = "ignore"
    (dataset / "dataset.json").write_text(json.dumps(meta))
    for path in sorted((dataset / "labelsTr").glob("*.nii.gz")):
        img = nib.load(path)
        arr = np.asarray(img.dataobj).astype(np.uint8)
        arr[..., list(slices)] = IGNORE
        nib.save(nib.Nifti1Image(arr, img.affine, img.header), path)
    return dataset


def test_the_ignore_label_is_no_class_and_becomes_the_class_after_the_last():
    labels = {0: "background", 1: "a", 2: "b", 3: "ignore"}
    assert label_values(labels) == [0, 1, 2]
    plans_like = Plans.model_construct(labels=labels)
    assert (plans_like.num_classes, plans_like.ignore_value, plans_like.ignore_class) == (3, 3, 3)
    assert plans_like.class_labels == {0: "background", 1: "a", 2: "b"}
    label = np.array([[0, 1, 2, 3]])
    assert labels_to_classes(label, [0, 1, 2], "x", ignore=3).tolist() == [[0, 1, 2, 3]]
    # sparse values: the ignore value 255 becomes class 3, one past the network's outputs
    assert labels_to_classes(np.array([0, 4, 9, 255]), [0, 4, 9], "x", ignore=255).tolist() == [0, 1, 2, 3]
    with pytest.raises(DatasetError, match="must be the highest"):
        labels_to_classes(label, [0, 1, 5], "x", ignore=3)


@pytest.mark.parametrize("labels, message", [
    ({"0": "background", "1": "ignore", "2": "b"}, "must have the highest value"),
    ({"0": "background", "1": "ignore"}, "name at least one structure"),
    ({"0": "background", "1": "a", "2": "ignore", "3": "Ignore"}, "declare one ignore label"),
])
def test_a_misdeclared_ignore_label_is_refused_in_one_line(msd_dataset, labels, message):
    meta = json.loads((msd_dataset / "dataset.json").read_text())
    meta["labels"] = labels
    (msd_dataset / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset(msd_dataset)
    assert "dataset.json" in str(info.value) and "\n" not in str(info.value)


def test_ignored_voxels_change_neither_the_loss_nor_get_a_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, 6, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 6, 6, 6))
    # without ignored voxels the masked loss is MONAI's DiceCELoss
    monai = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                       smooth_nr=1e-5, smooth_dr=1e-5)(logits, target)
    assert torch.allclose(GroupDiceCELoss(ignore_class=IGNORE)(logits, target), monai, atol=1e-6)
    sparse = target.clone()
    sparse[..., :3] = IGNORE
    loss = DeepSupervisionLoss(ignore_class=IGNORE)
    value = loss(logits, sparse)
    (grad,) = torch.autograd.grad(value, logits)
    assert grad[..., :3].abs().max() == 0 and grad[..., 3:].abs().max() > 0
    changed = logits.detach().clone()
    changed[..., :3] = torch.randn_like(changed[..., :3]) * 10
    assert torch.allclose(loss(changed, sparse), value.detach(), atol=1e-6)
    # it is the loss of the annotated half alone
    half = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                      smooth_nr=1e-5, smooth_dr=1e-5)(logits[..., 3:], target[..., 3:])
    assert torch.allclose(value, half, atol=1e-5)
    # per-element Dice (batch_dice off) masks the same way
    per_element = DeepSupervisionLoss(batch_dice=False, ignore_class=IGNORE)
    assert torch.allclose(per_element(changed, sparse), per_element(logits.detach(), sparse), atol=1e-6)


def test_metrics_leave_out_the_ignored_voxels():
    ref = np.zeros((10, 10, 4), np.uint8)
    ref[2:6, 2:6, :] = 1
    ref[..., 2:] = IGNORE  # half the slices unannotated
    pred = np.zeros_like(ref)
    pred[2:6, 2:6, :2] = 1
    pred[..., 2:] = 1  # anything at all where nothing is annotated
    labels = {0: "background", 1: "a", 3: "ignore"}
    rows = case_metrics(pred, ref, (1.0, 1.0, 1.0), labels, ignore=IGNORE)
    assert [r["class_id"] for r in rows] == [1]
    assert rows[0]["dice"] == 1.0 and rows[0]["fp"] == 0


def test_a_sparsely_annotated_dataset_plans_trains_and_predicts_without_the_ignore_label(msd_dataset, tmp_path):
    torch.set_num_threads(1)
    dataset = _sparse(msd_dataset)
    work = tmp_path / "work"
    plans = _tiny_plan(dataset, work)
    assert plans.num_classes == 3 and plans.ignore_class == 3
    folder = WorkDir(work).preprocessed("3d_fullres")
    seg = np.load(next(p for p in folder.glob("*_seg.npy")))
    assert set(np.unique(seg).tolist()) <= {-1, 0, 1, 2, 3} and (seg == 3).any()
    locations = load_class_locations(folder, "case_000")
    assert set(locations) <= {"1", "2", ANNOTATED} and len(locations[ANNOTATED])
    for coords in locations.values():  # no sampled location lies on an ignored voxel
        assert all(seg[0][tuple(c)] != 3 for c in coords)
    run = train_fold(work, "3d_fullres", 0, epochs=2, num_workers=0)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train_loss"]) for r in log)
    out = tmp_path / "pred"
    (written,) = predict_folder(dataset / "imagesTr" / "case_000.nii.gz", out, work, config_name="3d_fullres",
                                folds=[0], tta=False)
    values = set(np.unique(np.asarray(nib.load(written).dataobj)).tolist())
    assert values <= {0, 1, 2}
