"""The precision training runs in: AMP (forward and loss under fp16 autocast, loss scaling) on CUDA,
float32 on a CPU. One place, read by the training loop and by the planner's memory model and
measurements."""

from __future__ import annotations

import torch


def training_autocast(device: str) -> torch.dtype | None:
    """The autocast dtype of a training step's forward and loss on ``device``: float16 on CUDA, None
    (float32, no autocast) on a CPU."""
    return torch.float16 if torch.device(device).type == "cuda" else None
