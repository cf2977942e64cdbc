"""evaluate_folder on small NIfTI folders: pairing, errors, and the three output files."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import write_nifti

from medseg.errors import DatasetError
from medseg.evaluation.metrics import image_diagonal_mm
from medseg.evaluation.report import COLUMNS, evaluate_folder, format_summary
from medseg.io.image import read_image, write_image

SHAPE = (12, 12, 8)
SPACING = (1.0, 1.0, 2.0)


def labelmap(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> np.ndarray:
    out = np.zeros(SHAPE, dtype=np.uint8)
    if a is not None:
        out[a] = 1
    if b is not None:
        out[b] = 2
    return out


A = (slice(2, 6), slice(2, 6), slice(2, 6))
A_SHIFTED = (slice(3, 7), slice(2, 6), slice(2, 6))
B = (slice(8, 11), slice(8, 11), slice(1, 3))


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Three cases: perfect; class 1 shifted by one voxel and class 2 missed; class 2 absent in both."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    cases = {
        "case_0": (labelmap(A, B), labelmap(A, B)),
        "case_1": (labelmap(A, B), labelmap(A_SHIFTED, None)),
        "case_2": (labelmap(A, None), labelmap(A, None)),
    }
    for name, (r, p) in cases.items():
        write_nifti(ref / f"{name}.nii.gz", r, SPACING)
        write_nifti(pred / f"{name}.nii.gz", p, SPACING)
    return pred, ref


def test_evaluate_folder_writes_csv_summary_and_png(folders, tmp_path: Path):
    pred, ref = folders
    out = tmp_path / "out"
    summary = evaluate_folder(pred, ref, out, labels={0: "background", 1: "liver", 2: "tumour"})

    frame = pd.read_csv(out / "metrics.csv")
    assert list(frame.columns) == COLUMNS
    assert len(frame) == 6 and sorted(set(frame["case"])) == ["case_0", "case_1", "case_2"]
    assert (out / "metrics.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text()) == summary
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]

    liver, tumour = summary["classes"]["1"], summary["classes"]["2"]
    assert summary["n_cases"] == 3 and liver["name"] == "liver"
    assert liver["dice"]["mean"] == pytest.approx((1 + 0.75 + 1) / 3)
    assert liver["hd95_mm"]["mean"] == pytest.approx(1 / 3)  # one case shifted by 1 mm
    assert liver["dice"]["n"] == 3 and liver["dice"]["n_excluded"] == 0
    # tumour: perfect, missed (Dice 0, HD95 = diagonal, counted), absent from both (excluded)
    assert tumour["dice"] == {"mean": 0.5, "median": 0.5, "std": 0.5, "n": 2, "n_excluded": 1}
    assert tumour["hd95_mm"]["n_penalized"] == 1 and tumour["hd95_mm"]["n_excluded"] == 1
    diagonal = image_diagonal_mm(SHAPE, SPACING)
    assert tumour["hd95_mm"]["mean"] == pytest.approx(diagonal / 2)
    assert summary["foreground_mean"]["dice"] == pytest.approx((liver["dice"]["mean"] + 0.5) / 2)
    assert "excluded" in summary["conventions"] and "diagonal" in summary["conventions"]

    missed = frame[(frame["case"] == "case_1") & (frame["class_id"] == 2)].iloc[0]
    assert missed["hd95_penalized"] and missed["hd95_mm"] == pytest.approx(diagonal)
    absent = frame[(frame["case"] == "case_2") & (frame["class_id"] == 2)].iloc[0]
    assert math.isnan(absent["dice"]) and math.isnan(absent["hd95_mm"])

    text = format_summary(summary)
    assert "liver" in text and "tumour" in text and "foreground mean" in text


def test_labels_are_inferred_from_the_references_and_workers_agree(folders, tmp_path: Path):
    pred, ref = folders
    one = evaluate_folder(pred, ref, tmp_path / "one")
    assert one["labels"] == {"1": "label_1", "2": "label_2"}
    two = evaluate_folder(pred, ref, tmp_path / "two", num_workers=2)
    assert two == one
    assert (tmp_path / "one" / "metrics.csv").read_text() == (tmp_path / "two" / "metrics.csv").read_text()


def test_pairs_any_suffix_and_ignores_unmatched_predictions(folders, tmp_path: Path, caplog):
    pred, ref = folders
    array, geometry = read_image(pred / "case_0.nii.gz")
    (pred / "case_0.nii.gz").unlink()
    write_image(pred / "case_0.nrrd", array[0], geometry)
    write_nifti(pred / "case_2.nii", labelmap(A, None), SPACING)
    (pred / "case_2.nii.gz").unlink()
    write_nifti(pred / "extra.nii.gz", labelmap(A, None), SPACING)
    with caplog.at_level(logging.WARNING, logger="medseg.evaluation.report"):
        summary = evaluate_folder(pred, ref, tmp_path / "out", labels={1: "a", 2: "b"})
    assert summary["n_cases"] == 3 and summary["classes"]["1"]["dice"]["mean"] == pytest.approx(2.75 / 3)
    assert "extra.nii.gz" in caplog.text


def test_shape_mismatch_names_the_file_and_both_shapes(folders, tmp_path: Path):
    pred, ref = folders
    write_nifti(pred / "case_1.nii.gz", np.zeros((12, 12, 7), dtype=np.uint8), SPACING)
    with pytest.raises(DatasetError, match=r"case_1\.nii\.gz.*\(12, 12, 7\).*\(12, 12, 8\)"):
        evaluate_folder(pred, ref, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_prediction_names_the_case(folders, tmp_path: Path):
    pred, ref = folders
    (pred / "case_2.nii.gz").unlink()
    with pytest.raises(DatasetError, match="case_2"):
        evaluate_folder(pred, ref, tmp_path / "out")
