"""Small network blocks, built from MONAI's layer factories so one code path serves 2D and 3D.

Each block takes its channel counts, kernel and stride, and can report the activation elements
it stores for backward and its FLOPs for a given output size (used by the planner's models).
A new block variant = a new class here + an entry in :data:`ENCODER_BLOCKS`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.networks.layers.factories import Act, Conv, Norm
from torch import nn

# Elements kept for backward per conv–norm–activation, in units of its output size: the conv output
# (norm input), the norm output (activation input) and the activation output (next conv's input).
STORED_TENSORS_PER_CONV = 3


def _padding(kernel: Sequence[int]) -> tuple[int, ...]:
    return tuple(k // 2 for k in kernel)


class ConvNormAct(nn.Sequential):
    """conv → instance norm (affine) → leaky ReLU(0.01), nnU-Net's basic unit."""

    def __init__(self, dim: int, in_ch: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int]):
        super().__init__(
            Conv[Conv.CONV, dim](in_ch, out_ch, tuple(kernel), tuple(stride), padding=_padding(kernel), bias=True),
            Norm[Norm.INSTANCE, dim](out_ch, eps=1e-5, affine=True),
            Act[Act.LEAKYRELU](negative_slope=0.01, inplace=True),
        )


class PlainBlock(nn.Sequential):
    """``n`` ConvNormAct units; the first one carries the stride (strided-conv downsampling)."""

    def __init__(self, dim: int, in_ch: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int], n: int = 2):
        layers = [ConvNormAct(dim, in_ch, out_ch, kernel, stride)]
        layers += [ConvNormAct(dim, out_ch, out_ch, kernel, [1] * dim) for _ in range(n - 1)]
        super().__init__(*layers)

    @staticmethod
    def cost(in_ch: int, out_ch: int, kernel: Sequence[int], out_voxels: int, n: int = 2) -> tuple[float, float]:
        """(stored activation elements, forward FLOPs) for one sample."""
        k = float(np.prod(kernel))
        flops = 2 * k * in_ch * out_ch * out_voxels + (n - 1) * 2 * k * out_ch * out_ch * out_voxels
        elements = n * STORED_TENSORS_PER_CONV * out_ch * out_voxels
        return elements, flops


ENCODER_BLOCKS: dict[str, type[nn.Module]] = {"plain": PlainBlock}


def init_weights(module: nn.Module) -> None:
    """He (Kaiming) normal init for convs with leaky-ReLU slope 0.01, zero bias, as nnU-Net."""
    if isinstance(module, nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.ConvTranspose3d):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
