"""Cross-validation: train the folds of a configuration one after the other and collect the
out-of-fold predictions (``runs/<key>/crossval/``: a report over every case, each predicted by the
fold that did not train on it)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from medseg.errors import MedsegError
from medseg.plans.schema import Plans
from medseg.preprocessing.pipeline import preprocessed_dir
from medseg.training.loop import FULL, fold_case_ids, train_fold
from medseg.training.splits import load_or_create_splits

log = logging.getLogger(__name__)


def cv_folds(workdir: Path, plans: Plans, config_name: str) -> list[int]:
    config = plans.config(config_name)
    ids = sorted(p.stem for p in preprocessed_dir(workdir, config.data_config).glob("*.json"))
    if not ids:
        raise MedsegError(f"{preprocessed_dir(workdir, config.data_config)}: no preprocessed cases; run "
                          "`medseg plan` first")
    return list(range(len(load_or_create_splits(workdir, ids, plans.seed))))


def parse_folds(workdir: Path, config_name: str, spec: str) -> list[int | str]:
    """``0``..``4``, ``0,2``, ``all`` (every cross-validation fold; ``cv`` is the same) or ``full``."""
    spec = spec.strip().lower()
    if spec in ("all", "cv"):
        return list(cv_folds(workdir, Plans.load(Path(workdir) / "plans.json"), config_name))
    if spec == FULL:
        return [FULL]
    try:
        return [int(f) for f in spec.split(",")]
    except ValueError:
        raise MedsegError(f"--fold {spec!r}: expected a fold number, a comma-separated list, 'all' or 'full'") from None


def _finished(run: Path) -> bool:
    return (run / "checkpoint_final.pt").exists() and (run / "val_report" / "summary.json").exists()


def train_folds(workdir: Path, config_name: str, folds: list[int | str], *, resume: bool = False,
                validate_full: bool = True, **kwargs) -> list[str]:
    """Train ``folds`` in order. With several folds, finished ones are skipped and an interrupted one
    resumed, so re-running ``-f all`` after a kill continues where it stopped. Returns summary lines."""
    workdir = Path(workdir)
    plans = Plans.load(workdir / "plans.json")
    config = plans.config(config_name)
    lines = []
    for fold in folds:
        run = workdir / "runs" / config.key / f"fold_{fold}"
        if len(folds) > 1 and _finished(run):
            lines.append(f"fold {fold}: already trained ({run})")
            continue
        again = resume or (len(folds) > 1 and (run / "checkpoint_latest.pt").exists())
        train_fold(workdir, config.key, fold, resume=again, validate_full=validate_full, **kwargs)
        lines.append(f"fold {fold} done: {run}")
    if validate_full and all(f != FULL for f in folds):
        cv = cv_folds(workdir, plans, config.key)
        if all(_finished(workdir / "runs" / config.key / f"fold_{f}") for f in cv):
            summary = collect_out_of_fold(workdir, plans, config.key)
            lines.append(f"cross-validation of {config.key} over {summary['n_cases']} cases: "
                         f"foreground Dice {summary['foreground_mean']['dice']:.4f} "
                         f"(report: {workdir / 'runs' / config.key / 'crossval'})")
    return lines


def collect_out_of_fold(workdir: Path, plans: Plans, key: str) -> dict:
    """Link every fold's validation predictions into ``runs/<key>/crossval/`` and evaluate them together."""
    from medseg.evaluation.report import evaluate_folder

    config = plans.config(key)
    base = Path(workdir) / "runs" / config.key
    pred, ref = base / "crossval" / "predictions", base / "crossval" / "reference"
    for d in (pred, ref):
        d.mkdir(parents=True, exist_ok=True)
    for fold in cv_folds(workdir, plans, key):
        _, val_ids = fold_case_ids(workdir, plans, config, fold)
        run = base / f"fold_{fold}"
        for cid in val_ids:
            for src, dst_dir in ((run / "val" / f"{cid}.nii.gz", pred), (run / "val" / f"{cid}.npz", pred)):
                if not src.exists():
                    raise MedsegError(f"{src}: missing out-of-fold prediction; re-run `medseg train -c {key} -f {fold}`")
                _relink(dst_dir / src.name, src)
            refs = sorted((run / "val_reference").glob(f"{cid}.*"))
            if refs:
                _relink(ref / refs[0].name, refs[0].resolve())
    summary = evaluate_folder(pred, ref, base / "crossval" / "report", labels=plans.labels)
    (base / "crossval" / "folds.json").write_text(json.dumps({"folds": cv_folds(workdir, plans, key)}))
    return summary


def _relink(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve())
