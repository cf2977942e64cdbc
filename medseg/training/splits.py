"""Cross-validation splits: 5 seeded folds stored in ``splits.json`` (user-editable)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.utils import atomic_write_json

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


def load_or_create_splits(workdir: Path, case_ids: list[str], seed: int = 0) -> list[dict[str, list[str]]]:
    path = Path(workdir) / "splits.json"
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
