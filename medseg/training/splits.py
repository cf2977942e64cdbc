"""Cross-validation splits: 5 seeded folds stored in ``splits.json`` (user-editable)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.plans.schema import Configuration, Plans
from medseg.utils import atomic_write_json
from medseg.workdir import FULL, Fold, WorkDir

NUM_FOLDS = 5


def make_splits(case_ids: list[str], seed: int = 0, n_folds: int = NUM_FOLDS) -> list[dict[str, list[str]]]:
    ids = sorted(case_ids)
    if len(ids) < 2:
        raise MedsegError(f"cross-validation needs at least 2 cases, got {len(ids)}")
    n_folds = min(n_folds, len(ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = [sorted(ids[i] for i in order[k::n_folds]) for k in range(n_folds)]
    return [{"train": sorted(c for j, f in enumerate(folds) if j != k for c in f), "val": folds[k]}
            for k in range(n_folds)]


def load_or_create_splits(workdir: Path | WorkDir, case_ids: list[str], seed: int = 0) -> list[dict[str, list[str]]]:
    path = WorkDir.of(workdir).splits
    if path.exists():
        splits = json.loads(path.read_text())
        known = set(case_ids)
        for k, s in enumerate(splits):
            unknown = sorted((set(s["train"]) | set(s["val"])) - known)
            if unknown:
                raise MedsegError(f"{path}: fold {k} names case {unknown[0]!r}, which is not preprocessed")
        return splits
    splits = make_splits(case_ids, seed)
    atomic_write_json(path, splits)
    return splits


def preprocessed_case_ids(workdir: Path | WorkDir, config: Configuration) -> list[str]:
    """The case ids preprocessed for ``config``'s data; a one-line error when there are none."""
    folder = WorkDir.of(workdir).preprocessed(config.data_config)
    ids = sorted(p.stem for p in folder.glob("*.json"))
    if not ids:
        raise MedsegError(f"{folder}: no preprocessed cases; run `medseg plan` (or `medseg preprocess`) first")
    return ids


def fold_case_ids(workdir: Path | WorkDir, plans: Plans, config: Configuration, fold: Fold) -> tuple[list[str], list[str]]:
    """(training, validation) case ids of a fold; ``full`` trains on all and watches a tenth of them."""
    ids = preprocessed_case_ids(workdir, config)
    if fold == FULL:
        return ids, ids[: max(1, len(ids) // 10)]
    splits = load_or_create_splits(workdir, ids, plans.seed)
    if not (0 <= int(fold) < len(splits)):
        raise MedsegError(f"fold {fold} does not exist; {WorkDir.of(workdir).splits.name} has folds "
                          f"0..{len(splits) - 1}")
    return splits[int(fold)]["train"], splits[int(fold)]["val"]


def cv_folds(workdir: Path | WorkDir, plans: Plans, config: Configuration) -> list[int]:
    """The cross-validation folds of ``config`` (those of ``splits.json``, made when missing)."""
    return list(range(len(load_or_create_splits(workdir, preprocessed_case_ids(workdir, config), plans.seed))))
