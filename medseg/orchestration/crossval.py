"""Cross-validation: train the folds of a configuration one after the other, validate each on its
held-out cases, and collect the out-of-fold predictions (the configuration's crossval folder: a
report over every case, each predicted by the fold that did not train on it)."""

from __future__ import annotations

import logging
from pathlib import Path

from medseg.errors import MedsegError
from medseg.evaluation.report import evaluate_folder
from medseg.orchestration.validation import predict_validation, report_validation, validate_fold
from medseg.plans.schema import Plans
from medseg.training import distributed
from medseg.training.loop import train_fold
from medseg.training.splits import cv_folds, fold_case_ids
from medseg.utils import atomic_write_json
from medseg.workdir import FULL, Fold, WorkDir

log = logging.getLogger(__name__)


def parse_folds(workdir: Path | WorkDir, config_name: str, spec: str) -> list[Fold]:
    """``0``..``4``, ``0,2``, ``all`` (every cross-validation fold; ``cv`` is the same) or ``full``."""
    spec = spec.strip().lower()
    if spec in ("all", "cv"):
        plans = Plans.load(WorkDir.of(workdir).plans)
        return list(cv_folds(workdir, plans, plans.config(config_name)))
    if spec == FULL:
        return [FULL]
    try:
        return [int(f) for f in spec.split(",")]
    except ValueError:
        raise MedsegError(f"--fold {spec!r}: expected a fold number, a comma-separated list, 'all' or 'full'") from None


def train_and_validate(workdir: Path | WorkDir, config_name: str, fold: Fold, *, validate_full: bool = True,
                       device: str = "cpu", progress: bool = False, **train_kwargs) -> Path:
    """:func:`~medseg.training.loop.train_fold`, then (for a cross-validation fold) its full
    validation (in a distributed run each rank predicts its share of the cases, on its device)."""
    work = WorkDir.of(workdir)
    path = train_fold(work, config_name, fold, device=device, progress=progress, **train_kwargs)
    if validate_full and fold != FULL:
        plans = Plans.load(work.plans)
        config = plans.config(config_name)
        _, val_ids = fold_case_ids(work, plans, config, fold)
        run = work.run(config.key, fold)
        rank, world = distributed.rank_and_world()
        if world == 1:
            validate_fold(work, plans, config, run, val_ids, device=device, progress=progress)
        else:  # each rank predicts its share of the cases, rank 0 reports on them all
            predict_s = predict_validation(work, plans, config, run, val_ids[rank::world],
                                           device=distributed.rank_device(device), progress=progress and rank == 0)
            distributed.barrier()
            if rank == 0:
                report_validation(work, plans, run, val_ids, predict_s)
    return path


def train_folds(workdir: Path | WorkDir, config_name: str, folds: list[Fold], *, resume: bool = False,
                validate_full: bool = True, **kwargs) -> list[str]:
    """Train ``folds`` in order. With several folds, finished ones are skipped and an interrupted one
    resumed, so re-running ``-f all`` after a kill continues where it stopped. Returns summary lines."""
    work = WorkDir.of(workdir)
    plans = Plans.load(work.plans)
    config = plans.config(config_name)
    lines = []
    for fold in folds:
        run = work.run(config.key, fold)
        if len(folds) > 1 and run.validated:
            lines.append(f"fold {fold}: already trained ({run.path})")
            continue
        again = resume or (len(folds) > 1 and run.latest.exists())
        train_and_validate(work, config.key, fold, resume=again, validate_full=validate_full, **kwargs)
        lines.append(f"fold {fold} done: {run.path}")
    if validate_full and all(f != FULL for f in folds) and distributed.is_main_process():
        if all(work.run(config.key, f).validated for f in cv_folds(work, plans, config)):
            summary = collect_out_of_fold(work, plans, config.key)
            lines.append(f"cross-validation of {config.key} over {summary['n_cases']} cases: "
                         f"foreground Dice {summary['foreground_mean']['dice']:.4f} "
                         f"(report: {work.crossval(config.key).path})")
    return lines


def check_split(workdir: Path | WorkDir, configs: list[str], nproc: int) -> None:
    """Refuse, before any process starts, ``nproc`` ranks that a configuration's batch cannot feed."""
    plans = Plans.load(WorkDir.of(workdir).plans)
    for name in configs:
        distributed.rank_elements(plans.config(name).batch_size, 0, nproc)


def train_configs(workdir: Path | WorkDir, configs: list[str], fold_spec: str, **kwargs) -> list[str]:
    """:func:`train_folds` of ``fold_spec`` (:func:`parse_folds`) for each configuration in turn;
    the summary lines (``medseg train``). Run as one rank of several (``--nproc``, torchrun, srun),
    it leaves the group that training joined when done, and only rank 0 returns lines."""
    lines: list[str] = []
    try:
        for name in configs:
            lines += train_folds(workdir, name, parse_folds(workdir, name, fold_spec), **kwargs)
    except BaseException:
        distributed.leave(sync=False)
        raise
    main = distributed.is_main_process()
    distributed.leave()
    return lines if main else []


def collect_out_of_fold(workdir: Path | WorkDir, plans: Plans, key: str) -> dict:
    """Link every fold's validation predictions into the configuration's crossval folder and evaluate
    them together."""
    work = WorkDir.of(workdir)
    config = plans.config(key)
    cv = work.crossval(config.key)
    pred, ref = cv.predictions, cv.reference
    for d in (pred, ref):
        d.mkdir(parents=True, exist_ok=True)
    folds = cv_folds(work, plans, config)
    for fold in folds:
        _, val_ids = fold_case_ids(work, plans, config, fold)
        run = work.run(config.key, fold)
        for cid in val_ids:
            for src in (run.val_prediction(cid), run.val_prediction(cid, ".npz")):
                if not src.exists():
                    raise MedsegError(f"{src}: missing out-of-fold prediction; re-run `medseg train -c {key} -f {fold}`")
                _relink(pred / src.name, src)
            refs = sorted(run.val_reference.glob(f"{cid}.*"))
            if refs:
                _relink(ref / refs[0].name, refs[0].resolve())
    summary = evaluate_folder(pred, ref, cv.report, labels=plans.labels)
    atomic_write_json(cv.folds_json, {"folds": folds})
    return summary


def _relink(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve())
