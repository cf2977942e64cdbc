"""Dataset layouts: MSD (``dataset.json`` with ``modality``/``training``), nnU-Net v2
(``channel_names``, ``labels`` name→int, ``_0000`` channel files) and a plain
``imagesTr/`` + ``labelsTr/`` folder with no json (channels and labels inferred).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from medseg.errors import DatasetError
from medseg.io.image import Geometry, image_suffix, read_image

Layout = Literal["msd", "nnunetv2", "plain"]
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

    @property
    def foreground_labels(self) -> list[int]:
        return sorted(k for k in self.labels if k != 0)

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
        if "channel_names" in meta:
            return _load_nnunetv2(root, meta)
        if "modality" in meta:
            return _load_msd(root, meta)
        raise DatasetError(f"{meta_path}: neither MSD ('modality') nor nnU-Net v2 ('channel_names') dataset.json")
    if (root / "imagesTr").is_dir():
        return _load_plain(root)
    raise DatasetError(f"{root}: no dataset.json and no imagesTr/ folder; not a dataset")


def _labels_from_msd(meta: dict, meta_path: Path) -> dict[int, str]:
    try:
        return {int(k): str(v) for k, v in meta["labels"].items()}
    except (KeyError, ValueError, AttributeError) as exc:
        raise DatasetError(f"{meta_path}: 'labels' must map integer strings to names") from exc


def _load_msd(root: Path, meta: dict) -> Dataset:
    meta_path = root / "dataset.json"
    modality = meta["modality"]
    channel_names = [str(modality[k]) for k in sorted(modality, key=int)]
    labels = _labels_from_msd(meta, meta_path)
    cases = []
    for entry in meta.get("training", []):
        image = (root / entry["image"]).resolve()
        label = (root / entry["label"]).resolve() if entry.get("label") else None
        cases.append(Case(strip_suffix(image.name), [image], label))
    if not cases:
        raise DatasetError(f"{meta_path}: 'training' lists no cases")
    return Dataset(root, "msd", channel_names, labels, cases)


def _load_nnunetv2(root: Path, meta: dict) -> Dataset:
    meta_path = root / "dataset.json"
    names = meta["channel_names"]
    channel_names = [str(names[k]) for k in sorted(names, key=int)]
    try:
        labels = {}
        for name, value in meta["labels"].items():
            if isinstance(value, list):
                raise DatasetError(f"{meta_path}: region-based labels ({name}: {value}) are not supported yet")
            labels[int(value)] = str(name)
    except (KeyError, ValueError, AttributeError) as exc:
        raise DatasetError(f"{meta_path}: 'labels' must map names to integers") from exc
    ending = meta.get("file_ending", ".nii.gz")
    cases = _scan_channel_files(root, ending, len(channel_names))
    return Dataset(root, "nnunetv2", channel_names, labels, cases)


def _scan_channel_files(root: Path, ending: str, n_channels: int) -> list[Case]:
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: folder not found")
    by_case: dict[str, dict[int, Path]] = {}
    for f in sorted(images_dir.iterdir()):
        if not f.name.endswith(ending) or f.name.startswith("."):
            continue
        m = _CHANNEL_RE.match(f.name[: -len(ending)])
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
        cases.append(Case(case_id, [channels[c] for c in range(n_channels)], label))
    if not cases:
        raise DatasetError(f"{images_dir}: no images ending in {ending}")
    return cases


def _load_plain(root: Path) -> Dataset:
    images_dir = root / "imagesTr"
    files = sorted(f for f in images_dir.iterdir() if image_suffix(f) and not f.name.startswith("."))
    if not files:
        raise DatasetError(f"{images_dir}: no images ({', '.join(('.nii.gz', '.nrrd', '.mha'))} …)")
    ending = image_suffix(files[0])
    notes = []
    if all(_CHANNEL_RE.match(strip_suffix(f.name)) for f in files):
        n_channels = len({_CHANNEL_RE.match(strip_suffix(f.name))["ch"] for f in files})
        cases = _scan_channel_files(root, ending, n_channels)
        notes.append(f"inferred {n_channels} channel(s) from _XXXX file suffixes")
    else:
        cases = []
        for f in files:
            case_id = strip_suffix(f.name)
            label = next((root / "labelsTr" / f"{case_id}{s}" for s in (image_suffix(f), ".nii.gz", ".nrrd", ".mha")
                          if (root / "labelsTr" / f"{case_id}{s}").exists()), root / "labelsTr" / f.name)
            cases.append(Case(case_id, [f], label))
        first, _ = read_image(files[0])
        n_channels = first.shape[0]
        notes.append(f"inferred {n_channels} channel(s) from {files[0].name}")
    values: set[int] = set()
    for case in cases:
        if case.label is not None and case.label.exists():
            arr, _ = read_image(case.label)
            values.update(int(v) for v in np.unique(arr) if float(v).is_integer())
    values.add(0)
    labels = {v: ("background" if v == 0 else f"label_{v}") for v in sorted(values)}
    notes.append(f"inferred labels {sorted(values)} from the label files")
    notes.append("assumed non-CT channels (per-image z-score); add a dataset.json to declare modalities")
    return Dataset(root, "plain", [f"channel_{i}" for i in range(n_channels)], labels, cases, notes)


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
    arr, geo = read_image(case.label)
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
