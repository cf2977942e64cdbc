"""Reversible stages: additive-coupling blocks whose activations are recomputed in the backward
pass instead of stored (Gomez et al., RevNet; Brügger et al., partially reversible U-Net).

A coupling splits channels into halves ``(x1, x2)`` and computes
``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``; its input is recovered exactly (up to float rounding)
from its output by ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``. :class:`_ReversibleSequence` runs a
chain of couplings without autograd and keeps only the chain's output; its backward walks the
chain in reverse, rebuilding each input and back-propagating through one coupling at a time.
Written here (a custom ``torch.autograd.Function``) because the old reversible-network libraries
are unmaintained and do not work with current PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from medseg.networks.blocks import STORED_TENSORS_PER_CONV, ConvNormAct


class Coupling(nn.Module):
    def __init__(self, dim: int, channels: int, kernel: Sequence[int]):
        super().__init__()
        if channels % 2:
            raise ValueError(f"reversible coupling needs an even channel count, got {channels}")
        half = channels // 2
        self.f = ConvNormAct(dim, half, half, kernel, [1] * dim)
        self.g = ConvNormAct(dim, half, half, kernel, [1] * dim)
        for m in (self.f[2], self.g[2]):  # in-place activations would overwrite tensors the inverse needs
            m.inplace = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.chunk(x, 2, dim=1)
        y1 = x1 + self.f(x2)
        y2 = x2 + self.g(y1)
        return torch.cat([y1, y2], dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y1, y2 = torch.chunk(y, 2, dim=1)
        x2 = y2 - self.g(y1)
        x1 = y1 - self.f(x2)
        return torch.cat([x1, x2], dim=1)


class _ReversibleSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, couplings: nn.ModuleList, *params: torch.Tensor) -> torch.Tensor:
        ctx.couplings = couplings
        with torch.no_grad():
            for c in couplings:
                x = c(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (y,) = ctx.saved_tensors
        grads: dict[int, torch.Tensor] = {}
        for c in reversed(ctx.couplings):
            y1, y2 = (t.detach() for t in torch.chunk(y, 2, dim=1))
            dy1, dy2 = torch.chunk(dy, 2, dim=1)
            g_params = list(c.g.parameters())
            f_params = list(c.f.parameters())
            with torch.enable_grad():
                z1 = y1.requires_grad_()
                gz = c.g(z1)
                dz1, *dg = torch.autograd.grad(gz, [z1, *g_params], dy2)
            with torch.no_grad():
                x2 = y2 - gz
                dz1 = dy1 + dz1
            with torch.enable_grad():
                x2 = x2.detach().requires_grad_()
                fx = c.f(x2)
                dx2, *df = torch.autograd.grad(fx, [x2, *f_params], dz1)
            with torch.no_grad():
                x1 = y1 - fx
                y = torch.cat([x1, x2.detach()], dim=1)
                dy = torch.cat([dz1, dy2 + dx2], dim=1)
            for p, g in zip(g_params + f_params, dg + df, strict=True):
                grads[id(p)] = g
        params = [p for c in ctx.couplings for p in c.parameters()]
        return (dy, None, *[grads.get(id(p)) for p in params])


class ReversibleBlock(nn.Module):
    """A U-Net stage: one (strided) conv–norm–act from ``in_ch`` to ``out_ch``, then ``n``
    reversible couplings at ``out_ch``. With ``memory_saving`` (default) the couplings' activations
    are recomputed in backward; without it the same computation runs under plain autograd
    (used to check that both give the same gradients)."""

    def __init__(self, dim: int, in_ch: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int], n: int = 2):
        super().__init__()
        self.entry = ConvNormAct(dim, in_ch, out_ch, kernel, stride)
        self.couplings = nn.ModuleList(Coupling(dim, out_ch, kernel) for _ in range(n))
        self.memory_saving = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(x)
        if self.memory_saving and torch.is_grad_enabled() and x.requires_grad:
            return _ReversibleSequence.apply(x, self.couplings, *[p for c in self.couplings for p in c.parameters()])
        for c in self.couplings:
            x = c(x)
        return x

    @staticmethod
    def cost(in_ch: int, out_ch: int, kernel: Sequence[int], out_voxels: int, n: int = 2,
             stride: Sequence[int] = ()) -> tuple[float, float, int]:
        """Stored elements: the entry unit and the chain's output. (One coupling's activations also
        exist transiently while it is recomputed in backward; that is one coupling for the whole
        network at a time, not per stage, and is left out.)"""
        k = float(np.prod(kernel))
        half = out_ch // 2
        flops = 2 * k * in_ch * out_ch * out_voxels + n * 2 * (2 * k * half * half * out_voxels)
        params = int(k * in_ch * out_ch + 3 * out_ch + n * 2 * (k * half * half + 3 * half))
        elements = (STORED_TENSORS_PER_CONV + 1) * out_ch * out_voxels
        return elements, flops, params
