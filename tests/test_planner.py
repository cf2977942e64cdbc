"""The planner (``medseg.planning.planner``) and the plans file (``medseg.plans.schema``).

Synthetic fingerprints are built directly as pydantic objects, so every rule is checked against a
hand-computed oracle; one test plans the real hippocampus data and compares with nnU-Net v2.
CPU plans get ``throughput=`` explicitly so that they do not depend on this machine's speed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.errors import PlanError
from medseg.fingerprint import CaseFingerprint, ChannelStats, Fingerprint
from medseg.io.dataset import load_dataset
from medseg.networks.unet import estimate_costs
from medseg.planning.planner import CPU_TARGET_ITERATIONS, MIN_BATCH, plan_dataset
from medseg.plans import topology
from medseg.plans.schema import SCHEMA_VERSION, Configuration, Plans

CPU_FLOPS = 5e10  # a modest laptop CPU; fixed so that CPU plans are deterministic


def make_fingerprint(n_cases: int, spacing: Sequence[float] | Sequence[Sequence[float]],
                     shape: Sequence[int] | Sequence[Sequence[int]], *, channel: str = "MRI",
                     labels: dict[int, str] | None = None) -> Fingerprint:
    """``n_cases`` cases with the given spacing and (cropped) shape, or one of each per case."""
    spacings = np.broadcast_to(np.asarray(spacing, dtype=float), (n_cases, 3))
    shapes = np.broadcast_to(np.asarray(shape, dtype=int), (n_cases, 3))
    cases = [
        CaseFingerprint(case_id=f"case_{i:03d}", spacing=[float(s) for s in sp],
                        shape_before_crop=[int(s) for s in sh], shape_after_crop=[int(s) for s in sh],
                        class_voxels={0: int(np.prod(sh)) - 10, 1: 10}, class_volume_ml={0: 1.0, 1: 0.01})
        for i, (sp, sh) in enumerate(zip(spacings, shapes, strict=True))
    ]
    stats = ChannelStats(name=channel, mean=100.0, std=20.0, median=98.0, min=0.0, max=400.0, p00_5=20.0,
                         p99_5=300.0, n_samples=10_000)
    return Fingerprint(dataset_name="synthetic", layout="msd", channel_names=[channel],
                       labels=labels or {0: "background", 1: "foreground"}, cases=cases, channels=[stats])


def hippocampus_like() -> Fingerprint:
    rng = np.random.default_rng(0)
    shapes = np.stack([rng.integers(lo, hi, 260) for lo, hi in ((31, 40), (45, 56), (31, 40))], axis=1)
    labels = {0: "background", 1: "anterior", 2: "posterior"}
    return make_fingerprint(260, [1.0, 1.0, 1.0], shapes, labels=labels)


def assert_patch_divisible(config: Configuration) -> None:
    div = topology.divisibility(config.architecture.strides)
    assert [p % d for p, d in zip(config.patch_size, div, strict=True)] == [0] * config.dim


# --- isotropic -------------------------------------------------------------------------------------


def test_isotropic_plan_uses_median_spacing_and_identity_transpose() -> None:
    fp = make_fingerprint(20, [[1.0, 1.0, 1.0], [1.2, 1.2, 1.2]] * 10, [64, 64, 64])
    config = plan_dataset(fp, device="cuda", memory_gb=8).config("3d_fullres")
    assert config.spacing == pytest.approx([1.1, 1.1, 1.1])
    assert config.transpose_forward == [0, 1, 2]
    assert config.transpose_backward == [0, 1, 2]


def test_isotropic_plan_pools_until_every_axis_is_between_4_and_8() -> None:
    config = plan_dataset(make_fingerprint(20, [1.0, 1.0, 1.0], [64, 80, 48]), device="cuda",
                          memory_gb=40).config("3d_fullres")
    arch = config.architecture
    final = np.array(config.patch_size) / np.array(topology.divisibility(arch.strides))
    assert (final >= 4).all() and (final < 8).all()
    assert all(k == [3, 3, 3] for k in arch.kernel_sizes)
    assert arch.strides[0] == [1, 1, 1]
    assert_patch_divisible(config)


def test_features_double_per_stage_from_32_up_to_the_cap() -> None:
    config = plan_dataset(make_fingerprint(50, [1.0, 1.0, 1.0], [256, 256, 256]), device="cuda",
                          memory_gb=80).config("3d_fullres")
    features = config.architecture.features
    assert features[0] == 32
    assert features == [min(32 * 2**i, 320) for i in range(len(features))]


def test_2d_configuration_plans_the_in_plane_axes_and_keeps_the_out_of_plane_spacing() -> None:
    plans = plan_dataset(make_fingerprint(30, [0.8, 0.8, 5.0], [200, 180, 30]), device="cuda", memory_gb=8)
    config = plans.config("2d")
    assert config.dim == 2
    assert config.spacing == pytest.approx([5.0, 0.8, 0.8])
    assert config.transpose_forward == [2, 0, 1]
    assert config.median_shape == [200, 180]
    assert_patch_divisible(config)


# --- anisotropic -----------------------------------------------------------------------------------


def test_anisotropic_plan_moves_the_out_of_plane_axis_first_and_uses_the_10th_percentile() -> None:
    spacings = [[0.8, 0.8, 5.0]] * 7 + [[0.8, 0.8, 3.0]] * 3
    fp = make_fingerprint(10, spacings, [256, 256, 40])
    config = plan_dataset(fp, device="cuda", memory_gb=8).config("3d_fullres")
    assert config.transpose_forward == [2, 0, 1]
    assert config.transpose_backward == [1, 2, 0]
    assert config.spacing == pytest.approx([3.0, 0.8, 0.8])
    # median shape at the target spacing, transposed: z 40 slices of 5 mm → 66.7 at 3 mm
    assert config.median_shape == [67, 256, 256]


def test_anisotropic_first_stage_does_not_pool_or_convolve_the_coarse_axis() -> None:
    fp = make_fingerprint(10, [[0.8, 0.8, 5.0]] * 7 + [[0.8, 0.8, 3.0]] * 3, [256, 256, 40])
    arch = plan_dataset(fp, device="cuda", memory_gb=8).config("3d_fullres").architecture
    assert arch.strides[1] == [1, 2, 2]
    assert arch.kernel_sizes[0] == [1, 3, 3]
    assert arch.kernel_sizes[-1] == [3, 3, 3]


def test_anisotropic_spleen_like_plan_matches_nnunet_structure() -> None:
    fp = make_fingerprint(40, [0.79, 0.79, 5.0], [164, 166, 26])
    config = plan_dataset(fp, device="cuda", memory_gb=8).config("3d_fullres")
    arch = config.architecture
    assert config.spacing == pytest.approx([5.0, 0.79, 0.79])
    # 0.79 → 1.58 → 3.16 in plane before the 5 mm axis is within 2x of it
    assert arch.strides[1][0] == 1 and arch.strides[2][0] == 1
    assert arch.kernel_sizes[0][0] == 1 and arch.kernel_sizes[1][0] == 1
    assert_patch_divisible(config)


# --- tiny and large datasets -----------------------------------------------------------------------


def test_tiny_dataset_patch_covers_the_images_with_few_stages() -> None:
    config = plan_dataset(make_fingerprint(20, [1.0, 1.0, 1.0], [10, 12, 9]), device="cuda",
                          memory_gb=8).config("3d_fullres")
    assert all(p >= m for p, m in zip(config.patch_size, [10, 12, 9], strict=True))
    assert config.patch_size == [10, 12, 10]
    assert config.architecture.num_stages == 2
    assert config.batch_size >= MIN_BATCH
    assert_patch_divisible(config)


def test_large_images_on_a_small_gpu_shrink_the_patch_within_the_memory_budget() -> None:
    fp = make_fingerprint(10, [0.7, 0.7, 0.7], [512, 512, 400])
    plans = plan_dataset(fp, device="cuda", memory_gb=4)
    assert plans.device == "cuda"
    for config in plans.configurations.values():
        assert config.memory.budget_gb == 4
        assert config.memory.estimate_gb <= 4
        assert config.batch_size >= MIN_BATCH
        assert_patch_divisible(config)
    c3 = plans.config("3d_fullres")
    assert all(p < m for p, m in zip(c3.patch_size, c3.median_shape, strict=True))
    assert c3.batch_size == MIN_BATCH
    # the recorded estimate is the analytic model of the network at that patch and batch, under AMP as on CUDA
    costs = estimate_costs(c3.architecture, c3.patch_size, c3.batch_size, 1, 2, amp=True)
    assert c3.memory.activations_gb == pytest.approx(costs.activation_bytes / 1e9)


def test_a_larger_gpu_budget_never_gives_a_smaller_patch() -> None:
    fp = make_fingerprint(10, [0.7, 0.7, 0.7], [512, 512, 400])
    small = plan_dataset(fp, device="cuda", memory_gb=4, configs=["3d_fullres"]).config("3d_fullres")
    big = plan_dataset(fp, device="cuda", memory_gb=24, configs=["3d_fullres"]).config("3d_fullres")
    assert np.prod(big.patch_size) >= np.prod(small.patch_size)


def test_impossible_memory_budget_is_a_plan_error() -> None:
    fp = make_fingerprint(10, [0.7, 0.7, 0.7], [512, 512, 400])
    with pytest.raises(PlanError, match="memory-gb"):
        plan_dataset(fp, device="cuda", memory_gb=1e-4, configs=["3d_fullres"])


def test_default_gpu_budget_leaves_headroom_and_is_capped_at_the_reference_budget() -> None:
    from medseg.planning.planner import GPU_REFERENCE_GB, gpu_budget_gb

    assert GPU_REFERENCE_GB == 8.0
    assert gpu_budget_gb(80.0) == gpu_budget_gb(24.0) == gpu_budget_gb(11.0) == 8.0  # portable plans
    assert gpu_budget_gb(8.0) == pytest.approx(0.8 * (8.0 - 1.0))  # context, then 20% for the model and allocator
    assert gpu_budget_gb(6.0) == pytest.approx(4.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_default_gpu_budget_reads_the_chosen_device() -> None:
    from medseg.planning.planner import default_memory_gb, gpu_budget_gb

    for i in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(i).total_memory / 1e9
        assert default_memory_gb(f"cuda:{i}") == gpu_budget_gb(total)
    assert default_memory_gb("cuda") == default_memory_gb(f"cuda:{torch.cuda.current_device()}")


def test_gpu_plans_are_sized_for_amp_and_cpu_plans_for_float32() -> None:
    fp = make_fingerprint(10, [0.7, 0.7, 0.7], [512, 512, 400])
    gpu = plan_dataset(fp, device="cuda", memory_gb=4, configs=["3d_fullres"]).config("3d_fullres")
    cpu = plan_dataset(fp, device="cpu", memory_gb=4, throughput=CPU_FLOPS, configs=["3d_fullres"]).config("3d_fullres")
    for config, amp in ((gpu, True), (cpu, False)):
        costs = estimate_costs(config.architecture, config.patch_size, config.batch_size, 1, 2, amp=amp)
        assert config.memory.estimate_gb == pytest.approx(costs.training_bytes / 1e9)
    # fp16 activations: the same budget holds a larger GPU patch than float32 activations would
    assert np.prod(gpu.patch_size) > np.prod(cpu.patch_size)


# --- batch size: the 5% rule ---------------------------------------------------------------------------


def test_batch_is_capped_at_5_percent_of_the_dataset_voxels() -> None:
    # 200 cases of 32³, patch 32³ → 5% of 200 patches = 10, far below what 80 GB would allow
    config = plan_dataset(make_fingerprint(200, [1.0, 1.0, 1.0], [32, 32, 32]), device="cuda",
                          memory_gb=80).config("3d_fullres")
    assert config.patch_size == [32, 32, 32]
    assert config.batch_size == 10
    assert "5%" in config.memory.decision


def test_batch_is_at_least_2_even_when_5_percent_is_less() -> None:
    config = plan_dataset(make_fingerprint(20, [1.0, 1.0, 1.0], [32, 32, 32]), device="cuda",
                          memory_gb=80).config("3d_fullres")
    assert config.batch_size == 2


@pytest.mark.parametrize("n_cases", [5, 50, 400])
def test_gpu_batch_never_exceeds_the_5_percent_rule(n_cases: int) -> None:
    fp = make_fingerprint(n_cases, [1.0, 1.0, 1.0], [48, 64, 40])
    for config in plan_dataset(fp, device="cuda", memory_gb=16).configurations.values():
        cap = 0.05 * n_cases * 48 * 64 * 40 / np.prod(config.patch_size)
        assert MIN_BATCH <= config.batch_size <= max(MIN_BATCH, cap)
        assert config.memory.estimate_gb <= 16


# --- CPU path ----------------------------------------------------------------------------------------


def test_cpu_3d_plan_for_hippocampus_like_data_has_batch_2() -> None:
    plans = plan_dataset(hippocampus_like(), device="cpu", memory_gb=8, throughput=CPU_FLOPS)
    assert plans.device == "cpu"
    config = plans.config("3d_fullres")
    assert config.batch_size == 2
    assert config.patch_size == [40, 56, 40]
    assert config.training.time_budget_min == 30
    assert config.training.epochs * config.training.iterations_per_epoch >= CPU_TARGET_ITERATIONS


def test_cpu_smaller_time_budget_gives_a_narrower_or_equal_network() -> None:
    fp = hippocampus_like()
    widths = []
    for minutes in (600, 120, 30, 5, 1):
        config = plan_dataset(fp, device="cpu", memory_gb=8, throughput=CPU_FLOPS, time_budget_min=minutes,
                              configs=["3d_fullres"]).config("3d_fullres")
        widths.append(config.architecture.features[0])
        assert "CPU plan" in config.memory.decision
        assert f"is {widths[-1]} at batch {config.batch_size}" in config.memory.decision
        assert f"{minutes:g} min budget" in config.memory.decision
    assert widths == sorted(widths, reverse=True)
    assert widths[0] > widths[-1]


def test_cpu_step_estimate_fits_the_time_budget_unless_at_the_narrowest_width() -> None:
    config = plan_dataset(hippocampus_like(), device="cpu", memory_gb=8, throughput=CPU_FLOPS,
                          time_budget_min=30, configs=["3d_fullres"]).config("3d_fullres")
    assert config.architecture.features[0] > 8
    assert config.memory.step_seconds_estimate <= 30 * 60 / CPU_TARGET_ITERATIONS
    assert config.memory.flops_per_step / CPU_FLOPS == pytest.approx(config.memory.step_seconds_estimate)


def test_faster_cpu_never_gives_a_narrower_network() -> None:
    fp = hippocampus_like()
    slow, fast = (plan_dataset(fp, device="cpu", memory_gb=8, throughput=t, configs=["3d_fullres"])
                  .config("3d_fullres").architecture.features[0] for t in (1e10, 1e12))
    assert fast >= slow


def test_planning_is_deterministic() -> None:
    fp = hippocampus_like()
    a = plan_dataset(fp, device="cpu", memory_gb=8, throughput=CPU_FLOPS)
    b = plan_dataset(fp, device="cpu", memory_gb=8, throughput=CPU_FLOPS)
    assert a == b


# --- normalisation and misc -------------------------------------------------------------------------


def test_ct_channel_gets_ct_normalisation_with_foreground_statistics() -> None:
    fp = make_fingerprint(10, [1.0, 1.0, 1.0], [32, 32, 32], channel="CT")
    (norm,) = plan_dataset(fp, device="cuda", memory_gb=8).config("3d_fullres").normalization
    assert (norm.scheme, norm.mean, norm.std, norm.lower, norm.upper) == ("ct", 100.0, 20.0, 20.0, 300.0)


def test_mri_channel_gets_zscore() -> None:
    (norm,) = plan_dataset(make_fingerprint(10, [1.0, 1.0, 1.0], [32, 32, 32]), device="cuda",
                           memory_gb=8).config("3d_fullres").normalization
    assert norm.scheme == "zscore"


def test_unknown_configuration_is_rejected_listing_the_available_ones() -> None:
    with pytest.raises(PlanError, match="available: 2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres"):
        plan_dataset(make_fingerprint(4, [1.0, 1.0, 1.0], [32, 32, 32]), device="cuda", memory_gb=8,
                     configs=["3d_superres"])


def test_lowres_and_cascade_only_where_the_fullres_patch_is_small() -> None:
    small = plan_dataset(make_fingerprint(4, [1.0, 1.0, 1.0], [32, 32, 32]), device="cuda", memory_gb=8)
    assert list(small.configurations) == ["2d", "3d_fullres"]
    big = plan_dataset(make_fingerprint(4, [1.0, 1.0, 1.0], [320, 320, 320]), device="cuda", memory_gb=4,
                       configs=["3d_fullres", "3d_lowres"])
    assert list(big.configurations) == ["3d_fullres", "3d_lowres", "3d_cascade_fullres"]
    full, low, casc = (big.configurations[k] for k in big.configurations)
    assert np.prod(full.patch_size) < 0.25 * np.prod(full.median_shape)
    assert np.prod(low.patch_size) >= 0.25 * np.prod(low.median_shape)
    assert np.prod(full.median_shape) >= 2 * np.prod(low.median_shape)
    assert casc.previous_stage == "3d_lowres" and casc.patch_size == full.patch_size
    assert big.input_channels(casc) == big.input_channels(full) + big.num_classes - 1


# --- plans.json ----------------------------------------------------------------------------------------


@pytest.fixture
def plans_file(tmp_path: Path) -> Path:
    plans = plan_dataset(hippocampus_like(), device="cpu", memory_gb=8, throughput=CPU_FLOPS)
    path = tmp_path / "plans.json"
    plans.save(path)
    return path


def test_plans_json_round_trip_is_lossless(plans_file: Path) -> None:
    plans = plan_dataset(hippocampus_like(), device="cpu", memory_gb=8, throughput=CPU_FLOPS)
    assert Plans.load(plans_file) == plans
    assert json.loads(plans_file.read_text())["schema_version"] == SCHEMA_VERSION


def test_unknown_key_in_plans_is_rejected_naming_the_file(plans_file: Path) -> None:
    raw = json.loads(plans_file.read_text())
    raw["configurations"]["3d_fullres"]["patch_szie"] = [32, 32, 32]
    plans_file.write_text(json.dumps(raw))
    with pytest.raises(PlanError, match="patch_szie") as exc:
        Plans.load(plans_file)
    assert str(plans_file) in str(exc.value)


def test_wrong_schema_version_is_rejected_naming_the_file(plans_file: Path) -> None:
    raw = json.loads(plans_file.read_text())
    raw["schema_version"] = SCHEMA_VERSION + 1
    plans_file.write_text(json.dumps(raw))
    with pytest.raises(PlanError, match="schema_version") as exc:
        Plans.load(plans_file)
    assert str(plans_file) in str(exc.value)


def test_missing_plans_file_is_a_plan_error(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="not found"):
        Plans.load(tmp_path / "plans.json")


# --- real data: nnU-Net v2's plan for Task04_Hippocampus --------------------------------------------------


def test_hippocampus_gpu_plan_equals_nnunet_v2(shared_data_dir: Path) -> None:
    from medseg.fingerprint import compute_fingerprint

    fp = compute_fingerprint(load_dataset(shared_data_dir / "hippocampus"), num_workers=2)
    plans = plan_dataset(fp, device="cuda", memory_gb=8)
    c3 = plans.config("3d_fullres")
    assert c3.spacing == pytest.approx([1.0, 1.0, 1.0])
    assert c3.patch_size == [40, 56, 40]
    assert c3.batch_size == 7
    assert c3.architecture.features == [32, 64, 128, 256]
    assert c3.architecture.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert c3.architecture.kernel_sizes == [[3, 3, 3]] * 4
    c2 = plans.config("2d")
    assert c2.patch_size == [56, 40]
    assert c2.batch_size == 292
    assert c2.architecture.features == [32, 64, 128, 256]


def test_variants_get_one_configuration_each_and_unbuildable_ones_are_refused(tmp_path, monkeypatch):
    from medseg.errors import MedsegError, PlanError

    fp = make_fingerprint(20, (1.0, 1.0, 1.0), (36, 50, 35))
    plans = plan_dataset(fp, device="cuda", memory_gb=8, configs=["3d_fullres"], variants=["all"])
    assert list(plans.configurations) == ["3d_fullres", "3d_fullres_residual", "3d_fullres_attention", "3d_fullres_se",
                                          "3d_fullres_reversible", "3d_fullres_graph"]
    assert plans.config("3d_fullres_graph").architecture.blocks.bottleneck == "graph"
    assert plans.config("3d_fullres_reversible").memory.activations_gb < plans.config("3d_fullres").memory.activations_gb
    residual = plans.config("3d_fullres_residual")
    assert residual.architecture.blocks.encoder_block == "residual" and residual.variant == "residual"
    assert residual.memory.estimate_gb > plans.config("3d_fullres").memory.estimate_gb
    assert plans.config("3d_fullres_se").architecture.blocks.squeeze_excitation == "scse"
    plans.save(tmp_path / "plans.json")
    assert Plans.load(tmp_path / "plans.json") == plans
    import medseg.networks.unet as unet

    monkeypatch.setattr(unet, "MAX_GRAPH_NODES", 8)
    with pytest.raises(PlanError, match="variant 'graph' of 2d cannot be built: graph bottleneck too large: 35 nodes"):
        plan_dataset(fp, device="cuda", memory_gb=8, variants=["plain", "graph"])
    with pytest.raises(MedsegError, match="did you mean 'attention'"):
        plan_dataset(fp, device="cuda", memory_gb=8, variants=["atention"])


def test_reversible_buys_a_larger_patch_where_memory_binds_and_records_the_trade():
    fp = make_fingerprint(20, (1.0, 1.0, 1.0), (160, 160, 160))
    plans = plan_dataset(fp, device="cuda", memory_gb=1.0, configs=["3d_fullres"], variants=["plain", "reversible"])
    plain, rev = plans.config("3d_fullres"), plans.config("3d_fullres_reversible")
    assert plain.memory.trade is None
    trade = rev.memory.trade
    assert trade.versus_patch_size == plain.patch_size and trade.patch_size == rev.patch_size
    assert np.prod(rev.patch_size) > np.prod(plain.patch_size) and trade.voxel_ratio > 1.0
    assert "let patch" in trade.note
    assert rev.memory.estimate_gb <= 1.0
    small = plan_dataset(make_fingerprint(20, (1.0, 1.0, 1.0), (36, 50, 35)), device="cuda", memory_gb=8,
                         configs=["3d_fullres"], variants=["reversible"])
    t = small.config("3d_fullres_reversible").memory.trade
    assert t.voxel_ratio == 1.0 and "no larger patch to buy" in t.note


def test_step_times_are_measured_once_per_machine_and_step(tmp_path, caplog):
    from medseg.planning.planner import StepTimer
    from medseg.plans.schema import Architecture

    arch = Architecture(features=[2, 4], kernel_sizes=[[3, 3, 3]] * 2, strides=[[1, 1, 1], [2, 2, 2]])
    cache = tmp_path / "home" / "step_times.json"
    timer = StepTimer(cache)
    first = timer(arch, (8, 8, 8), 2, 1, 3)
    assert first > 0 and (timer.measured, timer.reused) == (1, 0) and cache.is_file()
    assert timer(arch, (8, 8, 8), 2, 1, 3) == first and timer.reused == 1
    again = StepTimer(cache)  # a later planning run on the same machine
    assert again(arch, (8, 8, 8), 2, 1, 3) == first and (again.measured, again.reused) == (0, 1)
    assert again(arch, (8, 8, 8), 3, 1, 3) > 0 and again.measured == 1  # another batch is another step
    fresh = StepTimer(cache, refresh=True)
    fresh(arch, (8, 8, 8), 2, 1, 3)
    assert (fresh.measured, fresh.reused) == (1, 0)
    cache.write_text("{not json")
    damaged = StepTimer(cache)
    assert damaged(arch, (8, 8, 8), 2, 1, 3) > 0 and damaged.measured == 1
    assert "unreadable step-time cache" in caplog.text


@pytest.mark.parametrize("target", [0.05, 0.3, 0.7, 1.2, 2.5, 9.0])
def test_width_search_finds_the_widest_fitting_width_with_few_measurements(target: float):
    from medseg.planning.planner import CPU_WIDTH_CHOICES, _widest_fitting

    measured: list[int] = []

    def step_seconds(width: int) -> float:  # grows with width, as a real step does
        measured.append(width)
        return (width / 16) ** 2 * 0.5

    width, seconds = _widest_fitting(step_seconds, target)
    assert len(measured) == len(set(measured)) <= 3  # never the same width twice, at most 3 of the 5
    fitting = [w for w in sorted(CPU_WIDTH_CHOICES, reverse=True) if step_seconds(w) <= target]
    assert width == (fitting[0] if fitting else min(CPU_WIDTH_CHOICES))  # what timing every width gives
    assert seconds == step_seconds(width)


def test_planner_timing_optimiser_updates_weights_exactly_as_torch_sgd():
    import torch

    from medseg.planning.memory import ForeachNesterovSGD

    torch.manual_seed(0)
    ours = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True), torch.randn(2, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    optimisers = (ForeachNesterovSGD(ours, lr=0.1, momentum=0.99),
                  torch.optim.SGD(theirs, lr=0.1, momentum=0.99, nesterov=True))
    for _ in range(4):
        for params, opt in zip((ours, theirs), optimisers, strict=True):
            opt.zero_grad()
            sum((p**2 * (i + 1)).sum() for i, p in enumerate(params[:2])).backward()  # the last gets no gradient
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
