"""DICOM series: find them in a folder tree, choose which to segment, read one as a volume.

- **Discovery** (:func:`find_series`): every file pydicom can parse (headers only), grouped by
  SeriesInstanceUID. Objects without pixel data or without a patient-space position (SR, SEG,
  presentation states …) are listed as non-image and never segmented.
- **Checks** (:func:`check_series`), each a one-line :class:`DatasetError` naming the series:
  mixed orientations or sizes, duplicate or missing slices (inconsistent spacing), gantry tilt
  (slices not stacked along their normal), and transfer syntaxes GDCM cannot decode (the ones it
  can: :data:`medseg.io.transfer_syntaxes.DECODABLE_TRANSFER_SYNTAXES`).
- **Reading** (:func:`read_series`): slices ordered by their position along the slice normal
  (never by InstanceNumber or file name); spacing between slices from the positions (never
  SliceThickness); orientation from ImageOrientationPatient; RescaleSlope/Intercept applied.
  Pixels are read by SimpleITK (GDCM: also JPEG, JPEG-LS, JPEG 2000, RLE) from the checked order.
- **Enhanced (multi-frame) MR/CT** (:data:`~medseg.io.transfer_syntaxes.ENHANCED_VOLUME_SOP_CLASSES`,
  one file per series): each frame becomes a :class:`Slice` placed by its functional groups
  (PlanePosition/PlaneOrientation/PixelMeasures, per-frame before shared), so the same checks and
  ordering apply. Pixels are decoded by pydicom (stored values) and each frame's own
  PixelValueTransformation is applied; GDCM applies the first frame's rescale to every frame, so it is
  used only for syntaxes pydicom cannot decode here and only when all frames share one rescale.
- **Choice** (:func:`select_series`): a :class:`SeriesSelector` (modality, SeriesDescription
  regex, SeriesInstanceUID); by default, per study, the one image series whose modality matches
  the model's channel; anything ambiguous is refused with the candidates listed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from medseg.errors import DatasetError, MedsegError
from medseg.io.geometry import LPS_TO_RAS, Geometry
from medseg.io.transfer_syntaxes import DECODABLE_TRANSFER_SYNTAXES, ENHANCED_VOLUME_SOP_CLASSES

SPACING_TOLERANCE = 0.1  # relative deviation of one slice gap from the median gap
TILT_TOLERANCE = 1e-3  # |sin| of the angle between the stacking direction and the slice normal
MODALITY_OF_CHANNEL = {"ct": "CT", "mr": "MR", "mri": "MR", "t1": "MR", "t1c": "MR", "t1w": "MR", "t2": "MR",
                       "t2w": "MR", "flair": "MR", "adc": "MR", "dwi": "MR", "pet": "PT", "pt": "PT"}


@dataclass
class Slice:
    path: Path
    position: np.ndarray
    orientation: np.ndarray
    rows: int
    columns: int
    sop_instance_uid: str
    transfer_syntax: str
    pixel_spacing: tuple[float, float] | None = None  # PixelSpacing: (between rows, between columns)
    thickness: float | None = None
    frame: int | None = None  # 1-based frame number in a multi-frame (enhanced) object
    rescale: tuple[float, float] = (1.0, 0.0)  # (slope, intercept); read from the file for single frames

    @property
    def name(self) -> str:
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame}"


@dataclass
class Series:
    """One series found on disk (headers only). ``slices`` are in file order until checked."""

    series_uid: str
    study_uid: str
    modality: str
    description: str
    number: int | None
    slices: list[Slice] = field(default_factory=list)
    non_image: list[Path] = field(default_factory=list)
    invalid: list[tuple[Path, str]] = field(default_factory=list)  # image objects that cannot be placed, and why

    @property
    def is_image(self) -> bool:
        return bool(self.slices or self.invalid)

    @property
    def multi_frame(self) -> bool:
        return any(s.frame is not None for s in self.slices)

    @property
    def files(self) -> list[Path]:
        """The image files (one per slice, or the multi-frame objects), in discovery order."""
        return list(dict.fromkeys(s.path for s in self.slices))

    def label(self) -> str:
        count = f"{len(self.slices)} frames" if self.multi_frame else f"{len(self.slices)} slices"
        return (f"{self.modality} series {self.number if self.number is not None else '?'} "
                f"\"{self.description}\" ({count}, UID {self.series_uid})")

    @property
    def folder(self) -> Path:
        return (self.slices[0].path if self.slices else self.invalid[0][0] if self.invalid else self.non_image[0]).parent


def find_series(root: Path) -> list[Series]:
    """All DICOM series under ``root`` (a folder tree or one file), sorted by study, number, UID."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    found: dict[str, Series] = {}
    for path in files:
        if path.name.startswith(".") or path.name == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=False, defer_size=256)
        except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError, KeyError, TypeError):
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:  # anonymised away: one series per folder, frame of reference, modality and description
            if "Modality" not in ds or "SOPClassUID" not in ds:
                continue  # not a DICOM object
            uid = "|".join([str(path.parent), str(ds.get("FrameOfReferenceUID", "")), str(ds.Modality),
                            str(ds.get("SeriesDescription", ""))])
        series = found.get(uid)
        if series is None:
            number = ds.get("SeriesNumber")
            series = found[uid] = Series(uid, str(ds.get("StudyInstanceUID", "")), str(ds.get("Modality", "")),
                                         str(ds.get("SeriesDescription", "")),
                                         int(number) if number not in (None, "") else None)
        if "PixelData" in ds and str(ds.get("SOPClassUID", "")) in ENHANCED_VOLUME_SOP_CLASSES:
            try:
                series.slices.extend(_frames(ds, path))
            except ValueError as exc:
                series.invalid.append((path, str(exc)))
            continue
        ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if "PixelData" not in ds or ipp is None or iop is None or int(ds.get("NumberOfFrames", 1) or 1) > 1:
            series.non_image.append(path)
            continue
        spacing = ds.get("PixelSpacing")
        series.slices.append(Slice(path, np.asarray(ipp, float), np.asarray(iop, float), int(ds.Rows),
                                   int(ds.Columns), str(ds.get("SOPInstanceUID", "")), _transfer_syntax(ds),
                                   (float(spacing[0]), float(spacing[1])) if spacing else None,
                                   float(ds.get("SliceThickness") or 0) or None))
    return sorted(found.values(), key=lambda s: (s.study_uid, s.number if s.number is not None else -1, s.series_uid))


def _transfer_syntax(ds: pydicom.Dataset) -> str:
    return str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))


def _functional(ds: pydicom.Dataset, per_frame, sequence: str):
    """The first item of functional group ``sequence`` for one frame: its per-frame item, else the shared one."""
    for groups in (per_frame, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        item = groups.get(sequence) if groups is not None else None
        if item:
            return item[0]
    return None


def _frames(ds: pydicom.Dataset, path: Path) -> list[Slice]:
    """One :class:`Slice` per frame of an enhanced (multi-frame) image; ``ValueError`` when a frame
    cannot be placed in patient space."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if len(per_frame) != n:
        raise ValueError(f"{len(per_frame)} PerFrameFunctionalGroupsSequence items for {n} frames")
    top_rescale = (float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0))
    out = []
    for i, groups in enumerate(per_frame, start=1):
        position = _functional(ds, groups, "PlanePositionSequence")
        orientation = _functional(ds, groups, "PlaneOrientationSequence")
        measures = _functional(ds, groups, "PixelMeasuresSequence")
        if position is None or "ImagePositionPatient" not in position:
            raise ValueError(f"frame {i} has no PlanePositionSequence (ImagePositionPatient)")
        if orientation is None or "ImageOrientationPatient" not in orientation:
            raise ValueError(f"frame {i} has no PlaneOrientationSequence (ImageOrientationPatient)")
        if measures is None or not measures.get("PixelSpacing"):
            raise ValueError(f"frame {i} has no PixelMeasuresSequence (PixelSpacing)")
        value = _functional(ds, groups, "PixelValueTransformationSequence")
        rescale = top_rescale if value is None else (float(value.get("RescaleSlope", 1) or 1),
                                                     float(value.get("RescaleIntercept", 0) or 0))
        out.append(Slice(path, np.asarray(position.ImagePositionPatient, float),
                         np.asarray(orientation.ImageOrientationPatient, float), int(ds.Rows), int(ds.Columns),
                         str(ds.get("SOPInstanceUID", "")), _transfer_syntax(ds),
                         (float(measures.PixelSpacing[0]), float(measures.PixelSpacing[1])),
                         float(measures.get("SliceThickness") or 0) or None, i, rescale))
    return out


def check_series(series: Series) -> tuple[list[Slice], list[float]]:
    """Checked slices in spatial order and the spacing (column, row, slice) in mm; raises on any problem."""
    where = f"{series.folder}: {series.label()}"
    if series.invalid:
        raise DatasetError(f"{where}: {series.invalid[0][0].name}: {series.invalid[0][1]}")
    if not series.slices:
        raise DatasetError(f"{where}: no image slices (only non-image objects)")
    if series.multi_frame and any(s.frame is None for s in series.slices):
        raise DatasetError(f"{where}: mixes single-frame and multi-frame (enhanced) instances; send one kind")
    orientations = {tuple(np.round(s.orientation, 4)) for s in series.slices}
    if len(orientations) > 1:
        raise DatasetError(f"{where}: mixed slice orientations ({len(orientations)} different ImageOrientationPatient)")
    sizes = {(s.rows, s.columns) for s in series.slices}
    if len(sizes) > 1:
        raise DatasetError(f"{where}: mixed slice sizes {sorted(sizes)}")
    bad = sorted({s.transfer_syntax for s in series.slices} - set(DECODABLE_TRANSFER_SYNTAXES))
    if bad:
        name = pydicom.uid.UID(bad[0]).name
        raise DatasetError(f"{where}: unsupported transfer syntax {bad[0]} ({name}); convert it to an "
                           "uncompressed or JPEG/JPEG-LS/JPEG 2000/RLE syntax (e.g. `dcmconv +te`)")
    row, col = series.slices[0].orientation[:3], series.slices[0].orientation[3:]
    normal = np.cross(row, col)
    ordered = sorted(series.slices, key=lambda s: float(s.position @ normal))
    pixel = ordered[0].pixel_spacing or (1.0, 1.0)
    pixels = {tuple(round(float(v), 4) for v in (s.pixel_spacing or (1.0, 1.0))) for s in ordered}
    if len(pixels) > 1:
        raise DatasetError(f"{where}: mixed pixel spacings {sorted(pixels)} (PixelSpacing)")
    if len(ordered) == 1:
        return ordered, [pixel[1], pixel[0], ordered[0].thickness or 1.0]
    along = np.array([float(s.position @ normal) for s in ordered])
    gaps = np.diff(along)
    if (gaps < 1e-4).any():
        dup = ordered[int(np.argmin(gaps)) + 1]
        if dup.frame is not None:
            raise DatasetError(f"{where}: two frames at the same position ({dup.name}); several stacks, echoes "
                               "or time points in one object? Only one volume per object is read")
        raise DatasetError(f"{where}: two slices at the same position ({dup.path.name}); duplicate instances?")
    step = float(np.median(gaps))
    off = np.abs(gaps - step) > SPACING_TOLERANCE * step
    if off.any():
        i = int(np.argmax(off))
        raise DatasetError(f"{where}: inconsistent slice spacing ({gaps[i]:.3g} mm between {ordered[i].name} and "
                           f"{ordered[i + 1].name}, {step:.3g} mm elsewhere); missing slices?")
    stack = ordered[-1].position - ordered[0].position
    sin = np.linalg.norm(np.cross(stack / np.linalg.norm(stack), normal))
    if sin > TILT_TOLERANCE:
        raise DatasetError(f"{where}: slices are not stacked along their normal ({np.degrees(np.arcsin(sin)):.2f} "
                           "degrees off: gantry tilt); resample it to an orthogonal grid first")
    return ordered, [pixel[1], pixel[0], step]


def read_series(series: Series) -> tuple[np.ndarray, Geometry]:
    """The checked series as float32 ``(1, X, Y, Z)`` (X along the rows' direction, Z along the slice
    normal, in stored order of increasing position) and its RAS geometry; rescale applied."""
    ordered, spacing = check_series(series)
    geometry = _geometry(ordered, spacing)
    if series.multi_frame:
        arr = _read_frames(series, ordered)
        return np.ascontiguousarray(np.transpose(arr, (2, 1, 0))[None], dtype=np.float32), geometry
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(s.path) for s in ordered])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise DatasetError(f"{series.folder}: {series.label()}: cannot read pixels "
                           f"({str(exc).strip().splitlines()[-1][:160]})") from exc
    arr = np.moveaxis(sitk.GetArrayFromImage(img), [0, 1, 2], [2, 1, 0])[None]  # (1, X, Y, Z)
    if tuple(arr.shape[1:]) != geometry.shape:
        raise DatasetError(f"{series.folder}: {series.label()}: pixel data {arr.shape[1:]} does not match the "
                           f"headers {geometry.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32), geometry


def _read_frames(series: Series, ordered: Sequence[Slice]) -> np.ndarray:
    """The frames of ``ordered`` (multi-frame objects) as float32 (Z, rows, columns), each frame's rescale applied."""
    from pydicom.pixels import get_decoder  # pydicom's decoders for this transfer syntax

    out = np.empty((len(ordered), ordered[0].rows, ordered[0].columns), np.float32)
    for path in dict.fromkeys(s.path for s in ordered):
        mine = [(k, s) for k, s in enumerate(ordered) if s.path == path]
        rescales = {s.rescale for _, s in mine}
        try:
            if get_decoder(mine[0][1].transfer_syntax).is_available:
                stored = pydicom.dcmread(path).pixel_array.reshape(-1, out.shape[1], out.shape[2])
                for k, s in mine:
                    slope, intercept = s.rescale
                    out[k] = stored[s.frame - 1].astype(np.float64) * slope + intercept
            elif len(rescales) == 1:  # GDCM applies one rescale (the first frame's) to every frame
                values = sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32))
                values = values.reshape(-1, out.shape[1], out.shape[2])
                for k, s in mine:
                    out[k] = values[s.frame - 1]
            else:
                raise DatasetError(f"{path}: {series.label()}: frames with different rescale values in transfer "
                                   f"syntax {mine[0][1].transfer_syntax}, which only GDCM decodes here and GDCM "
                                   "rescales every frame alike; convert it to an uncompressed syntax (`dcmconv +te`)")
        except (RuntimeError, ValueError, IndexError, NotImplementedError) as exc:
            raise DatasetError(f"{path}: {series.label()}: cannot read pixels "
                               f"({str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__})"
                               ) from exc
    return out


def series_geometry(series: Series) -> Geometry:
    """The RAS geometry :func:`read_series` gives ``series``, from the headers alone."""
    return _geometry(*check_series(series))


def _geometry(ordered: Sequence[Slice], spacing: Sequence[float]) -> Geometry:
    row, col = ordered[0].orientation[:3], ordered[0].orientation[3:]
    normal = np.cross(row, col)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * spacing[0], col * spacing[1], normal * spacing[2]
    lps[:3, 3] = ordered[0].position
    shape = (ordered[0].columns, ordered[0].rows, len(ordered))
    return Geometry(shape, tuple(float(s) for s in spacing), LPS_TO_RAS @ lps)


def folder_series(folder: Path) -> Series:
    """The one image series of a dataset case folder; raises naming the folder when it holds none or
    several (a case folder is one channel of one case)."""
    found = find_series(folder)
    images = [s for s in found if s.is_image]
    if not images:
        what = f"only non-image DICOM objects ({len(found)} series)" if found else "no DICOM files"
        raise DatasetError(f"{folder}: {what}; a case folder must hold one DICOM image series")
    if len(images) > 1:
        raise DatasetError(f"{folder}: {len(images)} DICOM image series; a case folder must hold one "
                           "(one folder per channel: <case>_0000/, <case>_0001/ …): "
                           + "; ".join(s.label() for s in images))
    return images[0]


def read_series_folder(folder: Path) -> tuple[np.ndarray, Geometry]:
    """:func:`read_series` of the one image series in ``folder`` (see :func:`folder_series`)."""
    return read_series(folder_series(folder))


@dataclass
class SeriesSelector:
    """``modality=MR,description=HCrop.*,uid=1.2.3``: every given key must match (description is a
    case-insensitive regex searched in SeriesDescription)."""

    modality: str | None = None
    description: str | None = None
    uid: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> SeriesSelector:
        if not text:
            return cls()
        out: dict[str, str] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in ("modality", "description", "uid"):
                raise MedsegError(f"--series {text!r}: expected key=value pairs with keys modality, description, uid")
            out[key] = value.strip()
        if "description" in out:
            try:
                re.compile(out["description"])
            except re.error as e:
                raise MedsegError(f"--series: description {out['description']!r} is not a regular expression ({e})") from e
        return cls(**out)

    @property
    def given(self) -> bool:
        return any((self.modality, self.description, self.uid))

    def matches(self, s: Series) -> bool:
        return ((self.modality is None or s.modality.upper() == self.modality.upper())
                and (self.description is None or re.search(self.description, s.description, re.IGNORECASE) is not None)
                and (self.uid is None or s.series_uid == self.uid))


def channel_modalities(channel_names: Sequence[str]) -> set[str]:
    """DICOM modalities that fit a model's channel names (empty: any)."""
    return {MODALITY_OF_CHANNEL[n.lower()] for n in channel_names if n.lower() in MODALITY_OF_CHANNEL}


def select_series(all_series: Iterable[Series], channel_names: Sequence[str], selector: SeriesSelector,
                  root: Path) -> list[Series]:
    """One image series per study: the selector's match, or by default the one whose modality fits the
    model's channel. Raises listing the candidates when a study has none or several."""
    if len(channel_names) != 1:
        raise MedsegError(f"{root}: DICOM input gives one channel per case; this model expects {len(channel_names)} "
                          f"({', '.join(channel_names)})")
    images = [s for s in all_series if s.is_image]
    if not images:
        raise DatasetError(f"{root}: no DICOM image series found")
    wanted = channel_modalities(channel_names)
    chosen = []
    for study in sorted({s.study_uid for s in images}):
        in_study = [s for s in images if s.study_uid == study]
        if selector.given:
            fits = [s for s in in_study if selector.matches(s)]
        else:
            fits = [s for s in in_study if not wanted or s.modality.upper() in wanted]
        if len(fits) == 1:
            chosen.append(fits[0])
            continue
        if not fits and selector.given:
            continue  # the selector picks studies too
        listing = "; ".join(s.label() for s in in_study)
        how = "match --series" if selector.given else f"fit the model's channel {channel_names[0]!r}"
        raise MedsegError(f"{in_study[0].folder}: {len(fits)} series {how} in study {study}; choose one with "
                          f"--series description=REGEX or uid=UID. Candidates: {listing}")
    if not chosen:
        raise MedsegError(f"{root}: no series matches --series; found: " + "; ".join(s.label() for s in images))
    return chosen
