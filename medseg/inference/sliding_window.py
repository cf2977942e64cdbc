"""Sliding-window prediction of one preprocessed volume with mirroring test-time augmentation.

A chain of small functions over any predictor callable: window (MONAI's Gaussian-weighted
``sliding_window_inference``) → mirror → softmax → mean over models.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from medseg.inference.uncertainty import qc_score

Predictor = Callable[[torch.Tensor], torch.Tensor]


def mirror_sets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """All subsets of the mirror axes (the empty one first)."""
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def _windowed(predictor: Predictor, x: torch.Tensor, patch: Sequence[int], step: float, sw_batch: int) -> torch.Tensor:
    return sliding_window_inference(x, roi_size=tuple(patch), sw_batch_size=sw_batch, predictor=predictor,
                                    overlap=1.0 - step, mode="gaussian", sigma_scale=0.125, padding_mode="constant",
                                    cval=0.0)


def _softmax(t: torch.Tensor) -> torch.Tensor:
    return torch.softmax(t, dim=1)


@torch.inference_mode()
def predict_logits_tta(predictor: Predictor, x: torch.Tensor, patch: Sequence[int], *, step: float = 0.5,
                       mirror_axes: Sequence[int] = (), sw_batch: int = 2,
                       transform: Callable[[torch.Tensor], torch.Tensor] = _softmax,
                       unmirrored: list | None = None) -> torch.Tensor:
    """x: (N, C, *S) → ``transform`` of the stitched outputs (softmax probabilities (N, K, *S) by
    default), averaged over mirrorings of the spatial axes in ``mirror_axes`` (0-based spatial indices).
    ``unmirrored``: a list that receives the pass without mirroring (what ``mirror_axes=()`` gives),
    at no extra cost."""
    total = None
    sets = mirror_sets(mirror_axes)
    for axes in sets:
        dims = [a + 2 for a in axes]
        xi = torch.flip(x, dims) if dims else x
        p = transform(_windowed(predictor, xi, patch, step, sw_batch).float())
        p = torch.flip(p, dims) if dims else p
        if not dims and unmirrored is not None:
            unmirrored.append(p)  # never changed in place below
        total = p if total is None else total + p
    return total / len(sets)


def attention_predictor(model: torch.nn.Module) -> Predictor:
    """A predictor returning the model's attention coefficients instead of its logits: one channel per
    gate, full resolution first, coarser gates upsampled (linear) to the window's size."""
    def run(x: torch.Tensor) -> torch.Tensor:
        model(x)
        size = tuple(x.shape[2:])
        mode = "bilinear" if len(size) == 2 else "trilinear"
        maps = [m.float() if tuple(m.shape[2:]) == size else F.interpolate(m.float(), size=size, mode=mode)
                for m in model.attention_maps()]
        return torch.cat(maps, dim=1)
    return run


def predict_volume(models: Sequence[torch.nn.Module], data: np.ndarray, patch: Sequence[int], *, step: float = 0.5,
                   mirror_axes: Sequence[int] = (), device: str = "cpu", attention: bool = False,
                   qc_scores: list[float] | None = None, unmirrored: list | None = None) -> np.ndarray:
    """Preprocessed (C, *S) 3D volume → probabilities (K, *S), mean over ``models``; with
    ``attention``, the models' attention coefficients (gates, *S) instead. When ``qc_scores`` is a
    list, each model's :func:`~medseg.inference.uncertainty.qc_score` is appended to it; when
    ``unmirrored`` is a list, the probabilities without mirroring (mean over models) are appended.

    A 2D patch predicts slice by slice along axis 0 (the out-of-plane axis)."""
    x = torch.from_numpy(np.ascontiguousarray(data)).to(device)
    two_d = len(patch) == 2
    x = x.permute(1, 0, 2, 3) if two_d else x[None]
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.startswith("cuda") else nullcontext()

    def volume(t: torch.Tensor) -> np.ndarray:  # (N, K, *S) batch → (K, *S) volume
        return (t.permute(1, 0, 2, 3) if two_d else t[0]).float().cpu().numpy()

    total = None
    plain: list = [] if unmirrored is not None else None
    for model in models:
        model.eval()
        with autocast:
            if attention:
                p = predict_logits_tta(attention_predictor(model), x, patch, step=step, mirror_axes=mirror_axes,
                                       sw_batch=8 if two_d else 2, transform=lambda t: t)
            else:
                p = predict_logits_tta(model, x, patch, step=step, mirror_axes=mirror_axes, sw_batch=8 if two_d else 2,
                                       unmirrored=plain)
        if qc_scores is not None:
            qc_scores.append(qc_score(volume(p)))
        total = p if total is None else total + p
    if plain:
        unmirrored.append(volume(sum(plain) / len(plain)))
    return volume(total / len(models))
