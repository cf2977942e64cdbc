"""DICOM SEG (highdicom) for a label map on a DICOM series' grid: write and read back.

Written SEGs are BINARY, one segment per foreground label of the dataset (label names as segment
labels), one frame per source slice (``omit_empty_frames=False``), referencing the source
instances (for an enhanced multi-frame source: its one instance and each of its frames). Coded
concepts: when a label's name is a SNOMED CT concept pydicom knows (``Liver``, ``Spleen``,
``Hippocampus``…), category *Anatomical structure* and that concept as the type; otherwise the
generic category and type *Tissue* (SCT 85756007). The algorithm is identified as
``medseg`` with its version, family *Artificial Intelligence*.

Read SEGs (training labels) become one label per voxel, segment number = label. **Overlapping
segments are refused** in one line naming the file and the overlapping segments (numbers, labels,
voxel counts): a label map cannot hold both, and any rule that picks one (the higher number, the
smaller segment) silently changes the ground truth a model learns from; which structure a voxel
belongs to is for whoever made the SEG to decide (re-export it without overlaps).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom

from medseg import __version__
from medseg.errors import DatasetError
from medseg.io.dicom import Series, check_series
from medseg.utils import atomic_path

TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _concepts(name: str):
    from pydicom.sr.codedict import codes  # deferred: 58 ms (-X importtime), only SEG writing needs it

    keyword = "".join(w.capitalize() for w in re.split(r"[^A-Za-z0-9]+", name) if w)
    try:
        return codes.SCT.AnatomicalStructure, getattr(codes.SCT, keyword)
    except AttributeError:
        return codes.SCT.Tissue, codes.SCT.Tissue


def write_dicom_seg(path: Path, series: Series, seg: np.ndarray, labels: Mapping[int, str], *,
                    series_number: int = 9901, model_name: str = "medseg") -> Path:
    """``seg`` (X, Y, Z) in the grid :func:`~medseg.io.dicom.read_series` gave for ``series``."""
    import highdicom as hd  # deferred: 0.18 s on top of medseg.io.dataset (-X importtime); SEG I/O only
    from pydicom.sr.codedict import codes

    ordered, _ = check_series(series)
    if series.multi_frame and len(series.files) > 1:
        raise DatasetError(f"{series.folder}: {series.label()}: spread over {len(series.files)} multi-frame "
                           "objects; a DICOM SEG can reference the frames of one")
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in dict.fromkeys(s.path for s in ordered)]
    for ds in sources:  # an empty SpecificCharacterSet means the default repertoire; highdicom wants it absent
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet
        for keyword in TYPE2_COPIED:  # type 2 (may be empty, must be present) in the SEG's patient/study modules
            if keyword not in ds:
                setattr(ds, keyword, "")
    if seg.shape != (ordered[0].columns, ordered[0].rows, len(ordered)):
        raise DatasetError(f"{series.folder}: label map {seg.shape} does not fit the series grid "
                           f"({ordered[0].columns}, {ordered[0].rows}, {len(ordered)})")
    frames = np.ascontiguousarray(np.transpose(seg, (2, 1, 0))).astype(np.uint8)  # (slices, rows, columns)
    if series.multi_frame:  # highdicom pairs frames[i] with the source's frame i + 1 (stored order)
        frames = frames[np.argsort([s.frame for s in ordered])]
    algorithm = hd.AlgorithmIdentificationSequence(name="medseg", family=codes.cid7162.ArtificialIntelligence,
                                                   version=__version__)
    descriptions = []
    for k, name in sorted((int(k), str(v)) for k, v in labels.items()):
        if k == 0:
            continue
        category, kind = _concepts(name)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=k, segment_label=name[:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    unknown = sorted(set(np.unique(frames).tolist()) - {0} - {d.segment_number for d in descriptions})
    if unknown:
        raise DatasetError(f"{path}: label values {unknown} have no name in the model's label map")
    with warnings.catch_warnings():  # e.g. single-component patient names copied from the source
        warnings.simplefilter("ignore", UserWarning)
        out = _segmentation(hd, sources, frames, descriptions, series_number, model_name)
    path = Path(path)
    with atomic_path(path) as tmp:
        out.save_as(tmp)
    return path


def _segmentation(hd, sources, frames, descriptions, series_number, model_name):
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medseg", manufacturer_model_name=model_name,
        software_versions=__version__, device_serial_number="0", omit_empty_frames=False,
        content_description=f"medseg {__version__} automatic segmentation", content_label="MEDSEG")


def read_dicom_seg(path: Path, series: Series) -> np.ndarray:
    """A SEG's segments combined into one label map (X, Y, Z) on ``series``' grid (segment number = label);
    overlapping segments are refused (see the module docstring)."""
    import highdicom as hd  # deferred, as in write_dicom_seg

    ordered, _ = check_series(series)
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # highdicom raises several types for foreign or broken files
        raise DatasetError(f"{path}: cannot read DICOM SEG ({type(exc).__name__}: {str(exc)[:120]})") from exc
    uids = [s.sop_instance_uid for s in ordered]
    referenced = {u[2] for u in seg.get_source_image_uids()}
    numbers = sorted(int(item.SegmentNumber) for item in seg.SegmentSequence)
    masks = np.zeros((len(uids), ordered[0].rows, ordered[0].columns, len(numbers)), bool)
    present = [i for i, u in enumerate(uids) if u in referenced]
    if not present:
        raise DatasetError(f"{path}: references none of the instances of {series.label()}")
    # a SEG that does not declare SpatialLocationsPreserved is still used when every frame's plane
    # position equals its source slice's (or source frame's)
    aligned = _frames_on_source_positions(seg, {(s.sop_instance_uid, s.frame): s.position for s in ordered})
    if not aligned:
        raise DatasetError(f"{path}: its frames do not lie on the slices of {series.label()}")
    options = dict(segment_numbers=numbers, combine_segments=False, assert_missing_frames_are_empty=True,
                   ignore_spatial_locations=True)
    try:
        if series.multi_frame:  # one enhanced source instance: by frame number (check_series allows one file)
            got = seg.get_pixels_by_source_frame(uids[0], [ordered[i].frame for i in present], **options)
        else:
            got = seg.get_pixels_by_source_instance([uids[i] for i in present], **options)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise DatasetError(f"{path}: cannot place its frames on {series.label()} ({str(exc)[:160]})") from exc
    masks[present] = np.asarray(got) >= 0.5  # binary 0/1; fractional SEGs (rescaled to 0..1) at one half
    _refuse_overlaps(path, masks, numbers, segment_labels(path))
    pixels = np.zeros(masks.shape[:3], np.uint8 if numbers[-1] < 256 else np.uint16)
    for k, number in enumerate(numbers):
        pixels[masks[..., k]] = number
    return np.ascontiguousarray(np.transpose(pixels, (2, 1, 0)))


def _refuse_overlaps(path: Path, masks: np.ndarray, numbers: list[int], labels: Mapping[int, str]) -> None:
    """One-line :class:`DatasetError` naming every pair of segments that share voxels (``masks`` (..., S))."""
    if not (masks.sum(axis=-1, dtype=np.int32) > 1).any():
        return
    pairs = []
    for i in range(len(numbers)):
        for j in range(i + 1, len(numbers)):
            shared = int(np.count_nonzero(masks[..., i] & masks[..., j]))
            if shared:
                pairs.append(f"{numbers[i]} \"{labels.get(numbers[i], '?')}\" and {numbers[j]} "
                             f"\"{labels.get(numbers[j], '?')}\" share {shared} voxels")
    raise DatasetError(f"{path}: segments overlap ({'; '.join(pairs)}); a label map holds one label per voxel, "
                       "so re-export the SEG without overlapping segments")


def _frames_on_source_positions(seg, positions: Mapping[tuple[str, int | None], np.ndarray],
                                tol_mm: float = 1e-2) -> bool:
    """Whether every SEG frame lies on the source slice (SOP instance UID, frame number or None) it derives from."""
    for frame in seg.PerFrameFunctionalGroupsSequence:
        plane = getattr(frame, "PlanePositionSequence", None)
        derivations = getattr(frame, "DerivationImageSequence", None)
        if not plane or not derivations:
            return False
        where = np.asarray(plane[0].ImagePositionPatient, float)
        for d in derivations:
            for src in d.SourceImageSequence:
                uid = str(src.ReferencedSOPInstanceUID)
                numbers = src.get("ReferencedFrameNumber")
                if numbers is None or not isinstance(numbers, Sequence):
                    numbers = [numbers]
                for number in numbers:
                    ref = positions.get((uid, None if number is None else int(number)), positions.get((uid, None)))
                    if ref is not None and np.abs(ref - where).max() > tol_mm:
                        return False
    return True


def segment_labels(path: Path) -> dict[int, str]:
    """A DICOM SEG's segments as ``{segment number: SegmentLabel}`` (headers only)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises several types for foreign or broken files
        raise DatasetError(f"{path}: cannot read DICOM SEG ({type(exc).__name__}: {str(exc)[:120]})") from exc
    if str(ds.get("Modality", "")) != "SEG" or "SegmentSequence" not in ds:
        raise DatasetError(f"{path}: not a DICOM SEG (Modality {ds.get('Modality', '?')})")
    return {int(item.SegmentNumber): str(item.get("SegmentLabel", f"segment_{item.SegmentNumber}"))
            for item in ds.SegmentSequence}
