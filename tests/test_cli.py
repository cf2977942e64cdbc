"""CLI contracts: bad input to `plan` gives one-line errors, exit 2 and writes nothing; `info`."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from helpers import make_msd_dataset, run_medseg, truncate_file


def _assert_clean_failure(result, workdir, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
    assert not workdir.exists(), "plan must not write anything when the check fails"


def test_plan_refuses_shape_mismatch(tmp_path):
    root = make_msd_dataset(tmp_path / "ds", n_cases=3)
    lab = root / "labelsTr" / "case_001.nii.gz"
    img = nib.load(lab)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:-2], img.affine), lab)
    _assert_clean_failure(run_medseg("plan", str(root), "-o", str(tmp_path / "wd")), tmp_path / "wd",
                          "case_001.nii.gz", "shape")


def test_plan_refuses_truncated_image_and_missing_label(tmp_path):
    root = make_msd_dataset(tmp_path / "ds", n_cases=3)
    truncate_file(root / "imagesTr" / "case_000.nii.gz")
    (root / "labelsTr" / "case_002.nii.gz").unlink()
    result = run_medseg("plan", str(root), "-o", str(tmp_path / "wd"))
    _assert_clean_failure(result, tmp_path / "wd", "imagesTr/case_000.nii.gz", "labelsTr/case_002.nii.gz")
    problem_lines = [ln for ln in result.stderr.splitlines() if ln.startswith(str(root))]
    assert len(problem_lines) == 2


def test_plan_refuses_undeclared_labels(tmp_path):
    root = make_msd_dataset(tmp_path / "ds", n_cases=3)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "1": "a"}
    (root / "dataset.json").write_text(json.dumps(meta))
    _assert_clean_failure(run_medseg("plan", str(root), "-o", str(tmp_path / "wd")), tmp_path / "wd",
                          "not declared")


def test_plan_then_info_prints_the_plan(tmp_path):
    root = make_msd_dataset(tmp_path / "ds", n_cases=4)
    wd = tmp_path / "wd"
    result = run_medseg("plan", str(root), "-o", str(wd), "--configs", "3d_fullres", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert (wd / "plans.json").exists() and (wd / "fingerprint.json").exists()
    assert len(list((wd / "preprocessed" / "3d_fullres").glob("*.npy"))) == 8
    info = run_medseg("info", str(wd))
    assert info.returncode == 0
    assert "3d_fullres: spacing 1x1x1, patch" in info.stdout and "why:" in info.stdout


def test_unknown_configuration_suggests_the_right_name(tmp_path):
    root = make_msd_dataset(tmp_path / "ds", n_cases=4)
    wd = tmp_path / "wd"
    run_medseg("plan", str(root), "-o", str(wd), "--configs", "3d_fullres", "--workers", "1", "--no-preprocess")
    result = run_medseg("train", str(wd), "-c", "3d_fullress")
    assert result.returncode == 2
    assert "did you mean '3d_fullres'" in result.stderr


def test_plan_refuses_an_unknown_variant_before_writing_anything(tmp_path):
    root = make_msd_dataset(tmp_path / "ds", n_cases=3)
    _assert_clean_failure(run_medseg("plan", str(root), "-o", str(tmp_path / "wd"), "--variants", "plain,grpah"),
                          tmp_path / "wd", "did you mean 'graph'")


def test_device_names_are_checked_before_torch_is_asked():
    from medseg.errors import MedsegError
    from medseg.utils import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) in ("cpu", "cuda")
    with pytest.raises(MedsegError, match="expected cpu, cuda or cuda:N"):
        resolve_device("gpu0")
