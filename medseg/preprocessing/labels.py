"""Label values ↔ classes: files hold a dataset's label values, the network and the preprocessed
arrays hold class indices 0..K-1 (:func:`medseg.plans.schema.label_values` gives the order).

Sparse values ({0, 1, 255}, {0, 3, 7}) become consecutive classes when a case is preprocessed and
become values again wherever a segmentation is written; consecutive labels 0..K-1 are their own
classes, so their arrays do not change.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg.errors import DatasetError
from medseg.plans.schema import MAX_CLASSES


def check_class_count(values: Sequence[int], where: str) -> None:
    """A one-line :class:`DatasetError` naming ``where`` when there are more classes than int8 holds."""
    if len(values) > MAX_CLASSES:
        raise DatasetError(f"{where}: {len(values)} label values (background included); medseg stores label maps "
                           f"as int8 class indices and supports at most {MAX_CLASSES} classes")
    if values and min(values) < 0:
        raise DatasetError(f"{where}: negative label value {min(values)}; label values must be 0 or more")


def _is_identity(values: Sequence[int]) -> bool:
    return list(values) == list(range(len(values)))


def labels_to_classes(label: np.ndarray, values: Sequence[int], where: str, ignore: int | None = None) -> np.ndarray:
    """A label map in label values → the same map in class indices (int16; unchanged for consecutive
    labels 0..K-1). ``ignore``: the ignore label's value, which becomes class index K = len(values).
    A voxel whose value is not one of ``values`` (or ``ignore``) is a :class:`DatasetError` naming ``where``."""
    values = list(values)
    check_class_count(values, where)
    if ignore is not None:
        if ignore <= max(values):
            raise DatasetError(f"{where}: the ignore label {ignore} must be the highest label value "
                               f"(the others: {values})")
        return labels_to_classes(label, [*values, ignore], where)
    label = np.asarray(label)
    if label.dtype.kind not in "iub":
        as_int = label.astype(np.int64)
        if not np.array_equal(as_int, label):
            bad = label[as_int != label].flat[0]
            raise DatasetError(f"{where}: label value {bad!r} is not an integer")
        label = as_int
    if label.size == 0:
        return label.astype(np.int16)
    lo, hi = int(label.min()), int(label.max())
    if lo >= 0 and hi < len(values) and _is_identity(values):
        return label
    lut = np.full(max(hi, values[-1]) + 1, -1, dtype=np.int16)
    lut[values] = np.arange(len(values), dtype=np.int16)
    classes = lut[np.clip(label, 0, None)] if lo >= 0 else np.full(label.shape, -1, np.int16)
    if lo < 0 or (classes < 0).any():
        unknown = sorted(set(np.unique(label).tolist()) - set(values))
        raise DatasetError(f"{where}: label value(s) {unknown[:5]} not among the declared labels {values}")
    return classes


def label_dtype(values: Sequence[int]) -> np.dtype:
    """The smallest unsigned integer type that holds every label value (uint8 up to 255)."""
    return np.dtype(np.uint8) if max(values, default=0) <= 255 else np.dtype(np.min_scalar_type(max(values)))


def classes_to_labels(seg: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """A map of class indices 0..K-1 → the same map in label values (:func:`label_dtype`)."""
    seg = np.asarray(seg)
    lut = np.asarray(values, dtype=label_dtype(values))
    if _is_identity(values):
        return seg.astype(lut.dtype, copy=False)
    return lut[seg]
