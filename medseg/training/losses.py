"""Dice + cross-entropy with deep supervision (MONAI's DiceCELoss; background excluded from Dice).

In a distributed run (:mod:`medseg.training.distributed`) the batch Dice must be the Dice of the
global batch, not a mean of per-rank Dice: :class:`GroupDiceCELoss` computes MONAI's formula from
true-positive/prediction/reference sums all-reduced over the group (differentiably, so every rank's
predictions get their exact share of the gradient), and weights its cross-entropy by the rank's
share of the batch, so that DDP's averaging of gradients gives the single-process gradient of the
global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
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


SMOOTH = 1e-5


class _AllReduceSum(torch.autograd.Function):
    """The group's sum of a tensor, whose gradient is the group's sum of the gradients (each
    rank's loss depends on every rank's input). ``torch.distributed.nn.functional.all_reduce``
    does the same but is deprecated, and its successor's autograd is new in torch 2.12."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class GroupDiceCELoss(nn.Module):
    """MONAI's ``DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
    smooth_nr=smooth_dr=1e-5)`` over the global batch of a process group, of which this rank holds
    ``share`` (its elements / the global batch size).

    Dice: the sums over batch and space of ``p * y``, ``p`` and ``y`` per foreground class are
    all-reduced (``torch.distributed.nn``: the backward all-reduces the gradient too), so every rank
    computes the global batch's Dice and each rank's predictions receive the gradient a single
    process would give them, times the world size, which DDP's averaging divides out. Cross-entropy:
    the rank's mean times ``share * world_size``, which DDP's averaging turns into the global mean.
    Without a process group it is exactly MONAI's loss (a test checks).

    ``ignore_class``: target voxels of this class index (the dataset's ignore label, one past the
    network's K outputs) take part in no term: they are masked out of the Dice sums and the
    cross-entropy is the mean over the other voxels (nnU-Net v2's convention). ``batch=False``: the
    Dice of each element, then their mean (single process only, as MONAI's ``batch=False``)."""

    def __init__(self, share: float = 1.0, ignore_class: int | None = None, batch: bool = True):
        super().__init__()
        self.share, self.ignore_class, self.batch = share, ignore_class, batch

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        labels = target[:, 0].long()
        probs = torch.softmax(logits.float(), dim=1)[:, 1:]
        valid = None
        if self.ignore_class is not None:
            valid = labels != self.ignore_class
            labels = torch.where(valid, labels, 0)
            probs = probs * valid.unsqueeze(1)
        onehot = F.one_hot(labels, k).movedim(-1, 1)[:, 1:].to(probs.dtype)
        if valid is not None:
            onehot = onehot * valid.unsqueeze(1)
        axes = [0, *range(2, logits.ndim)] if self.batch else list(range(2, logits.ndim))
        stats = torch.stack([(probs * onehot).sum(axes), probs.sum(axes), onehot.sum(axes)])
        world = 1
        if dist.is_initialized() and self.batch:
            stats, world = _AllReduceSum.apply(stats), dist.get_world_size()
        tp, pred, ref = stats
        dice = (1.0 - (2.0 * tp + SMOOTH) / (pred + ref + SMOOTH)).mean()
        if valid is None:
            ce = F.cross_entropy(logits.float(), labels)
        else:  # the mean over the annotated voxels (0 when a patch holds none)
            ce = (F.cross_entropy(logits.float(), labels, reduction="none") * valid).sum() / valid.sum().clamp_min(1)
        return dice + ce * (self.share * world)


class DeepSupervisionLoss(nn.Module):
    """``group_share``: this rank's share of the global batch in a distributed run (then the batch
    Dice is the global batch's, :class:`GroupDiceCELoss`); None for a single process.
    ``ignore_class``: the class index of the ignore label in the targets (no loss term sees it)."""

    def __init__(self, batch_dice: bool = True, group_share: float | None = None, ignore_class: int | None = None):
        super().__init__()
        if ignore_class is not None:  # MONAI's DiceCELoss takes no mask
            self.loss = GroupDiceCELoss(1.0 if group_share is None else group_share, ignore_class, batch_dice)
        elif group_share is not None and batch_dice:
            self.loss = GroupDiceCELoss(group_share)
        else:
            self.loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=batch_dice,
                                   smooth_nr=SMOOTH, smooth_dr=SMOOTH)

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """outputs: logits (B, K, *S) or a list of them, full resolution first; target: (B, 1, *S) int."""
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        weights = deep_supervision_weights(len(outputs))
        total = outputs[0].new_zeros(())
        for w, out in zip(weights, outputs, strict=True):
            if w > 0:
                total = total + w * self.loss(out, downsample_target(target, out.shape[2:]))
            else:  # a zero gradient, not none: every parameter takes part in every step (as DDP expects)
                total = total + 0.0 * out.float().mean()
        return total
