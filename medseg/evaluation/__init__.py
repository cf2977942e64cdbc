"""Evaluation: per-case metrics (Dice, IoU, HD95 in mm, volumes) and folder reports.

The metrics are numpy/scipy and import quickly; the report functions (pandas, matplotlib) are
imported on first use. Conventions: see :mod:`medseg.evaluation.metrics` and ``docs/evaluation.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medseg.evaluation.metrics import (
    case_metrics,
    confusion,
    dice,
    hd95,
    image_diagonal_mm,
    iou,
    surface_distances,
    volume_ml,
)

if TYPE_CHECKING:
    from medseg.evaluation.report import evaluate_folder, format_summary

__all__ = [
    "case_metrics",
    "confusion",
    "dice",
    "evaluate_folder",
    "format_summary",
    "hd95",
    "image_diagonal_mm",
    "iou",
    "surface_distances",
    "volume_ml",
]


def __getattr__(name: str):
    if name in ("evaluate_folder", "format_summary"):
        # deferred: the report's pandas and matplotlib take ~1 s CPU; the metrics alone import in 0.1 s
        from medseg.evaluation import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
