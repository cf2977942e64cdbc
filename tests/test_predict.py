"""Prediction contracts: outputs carry the input's exact geometry; skipping, probabilities, errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from helpers import make_case
from test_training import _tiny_plan

from medseg.errors import MedsegError
from medseg.inference.predictor import (
    InputCase,
    LoadedModel,
    PredictOptions,
    _loggable_id,
    predict_folder,
    write_summary,
)
from medseg.inference.sliding_window import predict_logits_tta
from medseg.training.loop import train_fold
from medseg.utils import atomic_write_json


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from helpers import make_msd_dataset

    root = tmp_path_factory.mktemp("pred")
    ds = make_msd_dataset(root / "ds", n_cases=4)
    _tiny_plan(ds, root / "wd")
    train_fold(root / "wd", "3d_fullres", 0, epochs=1)
    return root / "wd"


def test_nifti_output_has_the_input_header(trained, tmp_path):
    image, _ = make_case(shape=(22, 19, 17), seed=5)
    affine = np.array([[0.0, -1.2, 0.0, 30.0], [0.9, 0.0, 0.0, -12.0], [0.0, 0.0, 2.0, 5.0], [0, 0, 0, 1]])
    src = nib.Nifti1Image(image[0], affine)
    src.set_qform(affine, code=1)
    src.set_sform(affine, code=2)
    (tmp_path / "in").mkdir()
    nib.save(src, tmp_path / "in" / "x.nii.gz")
    written = predict_folder(tmp_path / "in", tmp_path / "out", trained, folds=[0], save_probabilities=True)
    out = nib.load(written[0])
    assert out.shape == src.shape
    np.testing.assert_allclose(out.affine, affine)
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 2
    assert out.get_data_dtype() == np.uint8
    assert set(np.unique(np.asanyarray(out.dataobj))) <= {0, 1, 2}
    probs = nib.load(tmp_path / "out" / "x_probabilities.nii.gz")
    assert probs.shape == (*src.shape, 3)
    np.testing.assert_allclose(np.asanyarray(probs.dataobj).sum(-1), 1.0, atol=1e-4)


def test_nrrd_output_keeps_origin_direction_spacing(trained, tmp_path):
    image, _ = make_case(shape=(20, 24, 16), seed=6)
    img = sitk.GetImageFromArray(np.ascontiguousarray(image[0].transpose(2, 1, 0)))
    img.SetSpacing((1.1, 0.9, 1.3))
    img.SetOrigin((-10.0, 4.0, 7.5))
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    (tmp_path / "in").mkdir()
    sitk.WriteImage(img, str(tmp_path / "in" / "y.nrrd"))
    predict_folder(tmp_path / "in", tmp_path / "out", trained, folds=[0], tta=False)
    out = sitk.ReadImage(str(tmp_path / "out" / "y.nrrd"))
    assert out.GetSize() == img.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), img.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(out.GetOrigin(), img.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(out.GetDirection(), img.GetDirection(), atol=1e-6)


def test_existing_outputs_are_skipped_unless_overwrite(trained, tmp_path):
    image, _ = make_case(seed=7)
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(image[0], np.eye(4)), tmp_path / "in" / "z.nii.gz")
    assert len(predict_folder(tmp_path / "in", tmp_path / "out", trained, tta=False)) == 1
    assert predict_folder(tmp_path / "in", tmp_path / "out", trained, tta=False) == []
    assert len(predict_folder(tmp_path / "in", tmp_path / "out", trained, tta=False, overwrite=True)) == 1


def test_a_loaded_model_with_options_predicts_as_a_work_directory_with_keywords(trained, tmp_path):
    image, _ = make_case(seed=8)
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(image[0], np.eye(4)), tmp_path / "in" / "w.nii.gz")
    (by_path,) = predict_folder(tmp_path / "in", tmp_path / "a", trained, folds=[0], tta=False)
    model = LoadedModel.load(trained, folds=[0])
    (loaded,) = predict_folder(tmp_path / "in", tmp_path / "b", model, PredictOptions(tta=False))
    assert np.array_equal(np.asanyarray(nib.load(by_path).dataobj), np.asanyarray(nib.load(loaded).dataobj))
    assert (tmp_path / "a" / "predict_summary.csv").read_bytes() == (tmp_path / "b" / "predict_summary.csv").read_bytes()


def test_choosing_folds_or_device_for_a_loaded_model_is_refused(trained, tmp_path):
    model = LoadedModel.load(trained, folds=[0])
    for given in ({"folds": [0]}, {"device": "cpu"}, {"config_name": "3d_fullres"}):
        with pytest.raises(MedsegError, match=f"{next(iter(given))} choose what to load") as err:
            predict_folder(tmp_path / "in", tmp_path / "out", model, **given)
        assert "\n" not in str(err.value)
    with pytest.raises(TypeError, match="tta_mode"):  # options are checked by name too
        predict_folder(tmp_path / "in", tmp_path / "out", model, tta_mode=False)
    assert not (tmp_path / "out").exists()


def test_wrong_channel_count_is_refused(trained, tmp_path):
    image = np.random.default_rng(0).normal(size=(20, 24, 16, 2)).astype(np.float32)
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "in" / "two.nii.gz")
    with pytest.raises(MedsegError, match="two.nii.gz: 2 channel"):
        predict_folder(tmp_path / "in", tmp_path / "out", trained)


def test_sliding_window_with_mirroring_is_exact_for_an_equivariant_predictor():
    """Oracle: a predictor whose logits are a pointwise function of the input gives, through
    windows, Gaussian blending and mirroring, exactly the softmax of that function."""
    x = torch.randn(1, 1, 23, 17, 29)

    def predictor(t):
        return torch.cat([t, 2 * t, -t], dim=1)

    probs = predict_logits_tta(predictor, x, (16, 16, 16), step=0.5, mirror_axes=(0, 1, 2))
    np.testing.assert_allclose(probs.numpy(), torch.softmax(predictor(x), 1).numpy(), atol=1e-5)


def test_save_attention_writes_one_coefficient_volume_per_gate_in_the_input_grid(trained, tmp_path):
    from medseg.plans.schema import Plans

    plans = Plans.load(trained / "plans.json")
    gated = plans.configurations["3d_fullres"].model_copy(deep=True)
    gated.variant = "attention"
    gated.architecture.blocks.attention_gates = True
    plans.configurations[gated.key] = gated
    plans.save(trained / "plans.json")
    train_fold(trained, gated.key, 0, epochs=1)
    image, _ = make_case(shape=(22, 19, 17), seed=6)
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(image[0], np.diag([1.1, 0.9, 1.3, 1.0])), tmp_path / "in" / "y.nii.gz")
    predict_folder(tmp_path / "in", tmp_path / "out", trained, config_name=gated.key, folds=[0], save_attention=True)
    att = nib.load(tmp_path / "out" / "y_attention.nii.gz")
    gates = gated.architecture.num_stages - 1
    assert att.shape == (22, 19, 17, gates)
    np.testing.assert_allclose(att.affine, np.diag([1.1, 0.9, 1.3, 1.0]))
    a = np.asanyarray(att.dataobj)
    assert a.min() >= 0.0 and a.max() <= 1.0 and a.std() > 0
    with pytest.raises(MedsegError, match="has no attention gates to save; choose one that has: 3d_fullres_attention"):
        predict_folder(tmp_path / "in", tmp_path / "out2", trained, config_name="3d_fullres", folds=[0],
                       save_attention=True)
    assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").iterdir())


def test_the_unmirrored_pass_comes_with_the_mirrored_prediction():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 3, padding=1)
    x = torch.randn(1, 1, 20, 18, 16)
    plain: list = []
    mirrored = predict_logits_tta(net, x, (16, 16, 16), step=0.5, mirror_axes=(0, 1, 2), unmirrored=plain)
    alone = predict_logits_tta(net, x, (16, 16, 16), step=0.5, mirror_axes=())
    assert len(plain) == 1 and torch.equal(plain[0], alone)
    assert not torch.allclose(mirrored, alone)  # a conv with random weights is not mirror-symmetric


def _inputs(folder, n=5, first=0):
    folder.mkdir(exist_ok=True)
    for k in range(first, first + n):
        image, _ = make_case(seed=20 + k)
        nib.save(nib.Nifti1Image(image[0], np.eye(4)), folder / f"case{k}.nii.gz")
    return folder


def _rows(output):
    return {f.stem for f in (output / ".predict_summary").glob("*.json")}


def test_shards_in_any_order_equal_one_unsharded_predict_summary_included(tiny_model, tmp_path):
    inputs = _inputs(tmp_path / "in")
    predict_folder(inputs, tmp_path / "whole", tiny_model, tta=False)
    parts, rows = {}, {}
    for part in (2, 0, 1):
        before = _rows(tmp_path / "sharded")
        written = predict_folder(inputs, tmp_path / "sharded", tiny_model, tta=False, num_parts=3, part=part)
        parts[part] = {p.name for p in written}
        rows[part] = _rows(tmp_path / "sharded") - before
    assert parts == {0: {"case0.nii.gz", "case3.nii.gz"}, 1: {"case1.nii.gz", "case4.nii.gz"}, 2: {"case2.nii.gz"}}
    assert rows == {p: {n.removesuffix(".nii.gz") for n in names} for p, names in parts.items()}  # disjoint
    assert _rows(tmp_path / "sharded") == _rows(tmp_path / "whole") == {f"case{k}" for k in range(5)}
    for k in range(5):
        a = nib.load(tmp_path / "whole" / f"case{k}.nii.gz")
        b = nib.load(tmp_path / "sharded" / f"case{k}.nii.gz")
        assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)) and np.array_equal(a.affine, b.affine)
    for name in ("predict_summary.json", "predict_summary.csv"):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "sharded" / name).read_text()
    summary = json.loads((tmp_path / "whole" / "predict_summary.json").read_text())
    assert [c["case"] for c in summary["cases"]] == [f"case{k}" for k in range(5)]


def test_a_case_killed_between_its_output_and_its_row_is_redone(tiny_model, tmp_path):
    inputs = _inputs(tmp_path / "in", n=2)
    predict_folder(inputs, tmp_path / "out", tiny_model, tta=False)
    # as if killed after case1's output was written: neither its row nor the summary are
    (tmp_path / "out" / ".predict_summary" / "case1.json").unlink()
    (tmp_path / "out" / "predict_summary.json").unlink()
    assert [p.name for p in predict_folder(inputs, tmp_path / "out", tiny_model, tta=False)] == ["case1.nii.gz"]
    assert _rows(tmp_path / "out") == {"case0", "case1"}


def test_an_old_style_summary_keeps_its_cases_and_they_are_not_redone(tiny_model, tmp_path):
    inputs = _inputs(tmp_path / "in", n=1)
    predict_folder(inputs, tmp_path / "out", tiny_model, tta=False)
    shutil.rmtree(tmp_path / "out" / ".predict_summary")  # written before row files existed
    _inputs(inputs, n=1, first=1)
    assert [p.name for p in predict_folder(inputs, tmp_path / "out", tiny_model, tta=False)] == ["case1.nii.gz"]
    summary = json.loads((tmp_path / "out" / "predict_summary.json").read_text())
    assert [c["case"] for c in summary["cases"]] == ["case0", "case1"]
    assert pd.read_csv(tmp_path / "out" / "predict_summary.csv")["case"].tolist() == ["case0", "case1"]


def test_the_qc_warning_names_only_this_runs_flagged_cases(tiny_model, tmp_path, caplog):
    from medseg.plans.schema import ChosenModel, QualityControl

    model = LoadedModel.load(tiny_model)
    chosen = ChosenModel(members=model.members, folds={m: [0] for m in model.members}, cv_dice=0.0,
                         cv_dice_per_class={}, cv_cases=0, decided="test",
                         qc=QualityControl(threshold=-1.0, quantile=0.9, spearman_vs_dice=0.0, worst_flagged=""))
    model = dataclasses.replace(model, chosen=chosen)  # every case scores above -1
    inputs = _inputs(tmp_path / "in", n=1)
    predict_folder(inputs, tmp_path / "out", model, PredictOptions(tta=False))
    _inputs(inputs, n=1, first=1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medseg.inference.predictor"):
        predict_folder(inputs, tmp_path / "out", model, PredictOptions(tta=False))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "1 case(s) flagged" in warning and "case1" in warning and "case0" not in warning
    assert json.loads((tmp_path / "out" / "predict_summary.json").read_text())["flagged"] == ["case0", "case1"]


def test_a_dicom_case_is_logged_by_a_hash_of_its_uid():
    uid = "1.2.826.0.1.3680043.8.498.1234"
    case = InputCase(uid, [], ".nii.gz", SimpleNamespace(series_uid=uid))
    assert re.fullmatch(r"series_[0-9a-f]{12}", _loggable_id(case))
    assert _loggable_id(InputCase("case0", [], ".nii.gz")) == "case0"


def _finish_shard(output, shard, n):
    """One shard's cases finishing one by one: each writes its row and rebuilds the summary, which
    then holds every row of this shard so far (another shard's rebuild can add rows, never drop them)."""
    for k in range(n):
        case = f"s{shard}c{k:02d}"
        atomic_write_json(output / ".predict_summary" / f"{case}.json",
                          {"case": case, "source": case, "qc_score": 0.0, "flagged": False})
        write_summary(output, ["3d_fullres"], None)
        have = {c["case"] for c in json.loads((output / "predict_summary.json").read_text())["cases"]}
        assert {f"s{shard}c{j:02d}" for j in range(k + 1)} <= have


def test_concurrent_shards_writing_the_summary_lose_no_rows(tmp_path):
    """4 processes, each finishing 15 cases, rebuild the summary after each; no rebuild loses a row
    (without the lock, some do in every run), and the last one holds all 60."""
    with ProcessPoolExecutor(4) as pool:
        for f in [pool.submit(_finish_shard, tmp_path, shard, 15) for shard in range(4)]:
            f.result()
    expected = sorted(f"s{s}c{k:02d}" for s in range(4) for k in range(15))
    assert [c["case"] for c in json.loads((tmp_path / "predict_summary.json").read_text())["cases"]] == expected
    assert pd.read_csv(tmp_path / "predict_summary.csv")["case"].tolist() == expected


@pytest.mark.parametrize(("num_parts", "part", "message"), [(3, 3, "--part 3: expected 0..2 for --num-parts 3"),
                                                            (3, -1, "--part -1: expected 0..2"),
                                                            (0, 0, "--num-parts 0: expected 1 or more")])
def test_a_bad_shard_is_refused(tiny_model, tmp_path, num_parts, part, message):
    inputs = _inputs(tmp_path / "in", n=1)
    with pytest.raises(MedsegError, match=re.escape(message)):
        predict_folder(inputs, tmp_path / "out", tiny_model, tta=False, num_parts=num_parts, part=part)
    assert not (tmp_path / "out").exists()
