"""The work directory's layout: the one place where its paths are spelled.

Every stage reads and writes a work directory through :class:`WorkDir` (and the :class:`RunDir`
and :class:`CrossvalDir` it hands out), so that a new stage or executor (a cluster job, a
distributed run) finds the same files without repeating their names::

    WORK/
      source.json              the dataset this work directory was planned from
      fingerprint.json         dataset statistics (medseg.fingerprint)
      plans.json               the plans (medseg.plans.schema.Plans)
      plan_timing.json         how long each planning phase took
      splits.json              the seeded cross-validation folds (user-editable)
      preprocessed/<data config>/<case>.npy, <case>_seg.npy, <case>.json
      priors/<previous stage>/<case>.npy     a cascade's out-of-fold priors
      runs/<config key>/fold_<k>/            one trained fold (RunDir)
      runs/<config key>/crossval/            out-of-fold predictions and report (CrossvalDir)
      model.json               the chosen model (medseg find-best)
      find_best/               find-best's tables, plots and report
      cluster.json             Slurm settings for --executor slurm (medseg.cluster.config)
      jobs/jobs.jsonl          every job submitted for this work directory (medseg jobs)
      jobs/logs/<job id>/      submitit's files of each job: its stdout/stderr, submission

This module is the bottom layer: paths only, no knowledge of plans or networks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import MedsegError
from medseg.utils import atomic_write_json

FULL = "full"  # the fold tag of a model trained on every case (nnU-Net's "all")
Fold = int | str
CHECKPOINTS = ("latest", "best", "final")
_FOLD_PREFIX = "fold_"


def medseg_home() -> Path:
    """medseg's per-user folder: ``$MEDSEG_HOME``, default ``~/.cache/medseg`` (remembered step times,
    imported model archives)."""
    return Path(os.environ.get("MEDSEG_HOME", "~/.cache/medseg")).expanduser()


def parse_fold_tag(tag: str) -> Fold:
    """A fold folder's tag (``"3"``, ``"full"``) as the fold it names (``3``, ``"full"``)."""
    return int(tag) if tag.isdigit() else tag


@dataclass(frozen=True)
class RunDir:
    """``runs/<key>/fold_<k>/``: one trained fold."""

    path: Path
    key: str
    fold: Fold

    def checkpoint(self, which: str = "final") -> Path:
        """``checkpoint_{latest,best,final}.pt``."""
        if which not in CHECKPOINTS:
            raise MedsegError(f"checkpoint {which!r}: expected one of {', '.join(CHECKPOINTS)}")
        return self.path / f"checkpoint_{which}.pt"

    @property
    def latest(self) -> Path:
        return self.checkpoint("latest")

    @property
    def best(self) -> Path:
        return self.checkpoint("best")

    @property
    def final(self) -> Path:
        return self.checkpoint("final")

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def log(self) -> Path:
        """The epoch log, one JSON object per line."""
        return self.path / "log.jsonl"

    @property
    def curves(self) -> Path:
        return self.path / "curves.png"

    @property
    def val(self) -> Path:
        """The full validation's predictions: ``<case>.nii.gz`` and ``<case>.npz`` (probabilities)."""
        return self.path / "val"

    @property
    def val_no_mirroring(self) -> Path:
        """The same validation cases' probabilities without mirroring."""
        return self.path / "val_no_mirroring"

    @property
    def val_reference(self) -> Path:
        """Links to the validation cases' reference labels."""
        return self.path / "val_reference"

    @property
    def val_report(self) -> Path:
        return self.path / "val_report"

    @property
    def backends(self) -> Path:
        """``backends/``: the network exported for a faster inference backend (medseg.inference.backends)."""
        return self.path / "backends"

    def backend_model(self, name: str, which: str = "final", suffix: str = ".onnx") -> Path:
        """``backends/<checkpoint>_<backend>.onnx``: ``checkpoint_<which>.pt`` exported for backend ``name``;
        ``suffix=".json"`` is its stamp (the checkpoint's size and mtime it was made from)."""
        return self.backends / f"{self.checkpoint(which).stem.removeprefix('checkpoint_')}_{name}{suffix}"

    def val_prediction(self, case_id: str, suffix: str = ".nii.gz") -> Path:
        return self.val / f"{case_id}{suffix}"

    @property
    def trained(self) -> bool:
        """Training finished (the final checkpoint exists)."""
        return self.final.exists()

    @property
    def validated(self) -> bool:
        """Trained and fully validated."""
        return self.trained and (self.val_report / "summary.json").exists()


@dataclass(frozen=True)
class CrossvalDir:
    """``runs/<key>/crossval/``: every fold's validation predictions linked together, and their report."""

    path: Path

    @property
    def predictions(self) -> Path:
        return self.path / "predictions"

    @property
    def reference(self) -> Path:
        return self.path / "reference"

    @property
    def report(self) -> Path:
        return self.path / "report"

    @property
    def folds_json(self) -> Path:
        return self.path / "folds.json"


@dataclass(frozen=True)
class WorkDir:
    """A work directory (see the module docstring for its layout)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def of(cls, workdir: str | Path | WorkDir) -> WorkDir:
        return workdir if isinstance(workdir, WorkDir) else cls(workdir)

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    # files at the top
    @property
    def source(self) -> Path:
        return self.root / "source.json"

    @property
    def fingerprint(self) -> Path:
        return self.root / "fingerprint.json"

    @property
    def plans(self) -> Path:
        return self.root / "plans.json"

    @property
    def plan_timing(self) -> Path:
        return self.root / "plan_timing.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def model(self) -> Path:
        """``model.json``: the model chosen by ``medseg find-best``."""
        return self.root / "model.json"

    @property
    def find_best(self) -> Path:
        return self.root / "find_best"

    @property
    def backend_trials(self) -> Path:
        """``find_best/backends/<backend>/<config>/<case>.npz``: the out-of-fold cases re-predicted with
        each backend by ``medseg find-best --try-backends`` (removed once evaluated)."""
        return self.find_best / "backends"

    # cluster jobs
    @property
    def cluster_config(self) -> Path:
        """``cluster.json``: the Slurm settings of ``--executor slurm``."""
        return self.root / "cluster.json"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def job_registry(self) -> Path:
        """One JSON line per submitted job."""
        return self.jobs / "jobs.jsonl"

    @property
    def job_logs(self) -> Path:
        """submitit's folder; ``%j`` is replaced by each job's id."""
        return self.jobs / "logs" / "%j"

    # the dataset it was planned from
    def write_source(self, dataset: str | Path) -> None:
        atomic_write_json(self.source, {"dataset": str(Path(dataset).resolve())})

    def dataset_path(self) -> Path:
        """The dataset recorded by ``medseg plan``."""
        if not self.source.is_file():
            raise MedsegError(f"{self.source}: not found; run `medseg plan` for this work directory first")
        try:
            return Path(json.loads(self.source.read_text())["dataset"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MedsegError(f"{self.source}: unreadable ({type(exc).__name__}); run `medseg plan` again") from exc

    # folders per configuration
    def preprocessed(self, data_config: str) -> Path:
        """``preprocessed/<data config>/``: a data configuration's preprocessed cases."""
        return self.root / "preprocessed" / data_config

    def priors(self, previous_key: str) -> Path:
        """``priors/<previous stage>/``: a cascade's priors, resampled from that stage's out-of-fold predictions."""
        return self.root / "priors" / previous_key

    def runs(self, key: str) -> Path:
        """``runs/<key>/``: every fold of one configuration."""
        return self.root / "runs" / key

    def run(self, key: str, fold: Fold) -> RunDir:
        return RunDir(self.runs(key) / f"{_FOLD_PREFIX}{fold}", key, fold)

    def runs_of(self, key: str) -> Iterator[RunDir]:
        """The fold folders that exist for ``key``, in name order."""
        base = self.runs(key)
        if not base.is_dir():
            return
        for d in sorted(base.glob(f"{_FOLD_PREFIX}*")):
            if d.is_dir():
                yield self.run(key, parse_fold_tag(d.name.removeprefix(_FOLD_PREFIX)))

    def trained_folds(self, key: str) -> list[Fold]:
        """The folds of ``key`` whose training finished."""
        return [r.fold for r in self.runs_of(key) if r.trained]

    def cv_prediction_files(self, key: str, case_id: str, suffix: str = ".nii.gz") -> list[Path]:
        """The out-of-fold predictions of ``case_id`` by numbered folds of ``key`` (normally one)."""
        return sorted(self.runs(key).glob(f"{_FOLD_PREFIX}[0-9]*/{self.run(key, 0).val.name}/{case_id}{suffix}"))

    def crossval(self, key: str) -> CrossvalDir:
        return CrossvalDir(self.runs(key) / "crossval")

    def describe_trained(self) -> str:
        """How a trained fold shows up here (for error messages)."""
        return f"{self.root / 'runs'}/<configuration>/{_FOLD_PREFIX}<k>/{self.run('x', 0).final.name}"
