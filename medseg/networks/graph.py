"""Graph bottleneck: the deepest U-Net stage's conv block replaced by graph convolutions over the
bottleneck voxels (after Garcia-Uceda Juarez et al., joint 3D U-Net–graph network for airway
segmentation).

Every bottleneck voxel is a node. Two adjacencies, both symmetric-normalised with self-loops
(Kipf & Welling, ``D^-1/2 (A + I) D^-1/2``):

- the fixed grid neighbourhood (every voxel's 3^d - 1 neighbours), built once per spatial shape;
- a k-nearest-neighbour graph in feature space, rebuilt from the current features on every forward
  pass (non-local context: voxels that look alike exchange information however far apart).

One graph convolution is ``H' = act(norm(H W_0 + Â_grid H W_g + Â_knn H W_k))``.

Written in plain torch with dense adjacency matrices: at a bottleneck of a few hundred nodes (the
hippocampus plan has 5×7×5 = 175), a dense ``(N, N)`` product is a handful of microseconds and needs
no extra dependency; torch-geometric would add a compiled extension for no gain at this size.
Dense adjacency grows as N², so the planner refuses the variant above :data:`MAX_GRAPH_NODES`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from medseg.networks.blocks import STORED_TENSORS_PER_CONV, WORKSPACE_UNITS, ConvNormAct, Cost

MAX_GRAPH_NODES = 4096
DEFAULT_K = 8


def grid_adjacency(shape: Sequence[int]) -> torch.Tensor:
    """Binary (N, N) adjacency of a voxel grid (row-major node order, as ``x.flatten(2)``): each
    node joined to its 3^d - 1 neighbours inside the grid, no self-loops."""
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape))
    coords = np.stack(np.unravel_index(np.arange(n), shape), axis=1)
    adj = torch.zeros(n, n)
    for offset in itertools.product((-1, 0, 1), repeat=len(shape)):
        if not any(offset):
            continue
        nb = coords + np.asarray(offset)
        ok = np.all((nb >= 0) & (nb < np.asarray(shape)), axis=1)
        src = np.nonzero(ok)[0]
        dst = np.ravel_multi_index(tuple(nb[ok].T), shape)
        adj[torch.from_numpy(src), torch.from_numpy(dst)] = 1.0
    return adj


def knn_adjacency(features: torch.Tensor, k: int) -> torch.Tensor:
    """features (B, N, C) → binary (B, N, N): i–j joined when j is among the k nearest nodes of i in
    Euclidean feature distance (self excluded) or i among those of j (symmetrised). Computed without
    gradient: the neighbour choice is discrete; gradients flow through the features it mixes."""
    b, n, _ = features.shape
    k = min(k, n - 1)
    adj = features.new_zeros(b, n, n)
    if k <= 0:
        return adj
    with torch.no_grad():
        dist = torch.cdist(features.detach(), features.detach())
        dist.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        idx = dist.topk(k, dim=2, largest=False).indices
        adj.scatter_(2, idx, 1.0)
        adj = torch.maximum(adj, adj.transpose(1, 2))
    return adj


def normalise(adj: torch.Tensor) -> torch.Tensor:
    """``D^-1/2 (A + I) D^-1/2`` for (N, N) or (B, N, N) binary adjacency."""
    a = adj + torch.eye(adj.shape[-1], dtype=adj.dtype, device=adj.device)
    d = a.sum(-1).rsqrt()
    return d.unsqueeze(-1) * a * d.unsqueeze(-2)


class GraphConv(nn.Module):
    """One graph convolution over both adjacencies, instance norm over the nodes, leaky ReLU."""

    def __init__(self, channels: int, k: int = DEFAULT_K):
        super().__init__()
        self.k = k
        self.w_self = nn.Linear(channels, channels, bias=True)
        self.w_grid = nn.Linear(channels, channels, bias=False)
        self.w_knn = nn.Linear(channels, channels, bias=False)
        self.norm = nn.InstanceNorm1d(channels, eps=1e-5, affine=True)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, h: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """h: (B, N, C) node features, grid: normalised (N, N) → (B, N, C)."""
        knn = normalise(knn_adjacency(h, self.k))
        out = self.w_self(h) + grid @ self.w_grid(h) + knn @ self.w_knn(h)
        return self.act(self.norm(out.transpose(1, 2)).transpose(1, 2))


class GraphBottleneck(nn.Module):
    """The deepest stage: a strided conv–norm–act into the bottleneck (as every stage), then ``n``
    graph convolutions over its voxels. Same signature as the other stage blocks."""

    workspace_units = WORKSPACE_UNITS

    def __init__(self, dim: int, in_ch: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int], n: int = 2,
                 k: int = DEFAULT_K):
        super().__init__()
        self.entry = ConvNormAct(dim, in_ch, out_ch, kernel, stride)
        self.layers = nn.ModuleList(GraphConv(out_ch, k) for _ in range(n))
        self._grid: dict[tuple, torch.Tensor] = {}

    def grid(self, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """The normalised grid adjacency for a bottleneck shape, built once per shape and device."""
        key = (*shape, str(device))
        if key not in self._grid:
            n = int(np.prod(shape))
            if n > MAX_GRAPH_NODES:
                raise ValueError(f"graph bottleneck of {n} nodes (spatial {list(shape)}) exceeds {MAX_GRAPH_NODES}")
            self._grid[key] = normalise(grid_adjacency(shape)).to(device)
        return self._grid[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(x)
        b, c, *spatial = x.shape
        grid = self.grid(spatial, x.device).to(x.dtype)
        h = x.flatten(2).transpose(1, 2)
        for layer in self.layers:
            h = layer(h, grid)
        return h.transpose(1, 2).reshape(b, c, *spatial)

    @staticmethod
    def cost(in_ch: int, out_ch: int, kernel: Sequence[int], out_voxels: int, n: int = 2,
             stride: Sequence[int] = ()) -> Cost:
        """One sample's cost: the entry unit,
        and per graph convolution its input, three linear outputs, two mixed products, the sum,
        the norm output, the kNN adjacency and its normalised form (N² each)."""
        k = float(np.prod(kernel))
        nodes = out_voxels
        flops = 2 * k * in_ch * out_ch * out_voxels
        flops += n * (3 * 2 * nodes * out_ch * out_ch + 2 * 2 * nodes * nodes * out_ch + 3 * nodes * nodes * out_ch)
        params = int(k * in_ch * out_ch + 3 * out_ch + n * (3 * out_ch * out_ch + out_ch + 2 * out_ch))
        elements = STORED_TENSORS_PER_CONV * out_ch * out_voxels
        elements += n * (7 * out_ch * nodes + 2 * nodes * nodes)
        return Cost(elements, flops, params)
