"""Preprocessing (``medseg.preprocessing``): cropping, normalisation, resampling and the pipeline.

The central contract: preprocessing a label map and exporting its one-hot probabilities gives back
the original label map — exactly when nothing is resampled, and closely (Dice > 0.9) when the
plan's spacing is coarser. Checked on real hippocampus MRI and the anisotropic spleen CT.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import make_case, shared_data

from medseg.errors import DatasetError
from medseg.fingerprint import compute_fingerprint
from medseg.io.dataset import Dataset, load_dataset, read_case_image, read_case_label
from medseg.io.image import Geometry
from medseg.planning.planner import plan_dataset
from medseg.plans.schema import Configuration, Normalization
from medseg.preprocessing.cropping import bbox_of, crop, nonzero_mask
from medseg.preprocessing.normalization import normalize
from medseg.preprocessing.pipeline import (
    CaseProperties,
    export_probabilities,
    load_class_locations,
    load_properties,
    preprocess_dataset,
    preprocess_image,
    preprocess_label,
)
from medseg.preprocessing.resampling import new_shape_for, resample_image, resample_labels
from medseg.workdir import WorkDir

CPU_FLOPS = 5e10
REAL_CASES = [("hippocampus", 0), ("hippocampus", 1), ("spleen-ct", 0)]


def _plan_3d(ds: Dataset) -> Configuration:
    fp = compute_fingerprint(ds)
    return plan_dataset(fp, device="cuda", memory_gb=8, configs=["3d_fullres"]).config("3d_fullres")


def _real_case(name: str, index: int) -> tuple[Dataset, Configuration]:
    root = shared_data()
    if root is None:
        pytest.skip("shared data folder not found (set MEDSEG_SHARED_DATA)")
    ds = load_dataset(root / name)
    ds.cases = ds.cases[:2]  # a fingerprint of the first cases is enough for a plan
    config = _plan_3d(ds)
    ds.cases = [ds.cases[index]]
    return ds, config


def _round_trip(ds: Dataset, config: Configuration) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(original label, preprocessed label, exported label) for the dataset's first case."""
    image, geometry = read_case_image(ds.cases[0])
    label, _ = read_case_label(ds.cases[0])
    _, props = preprocess_image(image, geometry, config)
    seg = preprocess_label(label, props, config, sorted(ds.labels))
    classes = np.arange(max(ds.labels) + 1).reshape(-1, *[1] * seg.ndim)
    probs = (seg[None] == classes).astype(np.float32)
    return label, seg, export_probabilities(probs, props, config)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


# --- round trip on real data ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "index"), REAL_CASES)
def test_round_trip_without_resampling_is_exact(name: str, index: int) -> None:
    ds, config = _real_case(name, index)
    label, seg, exported = _round_trip(ds, config)
    assert seg.shape == tuple(label.shape[t] for t in config.transpose_forward)
    assert exported.shape == label.shape
    assert np.array_equal(exported, label)


def test_spleen_plan_transposes_the_thick_slice_axis_first() -> None:
    ds, config = _real_case("spleen-ct", 0)
    assert config.transpose_forward == [2, 0, 1]
    image, geometry = read_case_image(ds.cases[0])
    data, props = preprocess_image(image, geometry, config)
    assert data.shape == (1, image.shape[3], image.shape[1], image.shape[2])
    assert props.spacing_transposed == pytest.approx([5.0, 0.795, 0.795], abs=1e-3)


@pytest.mark.parametrize(("name", "index"), REAL_CASES)
def test_round_trip_through_a_coarser_grid_keeps_labels_close(name: str, index: int) -> None:
    ds, config = _real_case(name, index)
    config = config.model_copy(deep=True)
    config.spacing = [1.5 * s for s in config.spacing]
    label, seg, exported = _round_trip(ds, config)
    assert seg.size < label.size  # it was really resampled
    assert exported.shape == label.shape
    assert set(np.unique(exported).tolist()) <= set(np.unique(label).tolist())
    for k in sorted(k for k in ds.labels if k != 0):
        assert _dice(exported == k, label == k) > 0.9, f"label {k}"


def test_round_trip_restores_the_zero_border_outside_the_crop(msd_dataset: Path) -> None:
    image, label = make_case((20, 24, 16), seed=3)
    padded_image = np.pad(image, [(0, 0), (3, 2), (0, 5), (4, 1)])
    padded_label = np.pad(label, [(3, 2), (0, 5), (4, 1)])
    geometry = Geometry(padded_label.shape, (1.0, 1.0, 3.5), np.diag([1.0, 1.0, 3.5, 1.0]))
    config = _plan_msd(msd_dataset).config("3d_fullres")
    config.spacing, config.transpose_forward = [3.5, 1.0, 1.0], [2, 0, 1]  # thick-slice axis first
    data, props = preprocess_image(padded_image, geometry, config)
    assert props.bbox == [[3, 23], [0, 24], [4, 20]]
    assert data.shape == (1, 16, 20, 24)
    seg = preprocess_label(padded_label, props, config, [0, 1, 2])
    probs = (seg[None] == np.arange(3).reshape(-1, 1, 1, 1)).astype(np.float32)
    assert np.array_equal(export_probabilities(probs, props, config), padded_label)


# --- cropping --------------------------------------------------------------------------------------


def test_crop_bbox_is_the_nonzero_region_of_any_channel() -> None:
    image = np.zeros((2, 12, 10, 8), dtype=np.float32)
    image[0, 2:7, 3:9, 1:4] = 1.0
    image[1, 5:10, 4:6, 2:6] = -2.0  # negative values count as nonzero
    bbox = bbox_of(nonzero_mask(image))
    assert bbox == [[2, 10], [3, 9], [1, 6]]
    assert crop(image, bbox).shape == (2, 8, 6, 5)
    assert crop(image[0], bbox).shape == (8, 6, 5)


def test_nonzero_mask_fills_holes() -> None:
    image = np.zeros((1, 9, 9, 9), dtype=np.float32)
    image[0, 1:8, 1:8, 1:8] = 5.0
    image[0, 3:6, 3:6, 3:6] = 0.0  # an enclosed dark region (e.g. a ventricle) stays in the mask
    mask = nonzero_mask(image)
    assert mask[4, 4, 4]
    assert mask.sum() == 7**3


def test_empty_mask_bbox_is_the_whole_array() -> None:
    assert bbox_of(np.zeros((4, 5, 6), dtype=bool)) == [[0, 4], [0, 5], [0, 6]]


# --- normalisation ---------------------------------------------------------------------------------


def test_zscore_inside_mask_gives_mean_0_std_1_there_and_zero_outside() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(300.0, 40.0, (1, 16, 16, 16)).astype(np.float32)
    mask = np.zeros((16, 16, 16), dtype=bool)
    mask[2:14, 3:12, 4:15] = True
    data[0, ~mask] = 0.0
    out = normalize(data, [Normalization(scheme="zscore", use_mask=True)], mask)
    assert out.dtype == np.float32
    assert out[0][mask].mean() == pytest.approx(0.0, abs=1e-4)
    assert out[0][mask].std() == pytest.approx(1.0, abs=1e-4)
    assert (out[0][~mask] == 0).all()


def test_zscore_without_mask_uses_the_whole_image() -> None:
    data = np.random.default_rng(1).uniform(0, 1000, (2, 8, 9, 10)).astype(np.float32)
    out = normalize(data, [Normalization(scheme="zscore")] * 2)
    for c in range(2):
        assert out[c].mean() == pytest.approx(0.0, abs=1e-4)
        assert out[c].std() == pytest.approx(1.0, abs=1e-4)


def test_ct_clips_to_the_window_then_zscores_with_the_given_statistics() -> None:
    data = np.array([-1000.0, -50.0, 0.0, 40.0, 100.0, 3000.0], dtype=np.float32).reshape(1, 6, 1, 1)
    norm = Normalization(scheme="ct", mean=40.0, std=20.0, lower=-50.0, upper=100.0)
    out = normalize(data, [norm])
    assert out.ravel() == pytest.approx([-4.5, -4.5, -2.0, 0.0, 3.0, 3.0])


def test_none_normalisation_leaves_values_unchanged_and_channels_are_independent() -> None:
    data = np.random.default_rng(2).normal(0, 50, (2, 5, 5, 5)).astype(np.float32)
    out = normalize(data, [Normalization(scheme="none"), Normalization(scheme="zscore")])
    assert np.array_equal(out[0], data[0])
    assert out[1].std() == pytest.approx(1.0, abs=1e-4)


# --- resampling ------------------------------------------------------------------------------------


def test_new_shape_keeps_the_physical_extent() -> None:
    assert new_shape_for([100, 50, 20], [1.0, 1.0, 5.0], [2.0, 0.5, 3.0]) == [50, 100, 33]


@pytest.mark.parametrize("anisotropic", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_resample_labels_never_creates_new_values(seed: int, anisotropic: bool) -> None:
    rng = np.random.default_rng(seed)
    values = np.array([0, 2, 3, 7])
    seg = rng.choice(values, size=tuple(rng.integers(5, 20, 3))).astype(np.int16)
    shape = tuple(int(s) for s in rng.integers(3, 30, 3))
    out = resample_labels(seg, shape, values.tolist(), anisotropic=anisotropic)
    assert out.shape == shape
    assert out.dtype == seg.dtype
    assert set(np.unique(out).tolist()) <= set(values.tolist())


def test_resample_labels_to_the_same_shape_is_the_identity() -> None:
    seg = np.random.default_rng(0).integers(0, 3, (6, 7, 8)).astype(np.int16)
    assert np.array_equal(resample_labels(seg, seg.shape, [0, 1, 2]), seg)


def test_resample_image_preserves_a_constant_image() -> None:
    data = np.full((2, 10, 12, 14), 7.5, dtype=np.float32)
    for spacing in ([1.0, 1.0, 1.0], [5.0, 0.8, 0.8]):
        out = resample_image(data, spacing, [2.0, 0.7, 1.3])
        assert out.shape[0] == 2
        assert np.allclose(out, 7.5, atol=1e-4)


def test_anisotropic_image_resampling_keeps_thick_slices_unsmeared() -> None:
    # slices along the out-of-plane axis with distinct constant values; upsampling that axis must
    # copy slices (nearest neighbour), never blend them
    data = np.stack([np.full((8, 8), v, dtype=np.float32) for v in (0.0, 10.0, 20.0, 30.0)])[None]
    out = resample_image(data, [5.0, 1.0, 1.0], [2.5, 1.0, 1.0])
    assert out.shape == (1, 8, 8, 8)
    assert set(np.round(np.unique(out), 4).tolist()) <= {0.0, 10.0, 20.0, 30.0}


# --- the dataset pipeline: resumable and deterministic -----------------------------------------------------


def _plan_msd(root: Path):
    fp = compute_fingerprint(load_dataset(root))
    return plan_dataset(fp, device="cpu", memory_gb=8, throughput=CPU_FLOPS, configs=["3d_fullres"])


def test_preprocess_dataset_writes_arrays_and_properties(msd_dataset: Path, tmp_path: Path) -> None:
    plans = _plan_msd(msd_dataset)
    ds = load_dataset(msd_dataset)
    assert preprocess_dataset(ds, plans, tmp_path / "work") == {"3d_fullres": 4}
    out = WorkDir(tmp_path / "work").preprocessed("3d_fullres")
    data = np.load(out / "case_000.npy")
    seg = np.load(out / "case_000_seg.npy")
    assert data.dtype == np.float32 and data.ndim == 4 and data.shape[0] == 1
    assert seg.dtype == np.int8 and seg.shape == (1, *data.shape[1:])
    assert set(np.unique(seg).tolist()) <= {0, 1, 2}
    props = json.loads((out / "case_000.json").read_text())
    for lab, locations in props["class_locations"].items():
        assert all(seg[0][tuple(loc)] == int(lab) for loc in locations[:50])


def test_case_properties_round_trip_through_their_json_file(msd_dataset: Path, tmp_path: Path) -> None:
    plans = _plan_msd(msd_dataset)
    ds = load_dataset(msd_dataset)
    preprocess_dataset(ds, plans, tmp_path / "work")
    out = WorkDir(tmp_path / "work").preprocessed("3d_fullres")
    path = out / "case_001.json"
    assert list(json.loads(path.read_text())) == ["geometry", "bbox", "shape_cropped_transposed", "spacing_transposed",
                                                  "shape_preprocessed", "case_id", "class_locations", "made_from"]
    props = load_properties(out, "case_001")
    assert props.case_id == "case_001" and props.shape_preprocessed == list(np.load(out / "case_001.npy").shape[1:])
    props.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()
    assert CaseProperties.from_dict(props.to_dict()).to_dict() == props.to_dict()
    # what the sampler reads: (N, 3) voxels of each foreground class, as stored
    locations = load_class_locations(out, "case_001")
    assert {k: v.tolist() for k, v in locations.items()} == props.class_locations
    # the stored properties invert preprocessing as the in-memory ones do
    image, geometry = read_case_image(ds.cases[1])
    label, _ = read_case_label(ds.cases[1])
    _, fresh = preprocess_image(image, geometry, plans.config("3d_fullres"))
    seg = np.load(out / "case_001_seg.npy")[0]
    probs = (seg[None] == np.arange(3).reshape(-1, 1, 1, 1)).astype(np.float32)
    config = plans.config("3d_fullres")
    assert np.array_equal(export_probabilities(probs, props, config), export_probabilities(probs, fresh, config))


def test_unreadable_case_properties_are_one_line_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"bbox": [[0, 1]]')
    (tmp_path / "b.json").write_text('{"bbox": [[0, 1]]}')
    for case_id, reason in (("a", "cannot read case properties"), ("b", "not a medseg case properties file")):
        with pytest.raises(DatasetError, match=reason) as err:
            load_properties(tmp_path, case_id)
        assert str(tmp_path / f"{case_id}.json") in str(err.value) and "\n" not in str(err.value)


def test_preprocess_dataset_resumes_redoing_only_missing_cases(msd_dataset: Path, tmp_path: Path) -> None:
    plans = _plan_msd(msd_dataset)
    ds = load_dataset(msd_dataset)
    work = tmp_path / "work"
    assert preprocess_dataset(ds, plans, work) == {"3d_fullres": 4}
    out = WorkDir(work).preprocessed("3d_fullres")
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith("case_002")}
    before = (out / "case_002.npy").read_bytes()
    for suffix in (".npy", "_seg.npy", ".json"):
        (out / f"case_002{suffix}").unlink()
    assert preprocess_dataset(ds, plans, work) == {"3d_fullres": 1}
    assert (out / "case_002.npy").read_bytes() == before
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith("case_002")} == kept
    assert preprocess_dataset(ds, plans, work) == {"3d_fullres": 0}


def test_case_without_its_properties_file_counts_as_unfinished(msd_dataset: Path, tmp_path: Path) -> None:
    plans = _plan_msd(msd_dataset)
    ds = load_dataset(msd_dataset)
    preprocess_dataset(ds, plans, tmp_path / "work")
    (WorkDir(tmp_path / "work").preprocessed("3d_fullres") / "case_001.json").unlink()
    assert preprocess_dataset(ds, plans, tmp_path / "work") == {"3d_fullres": 1}


def test_preprocessing_is_deterministic_across_runs_and_workers(msd_dataset: Path, tmp_path: Path) -> None:
    plans = _plan_msd(msd_dataset)
    ds = load_dataset(msd_dataset)
    preprocess_dataset(ds, plans, tmp_path / "a", num_workers=1)
    preprocess_dataset(ds, plans, tmp_path / "b", num_workers=2)
    a, b = WorkDir(tmp_path / "a").preprocessed("3d_fullres"), WorkDir(tmp_path / "b").preprocessed("3d_fullres")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert len([n for n in names if n.endswith(".npy")]) == 8
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
