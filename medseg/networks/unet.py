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

from medseg.errors import PlanError
from medseg.networks.blocks import (
    ENCODER_BLOCKS,
    RESIDUAL_STAGE_DEPTHS,
    AttentionGate,
    PlainBlock,
    SqueezeExcitation,
    init_weights,
)
from medseg.networks.graph import MAX_GRAPH_NODES, GraphBottleneck
from medseg.networks.reversible import ReversibleBlock
from medseg.plans.schema import Architecture
from medseg.utils import look_up


def bottleneck_shape(arch: Architecture, patch_size: Sequence[int]) -> list[int]:
    """Spatial size of the deepest stage for a patch (each stride rounds up, as the convs do)."""
    cur = np.array(patch_size, dtype=float)
    for st in arch.strides:
        cur = np.ceil(cur / np.array(st))
    return [int(c) for c in cur]


def check_buildable(arch: Architecture, patch_size: Sequence[int] | None = None) -> None:
    """Refuse block combinations the builder cannot make, with a one-line reason."""
    if arch.blocks.reversible and arch.blocks.encoder_block == "residual":
        raise PlanError("reversible blocks replace the encoder's blocks (their couplings are residual already); "
                        "choose encoder_block 'plain' with reversible")
    look_up(arch.blocks.encoder_block, ENCODER_BLOCKS, "encoder_block")
    if arch.blocks.bottleneck == "graph" and patch_size is not None:
        shape = bottleneck_shape(arch, patch_size)
        nodes = int(np.prod(shape))
        if nodes > MAX_GRAPH_NODES:
            raise PlanError(f"graph bottleneck too large: {nodes} nodes (bottleneck {shape} for patch "
                            f"{list(patch_size)}) > {MAX_GRAPH_NODES}; its dense adjacency grows as nodes²")


def stage_block(arch: Architecture, decoder: bool = False) -> type[nn.Module]:
    if arch.blocks.reversible:
        return ReversibleBlock
    return PlainBlock if decoder else ENCODER_BLOCKS[arch.blocks.encoder_block]


def bottleneck_block(arch: Architecture) -> type[nn.Module]:
    return GraphBottleneck if arch.blocks.bottleneck == "graph" else stage_block(arch)


def encoder_depths(arch: Architecture) -> list[int]:
    """Units (residual), couplings (reversible), convs (plain) or graph convolutions (graph bottleneck) per
    encoder stage."""
    out = [arch.convs_per_stage] * arch.num_stages
    if arch.blocks.encoder_block == "residual" and not arch.blocks.reversible:
        depths = arch.encoder_units_per_stage or list(RESIDUAL_STAGE_DEPTHS)
        out = [depths[min(i, len(depths) - 1)] for i in range(arch.num_stages)]
    if arch.blocks.bottleneck == "graph":
        out[-1] = arch.convs_per_stage  # graph convolutions in the bottleneck
    return out


class _WithSE(nn.Sequential):
    """A block followed by squeeze–excitation; passes every input on to the block."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self[1](self[0](*xs))


class UNet(nn.Module):
    """Encoder (plain or residual stages) → decoder (transposed conv up, optional attention gate
    on the skip, concatenation, plain conv block), squeeze–excitation after every block when
    asked, a 1x1 head per decoder stage."""

    def __init__(self, arch: Architecture, in_channels: int, num_classes: int):
        super().__init__()
        check_buildable(arch)
        dim = len(arch.strides[0])
        self.dim, self.deep_supervision = dim, arch.deep_supervision
        self.pair_decoder = arch.blocks.reversible
        b = arch.blocks
        block_cls, decoder_cls = stage_block(arch), stage_block(arch, decoder=True)
        f, k, s, n = arch.features, arch.kernel_sizes, arch.strides, arch.convs_per_stage

        def with_se(block: nn.Module, channels: int) -> nn.Module:
            if b.squeeze_excitation == "none":
                return block
            return _WithSE(block, SqueezeExcitation(dim, channels, b.squeeze_excitation, b.se_reduction))

        self.encoder = nn.ModuleList()
        prev = in_channels
        for i, depth in enumerate(encoder_depths(arch)):
            cls = bottleneck_block(arch) if i == arch.num_stages - 1 else block_cls
            self.encoder.append(with_se(cls(dim, prev, f[i], k[i], s[i], depth), f[i]))
            prev = f[i]
        self.up, self.decoder, self.heads, self.gates = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in range(arch.num_stages - 2, -1, -1):
            self.up.append(Conv[Conv.CONVTRANS, dim](f[i + 1], f[i], tuple(s[i + 1]), tuple(s[i + 1]), bias=False))
            self.gates.append(AttentionGate(dim, f[i], f[i]) if b.attention_gates else nn.Identity())
            pair = {"skip_ch": f[i]} if self.pair_decoder else {}  # reversible: up-sampled and skip kept apart
            self.decoder.append(with_se(decoder_cls(dim, 2 * f[i], f[i], k[i], [1] * dim, n, **pair), f[i]))
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
        for up, gate, block, head in zip(self.up, self.gates, self.decoder, self.heads, strict=True):
            u = up(x)
            skip = skips.pop()
            skip = gate(skip, u) if isinstance(gate, AttentionGate) else skip
            x = block(u, skip) if self.pair_decoder else block(torch.cat([u, skip], dim=1))
            outputs.append(head(x))
        outputs.reverse()
        if self.training and self.deep_supervision:
            return outputs
        return outputs[0]

    def attention_maps(self) -> list[torch.Tensor]:
        """The attention coefficients of the last forward pass, full resolution first ((B, 1, *S) each)."""
        return [g.last_coefficients for g in reversed(self.gates) if isinstance(g, AttentionGate)
                and g.last_coefficients is not None]


def build_network(arch: Architecture, in_channels: int, num_classes: int) -> UNet:
    return UNet(arch, in_channels, num_classes)


OPTIMISER_COPIES = 3  # weights, gradients and SGD momentum


@dataclass(frozen=True)
class CostEstimate:
    """Analytic costs of one training step (per batch), from the same topology walk as the builder.

    The memory model, fitted to measured peaks of real training steps (docs/architecture.md): the
    peak comes early in backward, at the full-resolution decoder block, when every stored activation
    is still alive, that block's backward workspace is allocated, and besides the weights and their
    momentum few gradients exist yet (gradients grow as activations are freed). When the weights
    dominate, the peak is instead the optimiser step's weights + gradients + momentum."""

    parameters: int
    activation_bytes: float
    forward_flops: float
    workspace_bytes: float = 0.0

    @property
    def weight_state_bytes(self) -> float:
        """Weights, gradients and momentum (float32)."""
        return OPTIMISER_COPIES * 4.0 * self.parameters

    @property
    def training_bytes(self) -> float:
        """Estimated peak tensor memory of one training step (float32)."""
        backward = self.activation_bytes + self.workspace_bytes + 2 * 4.0 * self.parameters
        return max(backward, self.weight_state_bytes)

    @property
    def train_flops(self) -> float:
        """forward + backward ≈ 3 × forward."""
        return 3.0 * self.forward_flops


def estimate_costs(arch: Architecture, patch_size: Sequence[int], batch_size: int, in_channels: int,
                   num_classes: int, bytes_per_element: int = 4) -> CostEstimate:
    """Parameters, stored activation bytes and forward FLOPs of a training step at this patch/batch,
    walking the same topology as :class:`UNet` and asking each block for its cost."""
    f, k, s, n = arch.features, arch.kernel_sizes, arch.strides, arch.convs_per_stage
    b = arch.blocks
    block_cls, decoder_cls = stage_block(arch), stage_block(arch, decoder=True)
    sizes, cur = [], np.array(patch_size, dtype=float)
    for st in s:
        cur = np.ceil(cur / np.array(st))
        sizes.append(int(np.prod(cur)))
    totals = np.zeros(3)  # elements, flops, params
    workspace = 0.0  # elements: the largest block's backward transients

    def add(cost) -> None:
        totals[:] += np.asarray(cost, dtype=float)

    def transient(units: float, channels: int, voxels: int) -> None:
        nonlocal workspace
        workspace = max(workspace, units * channels * voxels)

    def se(channels: int, voxels: int) -> None:
        if b.squeeze_excitation != "none":
            add(SqueezeExcitation.cost(channels, b.squeeze_excitation, b.se_reduction, voxels))

    prev = in_channels
    for i, depth in enumerate(encoder_depths(arch)):
        cls = bottleneck_block(arch) if i == arch.num_stages - 1 else block_cls
        add(cls.cost(prev, f[i], k[i], sizes[i], depth, s[i]))
        transient(cls.workspace_units, f[i], sizes[i])
        se(f[i], sizes[i])
        prev = f[i]
    for i in range(arch.num_stages - 2, -1, -1):
        ss = int(np.prod(s[i + 1]))
        # up-sampling, and the concatenation its conv keeps (reversible: only the up-sampled half is new)
        kept = (1 if b.reversible else 2) * f[i] * sizes[i]
        add((kept, 2 * ss * f[i + 1] * f[i] * sizes[i + 1], ss * f[i + 1] * f[i]))
        if b.attention_gates:
            add(AttentionGate.cost(f[i], f[i], sizes[i]))
        add(decoder_cls.cost(2 * f[i], f[i], k[i], sizes[i], n))
        transient(decoder_cls.workspace_units + (AttentionGate.workspace_units if b.attention_gates else 0.0),
                  f[i], sizes[i])
        se(f[i], sizes[i])
        add((2 * num_classes * sizes[i], 2 * f[i] * num_classes * sizes[i], f[i] * num_classes + num_classes))
    elements, flops, params = totals
    return CostEstimate(int(params), elements * batch_size * bytes_per_element, flops * batch_size,
                        workspace * batch_size * bytes_per_element)
