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


def test_unimplemented_block_variant_is_refused_with_its_name():
    from medseg.errors import PlanError

    arch = _arch((1.0, 1.0, 1.0), (16, 16, 16)).model_copy(update={"blocks": Blocks(attention_gates=True)})
    with pytest.raises(PlanError, match="attention_gates"):
        build_network(arch, 1, 2)
