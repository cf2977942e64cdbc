"""Checkpoints: written atomically, read with ``weights_only=True``."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from medseg.errors import CheckpointError
from medseg.utils import atomic_write_bytes


def save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, map_location: str = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {str(exc)[:120]})") from exc
