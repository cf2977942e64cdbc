"""Reversible stages: additive-coupling blocks whose activations are recomputed in the backward
pass instead of stored (Gomez et al., RevNet; Brügger et al., partially reversible U-Net).

A coupling splits channels into halves ``(x1, x2)`` and computes
``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``; its input is recovered exactly (up to float rounding)
from its output by ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``. :class:`_ReversibleSequence` runs a
chain of couplings without autograd and keeps only the chain's output; its backward walks the
chain in reverse, rebuilding each input and back-propagating through one coupling at a time.
Written here (a custom ``torch.autograd.Function``) because the old reversible-network libraries
are unmaintained and do not work with current PyTorch.

Mixed precision: under ``torch.autocast`` the chain runs in the autocast dtype (fp16 on CUDA, as
training; bf16 on a CPU) and keeps its output in that dtype. Training calls ``backward()`` outside
the autocast region, so the backward re-enters the forward's autocast state (enabled, dtype, for the
device type the input lives on) before recomputing: the recomputation then equals the forward's,
and the in-place reconstruction subtracts tensors of the stored output's dtype. (This is what
``torch.amp.custom_fwd``/``custom_bwd`` do, but those fix one device type when the class is
defined; this Function serves CPU and CUDA.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.networks.layers.factories import Conv
from torch import nn

from medseg.networks.blocks import ConvNormAct, Cost


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
        ctx.autocast, ctx.input_dtype = _autocast_state(x.device.type), x.dtype
        with torch.no_grad():
            for c in couplings:
                x = c(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        # Rebuild each coupling's input in place in the saved output's storage and accumulate the
        # gradient in place in one copy of dy, so that one coupling's recomputation is all that is
        # allocated. (The saved output was also the input of the layers after this stage; their
        # backward has run by now, and a second backward through them fails loudly on the version
        # counter instead of reading overwritten values.)
        (y,) = ctx.saved_tensors
        device_type, enabled, dtype = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            dx, *grads = _ReversibleSequence._backward(ctx.couplings, y.detach(), dy.to(y.dtype, copy=True))
        return dx.to(ctx.input_dtype), *grads

    @staticmethod
    def _backward(couplings: nn.ModuleList, y: torch.Tensor, dy: torch.Tensor) -> tuple:
        """The gradients of the chain's input and parameters. ``y`` (the chain's output, rebuilt in
        place into its input) and ``dy`` (a copy of its gradient, accumulated in place) have the
        forward output's dtype; each recomputation's results are subtracted or added into them in
        place (cast to that dtype), and the weights' gradients come out in the weights' dtype."""
        grads: dict[int, torch.Tensor] = {}
        for c in reversed(couplings):
            y1, y2 = torch.chunk(y, 2, dim=1)
            dy1, dy2 = torch.chunk(dy, 2, dim=1)
            g_params = list(c.g.parameters())
            f_params = list(c.f.parameters())
            with torch.enable_grad():
                z1 = y1.detach().requires_grad_()
                gz = c.g(z1)
                dz1, *dg = torch.autograd.grad(gz, [z1, *g_params], dy2.to(gz.dtype))
            with torch.no_grad():
                y2.sub_(gz)  # y2 := x2 = y2 - G(y1)
                dy1.add_(dz1)  # dy1 := total gradient of y1 = gradient of x1
            del gz, dz1, z1
            with torch.enable_grad():
                x2 = y2.detach().requires_grad_()
                fx = c.f(x2)
                dx2, *df = torch.autograd.grad(fx, [x2, *f_params], dy1.to(fx.dtype))
            with torch.no_grad():
                y1.sub_(fx)  # y1 := x1 = y1 - F(x2)
                dy2.add_(dx2)  # dy2 := gradient of x2
            del fx, dx2, x2
            for p, g in zip(g_params + f_params, dg + df, strict=True):
                grads[id(p)] = g
        params = [p for c in couplings for p in c.parameters()]
        return (dy, None, *[grads.get(id(p)) for p in params])


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    """(device type, whether autocast is on for it, its dtype) as the calling thread has them."""
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class ReversibleBlock(nn.Module):
    """A U-Net stage: one (strided) convolution from ``in_ch`` to ``out_ch``, then ``n`` reversible
    couplings at ``out_ch`` (each coupling normalises and activates inside its F and G).

    The entry is a bare convolution so that nothing of it is stored: its output is the chain's input,
    which backward rebuilds from the chain's output, and a convolution's backward needs only its
    input (stored already by the stage before). In the decoder (``skip_ch`` given) the entry is one
    convolution over the up-sampled features plus one over the skip, the same operation as a
    convolution over their concatenation without storing the concatenation. So a stage keeps one
    tensor for backward, the chain's output (plus the up-sampled features in the decoder).

    With ``memory_saving`` (default) the couplings' activations are recomputed in backward; without
    it the same computation runs under plain autograd (used to check both give the same gradients)."""

    # backward rebuilds each coupling's input in place and runs it again under autograd: the output
    # (rebuilt in place), one copy of its gradient, and one half-coupling's recomputed activations and
    # gradients are alive together, besides the non-reversible transients every block has
    workspace_units = 5.0
    # ... and under AMP all of them are fp16 (the recomputation runs under the forward's autocast);
    # measured under CPU bf16 autocast: the peak falls to 0.57-0.81x of float32's where activations dominate
    amp_workspace_bytes = 2
    separate_skip = True  # as a decoder block: the up-sampled features and the skip come apart (``skip_ch``)

    def __init__(self, dim: int, in_ch: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int], n: int = 2,
                 skip_ch: int | None = None):
        super().__init__()
        conv = Conv[Conv.CONV, dim]
        pad = tuple(k // 2 for k in kernel)
        self.entry = conv(in_ch - (skip_ch or 0), out_ch, tuple(kernel), tuple(stride), padding=pad, bias=True)
        self.entry_skip = (conv(skip_ch, out_ch, tuple(kernel), tuple(stride), padding=pad, bias=False)
                           if skip_ch else None)
        self.couplings = nn.ModuleList(Coupling(dim, out_ch, kernel) for _ in range(n))
        self.memory_saving = True

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.entry(x)
        if self.entry_skip is not None:
            x = x + self.entry_skip(skip)
        if self.memory_saving and torch.is_grad_enabled() and x.requires_grad:
            return _ReversibleSequence.apply(x, self.couplings, *[p for c in self.couplings for p in c.parameters()])
        for c in self.couplings:
            x = c(x)
        return x

    @staticmethod
    def cost(in_ch: int, out_ch: int, kernel: Sequence[int], out_voxels: int, n: int = 2,
             stride: Sequence[int] = ()) -> Cost:
        """Stored elements: the chain's output. (One coupling's activations also exist transiently
        while it is recomputed in backward; that is one block for the whole network at a time,
        counted in :attr:`workspace_units`.)"""
        k = float(np.prod(kernel))
        half = out_ch // 2
        flops = 2 * k * in_ch * out_ch * out_voxels + n * 2 * (2 * k * half * half * out_voxels)
        params = int(k * in_ch * out_ch + out_ch + n * 2 * (k * half * half + 3 * half))
        elements = out_ch * out_voxels
        return Cost(elements, flops, params)
