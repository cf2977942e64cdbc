"""What ``medseg predict --statistics`` and ``--preview`` add per case: the volume, voxel count and
intensity (mean/std per channel) of each predicted structure, and one PNG of three orthogonal slices
through the segmentation with the structures overlaid and named."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medseg.plotting import colormap, new_figure, save_figure


def structure_statistics(seg: np.ndarray, image: np.ndarray, spacing: Sequence[float], labels: Mapping[int, str],
                         channel_names: Sequence[str]) -> list[dict]:
    """One row per structure (label value ≠ 0 of ``labels``): ``label``, ``structure``, ``voxels``,
    ``volume_ml`` and ``mean_<channel>`` / ``std_<channel>`` of ``image`` (C, X, Y, Z) inside it
    (None when the structure is absent)."""
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=float))) / 1000.0
    rows = []
    for value, name in sorted(labels.items()):
        if value == 0:
            continue
        mask = seg == value
        n = int(mask.sum())
        row: dict = {"label": int(value), "structure": name, "voxels": n, "volume_ml": n * voxel_ml}
        for c, channel in enumerate(channel_names):
            values = image[c][mask].astype(np.float64)
            row[f"mean_{channel}"] = float(values.mean()) if n else None
            row[f"std_{channel}"] = float(values.std()) if n else None
        rows.append(row)
    return rows


def save_preview(path: Path, image: np.ndarray, seg: np.ndarray, spacing: Sequence[float],
                 labels: Mapping[int, str], title: str) -> None:
    """Three orthogonal slices of channel 0 through the centre of the segmentation (of the image when
    it is empty), each structure filled in its colour and named in the legend; aspect ratios follow
    the spacing."""
    fg = np.argwhere(seg > 0)
    centre = fg.mean(axis=0).round().astype(int) if len(fg) else np.asarray(seg.shape) // 2
    lo, hi = np.percentile(image[0], [0.5, 99.5])
    fig = new_figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 3)
    cmap = colormap("tab10")
    present = [(v, n) for v, n in sorted(labels.items()) if v != 0 and (seg == v).any()]
    for axis, ax in enumerate(axes):
        img2 = np.take(image[0], centre[axis], axis=axis).T
        seg2 = np.take(seg, centre[axis], axis=axis).T
        other = [s for a, s in enumerate(spacing) if a != axis]
        ax.imshow(img2, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=other[1] / other[0])
        for i, (value, _) in enumerate(present):
            overlay = np.ma.masked_where(seg2 != value, np.full(seg2.shape, i, dtype=float))
            ax.imshow(overlay, cmap=cmap, vmin=0, vmax=9, alpha=0.45, origin="lower", aspect=other[1] / other[0],
                      interpolation="nearest")
        ax.set_title(f"axis {axis}, slice {centre[axis]}", fontsize=8)
        ax.axis("off")
    from matplotlib.patches import Patch

    handles = [Patch(color=cmap(i), alpha=0.6, label=f"{value} {name}") for i, (value, name) in enumerate(present)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=90)
