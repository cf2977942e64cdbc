"""Synthetic datasets and shared-data lookup for the tests (plain functions; ``conftest.py`` wraps them).

Import from a test module as ``from helpers import make_msd_dataset`` (pytest puts ``tests/`` on
``sys.path`` because ``tests/conftest.py`` lives there).

Every synthetic case is a 3D volume ``(X, Y, Z)`` with two spheres: label 1 (radius ~ a quarter of the
smallest extent) and label 2 (a smaller sphere elsewhere, drawn over label 1 where they overlap).
Image intensities are ``100 + 30 * [label 1] + 60 * [label 2] + N(0, 5)`` (float32), so a network
can learn the labels; channel ``c`` adds ``10 * c`` so that channels differ. Everything is seeded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
LABELS = {0: "background", 1: "a", 2: "b"}


def shared_data() -> Path | None:
    """The shared real-data folder (``$MEDSEG_SHARED_DATA``, else ``<repo>/../shared/data``), or None
    when it does not exist."""
    env = os.environ.get("MEDSEG_SHARED_DATA")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


def affine_for(spacing: Sequence[float], origin: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """A 4x4 axis-aligned affine with the given voxel spacing (mm) and origin."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = origin
    return affine


def write_nifti(path: str | Path, array: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                affine: np.ndarray | None = None) -> Path:
    """Write ``array`` ((X, Y, Z) or channels-last (X, Y, Z, C)) as NIfTI, keeping its dtype."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = affine_for(spacing) if affine is None else affine
    img = nib.Nifti1Image(array, affine)
    img.set_data_dtype(array.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def make_case(shape: Sequence[int] = (20, 24, 16), seed: int = 0, n_channels: int = 1,
              ) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case: image float32 ``(C, X, Y, Z)`` and label uint8 ``(X, Y, Z)`` with values 0/1/2."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    extents = [s for s in shape if s > 1] or [1]
    radius = max(1.5, min(extents) / 4)
    grid = np.indices(shape, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    for value, r in ((1, radius * rng.uniform(0.9, 1.2)), (2, radius * rng.uniform(0.6, 0.8))):
        centre = [rng.uniform(r, s - 1 - r) if s - 1 > 2 * r else (s - 1) / 2 for s in shape]
        dist2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
        label[dist2 <= r * r] = value
    base = 100.0 + 30.0 * (label == 1) + 60.0 * (label == 2)
    image = np.stack([base + 10.0 * c + rng.normal(0.0, 5.0, shape) for c in range(n_channels)])
    return image.astype(np.float32), label


def make_msd_dataset(root: str | Path, n_cases: int = 4, shape: Sequence[int] = (20, 24, 16),
                     spacing: Sequence[float] = (1.0, 1.0, 1.0), seed: int = 0,
                     modalities: Sequence[str] = ("MRI",)) -> Path:
    """An MSD-layout dataset in ``root`` (created): ``dataset.json`` (modality, labels 0/1/2,
    training list), ``imagesTr/case_XXX.nii.gz`` (4D channels-last when several modalities) and
    ``labelsTr/case_XXX.nii.gz``. Returns ``root``."""
    root = Path(root)
    training = []
    for i in range(n_cases):
        image, label = make_case(shape, seed=seed * 1000 + i, n_channels=len(modalities))
        name = f"case_{i:03d}.nii.gz"
        data = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
        write_nifti(root / "imagesTr" / name, data, spacing)
        write_nifti(root / "labelsTr" / name, label, spacing)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "imagesTs").mkdir(exist_ok=True)
    meta = {
        "name": "Synthetic",
        "description": "synthetic spheres for the medseg tests",
        "tensorImageSize": "3D" if len(modalities) == 1 else "4D",
        "modality": {str(i): m for i, m in enumerate(modalities)},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": n_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def make_nnunetv2_dataset(root: str | Path, n_cases: int = 4, shape: Sequence[int] = (20, 24, 16),
                          spacing: Sequence[float] = (1.0, 1.0, 1.0), seed: int = 0,
                          channel_names: Sequence[str] = ("T1", "T2")) -> Path:
    """An nnU-Net v2-layout dataset in ``root`` (created): ``dataset.json`` (channel_names, labels
    name→int 0/1/2, file_ending), ``imagesTr/case_XXX_000C.nii.gz`` per channel and
    ``labelsTr/case_XXX.nii.gz``. Returns ``root``."""
    root = Path(root)
    for i in range(n_cases):
        image, label = make_case(shape, seed=seed * 1000 + i, n_channels=len(channel_names))
        for c in range(image.shape[0]):
            write_nifti(root / "imagesTr" / f"case_{i:03d}_{c:04d}.nii.gz", image[c], spacing)
        write_nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", label, spacing)
    meta = {
        "channel_names": {str(i): n for i, n in enumerate(channel_names)},
        "labels": {v: k for k, v in LABELS.items()},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def run_medseg(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python -m medseg ARGS`` in a fresh process (repo on ``PYTHONPATH``); capture text output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "medseg", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def truncate_file(path: str | Path, fraction: float = 0.5) -> Path:
    """Cut ``path`` to ``fraction`` of its bytes (a corrupt download)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def listing(root: str | Path) -> list[str]:
    """Every path under ``root`` (relative, sorted), to assert that a command wrote nothing."""
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))
