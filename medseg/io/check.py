"""``medseg check``: find everything wrong with a dataset before planning or training on it.

Each problem is one line ``<file path>: <what is wrong>`` naming the offending file. Per case:
every image and the label file are readable; the label exists; every channel file and the label
share one geometry (shape, spacing, affine: :meth:`Geometry.matches`); the channel count equals the
dataset's; label values are integers from the declared label set; images hold no NaN/Inf.
Arrays are checked raw, as stored (labels are not rounded first).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import Executor
from functools import partial
from pathlib import Path

import numpy as np

from medseg.errors import DatasetError
from medseg.io.dataset import Case, Dataset, read_label_file
from medseg.io.image import Geometry, read_image
from medseg.parallel import parallel_map

logger = logging.getLogger(__name__)
_MAX_LISTED = 10  # values listed in one problem line


def check_dataset(ds: Dataset, num_workers: int = 1, progress: bool = False,
                  executor: Executor | None = None) -> list[str]:
    """Check every case of ``ds``; return the problem lines (empty when the dataset is clean).

    Cases run in ``num_workers`` processes when > 1 (in ``executor``'s when given); lines come in
    case order either way. ``progress`` shows a rich progress bar on stderr.
    """
    check = partial(check_case, num_channels=ds.num_channels, labels=tuple(sorted(ds.labels)))
    problems = [line for lines in parallel_map(check, ds.cases, num_workers=num_workers, description="checking cases",
                                               progress=progress, executor=executor)
                for line in lines]
    logger.debug("checked %d cases of %s: %d problem(s)", len(ds.cases), ds.root, len(problems))
    return problems


def check_case(case: Case, num_channels: int, labels: Iterable[int]) -> list[str]:
    """Problem lines for one case; ``labels`` are the declared label values."""
    problems: list[str] = []
    image_geometry, image_path = _check_images(case, num_channels, problems)
    label_path = case.label
    if label_path is None or not label_path.is_file():
        where = label_path if label_path is not None else case.images[0]
        problems.append(f"{where}: label file missing" + ("" if label_path is not None else " (none listed)"))
        return problems
    try:
        label, geometry = read_label_file(label_path, case.images)
    except DatasetError as exc:
        problems.append(str(exc))
        return problems
    if label.shape[0] != 1:
        problems.append(f"{label_path}: label map has {label.shape[0]} channels; expected 1")
    if image_geometry is not None and (diff := image_geometry.matches(geometry)) is not None:
        problems.append(f"{label_path}: geometry differs from image {image_path.name}: {diff}")
    problems.extend(f"{label_path}: {p}" for p in _label_value_problems(label, labels))
    return problems


def _check_images(case: Case, num_channels: int, problems: list[str]) -> tuple[Geometry | None, Path]:
    """Check the channel files of a case; return the first readable file's geometry and path."""
    reference: tuple[Geometry, Path] | None = None
    counts: list[int] = []
    for path in case.images:
        try:
            array, geometry = read_image(path)
        except DatasetError as exc:
            problems.append(str(exc))
            continue
        counts.append(array.shape[0])
        if np.issubdtype(array.dtype, np.floating) and (bad := int(np.count_nonzero(~np.isfinite(array)))):
            problems.append(f"{path}: contains {bad} NaN/Inf voxels")
        if reference is None:
            reference = (geometry, path)
        elif (diff := reference[0].matches(geometry)) is not None:
            problems.append(f"{path}: geometry differs from channel file {reference[1].name}: {diff}")
        if len(case.images) > 1 and array.shape[0] != 1:
            problems.append(f"{path}: has {array.shape[0]} channels, expected 1 per channel file")
    if len(case.images) == 1 and counts and counts[0] != num_channels:
        problems.append(f"{case.images[0]}: has {counts[0]} channels, dataset declares {num_channels}")
    elif len(case.images) > 1 and len(case.images) != num_channels:
        problems.append(f"{case.images[0]}: case has {len(case.images)} channel files, "
                        f"dataset declares {num_channels}")
    return (reference[0], reference[1]) if reference else (None, case.images[0])


def _label_value_problems(label: np.ndarray, declared: Iterable[int]) -> list[str]:
    """What is wrong with the values of a raw label array (any dtype)."""
    problems = []
    values = np.unique(label)
    if np.issubdtype(values.dtype, np.floating):
        finite = np.isfinite(values)
        if not finite.all():
            problems.append(f"contains {int(np.count_nonzero(~np.isfinite(label)))} NaN/Inf voxels")
        values = values[finite]
        fractional = values[values != np.rint(values)]
        if fractional.size:
            problems.append(f"non-integer label values e.g. {_fmt_values(fractional[:3])}")
            values = values[values == np.rint(values)]
    declared = sorted(int(v) for v in declared)
    undeclared = sorted({int(v) for v in values} - set(declared))
    if undeclared:
        shown = ", ".join(map(str, undeclared[:_MAX_LISTED]))
        shown += ", …" if len(undeclared) > _MAX_LISTED else ""
        problems.append(f"label values [{shown}] not declared in dataset.json labels {declared}")
    return problems


def _fmt_values(values: np.ndarray) -> str:
    return ", ".join(f"{float(v):g}" for v in values)
