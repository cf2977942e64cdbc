"""Silent corruption at the edges (issue 16): sparse label values, stale preprocessed data, and
outputs whose header and data live in separate files.

- Label values {0, 1, 255} and {0, 3, 7} become classes 0..K-1 when preprocessed (int8 arrays, K
  network outputs) and values again in every file written (predictions, fold validation), so
  evaluation compares like with like.
- Each preprocessed case and the fingerprint record the digest of what made them; a change of plan
  or of a source file redoes exactly what it touched, and nothing else.
- Every output format is read back by SimpleITK after the atomic write, with no temporary file left.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from helpers import listing, make_msd_dataset
from test_training import _tiny_plan

from medseg import workflow
from medseg.errors import DatasetError
from medseg.inference.predictor import predict_folder
from medseg.io.dataset import load_dataset, read_case_label
from medseg.io.image import SUPPORTED_SUFFIXES, Geometry, data_file, read_image, write_image
from medseg.orchestration.crossval import train_and_validate
from medseg.plans.schema import MAX_CLASSES, Plans, label_values
from medseg.preprocessing.labels import classes_to_labels, label_dtype, labels_to_classes
from medseg.preprocessing.pipeline import export_probabilities, load_properties, preprocess_dataset
from medseg.workdir import WorkDir

THROUGHPUT = 1e12


def _relabel(root: Path, mapping: dict[int, int]) -> Path:
    """Rewrite a synthetic MSD dataset's label files and ``dataset.json`` with other label values."""
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {str(mapping.get(int(k), int(k))): v for k, v in meta["labels"].items()}
    (root / "dataset.json").write_text(json.dumps(meta))
    for path in sorted((root / "labelsTr").glob("*.nii.gz")):
        img = nib.load(path)
        old = np.asanyarray(img.dataobj)
        new = old.copy()
        for a, b in mapping.items():
            new[old == a] = b
        out = nib.Nifti1Image(new.astype(np.uint8), img.affine, img.header)
        nib.save(out, path)
    return root


# --- label values <-> classes -------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [[0, 1, 255], [0, 3, 7]])
def test_sparse_label_values_map_to_consecutive_classes_and_back_exactly(values: list[int]) -> None:
    rng = np.random.default_rng(0)
    label = rng.choice(values, size=(9, 8, 7)).astype(np.uint8)
    classes = labels_to_classes(label, values, "x.nii.gz")
    assert sorted(np.unique(classes).tolist()) == [0, 1, 2]
    assert np.array_equal(classes == 2, label == values[2])  # class k is the k-th smallest value
    back = classes_to_labels(classes.astype(np.int8), values)
    assert back.dtype == np.uint8 and np.array_equal(back, label)


def test_plans_have_one_output_per_label_value_however_sparse() -> None:
    assert label_values({255: "c", 0: "bg", 1: "a"}) == [0, 1, 255]
    assert label_values({3: "a", 7: "b"}) == [0, 3, 7]  # the background is class 0 even when undeclared
    for labels in ({0: "bg", 1: "a", 255: "c"}, {0: "bg", 3: "a", 7: "b"}, {0: "bg", 1: "a", 2: "b"}):
        plans = Plans.model_construct(labels=labels)
        assert plans.num_classes == 3


def test_consecutive_labels_are_their_own_classes_without_a_copy() -> None:
    label = np.array([[[0, 1, 2]]], dtype=np.uint8)
    assert labels_to_classes(label, [0, 1, 2], "x") is label


def test_a_value_that_is_not_declared_is_one_line_naming_the_file() -> None:
    with pytest.raises(DatasetError, match=r"lab\.nii\.gz: label value\(s\) \[4\] not among the declared labels"):
        labels_to_classes(np.array([0, 3, 4]), [0, 3, 7], "lab.nii.gz")
    with pytest.raises(DatasetError, match="not an integer"):
        labels_to_classes(np.array([0.0, 1.0000001]), [0, 1], "lab.nii.gz")


def test_more_classes_than_int8_holds_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    ds = make_msd_dataset(tmp_path / "ds", n_cases=2)
    meta = json.loads((ds / "dataset.json").read_text())
    meta["labels"] = {str(k): f"l{k}" for k in range(MAX_CLASSES + 1)}
    (ds / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=f"{MAX_CLASSES + 1} label values .* at most {MAX_CLASSES} classes"):
        workflow.plan(ds, tmp_path / "wd", num_workers=1, throughput=THROUGHPUT, configs=["3d_fullres"])
    assert not (tmp_path / "wd").exists()


def test_label_files_keep_uint8_up_to_255_and_widen_beyond() -> None:
    assert label_dtype([0, 1, 255]) == np.uint8
    assert label_dtype([0, 1, 1000]) == np.uint16
    assert classes_to_labels(np.array([0, 2, 1]), [0, 7, 1000]).tolist() == [0, 1000, 7]


# --- the pipeline with sparse labels: plan → preprocess → train → validate → predict ---------------------------


@pytest.fixture(scope="module", params=[{2: 255}, {1: 3, 2: 7}], ids=["0-1-255", "0-3-7"])
def sparse_model(request, tmp_path_factory):
    """A work directory trained for 1 epoch (fold 0, validated) on a dataset with sparse label values."""
    root = tmp_path_factory.mktemp("sparse")
    ds = _relabel(make_msd_dataset(root / "ds", n_cases=4), request.param)
    _tiny_plan(ds, root / "wd")
    train_and_validate(root / "wd", "3d_fullres", 0, epochs=2)
    values = sorted({0, *request.param.values(), *({1, 2} - set(request.param))})
    return root, values


def test_sparse_labels_preprocess_to_class_indices_with_one_location_set_per_class(sparse_model) -> None:
    root, values = sparse_model
    work = WorkDir(root / "wd")
    plans = Plans.load(work.plans)
    assert plans.label_values == values and plans.num_classes == 3
    out = work.preprocessed("3d_fullres")
    ds = load_dataset(root / "ds")
    for case in ds.cases:
        seg = np.load(out / f"{case.case_id}_seg.npy")
        assert seg.dtype == np.int8 and set(np.unique(seg).tolist()) == {0, 1, 2}  # no wrap to -1
        props = load_properties(out, case.case_id)
        assert sorted(props.class_locations) == ["1", "2"]
        # the round trip: one-hot of the preprocessed classes, exported and mapped back, is the label file
        probs = (seg == np.arange(3).reshape(-1, 1, 1, 1)).astype(np.float32)
        exported = classes_to_labels(export_probabilities(probs, props, plans.config("3d_fullres")), values)
        label, _ = read_case_label(case)
        assert np.array_equal(exported, label)


def test_fold_validation_writes_label_values_and_evaluates_against_the_references(sparse_model) -> None:
    root, values = sparse_model
    work = WorkDir(root / "wd")
    run = work.run("3d_fullres", 0)
    preds = sorted(run.val.glob("*.nii.gz"))
    assert preds
    summary = json.loads((run.val_report / "summary.json").read_text())
    assert sorted(summary["classes"], key=int) == [str(v) for v in values[1:]]
    for path in preds:
        pred = np.asanyarray(nib.load(path).dataobj)
        ref = np.asanyarray(nib.load(next(run.val_reference.glob(path.name))).dataobj)
        assert pred.dtype == np.uint8 and set(np.unique(pred).tolist()) <= set(values)
        assert np.load(path.with_name(path.name.replace(".nii.gz", ".npz")))["probabilities"].shape[0] == 3
    assert len(preds) == summary["n_cases"] == 1
    # the sparse class, found under its own value in prediction and reference (a class index would score 0)
    p, r = pred == values[2], ref == values[2]
    dice = 2 * (p & r).sum() / (p.sum() + r.sum())
    assert dice > 0
    assert summary["classes"][str(values[2])]["dice"]["mean"] == pytest.approx(dice)


def test_predict_writes_only_the_datasets_label_values(sparse_model, tmp_path) -> None:
    root, values = sparse_model
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in sorted((root / "ds" / "imagesTr").glob("*.nii.gz"))[:2]:
        os.symlink(f, inputs / f.name)
    written = predict_folder(inputs, tmp_path / "out", root / "wd", folds=[0], save_probabilities=True)
    for path in written:
        seg = np.asanyarray(nib.load(path).dataobj)
        probs = np.asanyarray(nib.load(str(path).replace(".nii.gz", "_probabilities.nii.gz")).dataobj)
        assert probs.shape[-1] == 3  # one network output per label value
        assert seg.dtype == np.uint8 and set(np.unique(seg).tolist()) <= set(values)
        assert np.array_equal(seg, np.asarray(values)[probs.argmax(-1)])


# --- stale preprocessed data and fingerprints -----------------------------------------------------------------


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def _planned(tmp_path: Path) -> tuple[Path, WorkDir]:
    ds = make_msd_dataset(tmp_path / "ds", n_cases=3)
    work = WorkDir(tmp_path / "wd")
    workflow.plan(ds, work.root, num_workers=1, throughput=THROUGHPUT, configs=["3d_fullres"])
    return ds, work


def test_unchanged_inputs_redo_nothing_not_even_the_fingerprint(tmp_path: Path) -> None:
    ds, work = _planned(tmp_path)
    out = work.preprocessed("3d_fullres")
    before, fp_before = _mtimes(out), work.fingerprint.stat().st_mtime_ns
    assert workflow.preprocess(work.root, num_workers=1) == {"3d_fullres": 0}
    workflow.plan(ds, work.root, num_workers=1, throughput=THROUGHPUT, configs=["3d_fullres"])
    assert _mtimes(out) == before
    assert work.fingerprint.stat().st_mtime_ns == fp_before


def test_a_new_target_spacing_in_plans_json_redoes_every_case(tmp_path: Path) -> None:
    ds, work = _planned(tmp_path)
    out = work.preprocessed("3d_fullres")
    shape = np.load(out / "case_000.npy").shape
    plans = Plans.load(work.plans)
    plans.configurations["3d_fullres"].spacing = [2.0, 2.0, 2.0]
    plans.save(work.plans)
    assert workflow.preprocess(work.root, num_workers=1) == {"3d_fullres": 3}
    new = np.load(out / "case_000.npy").shape
    assert new[1:] == tuple(round(s / 2) for s in shape[1:])
    assert load_properties(out, "case_000").shape_preprocessed == list(new[1:])
    assert workflow.preprocess(work.root, num_workers=1) == {"3d_fullres": 0}


def test_a_new_normalisation_redoes_every_case(tmp_path: Path) -> None:
    _, work = _planned(tmp_path)
    plans = Plans.load(work.plans)
    plans.configurations["3d_fullres"].normalization[0].scheme = "none"
    plans.save(work.plans)
    assert workflow.preprocess(work.root, num_workers=1) == {"3d_fullres": 3}


def test_a_touched_source_image_redoes_that_case_and_the_fingerprint(tmp_path: Path) -> None:
    ds, work = _planned(tmp_path)
    out = work.preprocessed("3d_fullres")
    before = _mtimes(out)
    fp_before = json.loads(work.fingerprint.read_text())
    image = ds / "imagesTr" / "case_001.nii.gz"
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, newer file
    assert workflow.preprocess(work.root, num_workers=1) == {"3d_fullres": 1}
    after = _mtimes(out)
    assert {k for k in after if after[k] != before[k]} == {"case_001.npy", "case_001_seg.npy", "case_001.json"}
    workflow.plan(ds, work.root, num_workers=1, throughput=THROUGHPUT, configs=["3d_fullres"])
    fp_after = json.loads(work.fingerprint.read_text())
    assert fp_after["made_from"] != fp_before["made_from"]
    assert {k: v for k, v in fp_after.items() if k != "made_from"} == {
        k: v for k, v in fp_before.items() if k != "made_from"}  # same bytes: the same statistics


def test_a_modified_label_file_redoes_that_case_with_the_new_labels(tmp_path: Path) -> None:
    ds, work = _planned(tmp_path)
    out = work.preprocessed("3d_fullres")
    path = ds / "labelsTr" / "case_002.nii.gz"
    img = nib.load(path)
    label = np.asanyarray(img.dataobj).copy()
    label[label == 2] = 1
    nib.save(nib.Nifti1Image(label, img.affine, img.header), path)
    plans = Plans.load(work.plans)
    assert preprocess_dataset(load_dataset(ds), plans, work.root) == {"3d_fullres": 1}
    seg = np.load(out / "case_002_seg.npy")
    assert set(np.unique(seg).tolist()) == {0, 1}
    assert sorted(load_properties(out, "case_002").class_locations) == ["1", "2"]
    assert load_properties(out, "case_002").class_locations["2"] == []


def test_a_case_interrupted_while_being_redone_counts_as_unfinished(tmp_path: Path) -> None:
    ds, work = _planned(tmp_path)
    out = work.preprocessed("3d_fullres")
    props = json.loads((out / "case_000.json").read_text())
    props["made_from"] = "0" * 64  # what an older plan left
    (out / "case_000.json").write_text(json.dumps(props))
    assert workflow.preprocess(work.root, num_workers=1) == {"3d_fullres": 1}
    assert json.loads((out / "case_000.json").read_text())["made_from"] != "0" * 64


# --- every output format, written atomically and read back ----------------------------------------------------


def _geometry() -> Geometry:
    affine = np.array([[0.0, -1.2, 0.0, 30.0], [0.9, 0.0, 0.0, -12.0], [0.0, 0.0, 2.5, 5.0], [0, 0, 0, 1]])
    return Geometry((5, 4, 3), (0.9, 1.2, 2.5), affine)


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
def test_every_output_format_reads_back_with_its_geometry_and_leaves_no_temp_file(tmp_path: Path, suffix: str) -> None:
    geometry = _geometry()
    array = np.arange(60, dtype=np.int16).reshape(5, 4, 3) - 7
    for attempt in range(2):  # the second write replaces the first
        write_image(tmp_path / "out" / f"seg{suffix}", array + attempt, geometry)
    files = listing(tmp_path / "out")
    header = tmp_path / "out" / f"seg{suffix}"
    detached = data_file(header)
    assert files == sorted([header.name, *([detached.name] if detached else [])])
    if suffix in (".mhd", ".nhdr"):
        assert detached is not None and detached.exists() and not detached.name.startswith(".")
    img = sitk.ReadImage(str(header))
    assert np.array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), array + 1)
    back, back_geometry = read_image(header)
    assert np.array_equal(back[0], array + 1)
    assert back_geometry.shape == geometry.shape
    np.testing.assert_allclose(back_geometry.spacing, geometry.spacing, atol=1e-6)
    np.testing.assert_allclose(back_geometry.affine, geometry.affine, atol=1e-6)


@pytest.mark.parametrize("suffix", [".mhd", ".nhdr"])
def test_a_failed_detached_write_leaves_nothing(tmp_path: Path, suffix: str, monkeypatch) -> None:
    def failing_write(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        write_image(tmp_path / f"seg{suffix}", np.zeros((5, 4, 3), np.uint8), _geometry())
    assert listing(tmp_path) == []
