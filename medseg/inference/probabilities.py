"""Compact storage of softmax probabilities in the input's voxel grid (out-of-fold predictions).

One ``<case>.npz`` per case: float16 probabilities cropped to the box outside of which every
channel but the background is zero (the preprocessing crop), the box and the full shape. About
2 bytes per voxel and class inside the crop, compressed, and nothing outside it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.utils import atomic_write_bytes


def save_probabilities(path: Path, probs: np.ndarray, bbox: list[list[int]], *, qc_score: float | None = None) -> None:
    """``probs`` (K, X, Y, Z) in the input grid, background 1 outside ``bbox`` [[lo, hi], ...]."""
    inside = probs[(slice(None), *(slice(a, b) for a, b in bbox))]
    buf = io.BytesIO()
    np.savez_compressed(buf, probabilities=inside.astype(np.float16), bbox=np.asarray(bbox, np.int64),
                        shape=np.asarray(probs.shape, np.int64),
                        qc_score=np.float64(np.nan if qc_score is None else qc_score))
    atomic_write_bytes(path, buf.getvalue())


def load_probabilities(path: Path) -> np.ndarray:
    """(K, X, Y, Z) float32, as given to :func:`save_probabilities` (to float16 precision)."""
    try:
        with np.load(path) as f:
            inside, bbox, shape = f["probabilities"], f["bbox"], tuple(int(s) for s in f["shape"])
    except (OSError, ValueError, KeyError) as e:
        raise MedsegError(f"{path}: cannot read probabilities ({e})") from e
    out = np.zeros(shape, dtype=np.float32)
    out[0] = 1.0
    out[(slice(None), *(slice(int(a), int(b)) for a, b in bbox))] = inside
    return out


def load_qc_score(path: Path) -> float:
    with np.load(path) as f:
        return float(f["qc_score"])
