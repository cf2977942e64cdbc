"""``medseg find-best``: choose the model on out-of-fold predictions.

1. **Candidates**: every configuration whose cross-validation folds are all trained, and every
   pair of them (softmax average). Each is evaluated on every case, predicted by the fold that did
   not train on it: Dice and HD95 per class (:func:`~medseg.evaluation.metrics.case_metrics`).
2. **Choice**: the highest foreground-mean Dice, rounded to :data:`DICE_DECIMALS` decimals; ties go
   to the simpler candidate (fewer members, then the order of ``plans.json``).
3. **Postprocessing** on the chosen candidate's predictions (nnU-Net's rule): keeping the largest
   connected component of all foreground is accepted when the foreground-mean Dice improves and no
   class gets worse; then, per class, keeping that class's largest component is accepted when the
   class's Dice improves (other classes cannot change).
4. **QC**: each case's score (:mod:`medseg.inference.uncertainty`) against its Dice after
   postprocessing: Spearman correlation, the threshold (a quantile of the scores) and how many of
   the worst-Dice decile it flags.
5. **Mirroring** at prediction time: the chosen candidate's foreground Dice on the out-of-fold
   predictions without mirroring (saved by each fold's validation: the unmirrored pass is one of the
   eight) against with it; mirroring is turned off when the difference is within
   :data:`MIRRORING_TOLERANCE` (it multiplies the network passes by 8). The figures go to
   ``model.json`` (``inference``).
6. **Backend** (opt-in, ``--try-backends``): each fold of the chosen model's members re-predicts its
   validation cases with each faster CPU backend (:mod:`medseg.inference.backends`; all members the
   same backend, the chosen mirroring); the first of :data:`BACKEND_PREFERENCE` whose foreground
   Dice is within the same tolerance of torch's is chosen (:func:`decide_backend`), else torch.

Outputs: ``model.json`` and ``find_best/`` (``candidates.csv``, ``candidates.png``, ``cases.csv``,
``postprocessing.json``, ``qc.csv``, ``qc.png``, ``report.md``).
"""

from __future__ import annotations

import itertools
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medseg.errors import MedsegError
from medseg.evaluation.metrics import case_metrics, confusion, dice
from medseg.inference.postprocessing import describe, keep_largest_foreground, keep_largest_per_class
from medseg.inference.probabilities import load_probabilities, load_qc_score
from medseg.inference.uncertainty import FLAG_QUANTILE, calibrate_threshold, spearman
from medseg.io.dataset import load_dataset, read_case_label
from medseg.parallel import parallel_map
from medseg.plans.schema import (
    ChosenModel,
    InferenceChoice,
    Plans,
    Postprocessing,
    QualityControl,
    ignore_value,
    label_values,
)
from medseg.plotting import new_figure, save_figure
from medseg.preprocessing.labels import classes_to_labels
from medseg.training.splits import cv_folds, fold_case_ids
from medseg.utils import atomic_path, atomic_write_json, atomic_write_text
from medseg.workdir import WorkDir

log = logging.getLogger(__name__)
DICE_DECIMALS = 4
MIRRORING_TOLERANCE = 0.005  # foreground Dice a prediction may lose without mirroring (8x fewer passes)
BACKEND_PREFERENCE = ("openvino", "onnxruntime")  # fastest first; the forward pass's CPU backends that pay

Candidate = tuple[str, ...]


class OutOfFold:
    """Out-of-fold predictions of a work directory (each fold's ``val/<case>.npz``) and the
    dataset's reference labels. Picklable (paths only), so cases can be evaluated in worker processes."""

    def __init__(self, workdir: Path | WorkDir, plans: Plans, keys: Sequence[str]) -> None:
        work = WorkDir.of(workdir)
        self.workdir = work.root
        ds = load_dataset(work.dataset_path())
        self.cases = {c.case_id: c for c in ds.cases}
        self.paths: dict[str, dict[str, Path]] = {}
        self.unmirrored_paths: dict[str, dict[str, Path]] = {}
        self.folds: dict[str, list[int]] = {}
        for key in keys:
            config = plans.config(key)
            self.folds[key] = cv_folds(work, plans, config)
            paths, plain = {}, {}
            for fold in self.folds[key]:
                run = work.run(config.key, fold)
                for cid in fold_case_ids(work, plans, config, fold)[1]:
                    paths[cid] = run.val_prediction(cid, ".npz")
                    plain[cid] = run.val_no_mirroring / f"{cid}.npz"
            self.paths[key], self.unmirrored_paths[key] = paths, plain

    @classmethod
    def complete_keys(cls, workdir: Path | WorkDir, plans: Plans) -> tuple[list[str], list[str]]:
        """(configurations with every fold's out-of-fold predictions, lines on those without)."""
        work = WorkDir.of(workdir)
        ok, missing = [], []
        for key, config in plans.configurations.items():
            if not work.runs(key).exists():
                continue
            try:
                folds = cv_folds(work, plans, config)
            except MedsegError:
                continue
            lacking = [f for f in folds if not all(work.run(key, f).val_prediction(c, ".npz").exists()
                                                    for c in fold_case_ids(work, plans, config, f)[1])]
            (missing if lacking else ok).append(key if not lacking else f"{key}: folds {lacking} not finished")
        return ok, missing

    @property
    def case_ids(self) -> list[str]:
        return sorted(set.intersection(*(set(p) for p in self.paths.values())))

    def probabilities(self, key: str, case_id: str) -> np.ndarray:
        return load_probabilities(self.paths[key][case_id])

    def unmirrored_path(self, key: str, case_id: str) -> Path:
        return self.unmirrored_paths[key][case_id]

    def unmirrored(self, keys: Sequence[str]) -> Unmirrored | None:
        """The same out-of-fold cases predicted without mirroring, when every fold of ``keys`` has them."""
        if all(self.unmirrored_path(k, c).exists() for k in keys for c in self.case_ids):
            return Unmirrored(self)
        return None

    def qc_score(self, key: str, case_id: str) -> float:
        return load_qc_score(self.paths[key][case_id])

    def reference(self, case_id: str) -> tuple[np.ndarray, Sequence[float]]:
        array, geometry = read_case_label(self.cases[case_id])
        return array, geometry.spacing


class Unmirrored:
    """An :class:`OutOfFold` seen through its predictions without mirroring (``val_no_mirroring/``)."""

    def __init__(self, source: OutOfFold) -> None:
        self.source = source
        self.case_ids = source.case_ids

    def probabilities(self, key: str, case_id: str) -> np.ndarray:
        return load_probabilities(self.source.unmirrored_path(key, case_id))

    def reference(self, case_id: str) -> tuple[np.ndarray, Sequence[float]]:
        return self.source.reference(case_id)


def candidates_of(keys: Sequence[str]) -> list[Candidate]:
    """Each configuration alone, then every pair."""
    return [(k,) for k in keys] + list(itertools.combinations(keys, 2))


def name_of(candidate: Candidate) -> str:
    return " + ".join(candidate)


def _segment(source, candidate: Candidate, case_id: str, cache: dict, values: Sequence[int]) -> np.ndarray:
    """The candidate's label map of a case, in the dataset's label ``values`` (class k → values[k])."""
    probs = [cache.setdefault(k, source.probabilities(k, case_id)) for k in candidate]
    return classes_to_labels(np.mean(probs, axis=0).argmax(axis=0), values)


def _foreground(labels: Mapping[int, str]) -> list[int]:
    """The foreground classes of ``labels``: neither the background nor the ignore label."""
    return [k for k in sorted(labels) if k not in (0, ignore_value(labels))]


def _evaluate_case(args: tuple) -> list[dict]:
    source, case_id, candidates, labels = args
    ref, spacing = source.reference(case_id)
    cache: dict = {}
    rows = []
    values = label_values(labels)
    for cand in candidates:
        seg = _segment(source, cand, case_id, cache, values)
        if seg.shape != ref.shape:
            raise MedsegError(f"case {case_id}: out-of-fold prediction of {name_of(cand)} has shape {seg.shape}, "
                              f"the reference {ref.shape}")
        for row in case_metrics(seg, ref, spacing, labels, ignore_value(labels)):
            rows.append({"candidate": name_of(cand), "case": case_id, **row})
    return rows


def _postprocessing_case(args: tuple) -> dict:
    """Per-class Dice of one case under each postprocessing option of ``candidate``."""
    source, case_id, candidate, classes, ignore = args
    ref, _ = source.reference(case_id)
    base = _segment(source, candidate, case_id, {}, label_values(classes))
    fg = keep_largest_foreground(base)
    annotated = True if ignore is None else ref != ignore  # unannotated voxels count for nothing
    out: dict = {"case": case_id}
    for k in classes:
        r = ref == k
        out[f"none_{k}"] = dice(*confusion((base == k) & annotated, r))
        out[f"fg_{k}"] = dice(*confusion((fg == k) & annotated, r))
        out[f"cls_{k}"] = dice(*confusion((keep_largest_per_class(base, [k]) == k) & annotated, r))
        out[f"fgcls_{k}"] = dice(*confusion((keep_largest_per_class(fg, [k]) == k) & annotated, r))
    return out


def summarize_candidates(frame: pd.DataFrame, candidates: Sequence[Candidate],
                         labels: Mapping[int, str]) -> pd.DataFrame:
    """One row per candidate: mean Dice and HD95 per class over cases (both-empty cases left out),
    and their means over classes."""
    rows = []
    classes = _foreground(labels)
    for order, cand in enumerate(candidates):
        sub = frame[frame["candidate"] == name_of(cand)]
        row: dict = {"candidate": name_of(cand), "members": len(cand), "order": order}
        for k in classes:
            c = sub[sub["class_id"] == k]
            row[f"dice_{labels[k]}"] = float(np.nanmean(c["dice"])) if c["dice"].notna().any() else math.nan
            row[f"hd95_{labels[k]}"] = float(np.nanmean(c["hd95_mm"])) if c["hd95_mm"].notna().any() else math.nan
        row["dice_fg"] = float(np.nanmean([row[f"dice_{labels[k]}"] for k in classes]))
        row["hd95_fg"] = float(np.nanmean([row[f"hd95_{labels[k]}"] for k in classes]))
        rows.append(row)
    return pd.DataFrame(rows)


def choose(table: pd.DataFrame) -> str:
    """The best foreground-mean Dice (rounded); ties to fewer members, then the earlier configuration."""
    ranked = table.assign(_d=-table["dice_fg"].round(DICE_DECIMALS)).sort_values(["_d", "members", "order"])
    return str(ranked.iloc[0]["candidate"])


def decide_postprocessing(per_case: pd.DataFrame, classes: Sequence[int]) -> tuple[Postprocessing, dict]:
    """nnU-Net's rule on per-case Dice columns ``none_k, fg_k, cls_k, fgcls_k`` (see module docstring).
    Returns the decision and the mean per-class Dice before/after each step."""
    mean = {c: float(np.nanmean(per_case[c])) if per_case[c].notna().any() else math.nan
            for c in per_case.columns if c != "case"}
    before = {k: mean[f"none_{k}"] for k in classes}
    with_fg = {k: mean[f"fg_{k}"] for k in classes}
    gain = np.nanmean(list(with_fg.values())) - np.nanmean(list(before.values()))
    use_fg = bool(gain > 0 and all(not (with_fg[k] < before[k]) for k in classes))
    base = with_fg if use_fg else before
    prefix = "fgcls" if use_fg else "cls"
    per_class = [k for k in classes if mean[f"{prefix}_{k}"] > base[k]]
    after = {k: (mean[f"{prefix}_{k}"] if k in per_class else base[k]) for k in classes}
    figures = {"dice_before": before, "dice_with_largest_foreground": with_fg,
               "dice_with_largest_per_class": {k: mean[f"{prefix}_{k}"] for k in classes},
               "dice_after": after, "foreground_gain": float(gain)}
    return Postprocessing(foreground=use_fg, classes=per_class), figures


def qc_figures(scores: Sequence[float], case_dice: Sequence[float],
               quantile: float = FLAG_QUANTILE) -> tuple[float, float, int, int]:
    """(threshold, Spearman(score, Dice), worst-decile cases flagged, worst-decile size)."""
    scores, case_dice = np.asarray(scores, float), np.asarray(case_dice, float)
    threshold = calibrate_threshold(scores, quantile)
    n_worst = max(1, int(round(len(case_dice) * (1 - quantile))))
    worst = np.argsort(case_dice, kind="stable")[:n_worst]
    return threshold, spearman(scores, case_dice), int((scores[worst] > threshold).sum()), n_worst


@dataclass
class Selection:
    """What :func:`select_model` found: the candidate table, the choice, its postprocessing and QC."""

    table: pd.DataFrame
    cases: pd.DataFrame
    best: Candidate
    postprocessing: Postprocessing
    pp_figures: dict
    qc: pd.DataFrame
    threshold: float
    spearman: float
    flagged_worst: int
    n_worst: int


def select_model(source, keys: Sequence[str], labels: Mapping[int, str], *, num_workers: int = 1,
                 progress: bool = False) -> Selection:
    """Steps 1-4 of the module docstring on any out-of-fold ``source`` (:class:`OutOfFold` or an
    object with the same ``case_ids``, ``probabilities``, ``qc_score`` and ``reference``)."""
    cases = source.case_ids
    labels = {int(k): v for k, v in labels.items()}
    classes = _foreground(labels)
    candidates = candidates_of(keys)
    rows = parallel_map(_evaluate_case, [(source, c, candidates, labels) for c in cases], num_workers=num_workers,
                        description=f"evaluate {len(candidates)} candidate(s)", progress=progress)
    frame = pd.DataFrame([r for case_rows in rows for r in case_rows])
    table = summarize_candidates(frame, candidates, labels)
    best_name = choose(table)
    best = next(c for c in candidates if name_of(c) == best_name)
    per_case = pd.DataFrame(parallel_map(_postprocessing_case, [(source, c, best, classes, ignore_value(labels))
                                                                  for c in cases],
                                         num_workers=num_workers, description="postprocessing", progress=progress))
    pp, pp_figures = decide_postprocessing(per_case, classes)
    prefix = {(False, False): "none", (True, False): "fg", (False, True): "cls", (True, True): "fgcls"}
    final = np.column_stack([per_case[f"{prefix[(pp.foreground, k in pp.classes)]}_{k}"] for k in classes])
    case_dice = np.nanmean(final, axis=1)
    scores = [float(np.mean([source.qc_score(k, c) for k in best])) for c in cases]
    threshold, rho, flagged_worst, n_worst = qc_figures(scores, case_dice)
    qc = pd.DataFrame({"case": cases, "qc_score": scores, "dice_fg": case_dice,
                       "flagged": np.asarray(scores) > threshold})
    return Selection(table, frame, best, pp, pp_figures, qc, threshold, rho, flagged_worst, n_worst)


def decide_mirroring(source, best: Candidate, labels: Mapping[int, str], dice_with: float, *,
                     tolerance: float = MIRRORING_TOLERANCE, num_workers: int = 1,
                     progress: bool = False) -> InferenceChoice:
    """Mirroring off when ``best``'s out-of-fold foreground Dice without it (``source``: an
    :class:`Unmirrored`, or ``None`` when not measured) is within ``tolerance`` of ``dice_with``
    (both before postprocessing)."""
    if source is None:
        return InferenceChoice(tolerance=tolerance, dice_with_mirroring=dice_with,
                               decided="mirroring on: the out-of-fold predictions without mirroring are missing "
                                       "(folds validated by an older medseg)")
    rows = parallel_map(_evaluate_case, [(source, c, [best], labels) for c in source.case_ids],
                        num_workers=num_workers, description="evaluate without mirroring", progress=progress)
    table = summarize_candidates(pd.DataFrame([r for case_rows in rows for r in case_rows]), [best], labels)
    dice_without = float(table.iloc[0]["dice_fg"])
    cost = dice_with - dice_without
    off = bool(cost <= tolerance)
    how = (f"{'off' if off else 'on'}: out-of-fold foreground Dice {dice_with:.4f} with mirroring, "
           f"{dice_without:.4f} without ({cost:+.4f} {'within' if off else 'beyond'} the {tolerance:g} tolerance)")
    return InferenceChoice(mirroring=not off, dice_with_mirroring=dice_with, dice_without_mirroring=dice_without,
                           tolerance=tolerance, decided=f"mirroring {how}")


def decide_backend(choice: InferenceChoice, dice_torch: float, dice_backend: Mapping[str, float], *,
                   preference: Sequence[str] = BACKEND_PREFERENCE) -> InferenceChoice:
    """``choice`` with the first backend of ``preference`` (fastest first, measured in
    docs/benchmarks.md) whose out-of-fold foreground Dice in ``dice_backend`` is within
    ``choice.tolerance`` of torch's ``dice_torch`` (both with ``choice``'s mirroring), else torch.
    The figures come from re-predicting the out-of-fold cases with each backend, which find-best
    does not do by itself (see ``medseg.inference.backends``)."""
    chosen, how = "torch", "torch: no backend measured"
    for name in preference:
        if name not in dice_backend:
            continue
        cost = dice_torch - dice_backend[name]
        ok = bool(cost <= choice.tolerance)
        how = (f"{name if ok else 'torch'}: out-of-fold foreground Dice {dice_torch:.4f} with torch, "
               f"{dice_backend[name]:.4f} with {name} ({cost:+.4f} {'within' if ok else 'beyond'} the "
               f"{choice.tolerance:g} tolerance)")
        if ok:
            chosen = name
            break
    return choice.model_copy(update={"backend": chosen, "dice_torch": dice_torch, "dice_backend": dict(dice_backend),
                                     "backend_decided": how})


NOT_TRIED = "torch: not tried; --try-backends"


def backend_candidates(names: Sequence[str] | str | None) -> tuple[list[str], list[str]]:
    """(the backends to try, notes on those skipped): ``names`` a list (or comma string) of
    :data:`~medseg.inference.backends.BACKENDS`, or ``auto`` (the installed ones of
    :data:`BACKEND_PREFERENCE`); ``torch`` is the reference, not a candidate. Fastest first."""
    from medseg.inference.backends import available, check_backend

    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names or [])
    if names == ["auto"]:
        names = list(BACKEND_PREFERENCE)
    names = [check_backend(n) for n in dict.fromkeys(names) if n != "torch"]
    ordered = [n for n in BACKEND_PREFERENCE if n in names] + [n for n in names if n not in BACKEND_PREFERENCE]
    notes = [f"{n} skipped: not installed (pip install 'medseg[cpu-fast]')" for n in ordered if not available(n)]
    return [n for n in ordered if available(n)], notes


class BackendPredictions:
    """The out-of-fold cases of ``source`` re-predicted with one backend (``folder/<config>/<case>.npz``)."""

    def __init__(self, source: OutOfFold, folder: Path) -> None:
        self.source, self.folder = source, folder
        self.case_ids = source.case_ids

    def path(self, key: str, case_id: str) -> Path:
        return self.folder / key / f"{case_id}.npz"

    def probabilities(self, key: str, case_id: str) -> np.ndarray:
        return load_probabilities(self.path(key, case_id))

    def reference(self, case_id: str) -> tuple[np.ndarray, Sequence[float]]:
        return self.source.reference(case_id)


def predict_with_backend(work: WorkDir, plans: Plans, source: OutOfFold, members: Candidate, backend: str,
                         folder: Path, *, mirroring: bool, progress: bool = False) -> BackendPredictions:
    """Each member's folds re-predict their validation cases on the CPU with ``backend`` (each fold its
    own model, as :func:`~medseg.orchestration.validation.predict_validation` with the final
    checkpoint), mirroring or not; the probabilities go to ``folder``."""
    from medseg.inference.predictor import InputCase, Stage, load_models, predict_case, read_input
    from medseg.inference.probabilities import save_probabilities
    from medseg.progress import track
    from medseg.training.cascade import oof_segmentation

    ds = load_dataset(work.dataset_path())
    out = BackendPredictions(source, folder)
    for key in members:
        config = plans.config(key)
        (folder / key).mkdir(parents=True, exist_ok=True)
        for fold in source.folds[key]:
            stage = Stage(config, load_models(work, plans, config, [fold], "cpu", backend=backend), plans.num_classes)
            val_ids = [c for c in fold_case_ids(work, plans, config, fold)[1] if c in set(out.case_ids)]
            for cid in track(val_ids, total=len(val_ids), description=f"{key} fold {fold} with {backend}",
                             enabled=progress):
                image, geometry = read_input(InputCase(cid, ds.case(cid).images, ".nii.gz"), len(plans.channel_names))
                prior = (oof_segmentation(work, plans.config(config.previous_stage).key, cid, plans.label_values)
                         if config.previous_stage else None)
                pred = predict_case(stage, image, geometry, tta=mirroring, device="cpu", prior=prior)
                save_probabilities(out.path(key, cid), pred.probabilities, pred.bbox, qc_score=pred.qc_scores[0])
    return out


def measure_backends(work: WorkDir, plans: Plans, source: OutOfFold, best: Candidate, labels: Mapping[int, str],
                 choice: InferenceChoice, names: Sequence[str] | str, *, num_workers: int = 1,
                 progress: bool = False) -> InferenceChoice:
    """``choice`` with the backend decided on ``best``'s out-of-fold cases re-predicted with each of
    ``names`` (:func:`backend_candidates`), against torch's Dice with ``choice``'s mirroring."""
    candidates, notes = backend_candidates(names)
    for note in notes:
        log.warning("find-best --try-backends: %s", note)
    dice_torch = choice.dice_with_mirroring if choice.mirroring else choice.dice_without_mirroring
    if not candidates:
        return choice.model_copy(update={"dice_torch": dice_torch, "backend_decided": "torch: no backend tried ("
                                         + ("; ".join(notes) or "none asked for") + ")"})
    dice_backend: dict[str, float] = {}
    for name in candidates:
        folder = work.backend_trials / name
        shutil.rmtree(folder, ignore_errors=True)
        try:
            preds = predict_with_backend(work, plans, source, best, name, folder, mirroring=choice.mirroring,
                                         progress=progress)
            rows = parallel_map(_evaluate_case, [(preds, c, [best], labels) for c in preds.case_ids],
                                num_workers=num_workers, description=f"evaluate with {name}", progress=progress)
            table = summarize_candidates(pd.DataFrame([r for case_rows in rows for r in case_rows]), [best], labels)
            dice_backend[name] = float(table.iloc[0]["dice_fg"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        log.info("find-best: out-of-fold foreground Dice of %s with %s: %.4f (torch %.4f)", name_of(best), name,
                 dice_backend[name], dice_torch)
    if work.backend_trials.is_dir() and not any(work.backend_trials.iterdir()):
        work.backend_trials.rmdir()
    decided = decide_backend(choice, dice_torch, dice_backend, preference=candidates)
    how = decided.backend_decided + (f"; every member of {name_of(best)} with the same backend" if len(best) > 1
                                     else "") + (f" ({'; '.join(notes)})" if notes else "")
    log.info("find-best: backend %s", how)
    return decided.model_copy(update={"backend_decided": how})


def find_best(workdir: Path | WorkDir, *, configs: Sequence[str] | None = None, num_workers: int = 1,
              progress: bool = False, try_backends: Sequence[str] | str | None = None) -> tuple[ChosenModel, str]:
    """Evaluate the candidates, choose, decide postprocessing and QC (and, with ``try_backends``, the
    forward pass's backend: :func:`backend_candidates`); write ``model.json`` and the report."""
    work = WorkDir.of(workdir)
    workdir = work.root
    plans = Plans.load(work.plans)
    complete, incomplete = OutOfFold.complete_keys(work, plans)
    if configs:
        keys = [plans.config(c).key for c in configs]
        lacking = [k for k in keys if k not in complete]
        if lacking:
            raise MedsegError(f"{workdir}: {lacking[0]} has no complete cross-validation; run "
                              f"`medseg train {workdir} -c {lacking[0]} -f all`")
    else:
        keys = complete
    if not keys:
        raise MedsegError(f"{workdir}: no configuration has all its cross-validation folds trained"
                          + (f" ({'; '.join(incomplete)})" if incomplete else "")
                          + "; run `medseg train WORKDIR -c CONFIG -f all` first")
    source = OutOfFold(work, plans, keys)
    labels = {int(k): v for k, v in plans.labels.items()}
    classes = _foreground(labels)
    sel = select_model(source, keys, labels, num_workers=num_workers, progress=progress)
    row = sel.table[sel.table["candidate"] == name_of(sel.best)].iloc[0]
    after = sel.pp_figures["dice_after"]
    inference = decide_mirroring(source.unmirrored(sel.best), sel.best, labels, float(row["dice_fg"]),
                                 num_workers=num_workers, progress=progress)
    if try_backends:
        inference = measure_backends(work, plans, source, sel.best, labels, inference, try_backends,
                                  num_workers=num_workers, progress=progress)
    else:
        inference = inference.model_copy(update={"backend_decided": NOT_TRIED})
    chosen = ChosenModel(
        members=list(sel.best), folds={k: list(source.folds[k]) for k in sel.best}, postprocessing=sel.postprocessing,
        qc=QualityControl(threshold=sel.threshold, quantile=FLAG_QUANTILE, spearman_vs_dice=sel.spearman,
                          worst_flagged=f"{sel.flagged_worst} of the {sel.n_worst} lowest-Dice cases"), inference=inference,
        cv_dice=float(np.nanmean(list(after.values()))),
        cv_dice_per_class={labels[k]: float(after[k]) for k in classes}, cv_hd95=float(row["hd95_fg"]),
        cv_cases=len(source.case_ids),
        decided=(f"best of {len(sel.table)} candidate(s) by out-of-fold foreground Dice {row['dice_fg']:.4f} over "
                 f"{len(source.case_ids)} cases; postprocessing: {describe(sel.postprocessing.model_dump())}"))
    out = work.find_best
    out.mkdir(exist_ok=True)
    with atomic_path(out / "candidates.csv") as tmp:
        sel.table.drop(columns=["order"]).to_csv(tmp, index=False, float_format="%.4f")
    with atomic_path(out / "cases.csv") as tmp:
        sel.cases.to_csv(tmp, index=False, float_format="%.4f")
    with atomic_path(out / "qc.csv") as tmp:
        sel.qc.to_csv(tmp, index=False, float_format="%.5f")
    atomic_write_json(out / "postprocessing.json", {"decision": sel.postprocessing.model_dump(), **{
        k: ({labels[c]: v for c, v in d.items()} if isinstance(d, dict) else d) for k, d in sel.pp_figures.items()}})
    _plot_candidates(sel.table, name_of(sel.best), out / "candidates.png")
    _plot_qc(sel.qc, sel.threshold, sel.n_worst, out / "qc.png")
    report = _report(sel.table, chosen, sel.pp_figures, labels, sel.qc, sel.n_worst, sel.flagged_worst)
    atomic_write_text(out / "report.md", report)
    chosen.save(work.model)
    return chosen, report


def _report(table: pd.DataFrame, chosen: ChosenModel, pp_figures: dict, labels: Mapping[int, str],
            qc: pd.DataFrame, n_worst: int, flagged_worst: int) -> str:
    classes = _foreground(labels)
    head = ["candidate", *(f"Dice {labels[k]}" for k in classes), "Dice fg", *(f"HD95 {labels[k]}" for k in classes),
            "HD95 fg"]
    lines = [f"Out-of-fold evaluation over {chosen.cv_cases} cases", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        mark = " (chosen)" if r["candidate"] == " + ".join(chosen.members) else ""
        vals = [f"{r[f'dice_{labels[k]}']:.4f}" for k in classes] + [f"{r['dice_fg']:.4f}"] + [
            f"{r[f'hd95_{labels[k]}']:.2f}" for k in classes] + [f"{r['hd95_fg']:.2f}"]
        lines.append(f"| {r['candidate']}{mark} | " + " | ".join(vals) + " |")
    singles = table[table["members"] == 1]
    pairs = table[table["members"] > 1]
    if len(pairs):
        best_single, best_pair = singles["dice_fg"].max(), pairs["dice_fg"].max()
        lines += ["", f"Best ensemble vs best single configuration: {best_pair - best_single:+.4f} foreground Dice."]
    before, after = pp_figures["dice_before"], pp_figures["dice_after"]
    lines += ["", f"Chosen: {' + '.join(chosen.members)}; postprocessing: {describe(chosen.postprocessing.model_dump())}"
              f" (foreground Dice {np.nanmean(list(before.values())):.4f} → {np.nanmean(list(after.values())):.4f}; "
              f"largest foreground component alone: {pp_figures['foreground_gain']:+.4f})."]
    q = chosen.qc
    lines += ["", f"Prediction: {chosen.inference.decided}; backend {chosen.inference.backend_decided}."]
    lines += ["", f"QC: Spearman(score, case Dice) = {q.spearman_vs_dice:.3f}; threshold {q.threshold:.4f} "
              f"(the {q.quantile:.0%} quantile) flags {int(qc['flagged'].sum())} cases, {flagged_worst} of the "
              f"{n_worst} lowest-Dice cases."]
    return "\n".join(lines) + "\n"


def _plot_candidates(table: pd.DataFrame, best: str, path: Path) -> None:
    fig = new_figure(figsize=(9.0, 0.9 + 0.45 * len(table)), layout="constrained")
    colours = ["tab:red" if c == best else "tab:blue" for c in table["candidate"]]
    for ax, col, title in zip(fig.subplots(1, 2, sharey=True), ("dice_fg", "hd95_fg"),
                              ("foreground Dice (higher is better)", "HD95 mm (lower is better)"), strict=True):
        ax.barh(range(len(table)), table[col], color=colours)
        ax.set_yticks(range(len(table)), table["candidate"])
        lo = float(table[col].min())
        if col == "dice_fg":
            ax.set_xlim(max(0.0, lo - 0.05), min(1.0, float(table[col].max()) + 0.01))
        for i, v in enumerate(table[col]):
            ax.text(v, i, f" {v:.4f}" if col == "dice_fg" else f" {v:.2f}", va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
    fig.suptitle("out-of-fold candidates (red: chosen)", fontsize=10)
    save_figure(fig, path, dpi=100)


def _plot_qc(qc: pd.DataFrame, threshold: float, n_worst: int, path: Path) -> None:
    fig = new_figure(figsize=(6.0, 4.5), layout="constrained")
    ax = fig.subplots()
    worst = qc["dice_fg"].rank(method="first") <= n_worst
    ax.scatter(qc["qc_score"][~worst], qc["dice_fg"][~worst], s=12, label="other cases")
    ax.scatter(qc["qc_score"][worst], qc["dice_fg"][worst], s=18, color="tab:red", label=f"{n_worst} lowest Dice")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.4f}")
    ax.set_xlabel("QC score: mean normalised entropy in predicted foreground")
    ax.set_ylabel("case foreground Dice (out of fold)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=100)
