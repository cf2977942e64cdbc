"""Evaluate a folder of predicted label maps against reference label maps and write a report.

``evaluate_folder`` writes, atomically, into ``out_dir``:

- ``metrics.csv``: one row per case x foreground class (the columns of
  :func:`medseg.evaluation.metrics.case_metrics`, plus ``case``);
- ``summary.json``: per class mean/median/std, ``n`` and ``n_excluded`` of Dice, IoU and HD95,
  the foreground mean over classes, the number of cases and the conventions as text;
- ``metrics.png``: box plots of Dice and HD95 per class, means as markers.

The library stays quiet: it logs through ``logging.getLogger(__name__)`` and shows a progress bar
only when asked (``progress=True``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from medseg.errors import DatasetError, MedsegError
from medseg.evaluation.metrics import case_metrics
from medseg.io.image import image_suffix, read_image
from medseg.parallel import parallel_map
from medseg.plans.schema import ignore_value
from medseg.plotting import new_figure
from medseg.utils import atomic_path, atomic_write_text

__all__ = ["COLUMNS", "CONVENTIONS", "evaluate_folder", "format_summary"]

log = logging.getLogger(__name__)

COLUMNS = ["case", "class_id", "name", "dice", "iou", "hd95_mm", "hd95_penalized",
           "vol_pred_ml", "vol_ref_ml", "tp", "fp", "fn"]

CONVENTIONS = (
    "Per case and foreground class, confusion counts (TP, FP, FN) are taken once; "
    "Dice = 2TP/(2TP+FP+FN), IoU = TP/(TP+FP+FN). "
    "HD95 in mm = max of the two directed 95th percentiles (linear interpolation) of the distances "
    "between surface voxels (surface = mask XOR its 1-connected erosion, outside the image counted as "
    "background; voxel centres scaled by the reference spacing), identical to MONAI "
    "compute_hausdorff_distance(include_background=True, percentile=95, spacing=...). "
    "Both masks empty: Dice, IoU and HD95 are NaN and excluded from the means (counted in n_excluded). "
    "Exactly one empty: Dice = IoU = 0 and HD95 = the image diagonal in mm (hd95_penalized, counted "
    "in n_penalized), both included in the means. "
    "std is the population standard deviation (ddof=0); foreground_mean is the mean over classes of "
    "the per-class means. "
    "A label named 'ignore' (unannotated voxels) is no class: reference voxels holding it count for "
    "no metric (the prediction there is masked out)."
)


def evaluate_folder(pred_dir: Path, ref_dir: Path, out_dir: Path, labels: Mapping[int, str] | None = None,
                    num_workers: int = 1, progress: bool = False) -> dict:
    """Compare every reference label map in ``ref_dir`` with the prediction of the same case name.

    Files pair by case name (the file name without its image suffix, any suffix ``image_suffix``
    knows). Label maps are channel 0 of the file, rounded to integers; spacing comes from the
    reference. ``labels`` maps class ids to names (0, the background, is skipped); when None the
    classes are the nonzero values found in the references, named ``label_<id>``.

    Raises :class:`DatasetError` when a reference case has no prediction or a pair's shapes differ.
    A prediction without a reference is ignored with a logged warning. Writes ``metrics.csv``,
    ``summary.json`` and ``metrics.png`` into ``out_dir`` and returns the summary (as in the JSON).
    """
    pred_dir, ref_dir, out_dir = Path(pred_dir), Path(ref_dir), Path(out_dir)
    if num_workers < 1:
        raise MedsegError(f"num_workers must be >= 1, got {num_workers}")
    refs = _index_folder(ref_dir, "reference")
    if not refs:
        raise DatasetError(f"{ref_dir}: no reference label maps found")
    preds = _index_folder(pred_dir, "prediction")
    missing = [case for case in refs if case not in preds]
    if missing:
        shown = ", ".join(missing[:5]) + (f" … ({len(missing)} in all)" if len(missing) > 5 else "")
        raise DatasetError(f"{pred_dir}: no prediction for reference case(s) {shown}")
    for case in sorted(set(preds) - set(refs)):
        log.warning("%s: no reference for this prediction in %s; ignored", preds[case], ref_dir)

    ignore = None if labels is None else ignore_value({int(k): str(v) for k, v in labels.items()})
    wanted = None if labels is None else {int(k): str(v) for k, v in labels.items() if int(k) not in (0, ignore)}
    if wanted is not None and not wanted:
        raise MedsegError(f"labels {dict(labels)} name no foreground class (only 0, the background)")
    jobs = [(case, preds[case], refs[case], wanted, ignore) for case in sorted(refs)]
    results = parallel_map(_evaluate_job, jobs, num_workers=num_workers, description="evaluating", progress=progress)

    if wanted is None:
        found = sorted(set().union(*(values for _, values in results)))
        wanted = {k: f"label_{k}" for k in found}
        if not wanted:
            log.warning("%s: the references contain no foreground label; the report is empty", ref_dir)
    rows = []
    for (case, *_), (case_rows, _) in zip(jobs, results, strict=True):
        by_class = {row["class_id"]: row for row in case_rows}
        for class_id, name in sorted(wanted.items()):
            row = by_class.get(class_id) or _absent_row(class_id, name)
            rows.append({"case": case, **row, "name": name})
    frame = pd.DataFrame(rows, columns=COLUMNS)
    summary = _summarize(frame, wanted, len(refs))

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "metrics.csv") as tmp:
        frame.to_csv(tmp, index=False, na_rep="NaN")
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    with atomic_path(out_dir / "metrics.png") as tmp:
        _plot(frame, wanted, len(refs), tmp)
    log.info("evaluated %d cases x %d classes into %s", len(refs), len(wanted), out_dir)
    return summary


def format_summary(summary: dict) -> str:
    """A few human lines: per class Dice and HD95, then the foreground mean."""
    lines = [f"Evaluation of {summary['n_cases']} cases (both masks empty: excluded; "
             "one empty: Dice 0, HD95 = image diagonal)"]
    for class_id, entry in summary["classes"].items():
        d, h = entry["dice"], entry["hd95_mm"]
        lines.append(
            f"  {class_id} {entry['name']}: Dice {_num(d['mean'], '.3f')} ± {_num(d['std'], '.3f')} "
            f"(n={d['n']}, {d['n_excluded']} excluded)  HD95 {_num(h['mean'], '.2f')} mm "
            f"(median {_num(h['median'], '.2f')}, {h['n_penalized']} penalized)")
    fg = summary["foreground_mean"]
    lines.append(f"  foreground mean: Dice {_num(fg['dice'], '.3f')}  HD95 {_num(fg['hd95_mm'], '.2f')} mm")
    return "\n".join(lines)


def _index_folder(folder: Path, role: str) -> dict[str, Path]:
    """Case name → file for every image file directly in ``folder`` (hidden files skipped)."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: {role} folder not found")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = image_suffix(path)
        if not suffix or path.name.startswith(".") or not path.is_file():
            continue
        case = path.name[: -len(suffix)]
        if case in found:
            raise DatasetError(f"{folder}: case '{case}' appears twice ({found[case].name}, {path.name}); "
                               "keep one file per case")
        found[case] = path
    return found


def _evaluate_job(job: tuple) -> tuple[list[dict], set[int]]:
    return _evaluate_pair(*job)


def _evaluate_pair(case: str, pred_path: Path, ref_path: Path,
                   labels: dict[int, str] | None, ignore: int | None = None) -> tuple[list[dict], set[int]]:
    """Rows of ``case_metrics`` for one case and the set of nonzero values in its reference
    (``ignore``: the ignore label's value, whose voxels count for nothing).

    With ``labels`` None, the rows cover every nonzero value of the reference or the prediction
    (the caller keeps those found in some reference and fills in the rest).
    """
    ref, ref_geometry = _read_labels(ref_path)
    pred, pred_geometry = _read_labels(pred_path)
    if pred.shape != ref.shape:
        raise DatasetError(f"{pred_path}: prediction shape {pred.shape} does not match the reference "
                           f"{ref_path.name} shape {ref.shape}")
    differs = ref_geometry.matches(pred_geometry)
    if differs:
        log.warning("%s: geometry differs from the reference %s (%s); using the reference spacing",
                    pred_path, ref_path.name, differs)
    ref_values = {int(v) for v in np.unique(ref) if v not in (0, ignore)}
    if labels is None:
        values = ref_values | {int(v) for v in np.unique(pred) if v != 0}
        labels = {v: f"label_{v}" for v in values}
    return case_metrics(pred, ref, ref_geometry.spacing, labels, ignore), ref_values


def _read_labels(path: Path):
    array, geometry = read_image(path)
    if array.shape[0] > 1:
        log.warning("%s: %d channels; using channel 0 as the label map", path, array.shape[0])
    labels = array[0]
    if not np.issubdtype(labels.dtype, np.integer):
        if bad := int(np.count_nonzero(~np.isfinite(labels))):
            raise DatasetError(f"{path}: label map contains {bad} NaN/Inf voxels")
        fractional = np.unique(labels[labels != np.rint(labels)])
        if fractional.size:
            shown = ", ".join(np.format_float_positional(v, trim="-") for v in fractional[:3])
            raise DatasetError(f"{path}: non-integer label values e.g. {shown}; a label map holds class numbers")
        labels = np.rint(labels).astype(np.int32)
    return labels, geometry


def _absent_row(class_id: int, name: str) -> dict:
    """The row ``case_metrics`` gives for a class absent from both masks."""
    return {"class_id": class_id, "name": name, "dice": math.nan, "iou": math.nan, "hd95_mm": math.nan,
            "hd95_penalized": False, "vol_pred_ml": 0.0, "vol_ref_ml": 0.0, "tp": 0, "fp": 0, "fn": 0}


def _summarize(frame: pd.DataFrame, labels: dict[int, str], n_cases: int) -> dict:
    classes = {}
    for class_id, name in sorted(labels.items()):
        rows = frame[frame["class_id"] == class_id]
        entry: dict = {"name": name}
        for metric in ("dice", "iou", "hd95_mm"):
            entry[metric] = _stats(rows[metric].to_numpy(dtype=float))
        entry["hd95_mm"]["n_penalized"] = int(rows["hd95_penalized"].sum())
        classes[str(class_id)] = entry

    def over_classes(metric: str) -> float | None:
        means = [c[metric]["mean"] for c in classes.values() if c[metric]["mean"] is not None]
        return float(np.mean(means)) if means else None

    return {
        "n_cases": n_cases,
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "classes": classes,
        "foreground_mean": {"dice": over_classes("dice"), "hd95_mm": over_classes("hd95_mm")},
        "conventions": CONVENTIONS,
    }


def _stats(values: np.ndarray) -> dict:
    kept = values[~np.isnan(values)]
    if kept.size == 0:
        return {"mean": None, "median": None, "std": None, "n": 0, "n_excluded": int(values.size)}
    return {"mean": float(np.mean(kept)), "median": float(np.median(kept)), "std": float(np.std(kept)),
            "n": int(kept.size), "n_excluded": int(values.size - kept.size)}


def _plot(frame: pd.DataFrame, labels: dict[int, str], n_cases: int, path: Path) -> None:
    ids = sorted(labels)
    fig = new_figure(figsize=(max(6.0, 2.0 + 1.6 * len(ids)), 4.0), layout="constrained")
    for ax, metric, title in zip(fig.subplots(1, 2), ("dice", "hd95_mm"), ("Dice", "HD95 (mm)"), strict=True):
        data = [frame.loc[frame["class_id"] == k, metric].dropna().to_numpy(dtype=float) for k in ids]
        if ids:
            ax.boxplot(data, showmeans=True,
                       meanprops={"marker": "D", "markerfacecolor": "tab:red", "markeredgecolor": "tab:red"})
            ax.set_xticks(range(1, len(ids) + 1), [f"{k} {labels[k]}" for k in ids], rotation=30, ha="right")
        ax.set_title(f"{title}, {n_cases} cases", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.supxlabel("diamonds: means; both masks empty: left out; one empty: Dice 0, HD95 = image diagonal",
                  fontsize=8)
    fig.savefig(path, format="png", dpi=100)


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)
