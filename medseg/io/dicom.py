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
from medseg.io.transfer_syntaxes import DECODABLE_TRANSFER_SYNTAXES

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

    @property
    def is_image(self) -> bool:
        return bool(self.slices)

    def label(self) -> str:
        return (f"{self.modality} series {self.number if self.number is not None else '?'} "
                f"\"{self.description}\" ({len(self.slices)} slices, UID {self.series_uid})")

    @property
    def folder(self) -> Path:
        return (self.slices[0].path if self.slices else self.non_image[0]).parent


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
        ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if "PixelData" not in ds or ipp is None or iop is None or int(ds.get("NumberOfFrames", 1) or 1) > 1:
            series.non_image.append(path)
            continue
        series.slices.append(Slice(path, np.asarray(ipp, float), np.asarray(iop, float), int(ds.Rows),
                                   int(ds.Columns), str(ds.get("SOPInstanceUID", "")),
                                   str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))))
    return sorted(found.values(), key=lambda s: (s.study_uid, s.number if s.number is not None else -1, s.series_uid))


def check_series(series: Series) -> tuple[list[Slice], list[float]]:
    """Checked slices in spatial order and the spacing (column, row, slice) in mm; raises on any problem."""
    where = f"{series.folder}: {series.label()}"
    if not series.slices:
        raise DatasetError(f"{where}: no image slices (only non-image objects)")
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
    first = pydicom.dcmread(ordered[0].path, stop_before_pixels=True)
    pixel = [float(v) for v in first.get("PixelSpacing", [1.0, 1.0])]
    if len(ordered) == 1:
        thickness = float(first.get("SliceThickness", 1.0) or 1.0)
        return ordered, [pixel[1], pixel[0], thickness]
    along = np.array([float(s.position @ normal) for s in ordered])
    gaps = np.diff(along)
    if (gaps < 1e-4).any():
        dup = ordered[int(np.argmin(gaps)) + 1]
        raise DatasetError(f"{where}: two slices at the same position ({dup.path.name}); duplicate instances?")
    step = float(np.median(gaps))
    off = np.abs(gaps - step) > SPACING_TOLERANCE * step
    if off.any():
        i = int(np.argmax(off))
        raise DatasetError(f"{where}: inconsistent slice spacing ({gaps[i]:.3g} mm between {ordered[i].path.name} and "
                           f"{ordered[i + 1].path.name}, {step:.3g} mm elsewhere); missing slices?")
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
