"""Overlay pictures: for each case, the slice with the most reference foreground, the image in grey,
the reference outlined in green and the prediction in red/colour per class."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.io.image import read_image
from medseg.plotting import colormap, new_figure, save_figure


def _best_slice(ref: np.ndarray, pred: np.ndarray) -> tuple[int, int]:
    """(axis, index) of the slice with the most foreground, on the axis with the fewest slices."""
    axis = int(np.argmin(ref.shape))
    fg = (ref > 0) | (pred > 0)
    counts = fg.sum(axis=tuple(a for a in range(3) if a != axis))
    return axis, int(np.argmax(counts)) if counts.any() else ref.shape[axis] // 2


def save_overlays(cases: Sequence[tuple[str, Path, Path, Path]], path: Path, max_cases: int = 12) -> None:
    """``cases``: (case_id, image file, prediction file, reference file). Writes one PNG grid."""
    cases = list(cases)[:max_cases]
    if not cases:
        return
    cols = min(4, len(cases))
    rows = int(np.ceil(len(cases) / cols))
    fig = new_figure(figsize=(3.2 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    autumn = colormap("autumn")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (case_id, image_path, pred_path, ref_path) in zip(axes.ravel(), cases, strict=False):
        image = read_image(image_path)[0][0].astype(np.float32)
        pred = np.rint(read_image(pred_path)[0][0]).astype(int)
        ref = np.rint(read_image(ref_path)[0][0]).astype(int)
        axis, idx = _best_slice(ref, pred)
        img2, ref2, pred2 = (np.take(a, idx, axis=axis).T for a in (image, ref, pred))
        lo, hi = np.percentile(image, [0.5, 99.5])
        ax.imshow(img2, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        for k in sorted((set(np.unique(ref)) | set(np.unique(pred))) - {0}):
            if (ref2 == k).any():
                ax.contour(ref2 == k, levels=[0.5], colors="lime", linewidths=1.0)
            if (pred2 == k).any():
                ax.contour(pred2 == k, levels=[0.5], colors=[autumn(k / 4)], linewidths=1.0, linestyles="--")
        ax.set_title(f"{case_id} (axis {axis}, slice {idx})", fontsize=8)
    fig.suptitle("reference: green solid, prediction: dashed", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
