"""Metrics against analytic oracles and against MONAI's Hausdorff distance."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from medseg.evaluation.metrics import (
    case_metrics,
    confusion,
    dice,
    hd95,
    image_diagonal_mm,
    iou,
    surface_distances,
    volume_ml,
)


def cube(shape, start, size) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))] = True
    return mask


def blobs(rng: np.random.Generator, shape, sigma: float = 1.5) -> np.ndarray:
    return ndimage.gaussian_filter(rng.random(shape), sigma) > 0.5


def monai_hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y_pred, y = pred[None, None].astype(np.float32), ref[None, None].astype(np.float32)
        out = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95,
                                         spacing=list(spacing))
    return float(out[0, 0])


def test_confusion_counts_each_voxel_once():
    pred = np.array([1, 1, 0, 0, 1], dtype=bool)
    ref = np.array([1, 0, 1, 0, 1], dtype=bool)
    assert confusion(pred, ref) == (2, 1, 1)


def test_concentric_cubes_have_known_dice_iou_and_hausdorff():
    outer = cube((20, 20, 20), (4, 4, 4), (12, 12, 12))  # 1728 voxels
    inner = cube((20, 20, 20), (6, 6, 6), (8, 8, 8))  # 512 voxels, 2 voxels inside on every side
    tp, fp, fn = confusion(inner, outer)
    assert (tp, fp, fn) == (512, 0, 1216)
    assert dice(tp, fp, fn) == pytest.approx(2 * 512 / (512 + 1728))
    assert iou(tp, fp, fn) == pytest.approx(512 / 1728)
    # Every inner surface voxel lies 2 voxels from the outer surface; the outer corners lie
    # 2 * sqrt(3) voxels from the inner corners (the full Hausdorff distance); HD95 is in between.
    d_in, d_out = surface_distances(inner, outer, (1.5, 1.5, 1.5))
    np.testing.assert_allclose(d_in, 3.0)
    assert d_out.min() == pytest.approx(3.0) and d_out.max() == pytest.approx(3.0 * math.sqrt(3))
    assert 3.0 <= hd95(inner, outer, (1.5, 1.5, 1.5)) <= 3.0 * math.sqrt(3)


def test_shifted_cube_hd95_equals_the_shift_in_mm_with_anisotropic_spacing():
    spacing = (0.7, 1.3, 2.5)
    ref = cube((24, 24, 24), (5, 5, 5), (10, 10, 10))
    for axis, voxels in ((0, 3), (1, 2), (2, 1)):
        start = [5, 5, 5]
        start[axis] += voxels
        pred = cube((24, 24, 24), start, (10, 10, 10))
        assert hd95(pred, ref, spacing) == pytest.approx(voxels * spacing[axis], rel=1e-6)
        assert hd95(ref, pred, spacing) == pytest.approx(voxels * spacing[axis], rel=1e-6)


def test_identical_masks_have_dice_one_and_hd95_zero():
    mask = cube((10, 12), (2, 3), (5, 4))
    assert dice(*confusion(mask, mask)) == 1.0
    assert hd95(mask, mask, (0.5, 2.0)) == 0.0


def test_concentric_spheres_match_monai_and_the_radius_gap():
    grid = np.indices((40, 40, 40), dtype=float) - 19.5
    radius = np.sqrt((grid**2).sum(0))
    big, small = radius <= 15, radius <= 10
    value = hd95(small, big, (1.0, 1.0, 1.0))
    assert value == monai_hd95(small, big, (1.0, 1.0, 1.0))
    assert 4.0 <= value <= 6.5  # about the 5 mm gap between the spheres, up to voxelisation


@pytest.mark.parametrize("seed", range(6))
def test_hd95_equals_monai_on_random_masks(seed: int):
    rng = np.random.default_rng(seed)
    ndim = 2 if seed % 2 == 0 else 3
    shape = tuple(int(s) for s in rng.integers(8, 28 if ndim == 3 else 60, size=ndim))
    spacing = tuple(float(s) for s in rng.uniform(0.3, 3.0, size=ndim))
    pred, ref = blobs(rng, shape, sigma=rng.uniform(0.6, 2.0)), blobs(rng, shape)
    if seed == 4:
        pred = rng.random(shape) > 0.8  # scattered voxels: many small surfaces
    assert pred.any() and ref.any()
    assert abs(hd95(pred, ref, spacing) - monai_hd95(pred, ref, spacing)) <= 1e-6


def test_hd95_empty_masks_nan_when_both_and_inf_when_one():
    empty = np.zeros((6, 6, 6), dtype=bool)
    full = cube((6, 6, 6), (1, 1, 1), (3, 3, 3))
    assert math.isnan(hd95(empty, empty, (1, 1, 1)))
    assert hd95(full, empty, (1, 1, 1)) == math.inf
    assert hd95(empty, full, (1, 1, 1)) == math.inf
    assert math.isnan(dice(*confusion(empty, empty))) and math.isnan(iou(*confusion(empty, empty)))
    assert dice(*confusion(full, empty)) == 0.0 and iou(*confusion(empty, full)) == 0.0


def test_volume_ml_uses_the_spacing():
    assert volume_ml(cube((10, 10, 10), (0, 0, 0), (5, 4, 2)), (2.0, 0.5, 1.0)) == pytest.approx(0.04)


def test_case_metrics_rows_per_foreground_class_with_empty_rules():
    spacing = (1.0, 2.0, 3.0)
    ref = np.zeros((10, 10, 10), dtype=np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    ref[7:9, 7:9, 7:9] = 2  # class 2 missed by the prediction
    pred = np.zeros_like(ref)
    pred[3:6, 2:6, 2:6] = 1
    rows = case_metrics(pred, ref, spacing, {0: "background", 1: "liver", 2: "tumour", 3: "cyst"})
    assert [r["class_id"] for r in rows] == [1, 2, 3]
    liver, tumour, cyst = rows
    assert (liver["tp"], liver["fp"], liver["fn"]) == (48, 0, 16)
    assert liver["dice"] == pytest.approx(96 / 112) and liver["hd95_mm"] == pytest.approx(1.0)
    assert liver["vol_ref_ml"] == pytest.approx(64 * 6 / 1000) and not liver["hd95_penalized"]
    assert tumour["dice"] == 0.0 and tumour["hd95_penalized"]
    assert tumour["hd95_mm"] == pytest.approx(image_diagonal_mm((10, 10, 10), spacing))
    assert math.isnan(cyst["dice"]) and math.isnan(cyst["hd95_mm"]) and not cyst["hd95_penalized"]
    assert set(liver) == {"class_id", "name", "dice", "iou", "hd95_mm", "hd95_penalized", "vol_pred_ml",
                          "vol_ref_ml", "tp", "fp", "fn"}


def test_case_metrics_measures_a_singleton_axis_image_in_2d():
    ref = cube((12, 12), (2, 2), (6, 6)).astype(np.uint8)
    pred = cube((12, 12), (4, 2), (6, 6)).astype(np.uint8)
    row = case_metrics(pred[..., None], ref[..., None], (0.5, 0.5, 3.0), {1: "a"})[0]
    assert row["hd95_mm"] == pytest.approx(hd95(pred, ref, (0.5, 0.5))) == pytest.approx(1.0)


def test_spacing_must_match_the_dimension():
    with pytest.raises(ValueError, match="spacing"):
        hd95(np.ones((3, 3), bool), np.ones((3, 3), bool), (1.0, 1.0, 1.0))


def test_far_apart_surfaces_fall_back_to_the_kd_tree_with_exact_distances():
    from medseg.evaluation import metrics

    pred, ref = np.zeros((90, 90, 12), dtype=bool), np.zeros((90, 90, 12), dtype=bool)
    pred[2, 3, 1] = True
    ref[80, 85, 10] = True  # far beyond the grid offsets tried before the k-d tree
    spacing = (0.8, 0.8, 3.0)
    far = math.sqrt((78 * 0.8) ** 2 + (82 * 0.8) ** 2 + (9 * 3.0) ** 2)
    assert far > metrics._offsets(spacing)[1][-1]
    d_pred, d_ref = surface_distances(pred, ref, spacing)
    assert d_pred == pytest.approx([far], rel=1e-12) and d_ref == pytest.approx([far], rel=1e-12)
    assert hd95(pred, ref, spacing) == monai_hd95(pred, ref, spacing)


@pytest.mark.parametrize("seed", range(3))
def test_hd95_equals_monai_when_the_offset_search_is_split_in_small_blocks(monkeypatch, seed: int):
    from medseg.evaluation import metrics

    monkeypatch.setattr(metrics, "_GATHER_LIMIT", 64)  # a few surface voxels per lookup block
    rng = np.random.default_rng(100 + seed)
    shape, spacing = (30, 24, 10), (0.7, 0.9, 2.5)
    pred, ref = blobs(rng, shape, sigma=1.2), blobs(rng, shape, sigma=2.5)
    pred[rng.random(shape) > 0.995] = True  # scattered outliers
    assert hd95(pred, ref, spacing) == monai_hd95(pred, ref, spacing)


def test_percentile_is_torch_quantile_bit_for_bit():
    import torch

    from medseg.evaluation.metrics import _percentile_95

    rng = np.random.default_rng(7)
    for n in [1, 2, 3, 20, 21, 101, 1000, 4097]:
        for values in (rng.random(n) * 30, np.sqrt(rng.integers(0, 40, n).astype(float))):  # ties too
            assert _percentile_95(values) == float(torch.quantile(torch.from_numpy(values.astype(np.float32)), 0.95))


def test_hd95_equals_monai_bit_for_bit_on_many_random_mask_pairs():
    rng = np.random.default_rng(2026)
    compared = 0
    for t in range(80):
        ndim = 2 if t % 3 == 0 else 3
        shape = tuple(int(s) for s in rng.integers(5, 70 if ndim == 2 else 36, size=ndim))
        spacing = tuple(float(s) for s in rng.uniform(0.2, 6.0, size=ndim))
        pred, ref = blobs(rng, shape, sigma=rng.uniform(0.5, 3.0)), blobs(rng, shape, sigma=rng.uniform(0.5, 3.0))
        if t % 5 == 0:
            pred = rng.random(shape) > 0.97  # scattered voxels
        if t % 7 == 0:  # two single voxels in opposite corners: beyond the grid offsets, the k-d tree answers
            pred, ref = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
            pred[(0,) * ndim], ref[(-1,) * ndim] = True, True
        if pred.any() and ref.any():
            assert hd95(pred, ref, spacing) == monai_hd95(pred, ref, spacing), (t, shape, spacing)
            compared += 1
    assert compared >= 60
