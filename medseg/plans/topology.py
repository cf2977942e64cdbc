"""Topology rules: target spacing, axis order, pooling and kernel sizes for a patch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ANISOTROPY_RATIO = 3.0
MIN_FEATURE_MAP = 4


def target_spacing(spacings: np.ndarray) -> list[float]:
    """Median spacing per axis; when the coarsest axis is more than 3x coarser than every other
    axis, that axis takes the 10th percentile of its spacings instead (but never finer than the
    other axes), so that thick-slice outliers do not force a needlessly coarse grid."""
    target = np.median(spacings, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    if others and target[worst] > ANISOTROPY_RATIO * max(target[others]):
        target[worst] = max(float(np.percentile(spacings[:, worst], 10)), float(max(target[others])))
    return [float(s) for s in target]


def is_anisotropic(spacing: Sequence[float]) -> bool:
    s = sorted(spacing)
    return s[-1] > ANISOTROPY_RATIO * s[-2] if len(s) > 1 else False


def transpose_forward(spacing: Sequence[float]) -> list[int]:
    """The out-of-plane (coarsest) axis first, the others in their original order."""
    worst = int(np.argmax(spacing))
    return [worst] + [i for i in range(len(spacing)) if i != worst]


def pooling_plan(spacing: Sequence[float], patch: Sequence[int], max_stages: int = 7
                 ) -> tuple[list[list[int]], list[list[int]]]:
    """Strides and kernel sizes per stage for ``patch`` at ``spacing``.

    Rules: an axis is pooled (stride 2) while its feature map stays >= 4 after pooling and its
    current spacing is within 2x of the finest pooled-candidate spacing; a lone axis is pooled only
    while it is >= 12. An axis gets 3-kernels once its spacing is within 2x of the finest (and
    keeps them); the bottleneck always uses 3-kernels. Returns ``(strides, kernel_sizes)`` with one
    entry per stage, ``strides[0]`` all ones.
    """
    dim = len(spacing)
    cur_spacing = [float(s) for s in spacing]
    cur_size = [float(p) for p in patch]
    kernel = [1] * dim
    strides, kernels = [[1] * dim], []
    while len(strides) < max_stages:
        valid = [i for i in range(dim) if cur_size[i] >= 2 * MIN_FEATURE_MAP]
        if not valid:
            break
        finest = min(cur_spacing[i] for i in valid)
        valid = [i for i in valid if cur_spacing[i] / finest < 2]
        if len(valid) == 1 and cur_size[valid[0]] < 3 * MIN_FEATURE_MAP:
            break
        for d in range(dim):
            if cur_spacing[d] / min(cur_spacing) < 2:
                kernel[d] = 3
        stride = [1] * dim
        for v in valid:
            stride[v] = 2
            cur_spacing[v] *= 2
            cur_size[v] = np.ceil(cur_size[v] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dim)
    return strides, kernels


def divisibility(strides: Sequence[Sequence[int]]) -> list[int]:
    return [int(np.prod([s[d] for s in strides])) for d in range(len(strides[0]))]


def pad_to_multiple(patch: Sequence[int], multiple: Sequence[int]) -> list[int]:
    return [int(np.ceil(p / m) * m) for p, m in zip(patch, multiple, strict=True)]
