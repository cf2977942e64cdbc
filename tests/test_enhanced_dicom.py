"""Enhanced (multi-frame) MR/CT DICOM, one file per series, and DICOM SEGs with overlapping segments.

The enhanced objects are made from the real classic series in ../shared/data by highdicom's legacy
converter (a standard conversion: Legacy Converted Enhanced MR/CT Image Storage), so each has a
classic twin that it must read exactly like.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import run_medseg
from pydicom.sr.codedict import codes

from medseg.errors import DatasetError, MedsegError
from medseg.inference.predictor import find_inputs
from medseg.io.dataset import load_dataset, read_case_image, read_case_label
from medseg.io.dicom import SeriesSelector, find_series, read_series, select_series
from medseg.io.dicom_seg import read_dicom_seg, write_dicom_seg


def convert_to_enhanced(folder: Path, out: Path) -> Path:
    """The classic series in ``folder`` as one Legacy Converted Enhanced MR/CT object at ``out``."""
    sources = [pydicom.dcmread(p) for p in sorted(folder.rglob("*")) if p.is_file()]
    for ds in sources:  # the anonymised CT lost these; the file meta still carries them
        ds.SOPClassUID = ds.get("SOPClassUID") or ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet
    kind = (hd.legacy.LegacyConvertedEnhancedCTImage if sources[0].Modality == "CT"
            else hd.legacy.LegacyConvertedEnhancedMRImage)
    enhanced = kind(legacy_datasets=sources, series_instance_uid=hd.UID(), series_number=int(
        sources[0].get("SeriesNumber") or 1), sop_instance_uid=hd.UID(), instance_number=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    enhanced.save_as(out)
    return out


def _only_image_series(root: Path):
    (series,) = [s for s in find_series(root) if s.is_image]
    return series


@pytest.fixture
def mr_pair(shared_data_dir, tmp_path):
    """(classic Study1 hippocampus crop folder, its enhanced conversion in a folder of its own)."""
    classic = shared_data_dir / "dicom" / "hippocampus-mr" / "Study1"
    return classic, convert_to_enhanced(classic, tmp_path / "enhanced" / "Study1" / "series.dcm")


@pytest.mark.parametrize("source", ["hippocampus-mr/Study1", "ct-abdomen"])
def test_enhanced_reads_exactly_like_its_classic_series(shared_data_dir, tmp_path, source):
    """Same voxels (CT: JPEG 2000 frames, RescaleIntercept -1024 from the functional groups) and the
    same geometry, although the converter stores the frames in file-name order, not by position."""
    classic = shared_data_dir / "dicom" / source
    path = convert_to_enhanced(classic, tmp_path / "enh.dcm")
    enhanced = _only_image_series(path)
    assert enhanced.multi_frame and enhanced.files == [path] and "frames" in enhanced.label()
    stored = [s.frame for s in sorted(enhanced.slices, key=lambda s: float(s.position[2]))]
    assert stored != sorted(stored)  # the frame order must be recovered from the positions
    image, geometry = read_series(enhanced)
    ref, ref_geometry = read_series(_only_image_series(classic))
    assert image.shape == ref.shape and np.array_equal(image, ref)
    assert geometry.shape == ref_geometry.shape and geometry.spacing == ref_geometry.spacing
    np.testing.assert_allclose(geometry.affine, ref_geometry.affine, atol=1e-6)
    if source == "ct-abdomen":
        assert image.min() == -1024.0


def test_each_frame_gets_its_own_rescale(mr_pair, tmp_path):
    """Per-frame PixelValueTransformationSequence (as Philips writes it): frame i scaled by its own
    slope and intercept (GDCM would apply the first frame's to all)."""
    classic, path = mr_pair
    ds = pydicom.dcmread(path)
    template = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    del ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    positions = []
    for i, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item = copy.deepcopy(template)
        item[0].RescaleSlope, item[0].RescaleIntercept = 1 + 0.5 * i, -3 * i
        frame.PixelValueTransformationSequence = item
        positions.append(float(frame.PlanePositionSequence[0].ImagePositionPatient[2]))
    ds.save_as(tmp_path / "rescaled.dcm")
    image, _ = read_series(_only_image_series(tmp_path / "rescaled.dcm"))
    ref, _ = read_series(_only_image_series(classic))
    for z, i in enumerate(np.argsort(positions)):  # z-th slice in space is stored frame i
        np.testing.assert_allclose(image[0, :, :, z], ref[0, :, :, z] * (1 + 0.5 * i) - 3 * i, rtol=1e-6)


def _drop_frame(ds: pydicom.Dataset, index: int) -> None:
    frames = ds.pixel_array
    keep = [i for i in range(int(ds.NumberOfFrames)) if i != index]
    ds.PixelData = np.ascontiguousarray(frames[keep]).tobytes()
    del ds.PerFrameFunctionalGroupsSequence[index]
    ds.NumberOfFrames = len(keep)


def _expect_one_line(path: Path, match: str) -> None:
    with pytest.raises(DatasetError, match=match) as err:
        read_series(_only_image_series(path))
    assert "\n" not in str(err.value) and str(path.parent) in str(err.value)


def test_enhanced_geometry_is_checked_like_a_classic_series(mr_pair, tmp_path):
    _, path = mr_pair
    by_z = sorted(range(32), key=lambda i: float(
        pydicom.dcmread(path).PerFrameFunctionalGroupsSequence[i].PlanePositionSequence[0].ImagePositionPatient[2]))

    ds = pydicom.dcmread(path)
    _drop_frame(ds, by_z[15])  # a missing frame in the middle
    ds.save_as(tmp_path / "missing.dcm")
    _expect_one_line(tmp_path / "missing.dcm", r"inconsistent slice spacing \(2 mm between missing.dcm frame")

    ds = pydicom.dcmread(path)
    tilted = copy.deepcopy(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence)
    tilted[0].ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, 0.0998334]
    ds.PerFrameFunctionalGroupsSequence[by_z[3]].PlaneOrientationSequence = tilted  # per-frame wins over shared
    ds.save_as(tmp_path / "mixed.dcm")
    _expect_one_line(tmp_path / "mixed.dcm", "mixed slice orientations")

    ds = pydicom.dcmread(path)
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    ds.save_as(tmp_path / "nospacing.dcm")
    _expect_one_line(tmp_path / "nospacing.dcm", "nospacing.dcm: frame 1 has no PixelMeasuresSequence")

    ds = pydicom.dcmread(path)
    measures = copy.deepcopy(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence)
    measures[0].PixelSpacing = [1.2, 1.2]
    ds.PerFrameFunctionalGroupsSequence[0].PixelMeasuresSequence = measures
    ds.save_as(tmp_path / "uneven.dcm")
    _expect_one_line(tmp_path / "uneven.dcm", r"mixed pixel spacings \[\(1.0, 1.0\), \(1.2, 1.2\)\]")

    ds = pydicom.dcmread(path)  # a second stack at the same positions (echoes, time points)
    frame = ds.PerFrameFunctionalGroupsSequence[by_z[1]]
    frame.PlanePositionSequence[0].ImagePositionPatient = list(
        ds.PerFrameFunctionalGroupsSequence[by_z[0]].PlanePositionSequence[0].ImagePositionPatient)
    ds.save_as(tmp_path / "stacks.dcm")
    _expect_one_line(tmp_path / "stacks.dcm", "two frames at the same position .*several stacks")


def test_predict_on_enhanced_equals_predict_on_its_classic_series(mr_pair, tiny_model, tmp_path):
    """The same NIfTI (header and labels) from the classic series and from its enhanced conversion,
    and a DICOM SEG that references the enhanced instance frame by frame and reads back."""
    classic, path = mr_pair
    outs = {}
    for kind, inputs in (("classic", classic), ("enhanced", path.parent)):
        out = tmp_path / f"out_{kind}"
        fmt = "both" if kind == "enhanced" else "nifti"
        result = run_medseg("predict", "-i", inputs, "-o", out, "-m", tiny_model, "--no-tta", "--output-format", fmt)
        assert result.returncode == 0, result.stderr
        (nifti,) = out.glob("*.nii.gz")
        outs[kind] = nib.load(nifti)
    a, b = outs["classic"], outs["enhanced"]
    assert a.shape == b.shape and np.array_equal(a.affine, b.affine)
    assert np.array_equal(a.header.get_zooms(), b.header.get_zooms())
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))

    series = _only_image_series(path)
    seg_path = tmp_path / "out_enhanced" / f"{series.series_uid}.dcm"
    seg = pydicom.dcmread(seg_path)
    source = pydicom.dcmread(path, stop_before_pixels=True)
    (ref,) = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == source.SOPClassUID
    derived = set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        (src,) = frame.DerivationImageSequence[0].SourceImageSequence
        assert src.ReferencedSOPInstanceUID == source.SOPInstanceUID
        derived.add(int(src.ReferencedFrameNumber))
    assert derived == set(range(1, int(source.NumberOfFrames) + 1))
    assert np.array_equal(read_dicom_seg(seg_path, series), np.asanyarray(b.dataobj))


def test_series_selection_among_enhanced_and_classic_series(shared_data_dir, tmp_path):
    """Study3 with its FLAIR and T2 series sent as enhanced objects: default choice refused with all
    candidates listed; description and uid pick the enhanced series; the case's file is the object."""
    root = tmp_path / "Study3"
    shutil.copytree(shared_data_dir / "dicom" / "hippocampus-mr" / "Study3", root)
    enhanced = {}
    for name in ("36468-FLAIRreg-58706", "37830-T2reg-78532"):
        out = convert_to_enhanced(root / name, tmp_path / "tmp" / f"{name}.dcm")
        shutil.rmtree(root / name)
        enhanced[name] = out.replace(root / f"{name}.dcm")
    found = find_series(root)
    assert len(found) == 5 and sum(s.multi_frame for s in found) == 2
    with pytest.raises(MedsegError, match="5 series fit the model's channel 'MRI'.*Candidates: .*frames") as err:
        select_series(found, ["MRI"], SeriesSelector(), root)
    assert "\n" not in str(err.value)
    (flair,) = select_series(found, ["MRI"], SeriesSelector.parse("modality=MR,description=flair"), root)
    assert flair.multi_frame and flair.files == [enhanced["36468-FLAIRreg-58706"]]
    t2_uid = pydicom.dcmread(enhanced["37830-T2reg-78532"], stop_before_pixels=True).SeriesInstanceUID
    (t2,) = select_series(found, ["MRI"], SeriesSelector.parse(f"uid={t2_uid}"), root)
    assert t2.files == [enhanced["37830-T2reg-78532"]]
    (case,) = find_inputs(root, 1, ["MRI"], f"uid={t2_uid}")
    assert case.files == [enhanced["37830-T2reg-78532"]] and case.case_id == t2_uid
    image, geometry = read_series(case.series)
    ref, ref_geometry = read_series(_only_image_series(shared_data_dir / "dicom" / "hippocampus-mr" / "Study3"
                                                      / "37830-T2reg-78532"))
    assert np.array_equal(image, ref) and np.allclose(geometry.affine, ref_geometry.affine, atol=1e-6)


def test_enhanced_case_folder_with_a_dicom_seg_label(mr_pair, tmp_path):
    """A DICOM training case: imagesTr/<case>/ holding one enhanced object, its label a DICOM SEG
    (written by medseg on the enhanced frames) that reads back on the same grid as the classic twin."""
    classic, path = mr_pair
    root = tmp_path / "ds"
    (root / "labelsTr").mkdir(parents=True)
    shutil.copytree(path.parent, root / "imagesTr" / "case1")
    series = _only_image_series(root / "imagesTr" / "case1")
    ref, ref_geometry = read_series(_only_image_series(classic))
    label = (ref[0] > np.percentile(ref, 70)).astype(np.uint8) + (ref[0] > np.percentile(ref, 90))
    write_dicom_seg(root / "labelsTr" / "case1.dcm", series, label, {0: "background", 1: "Anterior", 2: "Posterior"})
    ds = load_dataset(root)
    assert ds.channel_names == ["MR"] and sorted(ds.labels) == [0, 1, 2]
    image, geometry = read_case_image(ds.cases[0])
    got, label_geometry = read_case_label(ds.cases[0])
    assert np.array_equal(image, ref) and np.allclose(geometry.affine, ref_geometry.affine, atol=1e-6)
    assert np.array_equal(got, label) and np.allclose(label_geometry.affine, ref_geometry.affine, atol=1e-6)


def _foreign_seg(series, masks: np.ndarray, out: Path, names: list[str]) -> Path:
    """A BINARY SEG made by highdicom (as another tool would make it) with one segment per
    ``masks[..., k]`` ((slices in ``series`` order, rows, columns, segments))."""
    from medseg.io.dicom import check_series

    ordered, _ = check_series(series)
    sources = [pydicom.dcmread(s.path, stop_before_pixels=True) for s in ordered]
    for ds in sources:  # empty in this CT; highdicom wants it absent
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet
    algorithm = hd.AlgorithmIdentificationSequence(name="other", family=codes.cid7162.ArtificialIntelligence,
                                                   version="1")
    descriptions = [hd.seg.SegmentDescription(
        segment_number=k + 1, segment_label=name, segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for k, name in enumerate(names)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=masks.astype(np.uint8), segmentation_type="BINARY",
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=99,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="other", manufacturer_model_name="other",
        software_versions="1", device_serial_number="1")
    seg.save_as(out)
    return out


def test_a_seg_with_overlapping_segments_is_refused_naming_them(shared_data_dir, tmp_path):
    """Policy: overlapping segments cannot become one label map; refused in one line naming the file,
    both segments (number and label) and the shared voxel count. Touching segments read fine."""
    root = tmp_path / "ds"
    (root / "labelsTr").mkdir(parents=True)
    shutil.copytree(shared_data_dir / "dicom-seg" / "ct-3slice", root / "imagesTr" / "liver")
    series = _only_image_series(root / "imagesTr" / "liver")
    n, rows, cols = len(series.slices), series.slices[0].rows, series.slices[0].columns
    masks = np.zeros((n, rows, cols, 2), bool)
    masks[:, 100:200, 100:200, 0] = True
    masks[:, 150:250, 150:250, 1] = True  # 50 x 50 x 3 shared voxels
    seg_path = _foreign_seg(series, masks, root / "labelsTr" / "liver.dcm", ["organ", "lesion"])
    with pytest.raises(DatasetError) as err:
        read_case_label(load_dataset(root).cases[0])
    message = str(err.value)
    assert "\n" not in message and str(seg_path) in message
    assert 'segments overlap (1 "organ" and 2 "lesion" share 7500 voxels)' in message
    run = run_medseg("check", root)
    assert run.returncode == 2 and "segments overlap" in run.stderr and "Traceback" not in run.stderr

    masks[:, 150:200, 150:200, 0] = False  # now adjacent, not overlapping
    _foreign_seg(series, masks, seg_path, ["organ", "lesion"])
    label = read_dicom_seg(seg_path, series)
    assert np.count_nonzero(label == 1) == 3 * (100 * 100 - 50 * 50) and np.count_nonzero(label == 2) == 3 * 100 * 100
    assert json.dumps(sorted(np.unique(label).tolist())) == "[0, 1, 2]"
