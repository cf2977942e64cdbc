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

    arch = _arch((1.0, 1.0, 1.0), (16, 16, 16)).model_copy(update={"blocks": Blocks(reversible=True)})
    with pytest.raises(PlanError, match="reversible"):
        build_network(arch, 1, 2)


VARIANTS = [
    Blocks(encoder_block="residual"),
    Blocks(attention_gates=True),
    Blocks(squeeze_excitation="cse"),
    Blocks(squeeze_excitation="sse"),
    Blocks(squeeze_excitation="scse", se_reduction=4),
    Blocks(encoder_block="residual", attention_gates=True, squeeze_excitation="scse"),
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
