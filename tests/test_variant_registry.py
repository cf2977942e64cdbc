"""The variant registry (``medseg.networks.variants``): a variant is one block class + one entry.

A throwaway encoder block is registered inside the tests only (``monkeypatch.setitem``) and then
planned, built, costed and trained like the built-in variants, with nothing else changed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_msd_dataset
from torch import nn

from medseg.errors import PlanError
from medseg.fingerprint import Fingerprint, compute_fingerprint
from medseg.io.dataset import load_dataset
from medseg.networks import variants
from medseg.networks.blocks import STORED_TENSORS_PER_CONV, WORKSPACE_UNITS, ConvNormAct, Cost, num_parameters
from medseg.networks.unet import build_network, check_buildable, estimate_costs, stage_specs
from medseg.networks.variants import VARIANTS, Variant
from medseg.planning import planner
from medseg.plans.schema import Architecture, Blocks, Plans
from medseg.plans.topology import pooling_plan
from medseg.training.losses import DeepSupervisionLoss

CPU_FLOPS = 5e10  # fixed, so that CPU plans do not depend on this machine's speed


class PointwiseBlock(nn.Module):
    """A stage of one conv–norm–act with the stage's kernel (and stride), then ``n - 1`` 1x1 ones."""

    workspace_units = WORKSPACE_UNITS

    def __init__(self, dim: int, in_ch: int, out_ch: int, kernel, stride, n: int = 2):
        super().__init__()
        units = [ConvNormAct(dim, in_ch, out_ch, kernel, stride)]
        units += [ConvNormAct(dim, out_ch, out_ch, [1] * dim, [1] * dim) for _ in range(n - 1)]
        self.units = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(x)

    @staticmethod
    def cost(in_ch: int, out_ch: int, kernel, out_voxels: int, n: int = 2, stride=()) -> Cost:
        k = float(np.prod(kernel))
        flops = 2 * k * in_ch * out_ch * out_voxels + (n - 1) * 2 * out_ch * out_ch * out_voxels
        params = int(k * in_ch * out_ch + 3 * out_ch + (n - 1) * (out_ch * out_ch + 3 * out_ch))
        return Cost(n * STORED_TENSORS_PER_CONV * out_ch * out_voxels, flops, params)


@pytest.fixture
def pointwise(monkeypatch) -> str:
    monkeypatch.setitem(VARIANTS, "pointwise", Variant(Blocks(encoder_block="pointwise"), PointwiseBlock))
    return "pointwise"


@pytest.fixture(scope="module")
def fingerprint(tmp_path_factory) -> Fingerprint:
    root = make_msd_dataset(tmp_path_factory.mktemp("registry") / "msd", n_cases=4, shape=(20, 24, 16))
    return compute_fingerprint(load_dataset(root))


def _arch(blocks: Blocks, patch=(16, 24, 16), base: int = 8) -> Architecture:
    strides, kernels = pooling_plan([1.0] * len(patch), patch)
    return Architecture(features=[base * 2**i for i in range(len(strides))], kernel_sizes=kernels, strides=strides,
                        blocks=blocks)


def test_a_registered_encoder_block_is_planned_built_costed_and_trained(pointwise, fingerprint):
    plans = planner.plan_dataset(fingerprint, device="cpu", memory_gb=8, throughput=CPU_FLOPS, configs=["3d_fullres"],
                                 variants=["plain", pointwise])
    config = plans.config(f"3d_fullres_{pointwise}")
    arch, patch = config.architecture, config.patch_size
    assert config.variant == pointwise and arch.blocks == Blocks(encoder_block=pointwise)
    assert config.patch_size == plans.config("3d_fullres").patch_size  # the patch fits either way at 8 GB

    n_in, n_cls = plans.input_channels(config), plans.num_classes
    net = build_network(arch, n_in, n_cls)
    assert all(isinstance(stage, PointwiseBlock) for stage in net.encoder)
    costs = estimate_costs(arch, patch, config.batch_size, n_in, n_cls)
    assert costs.parameters == num_parameters(net)
    assert config.memory.flops_per_step == pytest.approx(costs.train_flops)

    torch.manual_seed(0)
    x = torch.randn(2, n_in, *patch)
    y = torch.randint(0, n_cls, (2, 1, *patch))
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    loss = DeepSupervisionLoss()(net(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    encoder_convs = [(n, p) for n, p in net.named_parameters() if n.startswith("encoder.") and p.ndim > 1]
    assert encoder_convs and all(not torch.equal(before[n], p) for n, p in encoder_convs)  # the new block learns


def test_presets_and_the_planner_read_the_registry(pointwise):
    assert planner.resolve_variants(["all"]) == [*variants.presets()["all"]] == list(VARIANTS)
    assert pointwise in planner.resolve_variants(["all"]) and planner.VARIANTS[pointwise].encoder_block == pointwise
    assert stage_specs(_arch(Blocks(encoder_block=pointwise)), 1, 2).encoder[0].cls is PointwiseBlock


def test_cli_help_lists_the_registered_variants(pointwise):
    from typer.testing import CliRunner

    from medseg.cli import app

    result = CliRunner().invoke(app, ["plan", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert all(name in result.output for name in VARIANTS)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("patch", [(16, 24, 16), (32, 24)], ids=["3d", "2d"])
def test_every_registered_variant_builds_trains_and_is_costed_exactly(name, patch):
    arch = _arch(VARIANTS[name].blocks, patch)
    check_buildable(arch, patch)
    net = build_network(arch, 2, 3)
    outs = net(torch.randn(2, 2, *patch))
    assert outs[0].shape == (2, 3, *patch) and len(outs) == arch.num_stages - 1
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in net.parameters())
    assert estimate_costs(arch, patch, 2, 2, 3).parameters == num_parameters(net)


def test_unknown_encoder_block_in_plans_json_is_one_line_with_a_suggestion(tmp_path: Path, fingerprint):
    path = tmp_path / "plans.json"
    planner.plan_dataset(fingerprint, device="cpu", memory_gb=8, throughput=CPU_FLOPS, configs=["3d_fullres"]).save(path)
    raw = json.loads(path.read_text())
    raw["configurations"]["3d_fullres"]["architecture"]["blocks"]["encoder_block"] = "residul"
    path.write_text(json.dumps(raw))
    plans = Plans.load(path)  # plans are data: the name is checked where the network is built
    config = plans.config("3d_fullres")
    with pytest.raises(PlanError, match="unknown encoder_block 'residul'; did you mean 'residual'") as exc:
        build_network(config.architecture, plans.input_channels(config), plans.num_classes)
    assert "\n" not in str(exc.value)
    with pytest.raises(PlanError, match="did you mean 'residual'"):
        check_buildable(config.architecture, config.patch_size)
