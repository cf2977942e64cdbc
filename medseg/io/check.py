"""``medseg check``: find everything wrong with a dataset before planning or training on it.

Each problem is one line ``<file path>: <what is wrong>`` naming the offending file. Per case:
every image and the label file are readable (the readers refuse broken headers: zero-size or
memory-busting sizes, zero / implausible spacing, pixdim disagreeing with the affine, sheared
direction cosines); the label exists; every channel file and the label share one geometry (shape,
spacing, affine: :meth:`Geometry.matches`); the channel count equals the dataset's; label values are
integers from the declared label set; images hold no NaN/Inf; a plain folder's 4D file is not a
time series. Over the dataset: 2D images are not mixed with 3D ones, and some label file holds
foreground. Arrays are checked raw, as stored (labels are not rounded first).

Warnings (going on is right, but the user should know): a case whose label map is empty
(background only), and declared labels that occur in no label file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from medseg.errors import DatasetError
from medseg.io.dataset import Case, Dataset, read_label_file
from medseg.io.image import NIFTI_SUFFIXES, Geometry, image_suffix, read_image
from medseg.parallel import parallel_map
from medseg.utils import IGNORE_LABEL_NAME

logger = logging.getLogger(__name__)
_MAX_LISTED = 10  # values listed in one problem line
_TIME_UNITS = ("sec", "msec", "usec")


@dataclass
class CaseReport:
    """What checking one case found: problem lines, warning lines, the integer label values present
    and each readable image file's stored spatial dimensionality (2 or 3)."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    label_values: set[int] = field(default_factory=set)
    ndims: list[tuple[Path, int]] = field(default_factory=list)


def check_dataset(ds: Dataset, num_workers: int = 1, progress: bool = False,
                  executor: Executor | None = None, warnings: list[str] | None = None) -> list[str]:
    """Check every case of ``ds``; return the problem lines (empty when the dataset is clean).

    Cases run in ``num_workers`` processes when > 1 (in ``executor``'s when given); lines come in
    case order either way. ``progress`` shows a rich progress bar on stderr. Warning lines are
    logged and, when ``warnings`` is a list, appended to it.
    """
    check = partial(check_case_report, num_channels=ds.num_channels, labels=tuple(sorted(ds.labels)),
                    time_series=ds.layout == "plain")
    reports = parallel_map(check, ds.cases, num_workers=num_workers, description="checking cases",
                           progress=progress, executor=executor)
    problems = [line for r in reports for line in r.problems]
    found = [line for r in reports for line in r.warnings]
    problems.extend(_dimensionality_problems([nd for r in reports for nd in r.ndims]))
    present = set().union(*(r.label_values for r in reports)) if reports else set()
    readable = [r for r in reports if not r.problems]
    ignore = {v for v, name in ds.labels.items() if name.strip().lower() == IGNORE_LABEL_NAME}
    if readable and len(readable) == len(reports) and not present - {0} - ignore:
        problems.append(f"{ds.root / 'labelsTr'}: no label file holds any foreground (only background 0); "
                        "there is nothing to learn")
    elif not problems and (missing := sorted(set(ds.labels) - present - {0} - ignore)):
        shown = ", ".join(f"{v} ({ds.labels[v]})" for v in missing[:_MAX_LISTED])
        found.append(f"{ds.root / 'dataset.json' if ds.layout != 'plain' else ds.root}: declared label(s) "
                     f"{shown} occur in no label file")
    for line in found:
        logger.warning("warning: %s", line)
    if warnings is not None:
        warnings.extend(found)
    logger.debug("checked %d cases of %s: %d problem(s)", len(ds.cases), ds.root, len(problems))
    return problems


def check_case(case: Case, num_channels: int, labels: Iterable[int]) -> list[str]:
    """Problem lines for one case; ``labels`` are the declared label values."""
    return check_case_report(case, num_channels, labels).problems


def check_case_report(case: Case, num_channels: int, labels: Iterable[int], time_series: bool = False) -> CaseReport:
    """Everything :func:`check_dataset` needs from one case. ``time_series``: refuse a 4D file whose
    header declares a time axis (a plain folder, where the 4th axis would be taken as channels)."""
    report = CaseReport()
    problems = report.problems
    image_geometry, image_path = _check_images(case, num_channels, report, time_series)
    label_path = case.label
    if label_path is None or not label_path.is_file():
        where = label_path if label_path is not None else case.images[0]
        problems.append(f"{where}: label file missing" + ("" if label_path is not None else " (none listed)"))
        return report
    try:
        label, geometry = read_label_file(label_path, case.images)
    except DatasetError as exc:
        problems.append(str(exc))
        return report
    if label.shape[0] != 1:
        problems.append(f"{label_path}: label map has {label.shape[0]} channels; expected 1")
    if image_geometry is not None and (diff := image_geometry.matches(geometry)) is not None:
        problems.append(f"{label_path}: geometry differs from image {image_path.name}: {diff}")
    value_problems, report.label_values = _label_values(label, labels)
    problems.extend(f"{label_path}: {p}" for p in value_problems)
    if not value_problems and not report.label_values - {0}:
        report.warnings.append(f"{label_path}: label map is empty (background only); the case teaches only "
                               "background")
    return report


def _check_images(case: Case, num_channels: int, report: CaseReport,
                  time_series: bool) -> tuple[Geometry | None, Path]:
    """Check the channel files of a case; return the first readable file's geometry and path."""
    problems = report.problems
    reference: tuple[Geometry, Path] | None = None
    counts: list[int] = []
    for path in case.images:
        if time_series and (line := _time_series_problem(path)):
            problems.append(line)
            continue
        try:
            array, geometry = read_image(path)
        except DatasetError as exc:
            problems.append(str(exc))
            continue
        report.ndims.append((path, _stored_ndim(path)))
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


def _time_series_problem(path: Path) -> str | None:
    """A problem line when ``path`` is a 4D NIfTI whose header gives its 4th axis a time unit."""
    if image_suffix(path) not in NIFTI_SUFFIXES or not path.is_file():
        return None
    import nibabel as nib

    try:
        header = nib.load(str(path)).header
    except Exception:  # unreadable: read_image names the reason
        return None
    shape = header.get_data_shape()
    unit = header.get_xyzt_units()[1]
    if len(shape) == 4 and shape[3] > 1 and unit in _TIME_UNITS and float(header["pixdim"][4]) > 0:
        return (f"{path}: 4D time series ({shape[3]} frames, {float(header['pixdim'][4]):g} {unit} apart, by the "
                "header's time unit); a folder without dataset.json would take the frames as channels: give "
                "one frame per case, or declare the channels in a dataset.json")
    return None


def _stored_ndim(path: Path) -> int:
    """The spatial dimensionality the file stores (2 or 3), before readers add a singleton Z."""
    suffix = image_suffix(path)
    try:
        if suffix in NIFTI_SUFFIXES:
            import nibabel as nib

            return 2 if len(nib.load(str(path)).header.get_data_shape()) == 2 else 3
        if suffix:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            return 2 if reader.GetDimension() == 2 else 3
    except Exception:  # read_image already read it; stay with 3D
        return 3
    return 3  # DICOM series folders


def _dimensionality_problems(ndims: list[tuple[Path, int]]) -> list[str]:
    """One line per 2D file when the dataset's other files are 3D (the reverse is legal: 2D datasets)."""
    n3 = sum(1 for _, nd in ndims if nd == 3)
    if not n3 or n3 == len(ndims):
        return []
    return [f"{path}: 2D image in a dataset of 3D images ({n3} of {len(ndims)} files are 3D); it would be read "
            "as one slice of spacing 1 mm" for path, nd in ndims if nd == 2]


def _label_values(label: np.ndarray, declared: Iterable[int]) -> tuple[list[str], set[int]]:
    """What is wrong with the values of a raw label array (any dtype), and its integer values."""
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
    present = {int(v) for v in values}
    declared = sorted(int(v) for v in declared)
    undeclared = sorted(present - set(declared))
    if undeclared:
        shown = ", ".join(map(str, undeclared[:_MAX_LISTED]))
        shown += ", …" if len(undeclared) > _MAX_LISTED else ""
        problems.append(f"label values [{shown}] not declared in dataset.json labels {declared}")
    return problems, present


def _fmt_values(values: np.ndarray) -> str:
    """Each value as the shortest text that reads back as it in its own dtype (1.0000001, not 1)."""
    return ", ".join(np.format_float_positional(v, trim="-") for v in values)
