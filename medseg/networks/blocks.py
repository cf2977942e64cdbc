"""Small network blocks, built from MONAI's layer factories so one code path serves 2D and 3D.

A stage block (encoder, decoder or bottleneck stage) is a class with
``__init__(dim, in_ch, out_ch, kernel, stride, n)`` (``n`` units; the first carries the stride), a
static ``cost(in_ch, out_ch, kernel, out_voxels, n, stride)`` returning its :class:`Cost` for one
sample, and ``workspace_units`` (its backward transients, see :data:`WORKSPACE_UNITS`). Optional:
``amp_workspace_bytes`` (bytes per workspace element under AMP, default :data:`AMP_WORKSPACE_BYTES`),
``stage_depths`` (units per encoder stage when the plan gives none, instead of ``convs_per_stage``)
and ``separate_skip`` (as a decoder block: takes the up-sampled features and the skip apart).
The builder and the cost model both walk :func:`medseg.networks.unet.stage_specs`, so a block is
costed with exactly the arguments it is built with. A new encoder block = a class + one entry in
:data:`medseg.networks.variants.VARIANTS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from monai.networks.layers.factories import Act, Conv, Norm, Pool
from torch import nn

# Elements kept for backward per conv–norm–activation, in units of its output size: the conv output
# (the norm's input) and the activation's output (the in-place leaky ReLU overwrites the norm's output;
# autograd keeps it for the activation and the next conv). Measured with saved-tensor hooks.
STORED_TENSORS_PER_CONV = 2
# Transient tensors alive while a block runs backward (gradients of its output, its concatenated
# input and its convs' inputs, the conv workspace, the loss at the same level), in units of the
# block's output size. Only one block is in backward at a time, so the network's workspace is the
# largest block's. Fitted to measured peaks (medseg.planning.memory.measure_training_peak, docs/architecture.md).
WORKSPACE_UNITS = 3.0
# Mixed precision (AMP: forward under fp16 autocast, as CUDA training runs it). Convolutions,
# instance norms (they run in their input's dtype) and activations then produce fp16, so every
# stored activation takes AMP_ACTIVATION_BYTES an element (checked with saved-tensor hooks under
# CPU bf16 autocast, the same size: the network's saved bytes fall to 0.52x of float32's).
AMP_ACTIVATION_BYTES = 2
# A conv block's backward workspace is still counted at 4 bytes an element under AMP: besides fp16
# gradients it holds the loss of its level (softmax and cross-entropy run in float32) and the
# convolution library's workspace (cuDNN benchmark mode picks the fastest algorithm, whatever its
# workspace), neither of which shrinks with the element size. Measured under CPU bf16 autocast:
# 0.6-1.2x of the float32 workspace, so halving it would under-estimate.
AMP_WORKSPACE_BYTES = 4
# nnU-Net ResEnc-M stage depths (residual units per encoder stage)
RESIDUAL_STAGE_DEPTHS = (1, 3, 4, 6, 6, 6, 6, 6)


class Cost(NamedTuple):
    """What one sample costs a block: the activation ``elements`` it keeps for backward, its forward
    ``flops`` and its ``params``. ``+`` adds costs component by component (not tuple concatenation)."""

    elements: float
    flops: float
    params: int

    def __add__(self, other: Cost) -> Cost:  # type: ignore[override]
        return Cost(self.elements + other.elements, self.flops + other.flops, self.params + other.params)

    def times(self, k: int) -> Cost:
        """``k`` copies of this cost (``k`` identical units)."""
        return Cost(k * self.elements, k * self.flops, k * self.params)


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

    workspace_units = WORKSPACE_UNITS

    def __init__(self, dim: int, in_ch: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int], n: int = 2):
        layers = [ConvNormAct(dim, in_ch, out_ch, kernel, stride)]
        layers += [ConvNormAct(dim, out_ch, out_ch, kernel, [1] * dim) for _ in range(n - 1)]
        super().__init__(*layers)

    @staticmethod
    def cost(in_ch: int, out_ch: int, kernel: Sequence[int], out_voxels: int, n: int = 2,
             stride: Sequence[int] = ()) -> Cost:
        k = float(np.prod(kernel))
        flops = 2 * k * in_ch * out_ch * out_voxels + (n - 1) * 2 * k * out_ch * out_ch * out_voxels
        elements = n * STORED_TENSORS_PER_CONV * out_ch * out_voxels
        params = int(k * in_ch * out_ch + 3 * out_ch + (n - 1) * (k * out_ch * out_ch + 3 * out_ch))
        return Cost(elements, flops, params)


class ResidualUnit(nn.Module):
    """Basic residual block (He et al.): conv–norm–act → conv–norm, plus the input (projected by a
    strided 1x1 conv + norm when channels or resolution change), then leaky ReLU."""

    def __init__(self, dim: int, in_ch: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int]):
        super().__init__()
        self.conv1 = ConvNormAct(dim, in_ch, out_ch, kernel, stride)
        self.conv2 = nn.Sequential(
            Conv[Conv.CONV, dim](out_ch, out_ch, tuple(kernel), 1, padding=_padding(kernel), bias=True),
            Norm[Norm.INSTANCE, dim](out_ch, eps=1e-5, affine=True),
        )
        needs_projection = in_ch != out_ch or any(s != 1 for s in stride)
        self.skip = (nn.Sequential(Conv[Conv.CONV, dim](in_ch, out_ch, 1, tuple(stride), bias=False),
                                   Norm[Norm.INSTANCE, dim](out_ch, eps=1e-5, affine=True))
                     if needs_projection else nn.Identity())
        self.act = Act[Act.LEAKYRELU](negative_slope=0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))

    @staticmethod
    def cost(in_ch: int, out_ch: int, kernel: Sequence[int], out_voxels: int, projected: bool) -> Cost:
        k = float(np.prod(kernel))
        flops = 2 * k * (in_ch * out_ch + out_ch * out_ch) * out_voxels
        params = int(k * in_ch * out_ch + 3 * out_ch + k * out_ch * out_ch + 3 * out_ch)
        # conv1 unit, conv2's output (norm input), the sum (in-place activation output); the addition keeps nothing
        elements = (STORED_TENSORS_PER_CONV + 1 + 1) * out_ch * out_voxels
        if projected:
            flops += 2 * in_ch * out_ch * out_voxels
            params += in_ch * out_ch + 2 * out_ch
            elements += out_ch * out_voxels  # the projection conv's output (norm input)
        return Cost(elements, flops, params)


class ResidualBlock(nn.Sequential):
    """``n`` residual units; the first one carries the stride (ResEnc-style encoder stage)."""

    workspace_units = WORKSPACE_UNITS
    stage_depths = RESIDUAL_STAGE_DEPTHS

    def __init__(self, dim: int, in_ch: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int], n: int = 1):
        units = [ResidualUnit(dim, in_ch, out_ch, kernel, stride)]
        units += [ResidualUnit(dim, out_ch, out_ch, kernel, [1] * dim) for _ in range(n - 1)]
        super().__init__(*units)

    @staticmethod
    def cost(in_ch: int, out_ch: int, kernel: Sequence[int], out_voxels: int, n: int = 1,
             stride: Sequence[int] = ()) -> Cost:
        first = ResidualUnit.cost(in_ch, out_ch, kernel, out_voxels, in_ch != out_ch or any(s != 1 for s in stride))
        rest = ResidualUnit.cost(out_ch, out_ch, kernel, out_voxels, False)
        return first + rest.times(n - 1)


class SqueezeExcitation(nn.Module):
    """Feature recalibration after a conv block.

    ``cse``: channel squeeze–excitation (Hu et al.): global average pool → 1x1 conv C→C/r → ReLU →
    1x1 conv → sigmoid, scaling each channel. ``sse``: spatial squeeze–excitation (Roy et al.):
    1x1 conv C→1 → sigmoid, scaling each voxel. ``scse``: both, combined by element-wise max
    (Roy et al., IEEE TMI 2019). Written here because MONAI has cSE only (``ChannelSELayer``) and
    one small module keeps the three variants and their cost in one place.
    """

    def __init__(self, dim: int, channels: int, mode: str, reduction: int = 2):
        super().__init__()
        self.mode = mode
        hidden = max(1, channels // reduction)
        if mode in ("cse", "scse"):
            self.channel = nn.Sequential(
                Pool[Pool.ADAPTIVEAVG, dim](1),
                Conv[Conv.CONV, dim](channels, hidden, 1),
                nn.ReLU(inplace=True),
                Conv[Conv.CONV, dim](hidden, channels, 1),
                nn.Sigmoid(),
            )
        if mode in ("sse", "scse"):
            self.spatial = nn.Sequential(Conv[Conv.CONV, dim](channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "cse":
            return x * self.channel(x)
        if self.mode == "sse":
            return x * self.spatial(x)
        return torch.maximum(x * self.channel(x), x * self.spatial(x))

    @staticmethod
    def cost(channels: int, mode: str, reduction: int, voxels: int) -> Cost:
        hidden = max(1, channels // reduction)
        elements = flops = 0.0
        params = 0
        if mode in ("cse", "scse"):
            params += 2 * channels * hidden + hidden + channels
            elements += channels * voxels
            flops += 2 * channels * voxels
        if mode in ("sse", "scse"):
            params += channels + 1
            elements += 2 * voxels + channels * voxels
            flops += 2 * channels * voxels + channels * voxels
        if mode == "scse":
            elements += channels * voxels
        return Cost(elements, flops, params)


class AttentionGate(nn.Module):
    """Additive attention gate on a skip connection (Oktay et al., Attention U-Net).

    ``α = σ(ψ(ReLU(W_x·x + W_g·g)))`` with 1x1 convs, computed at the skip's resolution from the
    decoder's gating signal ``g`` (the up-sampled decoder features, same size as ``x``); returns
    ``x · α``. The last coefficients ``α`` ((B, 1, *S), in [0, 1]) are kept in
    ``last_coefficients`` for inspection.
    """

    workspace_units = 1.0  # in units of the skip's size, on top of the decoder block's at that level

    def __init__(self, dim: int, skip_ch: int, gate_ch: int, inter_ch: int | None = None):
        super().__init__()
        inter = inter_ch or max(1, skip_ch // 2)
        self.w_x = nn.Sequential(Conv[Conv.CONV, dim](skip_ch, inter, 1, bias=False),
                                 Norm[Norm.INSTANCE, dim](inter, eps=1e-5, affine=True))
        self.w_g = nn.Sequential(Conv[Conv.CONV, dim](gate_ch, inter, 1, bias=False),
                                 Norm[Norm.INSTANCE, dim](inter, eps=1e-5, affine=True))
        self.psi = Conv[Conv.CONV, dim](inter, 1, 1, bias=True)
        self.last_coefficients: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.psi(torch.relu(self.w_x(x) + self.w_g(g))))
        self.last_coefficients = alpha.detach()
        return x * alpha

    @staticmethod
    def cost(skip_ch: int, gate_ch: int, voxels: int) -> Cost:
        inter = max(1, skip_ch // 2)
        params = skip_ch * inter + gate_ch * inter + 4 * inter + inter + 1
        flops = 2 * (skip_ch + gate_ch) * inter * voxels + 2 * inter * voxels
        # W_x and W_g outputs (norm inputs), the ReLU output, the coefficients (sigmoid output and product)
        elements = 3 * inter * voxels + 2 * voxels
        return Cost(elements, flops, params)


def init_weights(module: nn.Module) -> None:
    """He (Kaiming) normal init for convs with leaky-ReLU slope 0.01, zero bias, as nnU-Net."""
    if isinstance(module, nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.ConvTranspose3d):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
