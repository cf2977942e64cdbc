"""Checkpoints: written atomically, read with ``weights_only=True``.

On disk a checkpoint is a plain dict (what :func:`load_checkpoint` returns, so any reader can take
``["model"]``). Its contents are typed here:

- :class:`TrainingCheckpoint` (``checkpoint_latest.pt``, ``checkpoint_best.pt``): everything a run
  needs to resume exactly: ``model``, ``optimizer``, ``scaler`` (None without AMP), ``torch_rng``,
  ``cuda_rng`` (the training device's CUDA generator, saved only by a CUDA run, last),
  ``config`` (the configuration key), ``fold`` (as a string) and the :class:`TrainingState` fields
  ``epoch``, ``elapsed_s``, ``best_ema``, ``ema``, ``history``, flat at the top level;
- :class:`FinalCheckpoint` (``checkpoint_final.pt``): ``model``, ``config``, ``fold``, ``epoch``,
  ``elapsed_s``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medseg.errors import CheckpointError
from medseg.utils import atomic_write_bytes

StateDict = dict[str, Any]


@dataclass
class TrainingState:
    """Where a run stands after ``epoch`` epochs.

    ``elapsed_s``: training wall-clock seconds over all sessions; ``ema``: the smoothed pseudo-Dice
    (None before the first epoch); ``best_ema``: the best ``ema`` saved as ``checkpoint_best.pt``
    (-1 before any); ``history``: one dict per epoch, the lines of ``log.jsonl``."""

    epoch: int = 0
    elapsed_s: float = 0.0
    best_ema: float = -1.0
    ema: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "elapsed_s": self.elapsed_s, "best_ema": self.best_ema, "ema": self.ema,
                "history": self.history}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingState:
        return cls(epoch=d["epoch"], elapsed_s=d["elapsed_s"], best_ema=d["best_ema"], ema=d["ema"],
                   history=d["history"])


@dataclass
class TrainingCheckpoint:
    """A resumable checkpoint (``checkpoint_latest.pt``, ``checkpoint_best.pt``)."""

    model: StateDict
    optimizer: StateDict
    scaler: StateDict | None
    torch_rng: torch.Tensor
    config: str
    fold: str
    state: TrainingState
    cuda_rng: torch.Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """The dict for ``torch.save``; the state's fields sit at the top level, ``cuda_rng`` last
        and only when there is one (so a CPU run's checkpoint is what earlier versions wrote)."""
        d = {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler,
             "torch_rng": self.torch_rng, "config": self.config, "fold": self.fold, **self.state.to_dict()}
        if self.cuda_rng is not None:
            d["cuda_rng"] = self.cuda_rng
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingCheckpoint:
        """Read :meth:`to_dict`'s form; a missing ``scaler`` or ``cuda_rng`` reads as None. KeyError
        when a field is missing."""
        return cls(model=d["model"], optimizer=d["optimizer"], scaler=d.get("scaler"), torch_rng=d["torch_rng"],
                   config=d["config"], fold=str(d["fold"]), state=TrainingState.from_dict(d),
                   cuda_rng=d.get("cuda_rng"))


@dataclass
class FinalCheckpoint:
    """The weights a finished run leaves for prediction (``checkpoint_final.pt``)."""

    model: StateDict
    config: str
    fold: str
    epoch: int
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "config": self.config, "fold": self.fold, "epoch": self.epoch,
                "elapsed_s": self.elapsed_s}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinalCheckpoint:
        return cls(model=d["model"], config=d["config"], fold=str(d["fold"]), epoch=d["epoch"],
                   elapsed_s=d["elapsed_s"])


def save_checkpoint(path: Path, state: dict | TrainingCheckpoint | FinalCheckpoint) -> None:
    """``torch.save`` of ``state`` (a record is saved as its :meth:`to_dict`) to ``path``, atomically."""
    buf = io.BytesIO()
    torch.save(state if isinstance(state, dict) else state.to_dict(), buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, map_location: str = "cpu") -> dict:
    """The checkpoint at ``path`` as the plain dict it was saved as."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {str(exc)[:120]})") from exc


def load_training_checkpoint(path: Path, map_location: str = "cpu") -> TrainingCheckpoint:
    """The resumable checkpoint at ``path``; a :class:`CheckpointError` naming what is missing otherwise."""
    d = load_checkpoint(path, map_location)
    fix = "resume from a run's checkpoint_latest.pt, or delete the run folder to start over"
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: holds a {type(d).__name__}, not a checkpoint dict; {fix}")
    try:
        return TrainingCheckpoint.from_dict(d)
    except KeyError as exc:
        raise CheckpointError(f"{path}: not a resumable training checkpoint (no {exc} field); {fix}") from exc
