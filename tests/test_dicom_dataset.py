"""`medseg plan` on datasets whose cases are DICOM series folders (labels as images or DICOM SEG)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import run_medseg
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medseg.errors import DatasetError
from medseg.io.check import check_dataset
from medseg.io.dataset import load_dataset, read_case_image, read_case_label
from medseg.io.dicom import folder_series
from medseg.io.dicom_seg import write_dicom_seg
from medseg.io.image import read_image

DEMO = Path(__file__).resolve().parents[1] / "medseg" / "demo_data" / "hippocampus"
LABELS = {0: "background", 1: "Anterior", 2: "Posterior"}


def write_mr_series(volume: np.ndarray, affine: np.ndarray, folder: Path, description: str = "hippocampus crop",
                    study_uid: str | None = None, reverse_files: bool = True) -> None:
    """``volume`` (X, Y, Z) int16 as one MR DICOM series in ``folder``, one file per slice, with the
    geometry of the RAS ``affine`` (files named in reverse slice order unless ``reverse_files`` is off,
    so nothing can rely on file order)."""
    folder.mkdir(parents=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row, col = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    assert np.allclose(np.cross(row, col), lps[:3, 2] / spacing[2]), "test helper needs a right-handed LPS grid"
    study_uid, series_uid, frame_uid = study_uid or generate_uid(), generate_uid(), generate_uid()
    n = volume.shape[2]
    for k in range(n):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "MR", description, 1, k + 1
        ds.PatientName, ds.PatientID, ds.StudyDate = "Test^Hippocampus", "H001", "20260101"
        ds.ImagePositionPatient = [float(v) for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (between rows), column spacing
        ds.SliceThickness = float(spacing[2]) * 3  # deliberately wrong: spacing must come from positions
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype("<i2")).tobytes()
        ds.save_as(folder / f"IM{(n - 1 - k) if reverse_files else k:04d}.dcm", enforce_file_format=True)


def _demo_cases(n: int) -> list[str]:
    meta = json.loads((DEMO / "dataset.json").read_text())
    return [Path(e["image"]).name.removesuffix(".nii.gz") for e in meta["training"][:n]]


@pytest.fixture(scope="module")
def twin_datasets(tmp_path_factory) -> tuple[Path, Path]:
    """The same four hippocampus cases twice: as NIfTI (MSD layout) and as DICOM series folders (plain
    layout, three labels as NIfTI, one as a DICOM SEG written by medseg)."""
    root = tmp_path_factory.mktemp("dicom_dataset")
    nifti, dicom = root / "nifti", root / "dicom"
    for d in (nifti, dicom):
        (d / "imagesTr").mkdir(parents=True)
        (d / "labelsTr").mkdir()
    cases = _demo_cases(4)
    for i, case in enumerate(cases):
        img = nib.load(DEMO / "imagesTr" / f"{case}.nii.gz")
        volume = np.rint(np.asanyarray(img.dataobj)).astype(np.int16)
        nib.save(nib.Nifti1Image(volume, img.affine), nifti / "imagesTr" / f"{case}.nii.gz")
        shutil.copy(DEMO / "labelsTr" / f"{case}.nii.gz", nifti / "labelsTr" / f"{case}.nii.gz")
        write_mr_series(volume, img.affine, dicom / "imagesTr" / case)
        if i == 0:
            label = np.rint(np.asanyarray(nib.load(DEMO / "labelsTr" / f"{case}.nii.gz").dataobj)).astype(np.uint8)
            write_dicom_seg(dicom / "labelsTr" / f"{case}.dcm", folder_series(dicom / "imagesTr" / case), label,
                            LABELS)
        else:
            shutil.copy(DEMO / "labelsTr" / f"{case}.nii.gz", dicom / "labelsTr" / f"{case}.nii.gz")
    (nifti / "dataset.json").write_text(json.dumps({
        "name": "twin", "modality": {"0": "MR"}, "labels": {str(k): v for k, v in LABELS.items()},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases]}))
    return nifti, dicom


def test_dicom_case_folders_read_like_their_nifti_twins(twin_datasets):
    nifti, dicom = (load_dataset(d) for d in twin_datasets)
    assert dicom.layout == "plain" and dicom.channel_names == ["MR"]  # named by the series' Modality
    assert dicom.labels == LABELS  # names from the SEG's segment labels
    assert dicom.cases[0].label.suffix == ".dcm"
    assert check_dataset(dicom) == []
    for a, b in zip(nifti.cases, dicom.cases, strict=True):
        assert a.case_id == b.case_id
        image_a, geo_a = read_case_image(a)
        image_b, geo_b = read_case_image(b)
        assert geo_a.matches(geo_b) is None, geo_a.matches(geo_b)
        assert np.array_equal(image_a, image_b)
        label_a, _ = read_case_label(a)
        label_b, geo_lb = read_case_label(b)
        assert geo_lb.matches(geo_a) is None and np.array_equal(label_a, label_b)


def test_plan_dicom_dataset_equals_plan_of_nifti_twin(twin_datasets, tmp_path):
    nifti, dicom = twin_datasets
    for name, ds in (("nifti", nifti), ("dicom", dicom)):
        result = run_medseg("plan", ds, "-o", tmp_path / name, "--configs", "3d_fullres", "--workers", "1",
                            "--device", "cpu")
        assert result.returncode == 0, result.stderr
    plans = [json.loads((tmp_path / n / "plans.json").read_text()) for n in ("nifti", "dicom")]
    for p in plans:
        p.pop("dataset_name", None)
        p.pop("created", None)
    a, b = (p["configurations"]["3d_fullres"] for p in plans)
    assert a["spacing"] == pytest.approx(b["spacing"]) and a["patch_size"] == b["patch_size"]
    for case in _demo_cases(4):
        da = sorted((tmp_path / "nifti").rglob(f"{case}.npy"))
        db = sorted((tmp_path / "dicom").rglob(f"{case}.npy"))
        assert da and len(da) == len(db)
        np.testing.assert_allclose(np.load(da[0]), np.load(db[0]), atol=1e-5)
        sa, sb = (np.load(p[0].with_name(f"{case}_seg.npy")) for p in (da, db))
        assert np.array_equal(sa, sb)


def test_reference_seg_as_a_dataset_label(shared_data_dir, tmp_path):
    """The real CT with its reference DICOM SEG as a one-case dataset: CT normalisation, the SEG's
    segment name, and the label map equal to the reference NRRD."""
    root = tmp_path / "liver"
    (root / "labelsTr").mkdir(parents=True)
    shutil.copytree(shared_data_dir / "dicom-seg" / "ct-3slice", root / "imagesTr" / "liver")
    shutil.copy(shared_data_dir / "dicom-seg" / "liver.dcm", root / "labelsTr" / "liver.dcm")
    ds = load_dataset(root)
    assert ds.channel_names == ["CT"] and sorted(ds.labels) == [0, 1] and ds.labels[1].lower() == "liver"
    assert check_dataset(ds) == []
    label, geometry = read_case_label(ds.cases[0])
    ref, ref_geometry = read_image(shared_data_dir / "dicom-seg" / "liver_seg.nrrd")
    np.testing.assert_allclose(geometry.affine, ref_geometry.affine, atol=1e-4)
    assert label.sum() > 0 and np.array_equal(label, ref[0])


def test_case_folder_errors(twin_datasets, tmp_path):
    _, dicom = twin_datasets
    root = tmp_path / "bad"
    shutil.copytree(dicom, root)
    case = sorted((root / "imagesTr").iterdir())[1]
    volume = np.zeros((8, 8, 3), np.int16)
    write_mr_series(volume, np.eye(4), case / "second")  # two series in one case folder
    result = run_medseg("check", root)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert str(case) in line and "2 DICOM image series" in line
    shutil.rmtree(case)
    case.mkdir()
    (case / "notes.txt").write_text("not DICOM")
    with pytest.raises(DatasetError, match="no DICOM files"):
        read_case_image(load_dataset(root).case(case.name))
    shutil.copy(DEMO / "imagesTr" / f"{_demo_cases(1)[0]}.nii.gz", root / "imagesTr")
    with pytest.raises(DatasetError, match="mixes image files and DICOM series folders"):
        load_dataset(root)
