"""Intensity normalisation per channel, as the plan says (see :class:`Normalization`)."""

from __future__ import annotations

import numpy as np

from medseg.plans.schema import Normalization


def normalize(data: np.ndarray, schemes: list[Normalization], mask: np.ndarray | None = None) -> np.ndarray:
    """(C, *spatial) → float32 (C, *spatial). ``mask``: the nonzero region, used when a scheme says so."""
    out = np.empty(data.shape, dtype=np.float32)
    for c, n in enumerate(schemes):
        x = data[c].astype(np.float32)
        if n.scheme == "ct":
            x = np.clip(x, n.lower, n.upper)
            out[c] = (x - n.mean) / max(n.std, 1e-8)
        elif n.scheme == "zscore":
            if n.use_mask and mask is not None and mask.any():
                vals = x[mask]
                out[c] = np.where(mask, (x - vals.mean()) / max(float(vals.std()), 1e-8), 0.0)
            else:
                out[c] = (x - x.mean()) / max(float(x.std()), 1e-8)
        else:
            out[c] = x
    return out
