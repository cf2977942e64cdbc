"""Dataset layouts: MSD (``dataset.json`` with ``modality``/``training``), nnU-Net v2
(``channel_names``, ``labels`` name→int, ``_0000`` channel files) and a plain
``imagesTr/`` + ``labelsTr/`` folder with no json (channels and labels inferred).

A case image may also be a folder holding one DICOM series (``imagesTr/<case>/``, or
``<case>_0000/`` … per channel), and its label a DICOM SEG (``labelsTr/<case>.dcm``) that
references that series, as well as any label image in the series' geometry.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from medseg.errors import DatasetError
from medseg.io.geometry import Geometry
from medseg.io.image import image_suffix, read_image
from medseg.utils import IGNORE_LABEL_NAME

Layout = Literal["msd", "nnunetv2", "plain"]
LABEL_SUFFIXES = (".nii.gz", ".nrrd", ".mha", ".nii", ".dcm")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


@dataclass
class Case:
    """One training case: its image file(s) (one per channel, or one multi-channel file) and label."""

    case_id: str
    images: list[Path]
    label: Path | None


@dataclass
class Dataset:
    root: Path
    layout: Layout
    channel_names: list[str]
    labels: dict[int, str]
    cases: list[Case]
    notes: list[str] = field(default_factory=list)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise DatasetError(f"{self.root}: no case named {case_id!r}")


def strip_suffix(name: str) -> str:
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix else name


def load_dataset(root: str | Path) -> Dataset:
    """Discover the layout of ``root`` and list its cases. Does not read voxel data except to infer
    channels/labels of a plain folder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    meta_path = root / "dataset.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{meta_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{meta_path}: not a text file ({exc.reason})") from exc
        if not isinstance(meta, dict):
            raise DatasetError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
        if "channel_names" in meta:
            return _contained(_load_nnunetv2(root, meta))
        if "modality" in meta:
            return _contained(_load_msd(root, meta))
        raise DatasetError(f"{meta_path}: neither MSD ('modality') nor nnU-Net v2 ('channel_names') dataset.json")
    if (root / "imagesTr").is_dir():
        return _contained(_load_plain(root))
    raise DatasetError(f"{root}: no dataset.json and no imagesTr/ folder; not a dataset")


def _contained(ds: Dataset) -> Dataset:
    """``ds`` when every case file lies inside its folder (symlinks followed), else a DatasetError."""
    for case in ds.cases:
        for path in [*case.images, *([case.label] if case.label is not None else [])]:
            _inside(ds.root, path, path)
    return ds


def _int_key(value: object, meta_path: Path, what: str) -> int:
    """``value`` (a JSON key or value) as an int: ``0``, ``"3"``; not ``"1.5"``, ``"a"``, ``true`` or ``2.0``."""
    if isinstance(value, bool) or not isinstance(value, int | str) or not re.fullmatch(r"\s*\d+\s*", str(value)):
        raise DatasetError(f"{meta_path}: {what} {value!r} is not a non-negative integer")
    return int(value)


def _channels(meta: dict, key: str, meta_path: Path) -> list[str]:
    """The channel names of ``meta[key]`` (``{"0": "CT", …}``), in index order 0..C-1."""
    names = meta[key]
    if not isinstance(names, dict) or not names:
        raise DatasetError(f"{meta_path}: {key!r} must map channel indices 0..C-1 to names")
    by_index = {_int_key(k, meta_path, f"{key} key"): str(v) for k, v in names.items()}
    if sorted(by_index) != list(range(len(by_index))):
        raise DatasetError(f"{meta_path}: {key!r} indices {sorted(by_index)} are not 0..{len(by_index) - 1}")
    return [by_index[i] for i in range(len(by_index))]


def _check_labels(labels: dict[int, str], meta_path: Path) -> dict[int, str]:
    if 0 not in labels:
        raise DatasetError(f"{meta_path}: 'labels' does not declare 0 (the background)")
    ignored = [v for v, name in labels.items() if name.strip().lower() == IGNORE_LABEL_NAME]
    if len(ignored) > 1:
        raise DatasetError(f"{meta_path}: labels {ignored} are all named 'ignore'; declare one ignore label")
    if ignored and (ignored[0] == 0 or ignored[0] != max(labels)):
        raise DatasetError(f"{meta_path}: the label named 'ignore' ({ignored[0]}) must have the highest value "
                           f"({max(labels)} here), as in nnU-Net v2")
    if ignored and len(labels) < 3:
        raise DatasetError(f"{meta_path}: 'labels' declares only the background and 'ignore'; "
                           "name at least one structure to segment")
    return labels


def _labels_from_msd(meta: dict, meta_path: Path) -> dict[int, str]:
    raw = meta.get("labels")
    if not isinstance(raw, dict):
        raise DatasetError(f"{meta_path}: 'labels' must map integer strings to names")
    return _check_labels({_int_key(k, meta_path, "label key"): str(v) for k, v in raw.items()}, meta_path)


def _inside(root: Path, path: Path, where: Path) -> Path:
    """``path`` resolved, refused when it (or a symlink on the way) leads outside the dataset ``root``."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise DatasetError(f"{where}: leads outside the dataset folder (to {resolved}); copy the file into {root}")
    return resolved


def _load_msd(root: Path, meta: dict) -> Dataset:
    meta_path = root / "dataset.json"
    channel_names = _channels(meta, "modality", meta_path)
    labels = _labels_from_msd(meta, meta_path)
    training = meta.get("training", [])
    if not isinstance(training, list):
        raise DatasetError(f"{meta_path}: 'training' must be a list of {{\"image\", \"label\"}} entries")
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"]:
            raise DatasetError(f"{meta_path}: training entry {i} has no \"image\" path ({json.dumps(entry)[:80]})")
        if entry.get("label") is not None and not isinstance(entry["label"], str):
            raise DatasetError(f"{meta_path}: training entry {i}: \"label\" must be a path")
        image = _inside(root, root / entry["image"], root / entry["image"])
        label = _inside(root, root / entry["label"], root / entry["label"]) if entry.get("label") else None
        case_id = strip_suffix(image.name)
        if case_id in seen:
            raise DatasetError(f"{meta_path}: training entries {seen[case_id]} and {i} are both case {case_id!r}; "
                               "case ids must be unique")
        seen[case_id] = i
        cases.append(Case(case_id, [image], label))
    if not cases:
        raise DatasetError(f"{meta_path}: 'training' lists no cases")
    return Dataset(root, "msd", channel_names, labels, cases)


def _load_nnunetv2(root: Path, meta: dict) -> Dataset:
    meta_path = root / "dataset.json"
    channel_names = _channels(meta, "channel_names", meta_path)
    raw = meta.get("labels")
    if not isinstance(raw, dict):
        raise DatasetError(f"{meta_path}: 'labels' must map names to integers")
    labels = {}
    for name, value in raw.items():
        if isinstance(value, list):
            raise DatasetError(f"{meta_path}: region-based labels ({name}: {value}) are not supported yet")
        labels[_int_key(value, meta_path, f"label {name!r} value")] = str(name)
    _check_labels(labels, meta_path)
    ending = meta.get("file_ending", ".nii.gz")
    cases = _scan_channel_files(root, ending, len(channel_names))
    return Dataset(root, "nnunetv2", channel_names, labels, cases)


def _scan_channel_files(root: Path, ending: str, n_channels: int) -> list[Case]:
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: folder not found")
    by_case: dict[str, dict[int, Path]] = {}
    for f in sorted(images_dir.iterdir()):
        if f.name.startswith(".") or (not f.name.endswith(ending) if ending else not f.is_dir()):
            continue
        m = _CHANNEL_RE.match(f.name[: -len(ending)] if ending else f.name)  # no ending: DICOM series folders
        if m is None:
            raise DatasetError(f"{f}: image name lacks the _XXXX channel suffix of the nnU-Net v2 layout")
        by_case.setdefault(m["case"], {})[int(m["ch"])] = f
    cases = []
    for case_id, channels in sorted(by_case.items()):
        missing = [c for c in range(n_channels) if c not in channels]
        if missing:
            raise DatasetError(f"{images_dir / case_id}: channel file(s) {missing} missing (expected {n_channels} channels)")
        extra = sorted(set(channels) - set(range(n_channels)))
        if extra:
            raise DatasetError(f"{channels[extra[0]]}: channel {extra[0]} beyond the {n_channels} declared")
        label = root / "labelsTr" / f"{case_id}{ending}"
        if not ending:  # DICOM folders: a label image or a DICOM SEG
            label = next((label.with_name(f"{case_id}{s}") for s in LABEL_SUFFIXES
                          if label.with_name(f"{case_id}{s}").exists()), label.with_name(f"{case_id}.nii.gz"))
        cases.append(Case(case_id, [channels[c] for c in range(n_channels)], label))
    if not cases:
        raise DatasetError(f"{images_dir}: no images ending in {ending}")
    return cases


def _load_plain(root: Path) -> Dataset:
    images_dir = root / "imagesTr"
    files = sorted(f for f in images_dir.iterdir() if (image_suffix(f) or f.is_dir()) and not f.name.startswith("."))
    if not files:
        raise DatasetError(f"{images_dir}: no images ({', '.join(('.nii.gz', '.nrrd', '.mha'))} …) "
                           "and no DICOM series folders")
    ending = image_suffix(files[0])
    if any(bool(image_suffix(f)) != bool(ending) for f in files):
        raise DatasetError(f"{images_dir}: mixes image files and DICOM series folders; use one kind")
    notes = []
    if all(_CHANNEL_RE.match(strip_suffix(f.name)) for f in files):
        n_channels = len({_CHANNEL_RE.match(strip_suffix(f.name))["ch"] for f in files})
        cases = _scan_channel_files(root, ending, n_channels)
        notes.append(f"inferred {n_channels} channel(s) from _XXXX file suffixes")
    else:
        cases = []
        seen: dict[str, Path] = {}
        for f in files:
            case_id = strip_suffix(f.name)
            if case_id in seen:
                raise DatasetError(f"{f}: case {case_id!r} appears twice ({seen[case_id].name}, {f.name}); "
                                   "keep one file per case")
            seen[case_id] = f
            label = next((root / "labelsTr" / f"{case_id}{s}" for s in (image_suffix(f), *LABEL_SUFFIXES)
                          if s and (root / "labelsTr" / f"{case_id}{s}").exists()),
                         root / "labelsTr" / f"{case_id}{ending or '.nii.gz'}")
            cases.append(Case(case_id, [f], label))
        first, _ = read_image(files[0])
        n_channels = first.shape[0]
        notes.append(f"inferred {n_channels} channel(s) from {files[0].name}")
    values: set[int] = set()
    names: dict[int, str] = {}
    for case in cases:
        if case.label is not None and case.label.exists():
            if is_dicom_seg(case.label):  # segment numbers and names from the SEG's headers
                from medseg.io.dicom_seg import segment_labels

                segments = segment_labels(case.label)
                values.update(segments)
                names.update({k: v for k, v in segments.items() if k not in names})
                continue
            arr, _ = read_image(case.label)
            values.update(int(v) for v in np.unique(arr) if float(v).is_integer())
    values.add(0)
    labels = {v: ("background" if v == 0 else names.get(v, f"label_{v}")) for v in sorted(values)}
    notes.append(f"inferred labels {sorted(values)} from the label files")
    if ending:
        channel_names = [f"channel_{i}" for i in range(n_channels)]
        notes.append("assumed non-CT channels (per-image z-score); add a dataset.json to declare modalities")
    else:  # DICOM folders: the channel is named by the series' modality (CT → CT normalisation)
        channel_names = [_series_modality(c) for c in cases[0].images]
        notes.append(f"channel(s) {channel_names} named by the DICOM Modality of case {cases[0].case_id}")
    return Dataset(root, "plain", channel_names, labels, cases, notes)


def _series_modality(folder: Path) -> str:
    from medseg.io.dicom import folder_series

    return folder_series(folder).modality or "channel"


def is_dicom_seg(path: Path) -> bool:
    """Whether a label path is a DICOM SEG file (by its ``.dcm`` suffix)."""
    return Path(path).name.lower().endswith(".dcm")


def read_label_file(path: Path, images: Sequence[Path]) -> tuple[np.ndarray, Geometry]:
    """A label file as ``(1, X, Y, Z)`` in its stored dtype and its geometry: an image file, or a DICOM
    SEG decoded onto the grid of the case's DICOM series folder (``images[0]``)."""
    path = Path(path)
    if not is_dicom_seg(path):
        return read_image(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    if not images or not Path(images[0]).is_dir():
        raise DatasetError(f"{path}: a DICOM SEG label needs the case image to be a DICOM series folder")
    from medseg.io.dicom import folder_series, series_geometry
    from medseg.io.dicom_seg import read_dicom_seg

    series = folder_series(Path(images[0]))
    return read_dicom_seg(path, series)[None], series_geometry(series)


def read_case_image(case: Case) -> tuple[np.ndarray, Geometry]:
    """All channels of a case stacked as float32 ``(C, X, Y, Z)`` with the first channel's geometry."""
    arrays, geometry = [], None
    for f in case.images:
        arr, geo = read_image(f)
        if geometry is None:
            geometry = geo
        elif (diff := geometry.matches(geo)) is not None:
            raise DatasetError(f"{f}: channel geometry differs from {case.images[0].name}: {diff}")
        arrays.append(arr.astype(np.float32, copy=False))
    return np.concatenate(arrays, axis=0), geometry


def read_case_label(case: Case) -> tuple[np.ndarray, Geometry]:
    """The label map as int16 ``(X, Y, Z)``; values are rounded (``check`` rejects non-integers)."""
    if case.label is None or not case.label.exists():
        raise DatasetError(f"{case.label or case.case_id}: label file missing")
    arr, geo = read_label_file(case.label, case.images)
    if arr.shape[0] != 1:
        raise DatasetError(f"{case.label}: label map has {arr.shape[0]} channels; expected 1")
    return np.rint(arr[0]).astype(np.int16), geo


def channel_normalization(name: str) -> str:
    """Normalisation scheme for a channel name, as nnU-Net: 'CT' → ct; 'noNorm' → none; else zscore."""
    n = name.strip().lower()
    if n == "ct" or re.search(r"\bct\b", n):
        return "ct"
    if n in {"nonorm", "none"}:
        return "none"
    return "zscore"
