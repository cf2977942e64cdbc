"""Figures written as PNG files: matplotlib's object API (no pyplot, so the library never changes
matplotlib's global backend or keeps figures alive), saved atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medseg.utils import atomic_path


def new_figure(**kwargs: Any) -> Figure:
    """A :class:`matplotlib.figure.Figure` with an Agg canvas (``kwargs``: figsize, layout, …)."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def colormap(name: str):
    """A registered matplotlib colormap by name (e.g. ``"autumn"``)."""
    return colormaps[name]


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> None:
    """Write ``fig`` as PNG to ``path`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
