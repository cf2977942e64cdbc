"""Contracts of the training batch source (medseg.training.data): shapes, purity of batch(),
foreground oversampling, exact crops without augmentation, and clean worker shutdown."""

from __future__ import annotations

import dataclasses
import gc
import json
import multiprocessing
import os
import pickle
import random
import signal
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import DatasetError, MedsegError
from medseg.training.data import AugmentationParams, BatchSource, initial_patch_size


def write_case(folder: Path, case_id: str, shape: tuple[int, ...], *, channels: int = 1, seed: int = 0,
               outside: bool = False) -> None:
    """A case in the preprocessed format: a cube of label 1 and a sphere of label 2 (if it fits)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros(shape, dtype=np.int8)
    c = [s // 4 for s in shape]
    seg[c[0] : c[0] + max(1, shape[0] // 4), c[1] : c[1] + max(1, shape[1] // 4), c[2] : c[2] + 3] = 1
    grid = np.indices(shape)
    centre = [s * 0.65 for s in shape]
    radius = min(shape) / 5
    seg[sum((g - m) ** 2 for g, m in zip(grid, centre, strict=True)) <= radius**2] = 2
    if outside:
        seg[0] = -1  # the first slab is 'outside the image'
    image = rng.normal(0, 1, (channels, *shape)).astype(np.float32) + seg[None].astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{case_id}.npy", image)
    np.save(folder / f"{case_id}_seg.npy", seg[None])
    locations = {str(k): np.argwhere(seg == k).tolist() for k in (1, 2) if (seg == k).any()}
    (folder / f"{case_id}.json").write_text(json.dumps({"class_locations": locations}))


@pytest.fixture
def cases(tmp_path: Path) -> Path:
    folder = tmp_path / "pre"
    for i in range(3):
        write_case(folder, f"case{i}", (20, 24, 18), seed=i, outside=i == 0)
    return folder


IDS = ["case0", "case1", "case2"]


def assert_same(a: dict, b: dict) -> None:
    assert a["case_ids"] == b["case_ids"]
    for key in ("data", "target", "locations"):
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


def test_3d_batch_shapes_and_dtypes(cases: Path) -> None:
    out = BatchSource(cases, IDS, (16, 20, 12), 3).batch(0, 0)
    assert out["data"].shape == (3, 1, 16, 20, 12) and out["data"].dtype == np.float32
    assert out["target"].shape == (3, 1, 16, 20, 12) and out["target"].dtype in (np.int8, np.int16)
    assert len(out["case_ids"]) == 3 and set(out["case_ids"]) <= set(IDS)
    assert set(np.unique(out["target"])) <= {0, 1, 2}


def test_2d_batch_shapes_and_multichannel(tmp_path: Path) -> None:
    write_case(tmp_path, "mc", (20, 24, 18), channels=2)
    out = BatchSource(tmp_path, ["mc"], (16, 12), 4).batch(1, 2)
    assert out["data"].shape == (4, 2, 16, 12) and out["data"].dtype == np.float32
    assert out["target"].shape == (4, 1, 16, 12)
    assert set(np.unique(out["target"])) <= {0, 1, 2}


# every augmentation fires on every element, so that each transform's randomness is exercised
ALL_ON = AugmentationParams(**{f.name: 1.0 for f in dataclasses.fields(AugmentationParams)
                               if f.name.startswith("p_")})


@pytest.mark.parametrize("params", [None, ALL_ON], ids=["default", "all_on"])
def test_batch_is_pure_across_instances_and_call_order(cases: Path, params: AugmentationParams) -> None:
    a = BatchSource(cases, IDS, (16, 20, 12), 2, seed=7, params=params)
    b = BatchSource(cases, IDS, (16, 20, 12), 2, seed=7, params=params)
    first = a.batch(3, 5)
    b.batch(0, 0)  # other calls in between must not matter
    np.random.seed(123)  # nor the caller's global numpy state
    assert_same(first, b.batch(3, 5))
    state, py_state = np.random.get_state(), random.getstate()
    a.batch(1, 1)
    assert np.array_equal(state[1], np.random.get_state()[1]), "batch() must leave np.random alone"
    assert random.getstate() == py_state, "batch() must leave Python's random alone"


def test_different_epoch_index_or_seed_give_different_batches(cases: Path) -> None:
    src = BatchSource(cases, IDS, (16, 20, 12), 2)
    base = src.batch(0, 0)["data"]
    other_seed = BatchSource(cases, IDS, (16, 20, 12), 2, seed=1)
    for other in (src.batch(0, 1), src.batch(1, 0), other_seed.batch(0, 0)):
        assert not np.array_equal(base, other["data"])


def test_iterate_with_workers_matches_in_process_and_leaves_no_children(cases: Path) -> None:
    src = BatchSource(cases, IDS, (16, 20, 12), 2, seed=3, params=ALL_ON)
    serial = list(src.iterate(2, 5, num_workers=0))
    parallel = list(src.iterate(2, 5, num_workers=2))
    assert len(parallel) == 5
    for s, p in zip(serial, parallel, strict=True):
        assert_same(s, p)
    src.close()  # the workers live until the source is closed (they serve every epoch)
    assert multiprocessing.active_children() == []


def test_iterate_stopped_early_terminates_workers(cases: Path) -> None:
    src = BatchSource(cases, IDS, (16, 20, 12), 2)
    it = src.iterate(0, 50, num_workers=2)
    assert_same(next(it), src.batch(0, 0))
    it.close()
    assert multiprocessing.active_children() == []


def _children() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


def test_workers_serve_every_epoch_until_closed(cases: Path) -> None:
    before = _children()
    src = BatchSource(cases, IDS, (16, 20, 12), 2, seed=5, params=ALL_ON)
    with src:
        for epoch in (0, 1, 2):
            parallel = list(src.iterate(epoch, 4, num_workers=2))
            workers = _children() - before
            if epoch == 0:
                first_workers = workers
            assert len(workers) == 2 and workers == first_workers, "the same two processes in every epoch"
            for i, p in enumerate(parallel):
                assert_same(src.batch(epoch, i), p)
    assert _children() == before, "leaving the `with` block stops the workers"
    assert len(list(src.iterate(0, 2, num_workers=1))) == 2  # a closed source starts new workers on demand
    src.close()
    src.close()  # closing twice is harmless
    assert _children() == before


def test_spawned_workers_give_the_same_batches(cases: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medseg.training.data as data

    monkeypatch.setattr(data, "mp_context", lambda: multiprocessing.get_context("spawn"))
    with BatchSource(cases, IDS, (16, 20, 12), 2, seed=3, params=ALL_ON) as src:
        for s, p in zip(src.iterate(1, 3, num_workers=0), src.iterate(1, 3, num_workers=2), strict=True):
            assert_same(s, p)
    assert multiprocessing.active_children() == []


def test_source_pickles_without_its_workers_and_caches(cases: Path) -> None:
    before = _children()
    with BatchSource(cases, IDS, (16, 20, 12), 2, seed=3) as src:
        src.start(1)
        src.batch(0, 0)  # fills the case cache
        copy = pickle.loads(pickle.dumps(src))
        assert_same(copy.batch(2, 1), src.batch(2, 1))
        copy.close()  # the copy owns no workers: closing it leaves the source's running
        assert len(_children() - before) == 1


def test_dropping_the_source_stops_its_workers(cases: Path) -> None:
    before = _children()
    src = BatchSource(cases, IDS, (16, 20, 12), 2)
    next(src.iterate(0, 3, num_workers=2))  # the iterator is dropped unfinished, the source kept
    src.start(2)
    assert len(_children() - before) == 2
    del src
    gc.collect()
    assert _children() == before


def test_a_killed_worker_raises_instead_of_hanging(cases: Path) -> None:
    before = _children()
    with BatchSource(cases, IDS, (16, 20, 12), 2) as src:
        assert len(list(src.iterate(0, 2, num_workers=1))) == 2
        (worker,) = _children() - before
        os.kill(worker, signal.SIGKILL)  # killed while idle, between epochs
        with pytest.raises(MedsegError, match="worker died"):
            list(src.iterate(1, 2, num_workers=1))
        assert len(list(src.iterate(1, 2, num_workers=1))) == 2  # the next epoch starts a new worker
    assert _children() == before


def test_a_failing_batch_raises_its_own_error_from_the_worker(cases: Path) -> None:
    before = _children()
    with BatchSource(cases, IDS, (16, 20, 12), 2) as src:
        for case_id in IDS:
            (cases / f"{case_id}.npy").write_bytes(b"not an array")
        with pytest.raises(DatasetError, match="cannot read"):
            list(src.iterate(0, 3, num_workers=2))
        assert _children() == before, "a failed epoch stops the workers"


def test_tiny_cases_are_padded_and_target_has_no_minus_one(tmp_path: Path) -> None:
    write_case(tmp_path, "tiny", (6, 5, 7), outside=True)
    for augment in (False, True):
        src = BatchSource(tmp_path, ["tiny"], (16, 12, 10), 2, augment=augment)
        for i in range(4):
            out = src.batch(0, i)
            assert out["data"].shape == (2, 1, 16, 12, 10)
            assert set(np.unique(out["target"])) <= {0, 1, 2}


def test_forced_foreground_elements_always_contain_foreground(cases: Path) -> None:
    src = BatchSource(cases, IDS, (8, 8, 8), 4, oversample_foreground=0.5, augment=False)
    assert src.num_forced_foreground == 2
    for i in range(40):
        target = src.batch(0, i)["target"]
        for b in (2, 3):
            assert (target[b] > 0).any(), f"batch {i} element {b} has no foreground"


def test_forced_foreground_in_2d(cases: Path) -> None:
    src = BatchSource(cases, IDS, (8, 8), 2, oversample_foreground=0.5, augment=False)
    for i in range(30):
        assert (src.batch(1, i)["target"][1] > 0).any()


def test_case_without_foreground_falls_back_to_random(tmp_path: Path) -> None:
    write_case(tmp_path, "empty", (10, 10, 10))
    (tmp_path / "empty.json").write_text(json.dumps({"class_locations": {"1": []}}))
    out = BatchSource(tmp_path, ["empty"], (8, 8, 8), 2, oversample_foreground=1.0, augment=False).batch(0, 0)
    assert out["data"].shape == (2, 1, 8, 8, 8)


@pytest.mark.parametrize("patch", [(8, 10, 6), (30, 12, 22), (10, 14)])
def test_without_augmentation_patches_are_exact_crops(cases: Path, patch: tuple[int, ...]) -> None:
    src = BatchSource(cases, IDS, patch, 3, augment=False, oversample_foreground=0.33)
    margin = 40
    for i in range(6):
        out = src.batch(0, i)
        for b, (case_id, loc) in enumerate(zip(out["case_ids"], out["locations"], strict=True)):
            image = np.pad(np.load(cases / f"{case_id}.npy"), [(0, 0)] + [(margin, margin)] * 3)
            seg = np.pad(np.load(cases / f"{case_id}_seg.npy"), [(0, 0)] + [(margin, margin)] * 3)
            seg[seg < 0] = 0
            corner = loc[1:] if len(patch) == 2 else loc
            region = tuple(slice(lo + margin, lo + margin + p) for lo, p in zip(corner, patch, strict=True))
            region = (slice(None), loc[0] + margin, *region) if len(patch) == 2 else (slice(None), *region)
            assert np.array_equal(out["data"][b], image[region])
            assert np.array_equal(out["target"][b], seg[region])


def test_random_patches_without_augmentation_stay_inside_a_large_enough_case(cases: Path) -> None:
    src = BatchSource(cases, IDS, (8, 10, 6), 2, augment=False, oversample_foreground=0.0)
    assert src.num_forced_foreground == 0
    for i in range(20):
        loc = src.batch(0, i)["locations"]
        assert (loc >= 0).all() and (loc + (8, 10, 6) <= (20, 24, 18)).all()


def test_mirror_axes_and_params(cases: Path) -> None:
    params = AugmentationParams(p_rotation=0.0, p_scale=0.0)
    src = BatchSource(cases, IDS, (8, 10, 6), 2, mirror_axes=(0,), params=params)
    assert src.extract_size == (8, 10, 6)
    assert src.batch(0, 0)["data"].shape == (2, 1, 8, 10, 6)
    with pytest.raises(MedsegError, match="mirror_axes"):
        BatchSource(cases, IDS, (8, 10), 2, mirror_axes=(2,))


def test_params_round_trip_through_json() -> None:
    params = AugmentationParams(p_gamma=0.5)
    d = json.loads(json.dumps(dataclasses.asdict(params)))
    assert AugmentationParams.from_dict(d) == params
    with pytest.raises(MedsegError, match="p_noise"):
        AugmentationParams(p_noise=1.5)


def test_initial_patch_size_covers_rotation_and_keeps_parity() -> None:
    params = AugmentationParams()
    big = initial_patch_size((40, 56, 40), params)
    assert all(b > p and (b - p) % 2 == 0 for b, p in zip(big, (40, 56, 40), strict=True))
    # nnU-Net's get_patch_size gives 205 per axis for 128^3 (30 degrees, /0.85)
    assert all(204 <= b <= 207 for b in initial_patch_size((128, 128, 128), params))
    assert initial_patch_size((32, 32), AugmentationParams(p_rotation=0, p_scale=0)) == (32, 32)


def test_missing_case_is_a_dataset_error(cases: Path) -> None:
    with pytest.raises(DatasetError, match="nope.npy"):
        BatchSource(cases, ["case0", "nope"], (8, 8, 8), 2)
