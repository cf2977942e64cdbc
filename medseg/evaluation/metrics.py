"""Segmentation metrics on boolean masks and label maps (numpy/scipy; torch only for the
float32 percentile that makes HD95 identical to MONAI's).

Conventions (the same in ``docs/evaluation.md`` and in every report's header):

- **Confusion counts** ``(tp, fp, fn)`` are counted once per class and every overlap metric is derived
  from them: Dice ``= 2tp / (2tp + fp + fn)``, IoU ``= tp / (tp + fp + fn)``.
- **HD95** is in mm: the symmetric 95th-percentile Hausdorff distance between the two masks'
  surfaces, identical to MONAI's
  ``compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)``
  (``directed=False``). A mask's *surface* is the set of its voxels that a 1-connected binary erosion
  removes (``mask XOR erode(mask)``, with everything outside the array counted as background, so
  voxels on the array border are surface voxels). The distances run between voxel centres, scaled by
  ``spacing`` (mm per array axis). HD95 ``= max(p95(d(pred→ref)), p95(d(ref→pred)))``: the larger
  of the two *directed* 95th percentiles (linear interpolation), not the percentile of their union.
- **Empty masks.** Both empty: Dice, IoU and HD95 are NaN, and the value is excluded from the
  means over cases (reports count how many were excluded). Exactly one empty: Dice = IoU = 0;
  :func:`hd95` returns ``inf`` (the distance to an empty surface; MONAI 1.6 returns NaN here), and
  :func:`case_metrics` reports the image diagonal in mm instead (the field-of-view extent, larger
  than any distance inside the image) with ``hd95_penalized=True``, so that a missed or
  hallucinated structure enters the means as the worst possible value rather than dropping out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "case_metrics",
    "confusion",
    "dice",
    "hd95",
    "image_diagonal_mm",
    "iou",
    "surface_distances",
    "volume_ml",
]


def confusion(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
    """Voxel counts ``(tp, fp, fn)`` of a boolean prediction against a boolean reference.

    ``pred`` and ``ref`` have the same shape (any dimension); nonzero means foreground.
    """
    pred, ref = _as_masks(pred, ref)
    tp = int(np.count_nonzero(pred & ref))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(ref)) - tp


def dice(tp: int, fp: int, fn: int) -> float:
    """Dice ``2tp / (2tp + fp + fn)`` from confusion counts; NaN when both masks are empty."""
    denom = 2 * tp + fp + fn
    return 2.0 * tp / denom if denom else math.nan


def iou(tp: int, fp: int, fn: int) -> float:
    """IoU (Jaccard) ``tp / (tp + fp + fn)`` from confusion counts; NaN when both masks are empty."""
    denom = tp + fp + fn
    return tp / denom if denom else math.nan


def volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Volume of the nonzero voxels of ``mask`` in millilitres (``spacing`` in mm per array axis)."""
    mask = np.asarray(mask)
    _check_spacing(mask, spacing)
    return float(np.count_nonzero(mask)) * float(np.prod(np.asarray(spacing, dtype=float))) / 1000.0


def surface_distances(pred: np.ndarray, ref: np.ndarray,
                      spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of ``pred`` to the nearest surface voxel of ``ref``,
    and from each surface voxel of ``ref`` to the nearest of ``pred`` (float64, 1D each).

    Surfaces and distances as MONAI's ``get_edge_surface_distance(..., symmetric=True)``; see the
    module docstring. Both masks must be non-empty (callers handle the empty cases).
    """
    pred, ref = _as_masks(pred, ref)
    _check_spacing(pred, spacing)
    if not pred.any() or not ref.any():
        raise ValueError("surface_distances needs two non-empty masks")
    # Everything happens inside the bounding box of the union: surface voxels lie inside it, and
    # eroding with border_value=0 treats the box's outside as background, as the full array would.
    box = ndimage.find_objects((pred | ref).astype(np.uint8))[0]
    pred, ref = pred[box], ref[box]
    edge_pred = pred & ~ndimage.binary_erosion(pred, border_value=0)
    edge_ref = ref & ~ndimage.binary_erosion(ref, border_value=0)
    sampling = [float(s) for s in spacing]
    to_ref = ndimage.distance_transform_edt(~edge_ref, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~edge_pred, sampling=sampling)
    return to_ref[edge_pred], to_pred[edge_ref]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm between two boolean masks (2D or 3D).

    ``max(p95(d(pred→ref)), p95(d(ref→pred)))`` over surface voxels, ``spacing`` in mm per array
    axis. Agrees with MONAI's ``compute_hausdorff_distance(include_background=True, percentile=95,
    spacing=spacing)`` on every pair of non-empty masks (the percentile is taken in float32 with
    ``torch.quantile``, as in MONAI). Empty masks: NaN when both are empty, ``inf`` when exactly one
    is (MONAI 1.6 gives NaN there too, because ``torch.quantile`` interpolates ``inf - inf``).
    """
    pred, ref = _as_masks(pred, ref)
    _check_spacing(pred, spacing)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return math.nan
    if not has_pred or not has_ref:
        return math.inf
    d_pred, d_ref = surface_distances(pred, ref, spacing)
    return max(_percentile_95(d_pred), _percentile_95(d_ref))


def case_metrics(pred_labels: np.ndarray, ref_labels: np.ndarray, spacing: Sequence[float],
                 labels: Mapping[int, str]) -> list[dict]:
    """One row per foreground class of ``labels`` (key 0, the background, is skipped).

    ``pred_labels`` and ``ref_labels`` are integer label maps of the same shape ``(X, Y[, Z])``;
    ``spacing`` is in mm per array axis. Axes of length 1 are dropped before the surface distance,
    so a 2D image stored as ``(X, Y, 1)`` is measured in 2D (its contour, not its two faces).

    Each row: ``class_id, name, dice, iou, hd95_mm, hd95_penalized, vol_pred_ml, vol_ref_ml, tp, fp,
    fn``. Empty-mask rules as in the module docstring: both empty → dice/iou/hd95 NaN; exactly one
    empty → dice = iou = 0 and ``hd95_mm`` = the image diagonal in mm with ``hd95_penalized`` True.
    """
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} != reference shape {ref_labels.shape}")
    _check_spacing(ref_labels, spacing)
    keep = [i for i, n in enumerate(ref_labels.shape) if n > 1] or [0]
    squeeze = tuple(i for i in range(ref_labels.ndim) if i not in keep)
    pred_sq, ref_sq = pred_labels.squeeze(axis=squeeze), ref_labels.squeeze(axis=squeeze)
    spacing_sq = [float(spacing[i]) for i in keep]
    diagonal = image_diagonal_mm(ref_labels.shape, spacing)
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=float))) / 1000.0

    rows = []
    for class_id, name in sorted((int(k), str(v)) for k, v in labels.items()):
        if class_id == 0:
            continue
        pred, ref = pred_sq == class_id, ref_sq == class_id
        tp, fp, fn = confusion(pred, ref)
        distance = hd95(pred, ref, spacing_sq)
        penalized = math.isinf(distance)
        rows.append({
            "class_id": class_id,
            "name": name,
            "dice": dice(tp, fp, fn),
            "iou": iou(tp, fp, fn),
            "hd95_mm": diagonal if penalized else distance,
            "hd95_penalized": penalized,
            "vol_pred_ml": (tp + fp) * voxel_ml,
            "vol_ref_ml": (tp + fn) * voxel_ml,
            "tp": tp,
            "fp": fp,
            "fn": fn,
        })
    return rows


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The field-of-view diagonal ``sqrt(sum((shape * spacing)**2))`` in mm: the HD95 penalty when
    exactly one mask is empty. It exceeds every distance between two voxel centres of the image."""
    extent = np.asarray(shape, dtype=float) * np.asarray(spacing, dtype=float)
    return float(np.sqrt(np.sum(extent**2)))


def _percentile_95(distances: np.ndarray) -> float:
    """The 95th percentile (linear interpolation) in float32 with ``torch.quantile``, as MONAI does,
    so that results agree with MONAI bit for bit rather than to float32 rounding (~1e-6 relative).
    Beyond ``torch.quantile``'s 2**24-element limit, numpy in float64."""
    if distances.size > 2**24:
        return float(np.percentile(distances, 95))
    import torch  # deferred: numpy/scipy users of this module should not pay for importing torch

    return float(torch.quantile(torch.from_numpy(distances.astype(np.float32)), 0.95))


def _as_masks(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred).astype(bool, copy=False), np.asarray(ref).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    return pred, ref


def _check_spacing(array: np.ndarray, spacing: Sequence[float]) -> None:
    if len(spacing) != array.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {array.ndim}D array")
