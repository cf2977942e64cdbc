"""Dice + cross-entropy with deep supervision (MONAI's DiceCELoss; background excluded from Dice)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn


def deep_supervision_weights(n: int) -> list[float]:
    """Halving per scale, the lowest resolution weighted 0 (as nnU-Net), normalised to sum 1."""
    w = [0.5**i for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    s = sum(w)
    return [x / s for x in w]


def downsample_target(target: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Nearest-neighbour label map at ``shape`` (the deep-supervision output's spatial size)."""
    if target.shape[2:] == shape:
        return target
    return F.interpolate(target.float(), size=tuple(shape), mode="nearest").to(target.dtype)


class DeepSupervisionLoss(nn.Module):
    def __init__(self, batch_dice: bool = True):
        super().__init__()
        self.loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=batch_dice,
                               smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """outputs: logits (B, K, *S) or a list of them, full resolution first; target: (B, 1, *S) int."""
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        weights = deep_supervision_weights(len(outputs))
        total = outputs[0].new_zeros(())
        for w, out in zip(weights, outputs, strict=True):
            if w > 0:
                total = total + w * self.loss(out, downsample_target(target, out.shape[2:]))
        return total
