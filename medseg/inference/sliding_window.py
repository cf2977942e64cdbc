"""Sliding-window prediction of one preprocessed volume with mirroring test-time augmentation.

A chain of small functions over any predictor callable: window (MONAI's Gaussian-weighted
``sliding_window_inference``) → mirror → softmax → mean over models.

Windows run on the device of the input (the model's); the stitched output and every sum over
mirrorings and models live on the *stitch device* (MONAI's ``sw_device`` / ``device`` split), so a
large CT with many classes need not hold its full-size probabilities in GPU memory. The rule
(:func:`choose_stitch_device`): on the compute device when :data:`STITCH_COPIES` full-size float32
copies of the output take at most :data:`STITCH_FREE_SHARE` of the device's free memory, else on
the CPU. On a CPU both are the CPU and nothing changes.

Memory: each pass is stitched into MONAI's one float32 output, the softmax is taken in place there
(:func:`softmax_`), mirrorings and models are summed in place (a mirrored pass is flipped slab by
slab into the sum) and the QC score is taken slab by slab, so that without mirroring one model holds
one (K, *S) float32 copy (and MONAI's (1, *S) count map), with mirroring or several models two or
three. Every sum adds in the same order as ``a + b`` would, so the values are bit-identical to the
straightforward computation.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

Predictor = Callable[[torch.Tensor], torch.Tensor]

# Full-size float32 copies of the output that are alive at once at the worst point of
# predict_volume: the running sum over models, the unmirrored pass kept on request, and inside
# predict_logits_tta the sum over mirrorings and the stitched pass (its softmax is taken in place off
# CUDA; on CUDA one more copy), MONAI's count map adds 1/K more.
STITCH_COPIES = 5
SLAB_VOXELS = 1 << 21  # voxels per slab of the slab-wise steps (flipped sums, QC score)
STITCH_FREE_SHARE = 0.5  # the other half stays for the windows' activations and the allocator's slack


def stitched_bytes(batch: int, channels: int, spatial: Sequence[int]) -> int:
    """Bytes of one stitched float32 output (N, K, *S)."""
    return 4 * batch * channels * int(np.prod(spatial))


def choose_stitch_device(compute: torch.device | str, batch: int, channels: int, spatial: Sequence[int],
                         free_bytes: int | None = None) -> torch.device:
    """Where the stitched output of a (N=batch, K=channels, *spatial) prediction lives: ``compute``
    when :data:`STITCH_COPIES` copies of it fit in :data:`STITCH_FREE_SHARE` of the free memory of
    ``compute`` (``free_bytes``, default ``torch.cuda.mem_get_info``), else the CPU. A CPU compute
    device stitches on the CPU."""
    compute = torch.device(compute)
    if compute.type != "cuda":
        return compute
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(compute)[0]
    need = STITCH_COPIES * stitched_bytes(batch, channels, spatial)
    return compute if need <= STITCH_FREE_SHARE * free_bytes else torch.device("cpu")


def output_channels(predictor: Predictor, x: torch.Tensor, patch: Sequence[int]) -> int:
    """The predictor's number of output channels, from one window of zeros (1, C, *patch) on ``x``'s device."""
    return int(predictor(x.new_zeros((1, x.shape[1], *patch))).shape[1])


def mirror_sets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """All subsets of the mirror axes (the empty one first)."""
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def _windowed(predictor: Predictor, x: torch.Tensor, patch: Sequence[int], step: float, sw_batch: int,
              stitch: torch.device) -> torch.Tensor:
    return sliding_window_inference(x, roi_size=tuple(patch), sw_batch_size=sw_batch, predictor=predictor,
                                    overlap=1.0 - step, mode="gaussian", sigma_scale=0.125, padding_mode="constant",
                                    cval=0.0, sw_device=x.device, device=stitch)


def softmax_(t: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1, in place where the kernel allows it (a contiguous CPU tensor: the CPU kernel
    reads each element before it writes it, bit-identical to ``torch.softmax``), else a new tensor."""
    if t.device.type == "cpu" and t.is_contiguous() and t.dtype == torch.float32:
        return torch.ops.aten._softmax.out(t, 1, False, out=t)
    return torch.softmax(t, dim=1)


_softmax = softmax_


def _slabs(n: int, plane: int) -> list[slice]:
    """Slices of ``range(n)`` with about :data:`SLAB_VOXELS` voxels each (``plane`` voxels per index)."""
    step = max(1, SLAB_VOXELS // max(1, plane))
    return [slice(a, min(n, a + step)) for a in range(0, n, step)]


def add_flipped_(total: torch.Tensor, p: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """``total += torch.flip(p, dims)`` in place, slab by slab along dim 2 (no full-size flipped copy)."""
    if not dims:
        return total.add_(p)
    n = total.shape[2]
    for s in _slabs(n, int(np.prod(total.shape[3:])) * total.shape[1]):
        src = slice(n - s.stop, n - s.start) if 2 in dims else s
        total[:, :, s] += torch.flip(p[:, :, src], list(dims))
    return total


def qc_score_slabs(probs: np.ndarray) -> float:
    """:func:`~medseg.inference.uncertainty.qc_score` of (K, *S) probabilities, computed slab by slab
    along axis 1: the same float32 entropies of the same voxels, averaged at once."""
    from medseg.inference.uncertainty import entropy_map

    parts = []
    for s in _slabs(probs.shape[1], int(np.prod(probs.shape[2:])) * probs.shape[0]):
        p = probs[:, s]
        fg = p.argmax(axis=0) > 0
        if fg.any():
            parts.append(entropy_map(p)[fg])
    if not parts:
        return 1.0
    return float(np.concatenate(parts).mean())


@torch.inference_mode()
def predict_logits_tta(predictor: Predictor, x: torch.Tensor, patch: Sequence[int], *, step: float = 0.5,
                       mirror_axes: Sequence[int] = (), sw_batch: int = 2,
                       transform: Callable[[torch.Tensor], torch.Tensor] = _softmax,
                       unmirrored: list | None = None, stitch_device: torch.device | str | None = None) -> torch.Tensor:
    """x: (N, C, *S) → ``transform`` of the stitched outputs (softmax probabilities (N, K, *S) by
    default), averaged over mirrorings of the spatial axes in ``mirror_axes`` (0-based spatial indices).
    ``unmirrored``: a list that receives the pass without mirroring (what ``mirror_axes=()`` gives),
    at no extra cost. Windows run on ``x``'s device; the result lives on ``stitch_device`` (default:
    ``x``'s device)."""
    stitch = torch.device(stitch_device) if stitch_device is not None else x.device
    total = None
    sets = mirror_sets(mirror_axes)
    for axes in sets:
        dims = [a + 2 for a in axes]
        xi = torch.flip(x, dims) if dims else x
        p = transform(_windowed(predictor, xi, patch, step, sw_batch, stitch).float())
        if not dims and unmirrored is not None:
            unmirrored.append(p)  # never changed in place below: the sum starts from a copy then
        if total is None:
            total = torch.flip(p, dims) if dims else (p.clone() if unmirrored is not None and len(sets) > 1 else p)
        else:
            add_flipped_(total, p, dims)
        del p
    return total.div_(len(sets)) if len(sets) > 1 else total


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
                   qc_scores: list[float] | None = None, unmirrored: list | None = None,
                   stitch_device: str | None = None) -> np.ndarray:
    """Preprocessed (C, *S) 3D volume → probabilities (K, *S), mean over ``models``; with
    ``attention``, the models' attention coefficients (gates, *S) instead. When ``qc_scores`` is a
    list, each model's :func:`~medseg.inference.uncertainty.qc_score` is appended to it; when
    ``unmirrored`` is a list, the probabilities without mirroring (mean over models) are appended.
    Windows run on ``device`` (the models'); the stitched outputs on ``stitch_device``: None or
    ``auto`` for :func:`choose_stitch_device`'s rule, else that device (``cpu``, ``cuda:N``).

    A 2D patch predicts slice by slice along axis 0 (the out-of-plane axis)."""
    x = torch.from_numpy(np.ascontiguousarray(data)).to(device)
    two_d = len(patch) == 2
    x = x.permute(1, 0, 2, 3) if two_d else x[None]
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.startswith("cuda") else nullcontext()

    def volume(t: torch.Tensor) -> np.ndarray:  # (N, K, *S) batch → (K, *S) volume
        return (t.permute(1, 0, 2, 3) if two_d else t[0]).float().cpu().numpy()

    total = None
    plain: list = [] if unmirrored is not None else None
    stitch = None if stitch_device in (None, "auto") else torch.device(stitch_device)
    if stitch is None and x.device.type != "cuda":
        stitch = x.device  # the rule's answer off CUDA, without the probe
    with torch.inference_mode():  # the sums below are of inference tensors, so they stay inside it
        for model in models:
            model.eval()
            predictor = attention_predictor(model) if attention else model
            with autocast:
                if stitch is None:  # the rule, decided once from the first model's output channels
                    stitch = choose_stitch_device(x.device, x.shape[0], output_channels(predictor, x, patch), x.shape[2:])
                if attention:
                    p = predict_logits_tta(predictor, x, patch, step=step, mirror_axes=mirror_axes,
                                           sw_batch=8 if two_d else 2, transform=lambda t: t, stitch_device=stitch)
                else:
                    p = predict_logits_tta(model, x, patch, step=step, mirror_axes=mirror_axes, sw_batch=8 if two_d else 2,
                                           unmirrored=plain, stitch_device=stitch)
            if qc_scores is not None:
                qc_scores.append(qc_score_slabs(volume(p)))
            if total is None:  # a pass also kept in ``plain`` is never summed into in place
                total = p.clone() if len(models) > 1 and plain and p is plain[-1] else p
            else:
                total.add_(p)
            del p
        if plain:
            unmirrored.append(volume(sum(plain) / len(plain)))
        return volume(total.div_(len(models)) if len(models) > 1 else total)
