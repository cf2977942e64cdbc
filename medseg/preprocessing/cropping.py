"""Crop to the nonzero region (the bounding box of voxels where any channel is nonzero)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) → boolean (X, Y, Z): any channel nonzero, holes filled."""
    mask = np.any(image != 0, axis=0)
    return ndimage.binary_fill_holes(mask)


def bbox_of(mask: np.ndarray) -> list[list[int]]:
    """[[start, stop), …] per axis of the True region; the whole array when the mask is empty."""
    if not mask.any():
        return [[0, s] for s in mask.shape]
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append([int(idx[0]), int(idx[-1]) + 1])
    return out


def crop(array: np.ndarray, bbox: list[list[int]]) -> np.ndarray:
    """Crop the trailing spatial axes of ``array`` to ``bbox``."""
    sl = tuple(slice(a, b) for a, b in bbox)
    return array[(Ellipsis, *sl)]
