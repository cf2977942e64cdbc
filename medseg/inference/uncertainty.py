"""Uncertainty of a prediction: a per-voxel map and a per-case QC score.

- **Map**: normalised predictive entropy of the mean probabilities over all models (folds,
  configurations, mirrorings), ``H(p̄) / log K`` in [0, 1]. It is high where models disagree and
  where each model hesitates.
- **QC score** of one model's probabilities: the mean normalised entropy over the voxels it labels
  as foreground (1.0, the maximum, when it labels none: an empty prediction is suspect). A case's
  score is the mean over its models' scores. Averaging per-model scores, rather than scoring the
  averaged probabilities, keeps the score's scale independent of how many models are averaged, so
  a threshold calibrated on out-of-fold predictions (one model per case) applies to a five-fold
  ensemble.
- **Threshold**: a quantile of the out-of-fold scores (:data:`FLAG_QUANTILE`), chosen by
  ``medseg find-best`` and stored in ``model.json``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

FLAG_QUANTILE = 0.9  # flag the 10% most uncertain cases of the cross-validation


def entropy_map(probs: np.ndarray) -> np.ndarray:
    """(K, *S) probabilities → (*S) float32 entropy / log K."""
    k = probs.shape[0]
    p = np.clip(probs.astype(np.float32, copy=False), 1e-8, 1.0)
    h = -(p * np.log(p)).sum(axis=0)
    return (h / np.log(max(k, 2))).astype(np.float32)


def qc_score(probs: np.ndarray) -> float:
    """Mean normalised entropy inside the argmax foreground of one model's probabilities (K, *S)."""
    fg = probs.argmax(axis=0) > 0
    if not fg.any():
        return 1.0
    return float(entropy_map(probs)[fg].mean())


def calibrate_threshold(scores: Sequence[float], quantile: float = FLAG_QUANTILE) -> float:
    return float(np.quantile(np.asarray(scores, dtype=float), quantile))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    return float(pd.Series(a, dtype=float).rank().corr(pd.Series(b, dtype=float).rank()))
