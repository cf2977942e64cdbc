"""Resampling to the target spacing.

Images: cubic (order 3); when the grid is anisotropic the out-of-plane axis (axis 0 after the
plan's transpose) is resampled separately with nearest neighbour, as nnU-Net does, so thick
slices are not smeared. Label maps: each label's mask is resampled linearly and thresholded at
0.5 (labels are assigned in increasing order), which never creates label values that were not there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from skimage.transform import resize

from medseg.plans.topology import is_anisotropic


def new_shape_for(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> list[int]:
    return [max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target, strict=True)]


def _resize_channel(x: np.ndarray, shape: Sequence[int], order: int, separate_axis0: bool) -> np.ndarray:
    if tuple(x.shape) == tuple(shape):
        return x.astype(np.float32, copy=False)
    kw = dict(mode="edge", anti_aliasing=False, preserve_range=True)
    if not separate_axis0:
        return resize(x.astype(np.float32, copy=False), shape, order=order, **kw).astype(np.float32, copy=False)
    if x.shape[0] == shape[0]:  # in-plane only: each slice straight into the output
        out = np.empty(shape, dtype=np.float32)
        for i, s in enumerate(x):
            out[i] = resize(s.astype(np.float32, copy=False), shape[1:], order=order, **kw)
        return out
    inplane = np.stack([resize(s.astype(np.float32, copy=False), shape[1:], order=order, **kw) for s in x])
    idx = np.clip(np.round((np.arange(shape[0]) + 0.5) * inplane.shape[0] / shape[0] - 0.5).astype(int),
                  0, inplane.shape[0] - 1)
    return inplane[idx].astype(np.float32, copy=False)


def _resample_channels(data: np.ndarray, shape: Sequence[int], order: int, separate_axis0: bool) -> np.ndarray:
    """Each channel of (C, *spatial) resampled straight into one new (C, *shape) float32 array (no list
    of per-channel results stacked afterwards)."""
    out = np.empty((data.shape[0], *shape), dtype=np.float32)
    for i, c in enumerate(data):
        out[i] = _resize_channel(c, shape, order, separate_axis0)
    return out


def resample_image(data: np.ndarray, spacing: Sequence[float], target: Sequence[float],
                   shape: Sequence[int] | None = None, order: int = 3) -> np.ndarray:
    """(C, *spatial) float → (C, *new) at ``target`` spacing (or to ``shape`` when given)."""
    shape = list(shape) if shape is not None else new_shape_for(data.shape[1:], spacing, target)
    separate = is_anisotropic(spacing) or is_anisotropic(target)
    return _resample_channels(data, shape, order, separate and len(shape) == 3)


def resample_labels(seg: np.ndarray, shape: Sequence[int], labels: Sequence[int],
                    anisotropic: bool = False) -> np.ndarray:
    """(*spatial) int → (*shape) int, without new label values."""
    if tuple(seg.shape) == tuple(shape):
        return seg
    out = np.zeros(shape, dtype=seg.dtype)
    for lab in sorted(labels):
        if lab == 0:
            continue
        mask = _resize_channel((seg == lab).astype(np.float32), shape, 1, anisotropic and len(shape) == 3)
        out[mask >= 0.5] = lab
    return out


def resample_probabilities(probs: np.ndarray, shape: Sequence[int], anisotropic: bool = False) -> np.ndarray:
    """(K, *spatial) → (K, *shape), linear (the predictor's export step)."""
    if tuple(probs.shape[1:]) == tuple(shape):
        return probs
    return _resample_channels(probs, shape, 1, anisotropic and len(shape) == 3)


def resampled_channels(probs: np.ndarray, shape: Sequence[int], anisotropic: bool = False) -> Iterator[np.ndarray]:
    """The channels of :func:`resample_probabilities` one at a time (float32 (*shape) each), so that a
    caller that pastes or reduces them never holds all K at once."""
    for p in probs:
        if tuple(p.shape) == tuple(shape):
            yield p
        else:
            yield _resize_channel(p, shape, 1, anisotropic and len(shape) == 3)


def resample_probabilities_argmax(probs: np.ndarray, shape: Sequence[int], anisotropic: bool = False) -> np.ndarray:
    """``np.argmax(resample_probabilities(probs, shape, anisotropic), axis=0)`` as uint8, one channel at
    a time: a running maximum (float32 (*shape)) and its index, the first channel winning ties as
    ``np.argmax`` does, so the labels are identical without the (K, *shape) array."""
    if tuple(probs.shape[1:]) == tuple(shape):  # nothing to resample: slab by slab, no running maximum
        index = np.empty(tuple(shape), dtype=np.uint8)
        for i in range(shape[0]):
            index[i] = probs[:, i].argmax(axis=0)
        return index
    best = index = None
    for k, p in enumerate(resampled_channels(probs, shape, anisotropic)):
        if best is None:
            best, index = np.array(p, dtype=np.float32, copy=True), np.zeros(p.shape, dtype=np.uint8)
            continue
        better = p > best
        index[better] = k
        np.maximum(best, p, out=best)
        del better
    return index
