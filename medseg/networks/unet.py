"""One dynamic U-Net built from a plan's :class:`~medseg.plans.schema.Architecture`.

Encoder: stages of conv blocks, the first conv of a stage strided (downsampling). Decoder:
transposed conv up, concatenation with the skip, conv block, and a 1x1 segmentation head per
decoder stage (deep supervision; the full-resolution head is the network's output in eval mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.networks.layers.factories import Conv
from torch import nn

from medseg.networks.blocks import ENCODER_BLOCKS, PlainBlock, init_weights
from medseg.plans.schema import Architecture
from medseg.utils import look_up


class UNet(nn.Module):
    def __init__(self, arch: Architecture, in_channels: int, num_classes: int):
        super().__init__()
        dim = len(arch.strides[0])
        self.dim, self.deep_supervision = dim, arch.deep_supervision
        block_cls = ENCODER_BLOCKS[look_up(arch.blocks.encoder_block, ENCODER_BLOCKS, "encoder_block")]
        unsupported = [k for k, v in arch.blocks.model_dump().items()
                       if k != "encoder_block" and k != "se_reduction" and v not in (False, "none", "conv")]
        if arch.blocks.encoder_block != "plain" or unsupported:
            from medseg.errors import PlanError

            raise PlanError(f"block variant(s) {unsupported or [arch.blocks.encoder_block]} are not implemented yet")
        f, k, s, n = arch.features, arch.kernel_sizes, arch.strides, arch.convs_per_stage
        self.encoder = nn.ModuleList()
        prev = in_channels
        for i in range(arch.num_stages):
            self.encoder.append(block_cls(dim, prev, f[i], k[i], s[i], n))
            prev = f[i]
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for i in range(arch.num_stages - 2, -1, -1):
            self.up.append(Conv[Conv.CONVTRANS, dim](f[i + 1], f[i], tuple(s[i + 1]), tuple(s[i + 1]), bias=False))
            self.decoder.append(block_cls(dim, 2 * f[i], f[i], k[i], [1] * dim, n))
            self.heads.append(Conv[Conv.CONV, dim](f[i], num_classes, 1, 1, bias=True))
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """x: (B, C, *spatial) → logits (B, K, *spatial); in training with deep supervision, a list
        of logits from full resolution down to the second-deepest stage."""
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        outputs = []
        for up, block, head in zip(self.up, self.decoder, self.heads, strict=True):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
            outputs.append(head(x))
        outputs.reverse()
        if self.training and self.deep_supervision:
            return outputs
        return outputs[0]


def build_network(arch: Architecture, in_channels: int, num_classes: int) -> UNet:
    return UNet(arch, in_channels, num_classes)


@dataclass(frozen=True)
class CostEstimate:
    """Analytic costs of one training step (per batch), from the same topology walk as the builder."""

    parameters: int
    activation_bytes: float
    forward_flops: float

    @property
    def train_flops(self) -> float:
        """forward + backward ≈ 3 × forward."""
        return 3.0 * self.forward_flops


def estimate_costs(arch: Architecture, patch_size: Sequence[int], batch_size: int, in_channels: int,
                   num_classes: int, bytes_per_element: int = 4) -> CostEstimate:
    """Parameters, stored activation bytes and forward FLOPs of a training step at this patch/batch."""
    f, k, s, n = arch.features, arch.kernel_sizes, arch.strides, arch.convs_per_stage
    sizes, cur = [], np.array(patch_size, dtype=float)
    for st in s:
        cur = np.ceil(cur / np.array(st))
        sizes.append(int(np.prod(cur)))
    elements = flops = 0.0
    params = 0
    prev = in_channels
    for i in range(arch.num_stages):  # encoder
        e, fl = PlainBlock.cost(prev, f[i], k[i], sizes[i], n)
        elements, flops = elements + e, flops + fl
        kk = int(np.prod(k[i]))
        params += kk * prev * f[i] + f[i] * 3 + (n - 1) * (kk * f[i] * f[i] + f[i] * 3)
        prev = f[i]
    for i in range(arch.num_stages - 2, -1, -1):  # decoder
        ss = int(np.prod(s[i + 1]))
        flops += 2 * ss * f[i + 1] * f[i] * sizes[i + 1]
        elements += 2 * f[i] * sizes[i]  # upsampled map + concatenation
        e, fl = PlainBlock.cost(2 * f[i], f[i], k[i], sizes[i], n)
        elements, flops = elements + e, flops + fl + 2 * f[i] * num_classes * sizes[i]
        elements += num_classes * sizes[i] * 2  # logits + softmax for the loss
        kk = int(np.prod(k[i]))
        params += ss * f[i + 1] * f[i] + kk * 2 * f[i] * f[i] + f[i] * 3 + (n - 1) * (kk * f[i] * f[i] + f[i] * 3)
        params += f[i] * num_classes + num_classes
    return CostEstimate(params, elements * batch_size * bytes_per_element, flops * batch_size)
