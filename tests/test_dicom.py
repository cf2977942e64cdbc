"""DICOM input (discovery, checks, geometry) and DICOM SEG output, on the real series in ../shared/data."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers import run_medseg

from medseg.errors import DatasetError, MedsegError
from medseg.io.dicom import SeriesSelector, check_series, find_series, read_series, select_series
from medseg.io.dicom_seg import read_dicom_seg, write_dicom_seg
from medseg.io.image import from_sitk, read_image
from medseg.io.transfer_syntaxes import DECODABLE_TRANSFER_SYNTAXES


def _sitk_volume(series):
    files = [str(s.path) for s in check_series(series)[0]]
    return from_sitk(sitk.ReadImage(files, sitk.sitkFloat32), series.folder)


def test_finds_every_series_of_a_multi_series_tree_and_reads_them_like_simpleitk(shared_data_dir):
    found = find_series(shared_data_dir / "dicom" / "hippocampus-mr")
    assert len(found) == 7 and len({s.study_uid for s in found}) == 3
    assert sum(s.description == "HippoCrop" for s in found) == 3
    for series in found:
        image, geometry = read_series(series)
        ref, ref_geometry = _sitk_volume(series)
        assert image.shape == ref.shape and np.array_equal(image, ref)
        np.testing.assert_allclose(geometry.affine, ref_geometry.affine, atol=1e-4)


def test_ct_rescale_spacing_from_positions_and_jpeg2000(shared_data_dir):
    (series,) = find_series(shared_data_dir / "dicom" / "ct-abdomen")
    assert {s.transfer_syntax for s in series.slices} == {"1.2.840.10008.1.2.4.90"}  # JPEG 2000, decoded by GDCM
    image, geometry = read_series(series)
    assert image.shape == (1, 512, 512, 20) and image.min() == -1024.0  # RescaleIntercept applied
    thickness = float(pydicom.dcmread(series.slices[0].path, stop_before_pixels=True).SliceThickness)
    assert thickness == 3.0 and geometry.spacing[2] == pytest.approx(2.0)  # from positions, not SliceThickness


@pytest.fixture
def crop_copy(shared_data_dir, tmp_path):
    src = shared_data_dir / "dicom" / "hippocampus-mr" / "Study1"
    dst = tmp_path / "series"
    shutil.copytree(src, dst)
    files = sorted(p for p in dst.rglob("*") if p.is_file())
    by_position = sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    return dst, by_position


def _edit(path, **changes):
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(path)


def _one_line_error(root, match):
    (series,) = [s for s in find_series(root) if s.is_image]
    with pytest.raises(DatasetError, match=match) as err:
        read_series(series)
    assert "\n" not in str(err.value) and str(root) in str(err.value)


def test_missing_slice(crop_copy):
    root, files = crop_copy
    files[len(files) // 2].unlink()
    _one_line_error(root, "inconsistent slice spacing .* missing slices")


def test_mixed_orientation(crop_copy):
    root, files = crop_copy
    _edit(files[3], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    _one_line_error(root, "mixed slice orientations")


def test_mixed_sizes(crop_copy):
    root, files = crop_copy
    ds = pydicom.dcmread(files[2])
    ds.PixelData = ds.pixel_array[:-1].tobytes()
    ds.Rows = ds.Rows - 1
    ds.save_as(files[2])
    _one_line_error(root, "mixed slice sizes")


def test_gantry_tilt(crop_copy):
    root, files = crop_copy
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        _edit(path, ImagePositionPatient=[x, y + 0.3 * i, z])
    _one_line_error(root, "gantry tilt")


def test_unsupported_transfer_syntax(crop_copy):
    root, files = crop_copy
    ds = pydicom.dcmread(files[0])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG-2
    ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
    ds.save_as(files[0], enforce_file_format=True)
    _one_line_error(root, "unsupported transfer syntax 1.2.840.10008.1.2.4.100")


def test_deflated_series_reads_like_the_uncompressed_one(crop_copy):
    """Deflated Explicit VR Little Endian is decodable (and so accepted by ``medseg serve``): GDCM
    reads the same voxels and geometry from it."""
    root, files = crop_copy
    (series,) = [s for s in find_series(root) if s.is_image]
    image, geometry = read_series(series)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    (deflated,) = [s for s in find_series(root) if s.is_image]
    assert {s.transfer_syntax for s in deflated.slices} == {pydicom.uid.DeflatedExplicitVRLittleEndian}
    again, again_geometry = read_series(deflated)
    assert np.array_equal(again, image)
    np.testing.assert_allclose(again_geometry.affine, geometry.affine)


def test_the_node_accepts_exactly_the_transfer_syntaxes_medseg_decodes():
    from pynetdicom.sop_class import Verification

    from medseg.deploy.node import storage_ae

    assert set(DECODABLE_TRANSFER_SYNTAXES) == {
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.5",
    }  # uncompressed (with deflated and big endian), JPEG, JPEG-LS, JPEG 2000, RLE
    storage = [c for c in storage_ae("MEDSEG", ["PACS"]).supported_contexts if c.abstract_syntax != Verification]
    assert len(storage) > 100
    assert all(c.transfer_syntax == list(DECODABLE_TRANSFER_SYNTAXES) for c in storage)


def test_non_image_objects_only(shared_data_dir, tmp_path):
    shutil.copy(shared_data_dir / "dicom-seg" / "liver.dcm", tmp_path / "liver.dcm")
    found = find_series(tmp_path)
    assert len(found) == 1 and not found[0].is_image
    with pytest.raises(DatasetError, match="no DICOM image series"):
        select_series(found, ["MRI"], SeriesSelector(), tmp_path)


def test_series_selection(shared_data_dir):
    root = shared_data_dir / "dicom" / "hippocampus-mr"
    found = find_series(root)
    with pytest.raises(MedsegError, match="5 series fit the model's channel 'MRI' .*Candidates: .*T1post") as err:
        select_series(found, ["MRI"], SeriesSelector(), root)
    assert "\n" not in str(err.value)
    crops = select_series(found, ["MRI"], SeriesSelector.parse("description=hippo"), root)
    assert len(crops) == 3 and {s.description for s in crops} == {"HippoCrop"}
    one = select_series(found, ["MRI"], SeriesSelector.parse(f"uid={crops[1].series_uid}"), root)
    assert [s.series_uid for s in one] == [crops[1].series_uid]
    assert len(select_series(find_series(root / "Study1"), ["MRI"], SeriesSelector(), root)) == 1
    with pytest.raises(MedsegError, match="no series matches"):
        select_series(found, ["CT"], SeriesSelector.parse("modality=CT"), root)
    with pytest.raises(MedsegError, match="key=value"):
        SeriesSelector.parse("HippoCrop")


def test_reference_seg_matches_its_nrrd(shared_data_dir):
    ct = [s for s in find_series(shared_data_dir / "dicom-seg") if s.is_image][0]
    _, geometry = read_series(ct)
    mask = read_dicom_seg(shared_data_dir / "dicom-seg" / "liver.dcm", ct)
    ref, ref_geometry = read_image(shared_data_dir / "dicom-seg" / "liver_seg.nrrd")
    np.testing.assert_allclose(geometry.affine, ref_geometry.affine, atol=1e-4)
    assert mask.sum() > 0 and np.array_equal(mask, ref[0])


def test_written_seg_round_trips_and_describes_segments(shared_data_dir, tmp_path):
    ct = [s for s in find_series(shared_data_dir / "dicom-seg") if s.is_image][0]
    mask = read_dicom_seg(shared_data_dir / "dicom-seg" / "liver.dcm", ct)
    labels = mask.astype(np.uint8)
    labels[:100][mask[:100] > 0] = 2
    write_dicom_seg(tmp_path / "out.dcm", ct, labels, {0: "background", 1: "liver", 2: "tumour core"})
    assert np.array_equal(read_dicom_seg(tmp_path / "out.dcm", ct), labels)
    ds = pydicom.dcmread(tmp_path / "out.dcm")
    assert ds.Modality == "SEG" and int(ds.NumberOfFrames) == 2 * 3  # binary: one frame per segment and slice
    seg1, seg2 = ds.SegmentSequence
    assert (seg1.SegmentLabel, seg1.SegmentedPropertyTypeCodeSequence[0].CodeValue) == ("liver", "10200004")
    assert seg2.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Tissue"  # no SNOMED concept by that name
    assert seg1.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "medseg"
    referenced = {r.ReferencedSOPInstanceUID for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {s.sop_instance_uid for s in ct.slices}


def test_predict_dicom_series_to_nifti_and_seg(shared_data_dir, tiny_model, tmp_path):
    """The hippocampus crop series of Study1/Study2, predicted from DICOM: a NIfTI in the series'
    geometry and a DICOM SEG whose mask equals it voxel for voxel."""
    root = shared_data_dir / "dicom" / "hippocampus-mr"
    inputs = tmp_path / "in"
    for study in ("Study1", "Study2"):
        shutil.copytree(root / study, inputs / study)
    result = run_medseg("predict", "-i", inputs, "-o", tmp_path / "out", "-m", tiny_model, "--no-tta",
                        "--output-format", "both")
    assert result.returncode == 0, result.stderr
    series = [s for s in find_series(inputs) if s.is_image]
    assert len(series) == 2
    for s in series:
        image, geometry = read_series(s)
        out = nib.load(tmp_path / "out" / f"{s.series_uid}.nii.gz")
        assert out.shape == image.shape[1:]
        np.testing.assert_allclose(out.affine, geometry.affine, atol=1e-4)
        seg = read_dicom_seg(tmp_path / "out" / f"{s.series_uid}.dcm", s)
        assert np.array_equal(seg, np.asanyarray(out.dataobj))
    summary = json.loads((tmp_path / "out" / "predict_summary.json").read_text())
    assert all("HippoCrop" in row["source"] for row in summary["cases"])
    refused = run_medseg("predict", "-i", root, "-o", tmp_path / "out3", "-m", tiny_model)
    assert refused.returncode == 2 and "Candidates:" in refused.stderr and refused.stderr.count("\n") == 1
