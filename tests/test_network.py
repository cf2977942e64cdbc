"""Contracts for the U-Net builder: output shapes per configuration, deep supervision, cost model."""

from __future__ import annotations

import pytest
import torch

from medseg.networks.blocks import num_parameters
from medseg.networks.unet import build_network, estimate_costs
from medseg.plans.schema import Architecture, Blocks
from medseg.plans.topology import pooling_plan


def _arch(spacing, patch, base=8):
    strides, kernels = pooling_plan(spacing, patch)
    return Architecture(features=[min(base * 2**i, 64) for i in range(len(strides))], kernel_sizes=kernels,
                        strides=strides)


@pytest.mark.parametrize(
    "spacing,patch,in_ch,n_cls",
    [
        ((1.0, 1.0, 1.0), (16, 24, 16), 1, 3),  # 3d isotropic
        ((5.0, 0.8, 0.8), (8, 32, 32), 2, 2),  # 3d anisotropic: first stages keep axis 0
        ((1.0, 1.0), (32, 24), 1, 4),  # 2d
    ],
)
def test_output_shapes_and_deep_supervision(spacing, patch, in_ch, n_cls):
    arch = _arch(spacing, patch)
    net = build_network(arch, in_ch, n_cls)
    x = torch.randn(2, in_ch, *patch)
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert out.shape == (2, n_cls, *patch)
    net.train()
    outs = net(x)
    assert len(outs) == arch.num_stages - 1
    assert outs[0].shape == (2, n_cls, *patch)
    for a, b in zip(outs, outs[1:], strict=False):
        assert all(sa >= sb for sa, sb in zip(a.shape[2:], b.shape[2:], strict=True))
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_cost_model_counts_parameters_exactly():
    arch = _arch((1.0, 1.0, 1.0), (32, 40, 32), base=16)
    net = build_network(arch, 2, 3)
    est = estimate_costs(arch, (32, 40, 32), 2, 2, 3)
    assert est.parameters == num_parameters(net)
    double = estimate_costs(arch, (32, 40, 32), 4, 2, 3)
    assert double.activation_bytes == pytest.approx(2 * est.activation_bytes)
    assert double.forward_flops == pytest.approx(2 * est.forward_flops)


def test_unbuildable_block_combinations_are_refused_with_a_reason(monkeypatch):
    from medseg.errors import PlanError
    from medseg.networks import unet

    arch = _arch((1.0, 1.0, 1.0), (16, 16, 16)).model_copy(update={"blocks": Blocks(bottleneck="graph")})
    unet.check_buildable(arch, (16, 16, 16))
    monkeypatch.setattr(unet, "MAX_GRAPH_NODES", 4)
    with pytest.raises(PlanError, match=r"graph bottleneck too large: 64 nodes \(bottleneck \[4, 4, 4\]"):
        unet.check_buildable(arch, (16, 16, 16))
    both = Blocks(reversible=True, encoder_block="residual")
    with pytest.raises(PlanError, match="reversible"):
        build_network(arch.model_copy(update={"blocks": both}), 1, 2)


VARIANTS = [
    Blocks(encoder_block="residual"),
    Blocks(attention_gates=True),
    Blocks(squeeze_excitation="cse"),
    Blocks(squeeze_excitation="sse"),
    Blocks(squeeze_excitation="scse", se_reduction=4),
    Blocks(encoder_block="residual", attention_gates=True, squeeze_excitation="scse"),
    Blocks(reversible=True),
    Blocks(reversible=True, attention_gates=True, squeeze_excitation="cse"),
    Blocks(bottleneck="graph"),
    Blocks(bottleneck="graph", encoder_block="residual", attention_gates=True, squeeze_excitation="scse"),
]


@pytest.mark.parametrize("blocks", VARIANTS, ids=lambda b: "-".join(f"{k}={v}" for k, v in b.model_dump().items()
                                                                     if v not in (False, "none", "conv", "plain", 2)))
@pytest.mark.parametrize("spacing,patch", [((1.0, 1.0, 1.0), (16, 24, 16)), ((1.0, 1.0), (32, 24))], ids=["3d", "2d"])
def test_every_variant_builds_trains_and_is_costed_exactly(blocks, spacing, patch):
    arch = _arch(spacing, patch).model_copy(update={"blocks": blocks})
    net = build_network(arch, 2, 3)
    x = torch.randn(2, 2, *patch)
    outs = net(x)
    assert outs[0].shape == (2, 3, *patch) and len(outs) == arch.num_stages - 1
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 3, *patch)
    assert estimate_costs(arch, patch, 2, 2, 3).parameters == num_parameters(net)


def test_residual_encoder_uses_resenc_stage_depths():
    from medseg.networks.blocks import ResidualBlock

    arch = _arch((1.0, 1.0, 1.0), (32, 32, 32)).model_copy(update={"blocks": Blocks(encoder_block="residual")})
    net = build_network(arch, 1, 2)
    depths = [len(stage) for stage in net.encoder if isinstance(stage, ResidualBlock)]
    assert depths == [1, 3, 4, 6][: arch.num_stages]


def test_attention_coefficients_lie_in_unit_interval_at_skip_resolution():
    arch = _arch((1.0, 1.0, 1.0), (16, 24, 16)).model_copy(update={"blocks": Blocks(attention_gates=True)})
    net = build_network(arch, 1, 2).eval()
    with torch.no_grad():
        net(torch.randn(1, 1, 16, 24, 16) * 5)
    maps = net.attention_maps()
    assert len(maps) == arch.num_stages - 1
    assert maps[0].shape == (1, 1, 16, 24, 16)
    for m in maps:
        assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0


def test_squeeze_excitation_recalibrates_as_defined():
    from medseg.networks.blocks import SqueezeExcitation

    x = torch.randn(2, 8, 6, 5, 4)
    cse, sse = SqueezeExcitation(3, 8, "cse", 2), SqueezeExcitation(3, 8, "sse")
    w_c = cse.channel(x)
    assert w_c.shape == (2, 8, 1, 1, 1)
    torch.testing.assert_close(cse(x), x * w_c)
    w_s = sse.spatial(x)
    assert w_s.shape == (2, 1, 6, 5, 4)
    scse = SqueezeExcitation(3, 8, "scse", 2)
    torch.testing.assert_close(scse(x), torch.maximum(x * scse.channel(x), x * scse.spatial(x)))


def _reversible_pair(dim_patch):
    arch = _arch((1.0,) * len(dim_patch), dim_patch).model_copy(update={"blocks": Blocks(reversible=True)})
    torch.manual_seed(0)
    net = build_network(arch, 1, 3).double()
    return arch, net


@pytest.mark.parametrize("patch", [(16, 24, 16), (32, 24)], ids=["3d", "2d"])
def test_reversible_gradients_equal_those_of_stored_activations(patch):
    from medseg.networks.reversible import ReversibleBlock

    _, net = _reversible_pair(patch)
    x = torch.randn(2, 1, *patch, dtype=torch.float64)

    def grads(memory_saving: bool):
        for m in net.modules():
            if isinstance(m, ReversibleBlock):
                m.memory_saving = memory_saving
        net.zero_grad()
        xi = x.clone().requires_grad_()
        loss = sum((o**2).mean() for o in net(xi))
        loss.backward()
        return loss.item(), xi.grad.clone(), [p.grad.clone() for p in net.parameters()]

    loss_a, gx_a, gp_a = grads(False)
    loss_b, gx_b, gp_b = grads(True)
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    torch.testing.assert_close(gx_b, gx_a, rtol=1e-7, atol=1e-9)
    for a, b in zip(gp_a, gp_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("device,dtype", [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
], ids=["cpu-bf16", "cuda-fp16"])
def test_reversible_gradients_under_autocast_match_plain_autograd(device, dtype):
    """As training runs it (forward under autocast, ``backward()`` outside it), on a CPU in bf16 and
    on CUDA in fp16 (as training): the memory-saving backward recomputes in the forward's precision
    and gives the gradients plain autograd gives under the same autocast.

    Tolerance: bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.4%); through one entry conv, two
    couplings (four conv–norm–activations) and instance norm's backward, plain bf16 autograd's
    gradients here are 0.1–5.5% (relative L2) from float32's, and the reconstruction ``x = y - F(.)``
    rounds once more per coupling, an error of the same order (measured 0–6.6% over three seeds).
    10% is twice that (fp16, 11 bits, is closer); a wrong recomputation (other weights, other
    inputs) is off by O(1).
    Conv biases followed by instance norm are left out: their exact gradient is 0 (the norm removes
    the mean), so what remains is rounding noise in both."""
    from medseg.networks.reversible import ReversibleBlock

    torch.manual_seed(0)
    block = ReversibleBlock(3, 4, 16, (3, 3, 3), (1, 1, 1), n=2).to(device)
    x = torch.randn(2, 4, 12, 10, 8).to(device)
    names = ["input", *(n for n, _ in block.named_parameters())]

    def grads(memory_saving: bool, amp: bool) -> list[torch.Tensor]:
        block.memory_saving = memory_saving
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast(device, dtype=dtype, enabled=amp):
            out = block(xi)
            loss = (out.float() ** 2).mean()
        assert out.dtype == (dtype if amp else torch.float32)
        loss.backward()
        return [xi.grad, *(p.grad for p in block.parameters())]

    reference, plain, saving = grads(False, False), grads(False, True), grads(True, True)
    for name, ref, a, b in zip(names, reference, plain, saving, strict=True):
        assert b.dtype == a.dtype == torch.float32, name  # the weights' and the input's dtype
        assert torch.isfinite(b).all(), name
        if name.startswith("couplings.") and name.endswith(".0.bias"):
            continue
        assert float((b - a).norm() / a.norm()) <= 0.1, name
        assert float((b - ref).norm() / ref.norm()) <= 0.1, name


def test_coupling_inverse_reconstructs_its_input():
    from medseg.networks.reversible import Coupling

    c = Coupling(3, 8, (3, 3, 3)).double()
    x = torch.randn(2, 8, 6, 5, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(c.inverse(c(x)), x)


def test_reversible_stage_stores_less_for_backward():
    """The tensors autograd keeps for backward (counted by a saved-tensor hook) shrink."""
    from medseg.networks.reversible import ReversibleBlock

    block = ReversibleBlock(3, 8, 32, (3, 3, 3), (1, 1, 1), n=4)
    x = torch.randn(1, 8, 16, 16, 16, requires_grad=True)

    def saved_bytes(memory_saving: bool) -> int:
        from medseg.planning.memory import saved_for_backward_bytes

        block.memory_saving = memory_saving
        out = []  # only what the forward pass keeps for backward is counted
        n = saved_for_backward_bytes(lambda: out.append(block(x)))
        out[0].sum().backward()
        return n

    plain, reversible = saved_bytes(False), saved_bytes(True)
    assert reversible <= 0.5 * plain, (reversible, plain)


def test_grid_adjacency_joins_each_voxel_to_its_neighbours_only():
    from medseg.networks.graph import grid_adjacency, normalise

    adj = grid_adjacency((3, 3))  # node = row * 3 + col
    assert torch.equal(adj, adj.T) and adj.diagonal().sum() == 0
    assert adj.sum(1).tolist() == [3, 5, 3, 5, 8, 5, 3, 5, 3]  # corners, edges, centre (8-neighbourhood)
    assert adj[0].nonzero().flatten().tolist() == [1, 3, 4]
    assert adj[4].nonzero().flatten().tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    a3 = grid_adjacency((2, 3, 4))
    assert a3.sum(1).max() == 17 and a3.sum(1).min() == 7  # 2x3x4: interior-most voxels see 17, corners 7
    n = normalise(adj)
    deg = adj.sum(1) + 1
    torch.testing.assert_close(n[0, 4], 1 / torch.sqrt(deg[0] * deg[4]))
    torch.testing.assert_close(n, n.T)


def test_knn_adjacency_links_nodes_that_look_alike_and_is_symmetric():
    from medseg.networks.graph import knn_adjacency

    # two tight clusters far apart in feature space, interleaved in node order
    feats = torch.tensor([[0.0, 0.0], [10.0, 10.0], [0.1, 0.0], [10.1, 10.0], [0.0, 0.1], [10.0, 10.1]])[None]
    adj = knn_adjacency(feats, k=2)[0]
    assert torch.equal(adj, adj.T) and adj.diagonal().sum() == 0
    cluster = torch.tensor([0, 1, 0, 1, 0, 1])
    same = cluster[:, None] == cluster[None, :]
    assert adj[~same].sum() == 0  # no edge across clusters
    assert torch.equal(adj, (same & ~torch.eye(6, dtype=torch.bool)).float())  # k=2: each sees both cluster-mates
    # k=1 on a line of points: each node's nearest neighbour, symmetrised
    line = torch.tensor([[0.0], [1.0], [3.0], [7.0]])[None]
    a1 = knn_adjacency(line, k=1)[0]
    assert a1.nonzero().tolist() == [[0, 1], [1, 0], [1, 2], [2, 1], [2, 3], [3, 2]]


def test_graph_bottleneck_replaces_the_deepest_stage_with_graph_convolutions():
    from medseg.networks.graph import GraphBottleneck

    arch = _arch((1.0, 1.0, 1.0), (16, 24, 16)).model_copy(update={"blocks": Blocks(bottleneck="graph")})
    net = build_network(arch, 1, 2)
    assert isinstance(net.encoder[-1], GraphBottleneck) and len(net.encoder[-1].layers) == arch.convs_per_stage
    assert not any(isinstance(m, GraphBottleneck) for m in net.encoder[:-1])
    shape = [4, 6, 4]  # 16x24x16 after two stride-2 stages
    grid = net.encoder[-1].grid(shape, torch.device("cpu"))
    assert grid.shape == (96, 96) and not any("._grid" in k for k in net.state_dict())  # a cache, not weights
