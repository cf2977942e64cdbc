"""One dynamic U-Net built from a plan's :class:`~medseg.plans.schema.Architecture`.

Encoder: stages of conv blocks, the first conv of a stage strided (downsampling). Decoder:
transposed conv up, concatenation with the skip, conv block, and a 1x1 segmentation head per
decoder stage (deep supervision; the full-resolution head is the network's output in eval mode).

The structure is written once, in :func:`stage_specs`: :class:`UNet` builds the modules by walking
it and :func:`estimate_costs` walks the same specs with a patch's voxel counts.
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
    AMP_ACTIVATION_BYTES,
    AMP_WORKSPACE_BYTES,
    AttentionGate,
    Cost,
    PlainBlock,
    SqueezeExcitation,
    init_weights,
)
from medseg.networks.graph import MAX_GRAPH_NODES, GraphBottleneck
from medseg.networks.reversible import ReversibleBlock
from medseg.networks.variants import encoder_block
from medseg.plans.schema import Architecture


def bottleneck_shape(arch: Architecture, patch_size: Sequence[int]) -> list[int]:
    """Spatial size of the deepest stage for a patch (each stride rounds up, as the convs do)."""
    cur = np.array(patch_size, dtype=float)
    for st in arch.strides:
        cur = np.ceil(cur / np.array(st))
    return [int(c) for c in cur]


def check_buildable(arch: Architecture, patch_size: Sequence[int] | None = None) -> None:
    """Refuse block combinations the builder cannot make, with a one-line reason."""
    encoder_block(arch.blocks.encoder_block)  # an unknown name: PlanError with "did you mean"
    if arch.blocks.reversible and arch.blocks.encoder_block != "plain":
        raise PlanError("reversible blocks replace the encoder's blocks (their couplings are residual already); "
                        "choose encoder_block 'plain' with reversible")
    if arch.blocks.bottleneck == "graph" and patch_size is not None:
        shape = bottleneck_shape(arch, patch_size)
        nodes = int(np.prod(shape))
        if nodes > MAX_GRAPH_NODES:
            raise PlanError(f"graph bottleneck too large: {nodes} nodes (bottleneck {shape} for patch "
                            f"{list(patch_size)}) > {MAX_GRAPH_NODES}; its dense adjacency grows as nodes²")


class _WithSE(nn.Sequential):
    """A block followed by squeeze–excitation; passes every input on to the block."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self[1](self[0](*xs))


@dataclass(frozen=True)
class BlockSpec:
    """One stage block, as built and as costed: ``cls(dim, in_ch, out_ch, kernel, stride, depth)``
    (plus ``skip_ch`` for a decoder block that takes the skip apart), then squeeze–excitation
    ``se`` ('cse', 'sse', 'scse') on its output unless 'none'."""

    cls: type[nn.Module]
    in_ch: int
    out_ch: int
    kernel: list[int]
    stride: list[int]
    depth: int
    se: str = "none"
    se_reduction: int = 2
    skip_ch: int | None = None

    def build(self, dim: int) -> nn.Module:
        extra = {} if self.skip_ch is None else {"skip_ch": self.skip_ch}
        block = self.cls(dim, self.in_ch, self.out_ch, self.kernel, self.stride, self.depth, **extra)
        if self.se == "none":
            return block
        return _WithSE(block, SqueezeExcitation(dim, self.out_ch, self.se, self.se_reduction))

    def costs(self, voxels: int) -> list[Cost]:
        """Per sample at ``voxels`` output voxels: the block's cost, then the SE's."""
        out = [self.cls.cost(self.in_ch, self.out_ch, self.kernel, voxels, self.depth, self.stride)]
        if self.se != "none":
            out.append(SqueezeExcitation.cost(self.out_ch, self.se, self.se_reduction, voxels))
        return out

    def workspace(self, voxels: int, amp: bool = False) -> float:
        """Backward transients while this block runs backward, in bytes per sample (float32, or
        under AMP: :func:`workspace_bytes`)."""
        return self.cls.workspace_units * self.out_ch * voxels * workspace_bytes(self.cls, amp)


@dataclass(frozen=True)
class DecoderStage:
    """One decoder level at an encoder stage's resolution: a transposed conv up from the deeper
    level (``up_in`` channels, by ``up_stride``) to ``block.out_ch`` channels, an additive attention
    gate on the skip when ``gate``, ``block`` over the up-sampled features and the skip
    (concatenated, or apart when ``block.skip_ch`` is set), and a 1x1 head to ``num_classes``."""

    up_in: int
    up_stride: list[int]
    gate: bool
    block: BlockSpec
    num_classes: int

    def build(self, dim: int) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        """(up-sampling conv, gate or identity, block, head), constructed in this order."""
        f = self.block.out_ch
        up = Conv[Conv.CONVTRANS, dim](self.up_in, f, tuple(self.up_stride), tuple(self.up_stride), bias=False)
        gate = AttentionGate(dim, f, f) if self.gate else nn.Identity()
        block = self.block.build(dim)
        return up, gate, block, Conv[Conv.CONV, dim](f, self.num_classes, 1, 1, bias=True)

    def costs(self, voxels: int, below_voxels: int) -> list[Cost]:
        """Per sample, ``voxels`` at this level and ``below_voxels`` at the deeper one: up-sampling,
        gate, block, SE, head."""
        f, k = self.block.out_ch, self.num_classes
        ss = int(np.prod(self.up_stride))
        # up-sampling, and the concatenation its conv keeps (a block taking the skip apart: only the up-sampled half is new)
        kept = (1 if self.block.skip_ch is not None else 2) * f * voxels
        out = [Cost(kept, 2 * ss * self.up_in * f * below_voxels, ss * self.up_in * f)]
        if self.gate:
            out.append(AttentionGate.cost(f, f, voxels))
        out += self.block.costs(voxels)
        out.append(Cost(2 * k * voxels, 2 * f * k * voxels, f * k + k))
        return out

    def workspace(self, voxels: int, amp: bool = False) -> float:
        """The block's backward transients and the gate's, in bytes per sample."""
        gate = AttentionGate.workspace_units if self.gate else 0.0
        return (self.block.cls.workspace_units + gate) * self.block.out_ch * voxels * workspace_bytes(self.block.cls, amp)


@dataclass(frozen=True)
class StageSpecs:
    """The network's structure: encoder stages (full resolution first) and decoder levels (deepest
    first), walked by both :class:`UNet` and :func:`estimate_costs`."""

    dim: int
    encoder: list[BlockSpec]
    decoder: list[DecoderStage]


def _units(arch: Architecture, cls: type[nn.Module], stage: int) -> int:
    """Units of encoder stage ``stage``: the plan's ``encoder_units_per_stage`` or the block's
    ``stage_depths`` for a block that has them (residual), else ``convs_per_stage``."""
    depths = getattr(cls, "stage_depths", None)
    if depths is None:
        return arch.convs_per_stage
    depths = arch.encoder_units_per_stage or list(depths)
    return depths[min(stage, len(depths) - 1)]


def stage_specs(arch: Architecture, in_channels: int, num_classes: int) -> StageSpecs:
    """The blocks of the U-Net ``arch`` describes. Encoder stages use the registered
    ``encoder_block`` (reversible: :class:`ReversibleBlock`), the deepest one the graph bottleneck
    when asked; decoder blocks are plain (reversible: reversible, taking the skip apart)."""
    b, f, k, s = arch.blocks, arch.features, arch.kernel_sizes, arch.strides
    dim = len(s[0])
    stage_cls = ReversibleBlock if b.reversible else encoder_block(b.encoder_block)
    decoder_cls = ReversibleBlock if b.reversible else PlainBlock
    se = {"se": b.squeeze_excitation, "se_reduction": b.se_reduction}
    encoder, prev = [], in_channels
    for i in range(arch.num_stages):
        cls = GraphBottleneck if i == arch.num_stages - 1 and b.bottleneck == "graph" else stage_cls
        encoder.append(BlockSpec(cls, prev, f[i], k[i], s[i], _units(arch, cls, i), **se))
        prev = f[i]
    separate = getattr(decoder_cls, "separate_skip", False)
    decoder = [DecoderStage(f[i + 1], s[i + 1], b.attention_gates,
                            BlockSpec(decoder_cls, 2 * f[i], f[i], k[i], [1] * dim, arch.convs_per_stage, **se,
                                      skip_ch=f[i] if separate else None), num_classes)
               for i in range(arch.num_stages - 2, -1, -1)]
    return StageSpecs(dim, encoder, decoder)


class UNet(nn.Module):
    """Encoder (stages of the registered encoder block) → decoder (transposed conv up, optional
    attention gate on the skip, concatenation, plain conv block), squeeze–excitation after every
    block when asked, a 1x1 head per decoder stage: the modules of :func:`stage_specs`, in its order."""

    def __init__(self, arch: Architecture, in_channels: int, num_classes: int):
        super().__init__()
        check_buildable(arch)
        spec = stage_specs(arch, in_channels, num_classes)
        self.dim, self.deep_supervision = spec.dim, arch.deep_supervision
        self.pair_decoder = any(level.block.skip_ch is not None for level in spec.decoder)
        self.encoder = nn.ModuleList(stage.build(spec.dim) for stage in spec.encoder)
        self.up, self.decoder, self.heads, self.gates = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for level in spec.decoder:
            up, gate, block, head = level.build(spec.dim)
            self.up.append(up)
            self.gates.append(gate)
            self.decoder.append(block)
            self.heads.append(head)
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
AMP_WEIGHT_COPY_BYTES = 2  # autocast's fp16 copy of each weight, kept by its convolution for backward


def workspace_bytes(cls: type[nn.Module], amp: bool) -> float:
    """Bytes per backward-workspace element of a block class: 4 (float32), or under AMP the class's
    ``amp_workspace_bytes`` (default :data:`~medseg.networks.blocks.AMP_WORKSPACE_BYTES`)."""
    return getattr(cls, "amp_workspace_bytes", AMP_WORKSPACE_BYTES) if amp else 4.0


@dataclass(frozen=True)
class CostEstimate:
    """Analytic costs of one training step (per batch), from the same topology walk as the builder.

    The memory model, fitted to measured peaks of real training steps (docs/architecture.md): the
    peak comes early in backward, at the full-resolution decoder block, when every stored activation
    is still alive, that block's backward workspace is allocated, and besides the weights and their
    momentum few gradients exist yet (gradients grow as activations are freed). When the weights
    dominate, the peak is instead the optimiser step's weights + gradients + momentum.

    ``amp``: the step's forward runs under fp16 autocast (CUDA training): activations are stored in
    fp16 and each weight also has its fp16 copy during backward; weights, gradients and momentum
    stay float32 (:data:`~medseg.networks.blocks.AMP_ACTIVATION_BYTES` and the notes there)."""

    parameters: int
    activation_bytes: float
    forward_flops: float
    workspace_bytes: float = 0.0
    amp: bool = False

    @property
    def weight_state_bytes(self) -> float:
        """Weights, gradients and momentum (float32)."""
        return OPTIMISER_COPIES * 4.0 * self.parameters

    @property
    def training_bytes(self) -> float:
        """Estimated peak tensor memory of one training step."""
        backward = self.activation_bytes + self.workspace_bytes + 2 * 4.0 * self.parameters
        if self.amp:
            backward += AMP_WEIGHT_COPY_BYTES * self.parameters
        return max(backward, self.weight_state_bytes)

    @property
    def train_flops(self) -> float:
        """forward + backward ≈ 3 × forward."""
        return 3.0 * self.forward_flops


def estimate_costs(arch: Architecture, patch_size: Sequence[int], batch_size: int, in_channels: int,
                   num_classes: int, amp: bool = False) -> CostEstimate:
    """Parameters, stored activation bytes and forward FLOPs of a training step at this patch/batch:
    the blocks of :func:`stage_specs` (those :class:`UNet` builds), each asked for its cost at its
    stage's voxel count. Summed in float64 in walk order (encoder stages, then decoder levels).
    ``amp``: for a step under fp16 autocast (a CUDA plan), see :class:`CostEstimate`."""
    spec = stage_specs(arch, in_channels, num_classes)
    sizes, cur = [], np.array(patch_size, dtype=float)
    for st in arch.strides:
        cur = np.ceil(cur / np.array(st))
        sizes.append(int(np.prod(cur)))
    totals = np.zeros(3)  # elements, flops, params
    workspace = 0.0  # bytes: the largest block's backward transients
    for stage, voxels in zip(spec.encoder, sizes, strict=True):
        for cost in stage.costs(voxels):
            totals += np.asarray(cost, dtype=float)
        workspace = max(workspace, stage.workspace(voxels, amp))
    for level, i in zip(spec.decoder, range(arch.num_stages - 2, -1, -1), strict=True):
        for cost in level.costs(sizes[i], sizes[i + 1]):
            totals += np.asarray(cost, dtype=float)
        workspace = max(workspace, level.workspace(sizes[i], amp))
    elements, flops, params = totals
    activation = AMP_ACTIVATION_BYTES if amp else 4
    return CostEstimate(int(params), elements * batch_size * activation, flops * batch_size,
                        workspace * batch_size, amp)
