"""The bad-input corpus: every entry of :data:`CORPUS` is built in a temporary folder (tiny synthetic
files, copies of a few real DICOM slices), given to one command and must end as documented.

Each case checks, through the real ``medseg.cli.main`` (in-process: exit code, stderr), that the
command exits 2 (0 for the documented warnings) without a traceback, that the message names the
file and the problem, and that nothing was written: every folder involved lists exactly what it
listed before. ``docs/robustness.md`` holds :func:`corpus_markdown` (asserted below, so the table
cannot drift); a few entries also run as a real subprocess.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import REPO_ROOT, listing, make_msd_dataset, run_medseg, shared_data, truncate_file, write_nifti

SHAPE = (12, 10, 8)
DICOM_CT = (shared_data() or Path("/nonexistent")) / "dicom" / "ct-abdomen"
DICOM_MR = (shared_data() or Path("/nonexistent")) / "dicom" / "hippocampus-mr" / "Study1"


@dataclass
class Run:
    """What one corpus entry runs: the CLI ``args``, the file the message must name, the folders that
    must list the same before and after."""

    args: list[str]
    named: Path | str
    watch: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Bad:
    """One corpus entry: the command, the input (for the table), the expected message fragment, the
    builder (temporary folder, fixtures → :class:`Run`) and the exit code (0: a documented warning)."""

    command: str
    input: str
    expect: str
    build: Callable[[Path, Fixtures], Run]
    exit_code: int = 2

    @property
    def id(self) -> str:
        return f"{self.command}-{self.input}".replace(" ", "_")[:70]


class Fixtures:
    """The shared, read-only trained model (built on first use) for train/predict/serve entries."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request

    @property
    def model(self) -> Path:
        return self._request.getfixturevalue("tiny_model")


# --- builders ------------------------------------------------------------------------------------


def _ds(t: Path, n_cases: int = 2) -> Path:
    return make_msd_dataset(t / "ds", n_cases=n_cases, shape=SHAPE).resolve()


def _img(root: Path, i: int = 0) -> Path:
    return root / "imagesTr" / f"case_{i:03d}.nii.gz"


def _lab(root: Path, i: int = 0) -> Path:
    return root / "labelsTr" / f"case_{i:03d}.nii.gz"


def _data(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def _meta(root: Path, **changes) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(changes)
    (root / "dataset.json").write_text(json.dumps(meta))


def _as_nii(root: Path, i: int = 0) -> Path:
    """Case ``i``'s image rewritten as uncompressed ``.nii`` (so its header bytes can be patched)."""
    src = _img(root, i)
    dst = src.with_name(f"case_{i:03d}.nii")
    nib.save(nib.load(str(src)), str(dst))
    src.unlink()
    _meta(root, training=[{"image": f"./imagesTr/{(dst if j == i else _img(root, j)).name}",
                           "label": f"./labelsTr/case_{j:03d}.nii.gz"} for j in range(2)])
    return dst


def _patch(path: Path, offset: int, fmt: str, *values) -> Path:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<" + fmt, *values))
    return path


def check_run(named: Callable[[Path], Path]) -> Callable[[Path, Fixtures], Run]:
    """A ``medseg check`` run on a 2-case MSD dataset that ``named(root)`` breaks (returns the file)."""
    def build(t: Path, fx: Fixtures) -> Run:
        root = _ds(t)
        return Run(["check", str(root)], named(root), [t])
    return build


def plan_run(named: Callable[[Path], Path]) -> Callable[[Path, Fixtures], Run]:
    def build(t: Path, fx: Fixtures) -> Run:
        root = _ds(t)
        return Run(["plan", str(root), "-o", str(t / "wd"), "--workers", "1", "--configs", "3d_fullres"],
                   named(root), [t])
    return build


def _write_label(root: Path, i: int, change: Callable[[np.ndarray], np.ndarray], dtype=None) -> Path:
    path = _lab(root, i)
    arr = change(_data(path).astype(dtype or np.uint8))
    write_nifti(path, arr)
    return path


def _write_image(root: Path, i: int, array: np.ndarray | None = None, **kwargs) -> Path:
    path = _img(root, i)
    write_nifti(path, _data(path) if array is None else array, **kwargs)
    return path


def _set(arr: np.ndarray, value) -> np.ndarray:
    arr = arr.copy()
    arr[0, 0, 0] = value
    return arr


def _label_affine(root: Path, affine: np.ndarray) -> Path:
    path = _lab(root, 0)
    write_nifti(path, _data(path), affine=affine)
    return path


def _pixdim_disagrees(root: Path) -> Path:
    path = _img(root, 0)
    img = nib.load(str(path))
    img = nib.Nifti1Image(np.asanyarray(img.dataobj), np.diag([1.0, 1.0, 2.0, 1.0]))
    img.set_sform(np.diag([1.0, 1.0, 2.0, 1.0]), code=1)
    img.set_qform(np.diag([1.0, 1.0, 2.0, 1.0]), code=0)
    img.header["pixdim"][1:4] = [1.0, 1.0, 1.0]  # qform off: pixdim is free to disagree
    nib.save(img, str(path))
    return path


def _sform_only(path: Path, affine: np.ndarray) -> Path:
    """Rewrite ``path`` with ``affine`` as its sform only (nibabel cannot store a singular qform)."""
    img = nib.Nifti1Image(np.asanyarray(nib.load(str(path)).dataobj), None)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _sheared(root: Path) -> Path:
    affine = np.eye(4)
    affine[0, 1] = 0.3  # axis j leans into x: not a rotation
    return _write_image(root, 0, affine=affine)


def _wrong_magic(root: Path) -> Path:
    path = _as_nii(root)
    return _patch(path, 344, "4s", b"xyz\0")


def _size_mismatch(root: Path) -> Path:
    path = _as_nii(root)
    return _patch(path, 42, "3h", 12, 10, 9)  # one more slice than the data holds


def _absurd_size(root: Path) -> Path:
    path = _as_nii(root)
    return _patch(path, 42, "3h", 30000, 30000, 30000)


def _zero_dim(root: Path) -> Path:
    path = _as_nii(root)
    return _patch(path, 42, "3h", 12, 10, 0)


def _negative_pixdim(root: Path) -> Path:
    path = _as_nii(root)
    _patch(path, 252, "2h", 1, 0)  # qform from pixdim, no sform
    return _patch(path, 80, "3f", 1.0, -2.0, 1.0)


def _text_as_nifti(root: Path) -> Path:
    path = _img(root, 0)
    path.write_text("this is a radiology report, not an image\n")
    return path


def _gzip_of_garbage(root: Path) -> Path:
    path = _img(root, 0)
    path.write_bytes(gzip.compress(os.urandom(2000)))
    return path


def _non_image_entry(root: Path) -> Path:
    notes = root / "imagesTr" / "case_000.txt"
    notes.write_text("notes")
    _meta(root, training=[{"image": "./imagesTr/case_000.txt", "label": "./labelsTr/case_000.nii.gz"},
                          {"image": "./imagesTr/case_001.nii.gz", "label": "./labelsTr/case_001.nii.gz"}])
    return notes


def _symlink_out(root: Path) -> Path:
    outside = root.parent / "elsewhere.nii.gz"
    shutil.move(_lab(root, 1), outside)
    _lab(root, 1).symlink_to(outside)
    return _lab(root, 1)


def _dotdot_entry(root: Path) -> Path:
    outside = root.parent / "case_009.nii.gz"
    shutil.copy(_img(root, 1), outside)
    _meta(root, training=[{"image": "./imagesTr/case_000.nii.gz", "label": "./labelsTr/case_000.nii.gz"},
                          {"image": "../case_009.nii.gz", "label": "./labelsTr/case_001.nii.gz"}])
    return root / "../case_009.nii.gz"


def _duplicate_entry(root: Path) -> Path:
    entry = {"image": "./imagesTr/case_000.nii.gz", "label": "./labelsTr/case_000.nii.gz"}
    _meta(root, training=[entry, entry])
    return root / "dataset.json"


def _meta_broken(text: str) -> Callable[[Path], Path]:
    def named(root: Path) -> Path:
        (root / "dataset.json").write_text(text)
        return root / "dataset.json"
    return named


def _meta_change(**changes) -> Callable[[Path], Path]:
    def named(root: Path) -> Path:
        _meta(root, **changes)
        return root / "dataset.json"
    return named


def _no_foreground(root: Path) -> Path:
    for i in range(2):
        _write_label(root, i, np.zeros_like)
    return root / "labelsTr"


def _two_channel_label(root: Path) -> Path:
    path = _lab(root, 0)
    arr = _data(path)
    write_nifti(path, np.stack([arr, arr], axis=-1))
    return path


def _plain(t: Path) -> Path:
    root = _ds(t)
    (root / "dataset.json").unlink()
    return root


def plain_run(named: Callable[[Path], Path]) -> Callable[[Path, Fixtures], Run]:
    def build(t: Path, fx: Fixtures) -> Run:
        root = _plain(t)
        return Run(["check", str(root)], named(root), [t])
    return build


def _time_series(root: Path) -> Path:
    for i in range(2):
        path = _img(root, i)
        arr = _data(path)
        img = nib.Nifti1Image(np.stack([arr] * 3, axis=-1), np.eye(4))
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = 2.5
        nib.save(img, str(path))
    return _img(root, 0)


def _mixed_2d(root: Path) -> Path:
    for path in (_img(root, 1), _lab(root, 1)):
        write_nifti(path, _data(path)[:, :, 4])
    return _img(root, 1)


def _duplicate_plain(root: Path) -> Path:
    from medseg.io.image import read_image, write_image

    array, geometry = read_image(_img(root, 0))
    write_image(root / "imagesTr" / "case_000.nrrd", array, geometry)
    return root / "imagesTr" / "case_000.nrrd"


def _nrrd_case(root: Path) -> Path:
    """Case 0's image as NRRD (the MSD entry points at it)."""
    from medseg.io.image import read_image, write_image

    array, geometry = read_image(_img(root, 0))
    path = root / "imagesTr" / "case_000.nrrd"
    write_image(path, array, geometry)
    _img(root, 0).unlink()
    _meta(root, training=[{"image": "./imagesTr/case_000.nrrd", "label": "./labelsTr/case_000.nii.gz"},
                          {"image": "./imagesTr/case_001.nii.gz", "label": "./labelsTr/case_001.nii.gz"}])
    return path


def _nrrd_truncated(root: Path) -> Path:
    return truncate_file(_nrrd_case(root), 0.6)


def _nrrd_zero_spacing(root: Path) -> Path:
    path = _nrrd_case(root)
    raw = path.read_bytes()
    head, sep, body = raw.partition(b"\n\n")
    lines = [b"space directions: (1,0,0) (0,0,0) (0,0,1)" if ln.startswith(b"space directions") else ln
             for ln in head.split(b"\n")]
    path.write_bytes(b"\n".join(lines) + sep + body)
    return path


def _dicom_files(folder: Path, source: Path, keep: list[int], prefix: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    for k in keep:
        shutil.copy(files[k], folder / f"{prefix}{files[k].name}")


def dicom_run(kind: str) -> Callable[[Path, Fixtures], Run]:
    """A plain dataset of one DICOM case folder with a slice missing, or with two series mixed."""
    def build(t: Path, fx: Fixtures) -> Run:
        if not DICOM_CT.is_dir():
            pytest.skip(f"{DICOM_CT} not present")
        root = t / "ds"
        case = root / "imagesTr" / "case_000"
        _dicom_files(case, DICOM_CT, [0, 1, 3, 4, 5] if kind == "missing" else [0, 1, 2, 3])
        if kind == "mixed":
            _dicom_files(case, DICOM_MR, [0, 1, 2], prefix="mr_")
        write_nifti(root / "labelsTr" / "case_000.nii.gz", np.zeros((4, 4, 4), np.uint8))
        return Run(["check", str(root)], case, [t])
    return build


# --- other commands ------------------------------------------------------------------------------


def _workdir(t: Path, fx: Fixtures) -> Path:
    wd = t / "wd"
    shutil.copytree(fx.model, wd, ignore=shutil.ignore_patterns("checkpoint_*.pt", "val", "*.png"))
    return wd


def train_run(change: Callable[[Path], tuple[Path, list[str]]]) -> Callable[[Path, Fixtures], Run]:
    def build(t: Path, fx: Fixtures) -> Run:
        wd = _workdir(t, fx)
        named, extra = change(wd)
        return Run(["train", str(wd), "--epochs", "1", "--device", "cpu", "--no-validation", *extra], named, [t])
    return build


def _plans_text(text: str) -> Callable[[Path], tuple[Path, list[str]]]:
    def change(wd: Path) -> tuple[Path, list[str]]:
        (wd / "plans.json").write_text(text)
        return wd / "plans.json", []
    return change


def _plans_version(wd: Path) -> tuple[Path, list[str]]:
    plans = json.loads((wd / "plans.json").read_text())
    plans["schema_version"] = 99
    (wd / "plans.json").write_text(json.dumps(plans))
    return wd / "plans.json", []


def _bad_fold(wd: Path) -> tuple[Path, list[str]]:
    return "--fold", ["-f", "seven"]


def _preprocessed(wd: Path, pattern: str) -> Path:
    return sorted((wd / "preprocessed" / "3d_fullres").glob(pattern))[0]


def _truncated_npy(wd: Path) -> tuple[Path, list[str]]:
    return truncate_file(_preprocessed(wd, "case_*[0-9].npy"), 0.5), []


def _corrupt_properties(wd: Path) -> tuple[Path, list[str]]:
    path = _preprocessed(wd, "case_*.json")
    path.write_text("{not json")
    return path, []


def _predict_input(t: Path, write: Callable[[Path], Path]) -> tuple[Path, Path]:
    folder = t / "in"
    folder.mkdir()
    return folder, write(folder)


def predict_run(write: Callable[[Path], Path]) -> Callable[[Path, Fixtures], Run]:
    """``medseg predict`` of a folder holding what ``write(folder)`` puts there (the file it returns is
    named), into an output folder that already holds a file."""
    def build(t: Path, fx: Fixtures) -> Run:
        model = fx.model
        folder, named = _predict_input(t, write)
        out = t / "out"
        out.mkdir()
        (out / "keep.txt").write_text("was here before")
        return Run(["predict", "-i", str(folder), "-o", str(out), "-m", str(model), "--device", "cpu"],
                   named, [t, model])
    return build


def _case_image(folder: Path, array: np.ndarray | None = None, **kwargs) -> Path:
    from helpers import make_case

    image = make_case(SHAPE)[0][0] if array is None else array
    return write_nifti(folder / "case.nii.gz", image, **kwargs)


def _nan_input(folder: Path) -> Path:
    from helpers import make_case

    image = make_case(SHAPE)[0][0]
    image[2, 2, 2] = np.nan
    return _case_image(folder, image)


def _two_channel_input(folder: Path) -> Path:
    from helpers import make_case

    return write_nifti(folder / "case.nii.gz", np.moveaxis(make_case(SHAPE, n_channels=2)[0], 0, -1))


def _zero_spacing_input(folder: Path) -> Path:
    return _sform_only(_case_image(folder), np.diag([1.0, 0.0, 1.0, 1.0]))


def _absurd_input(folder: Path) -> Path:
    path = _case_image(folder)
    nii = path.with_name("case.nii")
    nib.save(nib.load(str(path)), str(nii))
    path.unlink()
    return _patch(nii, 42, "3h", 30000, 30000, 30000)


def _truncated_input(folder: Path) -> Path:
    return truncate_file(_case_image(folder), 0.5)


def _only_text(folder: Path) -> Path:
    (folder / "readme.txt").write_text("no images here")
    return folder


def _dicom_input(folder: Path) -> Path:
    """Slices 1, 2, 3, 5, 6 of the real MR series (the model's modality), slice 4 left out."""
    source = DICOM_MR / "13_HCropVolume"
    if not source.is_dir():
        pytest.skip(f"{source} not present")
    (folder / "series").mkdir()
    for k in (1, 2, 3, 5, 6):
        shutil.copy(source / f"{k}.dcm", folder / "series" / f"{k}.dcm")
    return folder / "series"


def _not_a_model(t: Path, fx: Fixtures) -> Run:
    folder, _ = _predict_input(t, _case_image)
    (t / "model").mkdir()
    return Run(["predict", "-i", str(folder), "-o", str(t / "out"), "-m", str(t / "model"), "--device", "cpu"],
               t / "model", [t])


def evaluate_run(change: Callable[[Path, Path], Path]) -> Callable[[Path, Fixtures], Run]:
    """``medseg evaluate pred gt -o report`` with 2 matching cases that ``change(pred, gt)`` breaks."""
    def build(t: Path, fx: Fixtures) -> Run:
        root = _ds(t)
        pred, gt = t / "pred", root / "labelsTr"
        shutil.copytree(gt, pred)
        named = change(pred, gt)
        return Run(["evaluate", str(pred), str(gt), "-o", str(t / "report"), "--workers", "1"], named, [t])
    return build


def _pred_label(pred: Path, change: Callable[[np.ndarray], np.ndarray], dtype=np.float32) -> Path:
    path = pred / "case_001.nii.gz"
    write_nifti(path, change(_data(path).astype(dtype)))
    return path


def _ref_nan(pred: Path, gt: Path) -> Path:
    path = gt / "case_000.nii.gz"
    write_nifti(path, _set(_data(path).astype(np.float32), np.nan))
    return path


def _duplicate_pred(pred: Path, gt: Path) -> Path:
    shutil.copy(pred / "case_000.nii.gz", pred / "case_000.nii")
    return pred


def _ref_only_text(pred: Path, gt: Path) -> Path:
    for f in gt.iterdir():
        shutil.move(f, gt.parent / f.name)
    (gt / "notes.txt").write_text("no label maps")
    return gt


def serve_run(config: Callable[[Path, Fixtures], object], named: str = "node.json") -> Callable[[Path, Fixtures], Run]:
    """``medseg serve node.json`` with what ``config`` gives (a dict as JSON, a string as it is); the
    message names ``named`` (in the temporary folder)."""
    def build(t: Path, fx: Fixtures) -> Run:
        content = config(t, fx)
        path = t / "node.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return Run(["serve", str(path)], t / named, [t])
    return build


def _node(t: Path, fx: Fixtures | None, **changes) -> dict:
    config = {"ae_title": "MEDSEG", "port": 11112, "allowed_calling_aets": ["PACS"],
              "destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 11113},
              "model_dir": str(fx.model if fx is not None else t / "model"), "spool_dir": str(t / "spool")}
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


# --- the corpus ----------------------------------------------------------------------------------

CORPUS: list[Bad] = [
    # readable files
    Bad("check", "truncated .nii.gz image", "the file may be truncated or corrupt",
        check_run(lambda r: truncate_file(_img(r), 0.5))),
    Bad("check", "truncated .nii.gz label", "cannot read image", check_run(lambda r: truncate_file(_lab(r, 1), 0.4))),
    Bad("check", "wrong NIfTI magic", "cannot read image", check_run(_wrong_magic)),
    Bad("check", "text file named .nii.gz", "cannot read image", check_run(_text_as_nifti)),
    Bad("check", "gzip of random bytes as .nii.gz", "cannot read image", check_run(_gzip_of_garbage)),
    Bad("check", "header/data size mismatch (.nii one slice short)", "cannot read image", check_run(_size_mismatch)),
    Bad("check", "absurd declared size (30000^3 header, tiny file)", "more than the memory budget",
        check_run(_absurd_size)),
    Bad("check", "zero-size dimension in the header", "zero-size dimension", check_run(_zero_dim)),
    Bad("check", "truncated .nrrd image", "cannot read image", check_run(_nrrd_truncated)),
    Bad("check", "NRRD with a zero space direction", "has a zero, negative or undefined axis",
        check_run(_nrrd_zero_spacing)),
    Bad("check", "non-image file as a training image", "unsupported file type", check_run(_non_image_entry)),
    # voxel values
    Bad("check", "NaN/Inf in an image", "contains 2 NaN/Inf voxels",
        check_run(lambda r: _write_image(r, 0, _set(_set(_data(_img(r)), np.nan)[::-1], np.inf)[::-1]))),
    Bad("check", "float label 0.5", "non-integer label values e.g. 0.5",
        check_run(lambda r: _write_label(r, 0, lambda a: _set(a, 0.5), np.float32))),
    Bad("check", "float label 1.0000001", "non-integer label values e.g. 1.0000001",
        check_run(lambda r: _write_label(r, 0, lambda a: _set(a, 1.0000001), np.float32))),
    Bad("check", "NaN in a label map", "contains 1 NaN/Inf voxels",
        check_run(lambda r: _write_label(r, 1, lambda a: _set(a, np.nan), np.float32))),
    Bad("check", "undeclared label value 5", "label values [5] not declared",
        check_run(lambda r: _write_label(r, 0, lambda a: _set(a, 5)))),
    Bad("check", "no foreground in any label map", "no label file holds any foreground", check_run(_no_foreground)),
    Bad("check", "one empty label map (warning)", "label map is empty (background only)",
        check_run(lambda r: _write_label(r, 1, np.zeros_like)), exit_code=0),
    Bad("check", "declared label that never occurs (warning)", "declared label(s) 3 (c) occur in no label file",
        check_run(_meta_change(labels={"0": "background", "1": "a", "2": "b", "3": "c"})), exit_code=0),
    Bad("check", "label map with 2 channels", "label map has 2 channels", check_run(_two_channel_label)),
    Bad("check", "missing label file", "label file missing", check_run(lambda r: (_lab(r, 1).unlink(), _lab(r, 1))[1])),
    # geometry
    Bad("check", "image/label shape mismatch", "geometry differs from image case_000.nii.gz: shape",
        check_run(lambda r: _write_label(r, 0, lambda a: a[:, :, :7]))),
    Bad("check", "image/label origin mismatch", "origin/direction differ",
        check_run(lambda r: _label_affine(r, np.array([[1, 0, 0, 5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])))),
    Bad("check", "spacing 0 (singular affine)", "has a zero axis",
        check_run(lambda r: _sform_only(_img(r), np.diag([1.0, 1.0, 0.0, 1.0])))),
    Bad("check", "negative pixdim", "holds a negative spacing",
        check_run(_negative_pixdim)),
    Bad("check", "spacing 1e6 mm", "is implausible",
        check_run(lambda r: _write_image(r, 0, spacing=(1.0, 1e6, 1.0)))),
    Bad("check", "pixdim disagrees with the sform", "disagrees with the sform affine", check_run(_pixdim_disagrees)),
    Bad("check", "non-orthonormal direction cosines", "not orthonormal", check_run(_sheared)),
    Bad("check", "2D image mixed into a 3D dataset", "2D image in a dataset of 3D images", check_run(_mixed_2d)),
    Bad("check", "4D time series in a plain folder", "4D time series (3 frames, 2.5 sec apart",
        plain_run(_time_series)),
    # dataset layout and dataset.json
    Bad("check", "duplicated case id in dataset.json", "are both case 'case_000'", check_run(_duplicate_entry)),
    Bad("check", "duplicated case id in a plain folder (.nii.gz + .nrrd)", "appears twice",
        plain_run(_duplicate_plain)),
    Bad("check", "label symlink leading out of the dataset", "leads outside the dataset folder",
        check_run(_symlink_out)),
    Bad("check", "training entry ../ out of the dataset", "leads outside the dataset folder",
        check_run(_dotdot_entry)),
    Bad("check", "dataset.json invalid JSON", "invalid JSON", check_run(_meta_broken('{"modality": {"0": "MRI"'))),
    Bad("check", "dataset.json a JSON list", "expected a JSON object, got list", check_run(_meta_broken("[1, 2]"))),
    Bad("check", "dataset.json non-integer label key", "label key 'one' is not a non-negative integer",
        check_run(_meta_change(labels={"0": "background", "one": "a", "2": "b"}))),
    Bad("check", "nnU-Net v2 labels with a non-integer value", "label 'a' value 1.5 is not a non-negative integer",
        check_run(_meta_broken(json.dumps({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1.5},
                                           "file_ending": ".nii.gz"})))),
    Bad("check", "training entry without \"image\"", "training entry 1 has no \"image\" path",
        check_run(_meta_change(training=[{"image": "./imagesTr/case_000.nii.gz", "label": "./labelsTr/case_000.nii.gz"},
                                         {"label": "./labelsTr/case_001.nii.gz"}]))),
    Bad("check", "modality keys not 0..C-1", "'modality' indices [0, 2] are not 0..1",
        check_run(_meta_change(modality={"0": "MRI", "2": "CT"}))),
    Bad("check", "DICOM series with a missing slice", "missing slices?", dicom_run("missing")),
    Bad("check", "DICOM case folder mixing two series", "2 DICOM image series", dicom_run("mixed")),
    # plan: the same check first, nothing written
    Bad("plan", "undeclared label value", "not declared in dataset.json labels",
        plan_run(lambda r: _write_label(r, 1, lambda a: _set(a, 9)))),
    Bad("plan", "truncated image", "cannot read image", plan_run(lambda r: truncate_file(_img(r, 1), 0.5))),
    Bad("plan", "2D image mixed into a 3D dataset", "2D image in a dataset of 3D images", plan_run(_mixed_2d)),
    Bad("plan", "dataset.json non-integer label key", "is not a non-negative integer",
        plan_run(_meta_change(labels={"0": "background", "1.5": "a"}))),
    # train
    Bad("train", "plans.json invalid JSON", "invalid JSON", train_run(_plans_text("{\"schema_version\": 1,"))),
    Bad("train", "plans.json of another schema_version", "schema_version 99 is not supported",
        train_run(_plans_version)),
    Bad("train", "fold that is not a number", "expected a fold number", train_run(_bad_fold)),
    Bad("train", "truncated preprocessed case array", "re-run preprocessing", train_run(_truncated_npy)),
    Bad("train", "corrupt case properties json", "re-run preprocessing", train_run(_corrupt_properties)),
    # predict
    Bad("predict", "truncated input image", "cannot read image", predict_run(_truncated_input)),
    Bad("predict", "folder with no image files", "no images to predict", predict_run(_only_text)),
    Bad("predict", "NaN in the input image", "image contains NaN/Inf voxels", predict_run(_nan_input)),
    Bad("predict", "2 channels for a 1-channel model", "the model expects 1", predict_run(_two_channel_input)),
    Bad("predict", "input with spacing 0", "has a zero axis", predict_run(_zero_spacing_input)),
    Bad("predict", "input with an absurd declared size", "more than the memory budget", predict_run(_absurd_input)),
    Bad("predict", "DICOM series with a missing slice", "missing slices?", predict_run(_dicom_input)),
    Bad("predict", "model folder that is not a trained work directory", "plans file not found", _not_a_model),
    # evaluate
    Bad("evaluate", "prediction shape mismatch", "does not match the reference",
        evaluate_run(lambda p, g: _pred_label(p, lambda a: a[:, :, :6], np.uint8))),
    Bad("evaluate", "missing prediction", "no prediction for reference case(s) case_001",
        evaluate_run(lambda p, g: ((p / "case_001.nii.gz").unlink(), p)[1])),
    Bad("evaluate", "truncated prediction", "cannot read image",
        evaluate_run(lambda p, g: truncate_file(p / "case_000.nii.gz", 0.5))),
    Bad("evaluate", "fractional prediction values", "non-integer label values e.g. 0.5",
        evaluate_run(lambda p, g: _pred_label(p, lambda a: _set(a, 0.5)))),
    Bad("evaluate", "NaN in a reference label map", "NaN/Inf", evaluate_run(_ref_nan)),
    Bad("evaluate", "two predictions of one case", "appears twice", evaluate_run(_duplicate_pred)),
    Bad("evaluate", "reference folder with no label maps", "no reference label maps found",
        evaluate_run(lambda p, g: _ref_only_text(p, g)), ),
    # serve (the node configuration)
    Bad("serve", "node.json invalid JSON", "invalid JSON", serve_run(lambda t, fx: '{"port": 104,')),
    Bad("serve", "node.json a JSON list", "expected a JSON object, got list", serve_run(lambda t, fx: "[]")),
    Bad("serve", "node.json without allowed_calling_aets", "allowed_calling_aets",
        serve_run(lambda t, fx: _node(t, None, allowed_calling_aets=None))),
    Bad("serve", "node.json port not a number", "port", serve_run(lambda t, fx: _node(t, None, port="eleven"))),
    Bad("serve", "node.json with a misspelt field", "portt", serve_run(lambda t, fx: _node(t, None, portt=1))),
    Bad("serve", "node.json model_dir not a trained work directory", "not a trained work directory",
        serve_run(lambda t, fx: _node(t, None), named="model")),
    Bad("serve", "node.json destination without port or stow_url", "destination needs",
        serve_run(lambda t, fx: _node(t, None, destination={"ae_title": "PACS"}))),
]


def corpus_markdown() -> str:
    """The corpus as the markdown table of ``docs/robustness.md`` (with its count)."""
    lines = [f"{len(CORPUS)} bad inputs, each a test case of `tests/test_corpus.py::test_bad_input`.", "",
             "| # | command | input | exit | message contains |", "|---|---|---|---|---|"]
    for i, bad in enumerate(CORPUS, 1):
        message = f"`{bad.expect}`" if bad.expect else "(the file named, one line)"
        lines.append(f"| {i} | `{bad.command}` | {bad.input} | {bad.exit_code} | {message} |")
    return "\n".join(lines) + "\n"


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """``medseg ARGS`` through the real entry point in this process: (exit code, stderr)."""
    from medseg import cli

    monkeypatch.setattr(sys, "argv", ["medseg", *args])
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


@pytest.mark.parametrize("bad", CORPUS, ids=[b.id for b in CORPUS])
def test_bad_input(bad: Bad, tmp_path: Path, request: pytest.FixtureRequest, capsys, monkeypatch, caplog) -> None:
    t = tmp_path / "t"
    t.mkdir()
    run = bad.build(t, Fixtures(request))
    before = {str(w): listing(w) for w in run.watch}
    code, err = run_cli(run.args, capsys, monkeypatch)
    text = err + caplog.text
    assert code == bad.exit_code, text
    assert "Traceback" not in text
    assert any(str(run.named) in line and bad.expect in line for line in text.splitlines()), \
        f"one line must name {run.named} and say {bad.expect!r}: {text}"
    assert {str(w): listing(w) for w in run.watch} == before, "a failed command must write nothing"


def test_corpus_has_at_least_40_entries_and_every_command() -> None:
    assert len(CORPUS) >= 40
    assert {b.command for b in CORPUS} == {"check", "plan", "train", "predict", "evaluate", "serve"}
    assert len({b.id for b in CORPUS}) == len(CORPUS)


def test_docs_robustness_shows_the_corpus_table() -> None:
    doc = (REPO_ROOT / "docs" / "robustness.md").read_text()
    hint = "regenerate it: cd tests && python -c 'import test_corpus as t; print(t.corpus_markdown())'"
    assert corpus_markdown() in doc, hint


def _entry(text: str) -> Bad:
    return next(b for b in CORPUS if b.input == text)


@pytest.mark.parametrize("text", ["truncated .nii.gz image", "dataset.json a JSON list"])
def test_a_real_process_exits_2_without_traceback(text: str, tmp_path: Path) -> None:
    bad = _entry(text)
    run = bad.build(tmp_path, None)  # check entries need no fixture
    result = run_medseg(*run.args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert any(str(run.named) in ln and bad.expect in ln for ln in result.stderr.splitlines()), result.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    run = _entry("dataset.json a JSON list").build(tmp_path, None)
    result = run_medseg("--debug", *run.args)
    assert result.returncode != 0 and "Traceback" in result.stderr and "DatasetError" in result.stderr


# --- interruption: kill -9, then the same command again ------------------------------------------


def _start(*args: str | Path):
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, "-m", "medseg", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_when(proc, ready: Callable[[], bool], timeout: float = 120.0) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()``; False when it ended first."""
    import time

    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.002)
    if proc.poll() is not None:
        return False
    proc.kill()
    proc.wait()
    return True


def _visible(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def test_preprocessing_killed_then_rerun_equals_an_uninterrupted_run(tiny_model: Path, tmp_path: Path) -> None:
    reference = tiny_model / "preprocessed" / "3d_fullres"
    wd = tmp_path / "wd"
    shutil.copytree(tiny_model, wd, ignore=shutil.ignore_patterns("runs", "preprocessed"))
    out = wd / "preprocessed" / "3d_fullres"
    proc = _start("preprocess", wd, "--workers", "1")
    if not _kill_when(proc, lambda: out.is_dir() and any(out.glob("*.json"))):
        pytest.skip("preprocessing finished before it could be killed")
    finished = len([p for p in out.glob("*.json") if not p.name.startswith(".")])
    assert finished < len(list(reference.glob("*.json"))), "killed after the last case"
    assert run_medseg("preprocess", wd, "--workers", "1").returncode == 0
    assert _visible(out).keys() == _visible(reference).keys()
    for name, data in _visible(reference).items():
        if name.endswith(".npy"):
            np.testing.assert_array_equal(np.load(out / name), np.load(reference / name), err_msg=name)
        elif name.endswith(".json"):
            assert json.loads((out / name).read_text()) == json.loads(data), name


def test_evaluation_killed_then_rerun_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", n_cases=6, shape=(24, 24, 20))
    gt, pred = root / "labelsTr", tmp_path / "pred"
    shutil.copytree(gt, pred)
    for i, path in enumerate(sorted(pred.iterdir())):
        write_nifti(path, np.roll(_data(path), i % 3, axis=0))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_medseg("evaluate", pred, gt, "-o", whole, "--workers", "1").returncode == 0
    proc = _start("evaluate", pred, gt, "-o", killed, "--workers", "1")
    if not _kill_when(proc, lambda: killed.is_dir()):
        pytest.skip("evaluation finished before it could be killed")
    assert not (killed / "metrics.png").exists() or (killed / "summary.json").exists()  # written in order, whole
    assert run_medseg("evaluate", pred, gt, "-o", killed, "--workers", "1").returncode == 0
    assert _visible(killed).keys() == _visible(whole).keys() == {"metrics.csv", "summary.json", "metrics.png"}
    assert (killed / "metrics.csv").read_bytes() == (whole / "metrics.csv").read_bytes()
    assert json.loads((killed / "summary.json").read_text()) == json.loads((whole / "summary.json").read_text())


def test_plans_json_that_is_a_list_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "plans.json").write_text("[1, 2]")
    code, err = run_cli(["info", str(tmp_path)], capsys, monkeypatch)
    assert code == 2
    assert err.strip().splitlines() == [f"error: {tmp_path / 'plans.json'}: expected a JSON object, got list"]
