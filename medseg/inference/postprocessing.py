"""Postprocessing decided on cross-validation: keep the largest connected component.

``{"foreground": bool, "classes": [k, ...]}``: with ``foreground``, every foreground voxel outside
the largest connected component of the union of all foreground classes becomes background; then,
for each class in ``classes``, voxels of that class outside its own largest component become
background. Components are 26-connected in 3D (8 in 2D), as nnU-Net's.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a boolean mask (the mask itself when it has at most one)."""
    labelled, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == int(np.argmax(sizes))


def keep_largest_foreground(seg: np.ndarray) -> np.ndarray:
    fg = seg > 0
    out = seg.copy()
    out[fg & ~largest_component(fg)] = 0
    return out


def keep_largest_per_class(seg: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    out = seg.copy()
    for k in classes:
        mask = seg == k
        if mask.any():
            out[mask & ~largest_component(mask)] = 0
    return out


def apply_postprocessing(seg: np.ndarray, pp: dict | None) -> np.ndarray:
    if not pp:
        return seg
    if pp.get("foreground"):
        seg = keep_largest_foreground(seg)
    if pp.get("classes"):
        seg = keep_largest_per_class(seg, pp["classes"])
    return seg


def describe(pp: dict | None) -> str:
    if not pp or (not pp.get("foreground") and not pp.get("classes")):
        return "none"
    parts = (["largest foreground component"] if pp.get("foreground") else []) + (
        [f"largest component of class {', '.join(map(str, pp['classes']))}"] if pp.get("classes") else [])
    return " + ".join(parts)
