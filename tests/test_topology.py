"""Topology rules (``medseg.plans.topology``): target spacing, axis order, pooling and kernel sizes.

Oracles are nnU-Net v2's rules, worked out by hand for small inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

from medseg.plans import topology


def _final_feature_map(patch: list[int], strides: list[list[int]]) -> list[int]:
    return [p // d for p, d in zip(patch, topology.divisibility(strides), strict=True)]


# --- target spacing -------------------------------------------------------------------------------


def test_isotropic_target_spacing_is_the_median() -> None:
    spacings = np.array([[1.0, 1.0, 1.0], [1.2, 1.1, 0.9], [0.8, 0.9, 1.3]])
    assert topology.target_spacing(spacings) == pytest.approx([1.0, 1.0, 1.0])


def test_thick_slice_axis_takes_the_10th_percentile_when_more_than_3x_coarser() -> None:
    spacings = np.array([[0.8, 0.8, 5.0]] * 7 + [[0.8, 0.8, 3.0]] * 3)
    # median z = 5 > 3 * 0.8 → 10th percentile of z (3 mm) instead
    assert topology.target_spacing(spacings) == pytest.approx([0.8, 0.8, 3.0])


def test_percentile_rule_not_used_when_at_most_3x_coarser() -> None:
    spacings = np.array([[1.0, 1.0, 2.5]] * 7 + [[1.0, 1.0, 1.2]] * 3)
    assert topology.target_spacing(spacings) == pytest.approx([1.0, 1.0, 2.5])


def test_percentile_rule_never_makes_the_coarse_axis_finer_than_in_plane() -> None:
    spacings = np.array([[1.0, 1.0, 5.0]] * 7 + [[1.0, 1.0, 0.5]] * 3)
    assert topology.target_spacing(spacings) == pytest.approx([1.0, 1.0, 1.0])


def test_coarse_axis_rule_applies_to_any_axis() -> None:
    spacings = np.array([[0.7, 4.0, 0.7]] * 8 + [[0.7, 2.5, 0.7]] * 2)
    assert topology.target_spacing(spacings) == pytest.approx([0.7, 2.5, 0.7])


# --- anisotropy and axis order ---------------------------------------------------------------------


@pytest.mark.parametrize(("spacing", "expected"), [
    ([1.0, 1.0, 1.0], False),
    ([1.0, 1.0, 3.0], False),  # exactly 3x is not "more than 3x"
    ([0.8, 0.8, 5.0], True),
    ([5.0, 0.8, 0.8], True),
    ([0.5, 1.0, 3.5], True),  # compared with the second coarsest axis
    ([0.5, 2.0, 3.5], False),
])
def test_anisotropy_means_coarsest_axis_more_than_3x_the_next(spacing: list[float], expected: bool) -> None:
    assert topology.is_anisotropic(spacing) is expected


@pytest.mark.parametrize(("spacing", "expected"), [
    ([1.0, 1.0, 1.0], [0, 1, 2]),
    ([0.8, 0.8, 5.0], [2, 0, 1]),
    ([0.8, 5.0, 0.8], [1, 0, 2]),
    ([5.0, 0.8, 0.8], [0, 1, 2]),
])
def test_transpose_moves_the_coarsest_axis_first_keeping_the_others_in_order(
        spacing: list[float], expected: list[int]) -> None:
    assert topology.transpose_forward(spacing) == expected


# --- pooling and kernels ---------------------------------------------------------------------------


def test_isotropic_pooling_halves_every_axis_until_feature_maps_fall_below_8() -> None:
    strides, kernels = topology.pooling_plan([1.0, 1.0, 1.0], [40, 56, 40])
    # 40 → 20 → 10 → 5 and 56 → 28 → 14 → 7: three poolings, four stages (nnU-Net Task04)
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert kernels == [[3, 3, 3]] * 4
    assert _final_feature_map([40, 56, 40], strides) == [5, 7, 5]


@pytest.mark.parametrize("patch", [[16, 16, 16], [32, 48, 40], [64, 64, 64], [20, 24, 16], [128, 128, 128]])
def test_isotropic_pooling_stops_with_every_axis_at_least_4_and_none_poolable(patch: list[int]) -> None:
    strides, kernels = topology.pooling_plan([1.0, 1.0, 1.0], patch)
    final = np.array(patch) / np.array(topology.divisibility(strides))
    assert (final >= topology.MIN_FEATURE_MAP).all()
    if len(strides) < 7:  # stopped by the feature-map rule, not by the stage cap
        assert (final < 2 * topology.MIN_FEATURE_MAP).all()
    assert all(k == [3, 3, 3] for k in kernels)
    assert len(kernels) == len(strides)


def test_pooling_is_capped_at_max_stages() -> None:
    strides, kernels = topology.pooling_plan([1.0, 1.0, 1.0], [1024, 1024, 1024], max_stages=5)
    assert len(strides) == len(kernels) == 5


def test_anisotropic_first_stages_neither_pool_nor_convolve_the_coarse_axis() -> None:
    # transposed spacing: out-of-plane axis first (3 mm), in-plane 0.8 mm
    strides, kernels = topology.pooling_plan([3.0, 0.8, 0.8], [24, 160, 160])
    assert strides[1] == [1, 2, 2]
    assert kernels[0] == [1, 3, 3]
    # after one in-plane pooling the spacing is (3, 1.6, 1.6): within 2x → pooled and 3-kernel too
    assert strides[2] == [2, 2, 2]
    assert kernels[1] == [3, 3, 3]
    assert kernels[-1] == [3, 3, 3]
    assert (np.array(_final_feature_map([24, 160, 160], strides)) >= topology.MIN_FEATURE_MAP).all()


def test_strongly_anisotropic_axis_waits_several_stages_before_pooling() -> None:
    strides, kernels = topology.pooling_plan([5.0, 0.8, 0.8], [20, 192, 192])
    # in-plane 0.8 → 1.6 → 3.2: the 5 mm axis joins once the in-plane spacing is within 2x of it
    assert strides[1] == [1, 2, 2] and strides[2] == [1, 2, 2]
    assert kernels[0] == [1, 3, 3] and kernels[1] == [1, 3, 3]
    assert kernels[2] == [3, 3, 3]
    assert strides[3][0] == 2


def test_lone_axis_is_pooled_only_while_at_least_12() -> None:
    strides, _ = topology.pooling_plan([1.0, 1.0, 1.0], [8, 8, 64])
    # 8 → 4 with the others; then only axis 2 remains: 32 → 16 → 8, and 8 < 12 stops
    assert topology.divisibility(strides) == [2, 2, 8]


def test_2d_pooling_plan() -> None:
    strides, kernels = topology.pooling_plan([1.0, 1.0], [56, 40])
    assert strides == [[1, 1], [2, 2], [2, 2], [2, 2]]
    assert kernels == [[3, 3]] * 4


# --- divisibility -----------------------------------------------------------------------------------


def test_divisibility_is_the_product_of_strides_per_axis() -> None:
    assert topology.divisibility([[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 1]]) == [4, 8, 4]


def test_pad_to_multiple_rounds_up_per_axis() -> None:
    assert topology.pad_to_multiple([10, 12, 9], [2, 4, 8]) == [10, 12, 16]
    assert topology.pad_to_multiple([16, 16], [8, 16]) == [16, 16]
