"""``check_dataset`` / ``medseg check``: one exact problem line per bad input, naming the file."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import (
    listing,
    make_msd_dataset,
    run_medseg,
    truncate_file,
    write_nifti,
)

from medseg.errors import DatasetError
from medseg.io.check import check_dataset
from medseg.io.dataset import load_dataset
from medseg.io.image import read_image


def _check(root: Path, **kwargs) -> list[str]:
    return check_dataset(load_dataset(root), **kwargs)


def _load(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


# --- clean datasets ------------------------------------------------------------------------------


def test_clean_msd_dataset_has_no_problems(msd_dataset: Path) -> None:
    assert _check(msd_dataset) == []


def test_clean_nnunetv2_dataset_has_no_problems(nnunetv2_dataset: Path) -> None:
    assert _check(nnunetv2_dataset) == []


def test_clean_plain_folder_has_no_problems(msd_dataset: Path) -> None:
    (msd_dataset / "dataset.json").unlink()
    assert _check(msd_dataset) == []


def test_synthetic_cases_hold_every_declared_label(msd_dataset: Path) -> None:
    for label in sorted((msd_dataset / "labelsTr").iterdir()):
        assert set(np.unique(_load(label)).tolist()) == {0, 1, 2}


# --- one bad input each --------------------------------------------------------------------------


def test_label_shape_mismatch_names_the_label(msd_dataset: Path) -> None:
    label = (msd_dataset / "labelsTr" / "case_001.nii.gz").resolve()
    write_nifti(label, _load(label)[:, :, :15])
    assert _check(msd_dataset) == [
        f"{label}: geometry differs from image case_001.nii.gz: shape (20, 24, 15) != (20, 24, 16)"
    ]


def test_label_spacing_mismatch_names_the_label(msd_dataset: Path) -> None:
    label = (msd_dataset / "labelsTr" / "case_002.nii.gz").resolve()
    write_nifti(label, _load(label), spacing=(1.0, 1.0, 2.0))
    assert _check(msd_dataset) == [
        f"{label}: geometry differs from image case_002.nii.gz: spacing (1, 1, 2) != (1, 1, 1)"
    ]


def test_undeclared_label_value_is_reported(msd_dataset: Path) -> None:
    label = (msd_dataset / "labelsTr" / "case_000.nii.gz").resolve()
    arr = _load(label).copy()
    arr[0, 0, :3] = 3
    write_nifti(label, arr)
    assert _check(msd_dataset) == [f"{label}: label values [3] not declared in dataset.json labels [0, 1, 2]"]


def test_non_integer_label_values_are_reported_before_rounding(msd_dataset: Path) -> None:
    label = (msd_dataset / "labelsTr" / "case_003.nii.gz").resolve()
    arr = _load(label).astype(np.float32)
    arr[0, 0, 0] = 0.5
    write_nifti(label, arr)
    assert _check(msd_dataset) == [f"{label}: non-integer label values e.g. 0.5"]


def test_float_labels_with_integer_values_pass(msd_dataset: Path) -> None:
    label = msd_dataset / "labelsTr" / "case_003.nii.gz"
    write_nifti(label, _load(label).astype(np.float32))
    assert _check(msd_dataset) == []


def test_truncated_image_gives_one_clean_line(msd_dataset: Path) -> None:
    image = (msd_dataset / "imagesTr" / "case_002.nii.gz").resolve()
    truncate_file(image, 0.5)
    with pytest.raises(DatasetError) as exc:
        read_image(image)
    assert _check(msd_dataset) == [str(exc.value)]
    assert str(exc.value).startswith(f"{image}: cannot read image (")
    assert "truncated" in str(exc.value)


def test_truncated_label_gives_one_clean_line(msd_dataset: Path) -> None:
    label = (msd_dataset / "labelsTr" / "case_002.nii.gz").resolve()
    truncate_file(label, 0.5)
    (problem,) = _check(msd_dataset)
    assert problem.startswith(f"{label}: cannot read image (")


def test_missing_label_file_is_reported(msd_dataset: Path) -> None:
    label = (msd_dataset / "labelsTr" / "case_001.nii.gz").resolve()
    label.unlink()
    assert _check(msd_dataset) == [f"{label}: label file missing"]


def test_msd_4d_image_with_more_channels_than_declared(msd_dataset: Path) -> None:
    image = (msd_dataset / "imagesTr" / "case_000.nii.gz").resolve()
    arr = _load(image)
    write_nifti(image, np.stack([arr, arr], axis=-1))
    assert _check(msd_dataset) == [f"{image}: has 2 channels, dataset declares 1"]


def test_nnunetv2_case_missing_a_channel_file_fails_to_load(nnunetv2_dataset: Path) -> None:
    (nnunetv2_dataset / "imagesTr" / "case_002_0001.nii.gz").unlink()
    expected = r"case_002: channel file\(s\) \[1\] missing \(expected 2 channels\)"
    with pytest.raises(DatasetError, match=expected):
        load_dataset(nnunetv2_dataset)


def test_nnunetv2_channel_geometry_mismatch_names_the_channel_file(nnunetv2_dataset: Path) -> None:
    second = (nnunetv2_dataset / "imagesTr" / "case_001_0001.nii.gz").resolve()
    write_nifti(second, _load(second), spacing=(1.0, 1.0, 2.0))
    assert _check(nnunetv2_dataset) == [
        f"{second}: geometry differs from channel file case_001_0000.nii.gz: spacing (1, 1, 2) != (1, 1, 1)"
    ]


def test_nan_and_inf_in_image_are_counted(msd_dataset: Path) -> None:
    image = (msd_dataset / "imagesTr" / "case_001.nii.gz").resolve()
    arr = _load(image).copy()
    arr[0, :10, 0] = np.nan
    arr[1, :2, 0] = np.inf
    write_nifti(image, arr)
    assert _check(msd_dataset) == [f"{image}: contains 12 NaN/Inf voxels"]


# --- ordering, workers, progress -----------------------------------------------------------------


def _break_several(root: Path) -> None:
    truncate_file(root / "imagesTr" / "case_000.nii.gz", 0.5)
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    label = root / "labelsTr" / "case_003.nii.gz"
    arr = _load(label).copy()
    arr[0, 0, 0] = 7
    write_nifti(label, arr)


def test_workers_and_progress_give_the_same_lines_in_case_order(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_msd_dataset(tmp_path / "ds", n_cases=4, shape=(12, 10, 8))
    _break_several(root)
    serial = _check(root)
    assert [p.split(":")[0].rsplit("/", 1)[-1] for p in serial] == [
        "case_000.nii.gz", "case_001.nii.gz", "case_003.nii.gz"]
    assert _check(root, num_workers=2, progress=True) == serial
    assert capsys.readouterr().out == ""


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_check_clean_dataset_exits_0_and_writes_nothing(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", n_cases=2, shape=(12, 10, 8))
    before = listing(root)
    result = run_medseg("check", root)
    assert result.returncode == 0, result.stderr
    assert listing(root) == before


def test_cli_check_bad_dataset_exits_2_with_one_line_per_file(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", n_cases=4, shape=(12, 10, 8))
    _break_several(root)
    before = listing(root)
    result = run_medseg("check", root)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == _check(root)
    named = [Path(line.split(": ", 1)[0]) for line in lines]
    assert [p.name for p in named] == ["case_000.nii.gz", "case_001.nii.gz", "case_003.nii.gz"]
    assert all(p.is_relative_to(root.resolve()) for p in named)
    assert listing(root) == before


def test_cli_check_unloadable_dataset_exits_2_without_traceback(nnunetv2_dataset: Path) -> None:
    (nnunetv2_dataset / "imagesTr" / "case_002_0001.nii.gz").unlink()
    before = listing(nnunetv2_dataset)
    result = run_medseg("check", nnunetv2_dataset)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    case = nnunetv2_dataset / "imagesTr" / "case_002"
    assert result.stderr.strip().splitlines() == [
        f"error: {case}: channel file(s) [1] missing (expected 2 channels)"]
    assert listing(nnunetv2_dataset) == before


# --- the shared real subsets ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["spleen-ct", "brats-subset"])
def test_cli_check_passes_on_shared_real_data(shared_data_dir: Path, name: str) -> None:
    root = shared_data_dir / name
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    before = listing(root)
    result = run_medseg("check", root)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert listing(root) == before
