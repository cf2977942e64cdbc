"""Training batches: patch sampling with foreground oversampling, batchgenerators augmentation, and
ordered prefetching in background worker processes.

A batch is a pure function of ``(seed, epoch, index)``, and each of its elements a pure function of
``(seed, epoch, index, element)``: :meth:`BatchSource.batch` derives every random draw of element
``b`` from ``np.random.SeedSequence([seed, epoch, index, b])``, so a run resumed at any epoch sees
exactly the batches it would have seen, whichever process computes them and in whatever order, and
the ranks of a distributed run (each one given its ``elements`` of the global batch) together see
exactly the batch a single process would.

Preprocessed case format, in one folder ``F`` (written by ``medseg.preprocessing``):

- ``F/<case>.npy``: float32 image, shape (C, D0, D1, D2), already normalised;
- ``F/<case>_seg.npy``: int8 class indices, shape (1, D0, D1, D2), values 0..K-1 (the dataset's label
  values mapped to consecutive classes, :mod:`medseg.preprocessing.labels`), K for the ignore label's
  unannotated voxels (datasets that declare one), or -1 outside the image;
- ``F/<case>.json``: ``{"class_locations": {"1": [[d0, d1, d2], ...], ...}, ...}``, sampled voxel
  coordinates per foreground class (a list may be empty or a class absent), and with an ignore label
  of annotated voxels (``"annotated"``).

Sampling follows nnU-Net v2's data loader: each batch element is a case drawn uniformly; the last
``max(1, round(batch_size * oversample_foreground))`` elements of the global batch are centred on a random voxel of a
random foreground class present in their case (with a small random jitter, see
:class:`AugmentationParams`), the others on a random location (with an ignore label: on a random
annotated voxel, so that no patch holds unannotated voxels only). With spatial augmentation, a larger
patch is extracted (:func:`initial_patch_size`) and ``SpatialTransform`` rotates/scales about its
centre and centre-crops it to the patch size; regions outside the case are padded (image 0, labels
-1) and labels -1 become 0 in the returned target.
"""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing.connection
import random
import signal
import sys
import traceback
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from batchgenerators.augmentations.utils import rotate_coords_2d, rotate_coords_3d
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

from medseg.errors import DatasetError, MedsegError
from medseg.parallel import mp_context
from medseg.preprocessing.pipeline import ANNOTATED, load_class_locations, one_hot
from medseg.training.cascade import augment_prior

__all__ = ["AugmentationParams", "BatchSource", "initial_patch_size"]

_CACHE_CASES = 64  # opened memmaps (and parsed class locations) kept per process
_PREFETCH_PER_WORKER = 2  # batches computed ahead per worker in iterate()
_PER_PROCESS = ("_transform", "_cache", "_channels", "_workers", "_shutdown")  # rebuilt in each process, never pickled


@dataclass(frozen=True)
class AugmentationParams:
    """Every range and probability of the training augmentation (defaults: nnU-Net v1/v2).

    Probabilities ``p_*`` are per batch element unless named ``*_per_channel``/``*_per_axis``.
    Angles are in degrees; rotation uses ``rotation_deg_3d`` about each axis for 3D patches and
    ``rotation_deg_2d`` in-plane for 2D patches. ``dataclasses.asdict`` gives a JSON-able dict and
    :meth:`from_dict` reads it back.
    """

    # spatial (batchgenerators SpatialTransform; no elastic deformation)
    rotation_deg_3d: float = 30.0
    rotation_deg_2d: float = 180.0
    p_rotation: float = 0.2
    p_rotation_per_axis: float = 1.0
    scale_range: tuple[float, float] = (0.7, 1.4)
    p_scale: float = 0.2
    order_data: int = 3
    order_seg: int = 1
    # the extracted patch is enlarged by 1 / min(this) to leave room for zooming out (nnU-Net v2)
    initial_patch_scale_range: tuple[float, float] = (0.85, 1.25)
    # intensity
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_noise: float = 0.1
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_blur: float = 0.2
    p_blur_per_channel: float = 0.5
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_brightness: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    low_res_zoom_range: tuple[float, float] = (0.5, 1.0)
    p_low_res: float = 0.25
    p_low_res_per_channel: float = 0.5
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    # foreground sampling: the chosen voxel lies within +-(this * patch size) of the patch centre
    # (clipped so it always stays inside the patch). nnU-Net centres exactly (0.0).
    foreground_jitter: float = 0.25

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise MedsegError(f"augmentation parameter {f.name}={value} must lie in [0, 1]")
            if isinstance(value, tuple) and (len(value) != 2 or value[0] > value[1]):
                raise MedsegError(f"augmentation parameter {f.name}={value} must be a range (low, high)")
        if not 0.0 <= self.foreground_jitter <= 0.5:
            raise MedsegError(f"foreground_jitter={self.foreground_jitter} must lie in [0, 0.5]")
        if min(self.scale_range) <= 0 or min(self.initial_patch_scale_range) <= 0:
            raise MedsegError("augmentation scale ranges must be positive")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugmentationParams:
        """Inverse of ``dataclasses.asdict`` (also after a JSON round trip: lists become tuples)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise MedsegError(f"unknown augmentation parameter(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def rotation_rad(self, ndim: int) -> float:
        """Largest rotation angle (radians) for a patch of ``ndim`` spatial axes."""
        return float(np.deg2rad(self.rotation_deg_3d if ndim == 3 else self.rotation_deg_2d))


def initial_patch_size(patch_size: Sequence[int], params: AugmentationParams) -> tuple[int, ...]:
    """Size of the patch to extract so that ``SpatialTransform`` can rotate and scale it, then
    centre-crop ``patch_size``, without pulling in padding (nnU-Net's ``get_patch_size``).

    As nnU-Net: rotations about one axis at a time, angles capped at 90 degrees, then divided by
    ``min(params.initial_patch_scale_range)``. Unlike nnU-Net's version, all corners of the patch and
    all angles up to the limit are considered (nnU-Net rotates one corner by the largest angle only,
    which under-covers non-square patches). Each axis grows by an even number of voxels so that the
    centre crop is exact. Returns ``patch_size`` when rotation and scaling are both off.
    """
    patch = np.asarray(patch_size, dtype=float)
    ndim = len(patch)
    if params.p_rotation == 0 and params.p_scale == 0:
        return tuple(int(p) for p in patch_size)
    angle = min(params.rotation_rad(ndim), np.pi / 2) if params.p_rotation > 0 else 0.0
    signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * ndim, indexing="ij")).reshape(ndim, -1)
    corners = signs * (patch[:, None] / 2)  # (ndim, 2**ndim), centred
    extent = patch / 2
    for a in np.linspace(0.0, angle, 31):
        rotated = [rotate_coords_2d(corners, a)] if ndim == 2 else [
            rotate_coords_3d(corners, a, 0, 0),
            rotate_coords_3d(corners, 0, a, 0),
            rotate_coords_3d(corners, 0, 0, a),
        ]
        for r in rotated:
            extent = np.maximum(extent, np.abs(r).max(axis=1))
    if params.p_scale > 0:
        extent = extent / min(params.initial_patch_scale_range)
    size = np.ceil(2 * extent - 1e-6).astype(int)
    size += (size - patch.astype(int)) % 2  # same parity as the patch: integer centre-crop offset
    return tuple(int(s) for s in size)


class BatchSource:
    """Batches of training patches from a folder of preprocessed cases.

    Augmentation workers (:meth:`iterate` with ``num_workers > 0``) live for the whole run: they
    start on first use (or :meth:`start`) and every epoch reuses them until :meth:`close` (or the
    end of a ``with`` block, or garbage collection). A source pickles without its workers and
    per-process caches, so the workers can be spawned (:func:`medseg.parallel.mp_context`).

    Args:
        folder: preprocessed case folder (format in the module docstring).
        case_ids: the cases to draw from (e.g. one fold's training split).
        patch_size: 3 ints (3D patches) or 2 ints (2D: slices along spatial axis 0, patch over 1, 2).
        batch_size: elements per batch.
        oversample_foreground: share of each batch forced to contain foreground (the last
            ``max(1, round(batch_size * share))`` elements; none when 0).
        augment: apply the augmentation pipeline; False returns exact crops of the stored arrays.
        seed: the run's seed; batches are a pure function of ``(seed, epoch, index)``.
        mirror_axes: spatial axes of the patch to mirror (None: all; ``()``: no mirroring).
        params: augmentation ranges and probabilities (None: nnU-Net's defaults).
        elements: which elements of the global batch of ``batch_size`` this source returns (a
            distributed rank's share, :func:`medseg.training.distributed.rank_elements`); None: all.
        prior_folder: for a cascade stage, a folder of ``<case>.npy`` int8 (1, *S) previous-stage label
            maps in the same grid; they are cropped and spatially transformed with the labels, then
            appended to the image as ``num_classes - 1`` one-hot channels (augmented with
            :func:`medseg.training.cascade.augment_prior` when ``augment``).
    """

    def __init__(
        self,
        folder: Path,
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        batch_size: int,
        *,
        oversample_foreground: float = 0.33,
        augment: bool = True,
        seed: int = 0,
        mirror_axes: Sequence[int] | None = None,
        params: AugmentationParams | None = None,
        prior_folder: Path | None = None,
        num_classes: int | None = None,
        elements: range | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.case_ids = list(case_ids)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = int(batch_size)
        self.oversample_foreground = float(oversample_foreground)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.params = params if params is not None else AugmentationParams()
        self.prior_folder = Path(prior_folder) if prior_folder is not None else None
        if self.prior_folder is not None and not num_classes:
            raise MedsegError("a prior folder needs num_classes (the one-hot prior's channels + 1)")
        self.num_classes = num_classes
        self.elements = range(self.batch_size) if elements is None else elements
        ndim = len(self.patch_size)
        self.mirror_axes = tuple(range(ndim)) if mirror_axes is None else tuple(int(a) for a in mirror_axes)
        self._validate()
        self.num_forced_foreground = (
            0 if self.oversample_foreground <= 0
            else max(1, round(self.batch_size * self.oversample_foreground))
        )
        # the size extracted from the case before SpatialTransform crops it to patch_size
        self.extract_size = initial_patch_size(self.patch_size, self.params) if augment else self.patch_size
        self._init_per_process()

    def _init_per_process(self) -> None:
        """The state each process builds for itself: transforms, opened cases, worker processes."""
        self._transform = (
            _build_transforms(self.patch_size, self.mirror_axes, self.params) if self.augment else None
        )
        self._cache: OrderedDict[str, _Case] = OrderedDict()
        self._channels: int | None = None  # the first case's channel count, which every case must have
        self._workers: list[_Worker] = []
        self._shutdown: weakref.finalize | None = None

    def _validate(self) -> None:
        ndim = len(self.patch_size)
        if ndim not in (2, 3) or min(self.patch_size) < 1:
            raise MedsegError(f"patch_size {list(self.patch_size)} must be 2 or 3 positive ints")
        if self.batch_size < 1:
            raise MedsegError(f"batch_size {self.batch_size} must be at least 1")
        if not 0.0 <= self.oversample_foreground <= 1.0:
            raise MedsegError(f"oversample_foreground {self.oversample_foreground} must lie in [0, 1]")
        bad = [a for a in self.mirror_axes if not 0 <= a < ndim]
        if bad:
            raise MedsegError(f"mirror_axes {list(self.mirror_axes)}: a {ndim}D patch has axes 0..{ndim - 1}")
        if not self.elements or self.elements.start < 0 or self.elements.stop > self.batch_size:
            raise MedsegError(f"elements {self.elements} must be a non-empty part of the batch 0..{self.batch_size - 1}")
        if not self.case_ids:
            raise DatasetError(f"{self.folder}: no case ids given")
        missing = [c for c in self.case_ids if not (self.folder / f"{c}.npy").is_file()]
        if missing:
            raise DatasetError(
                f"{self.folder / (missing[0] + '.npy')}: missing ({len(missing)} case(s) in all); "
                "run preprocessing for this configuration first"
            )

    def __getstate__(self) -> dict[str, Any]:
        # workers get the light description only; each builds its transforms and opens its own memmaps
        return {k: v for k, v in self.__dict__.items() if k not in _PER_PROCESS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_per_process()

    def __enter__(self) -> BatchSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the augmentation workers (if any); a later :meth:`iterate` with workers starts new ones.
        Safe to call more than once."""
        if self._shutdown is not None:
            self._shutdown()  # terminate + join, once
        self._workers, self._shutdown = [], None

    # ------------------------------------------------------------------ batches

    def batch(self, epoch: int, index: int) -> dict[str, Any]:
        """This source's :attr:`elements` of batch ``index`` of ``epoch``: a pure function of
        ``(seed, epoch, index)``, element by element.

        Returns ``{"data": float32 (B, C, *patch_size), "target": int8 (B, 1, *patch_size) with
        class indices 0..K-1, "case_ids": list[str], "locations": int64 (B, 3)}`` with ``B = len(elements)``.
        ``locations[b]`` is the case voxel at the patch's first corner before spatial augmentation
        (2D: ``(slice, d1, d2)``).

        Randomness: element ``b``'s case/location draws use a local ``np.random.default_rng``;
        batchgenerators draws from the global ``np.random`` and Python's ``random`` (Gaussian noise
        variance), which are seeded per element from the same ``SeedSequence`` and restored to their
        previous states on return, so the caller's global streams are untouched.
        """
        parts = [self._element(epoch, index, b) for b in self.elements]
        return {
            "data": np.ascontiguousarray(np.concatenate([p[0] for p in parts]), dtype=np.float32),
            "target": np.concatenate([p[1] for p in parts]),
            "case_ids": [p[2] for p in parts],
            "locations": np.stack([p[3] for p in parts]),
        }

    def _element(self, epoch: int, index: int, b: int) -> tuple[np.ndarray, np.ndarray, str, np.ndarray]:
        """Element ``b`` of the global batch: image (1, C, *patch), target int8 (1, 1, *patch), case, location."""
        sample_seq, augment_seq, prior_seq = np.random.SeedSequence(
            [self.seed, int(epoch), int(index), int(b)]).spawn(3)
        data, seg, case_id, location = self._sample(np.random.default_rng(sample_seq),
                                                    forced=b >= self.batch_size - self.num_forced_foreground)
        if self._transform is not None:
            saved = np.random.get_state(), random.getstate()
            try:
                state = augment_seq.generate_state(4)
                np.random.seed(state)
                random.seed(int.from_bytes(state.tobytes(), "little"))
                out = self._transform(data=data, seg=seg)
            finally:
                np.random.set_state(saved[0])
                random.setstate(saved[1])
            data, seg = out["data"], out["seg"]
        if self.prior_folder is not None:  # the previous stage's labels travelled as a second label channel
            prior = np.rint(seg[:, 1]).astype(np.int8)
            onehot = np.stack([one_hot(p, self.num_classes) for p in prior])
            if self.augment:
                onehot = augment_prior(onehot, np.random.default_rng(prior_seq))
            data, seg = np.concatenate([data, onehot], axis=1), seg[:, :1]
        target = np.rint(seg).astype(np.int8)
        target[target < 0] = 0
        return data, target, case_id, location

    def _sample(self, rng: np.random.Generator, forced: bool) -> tuple[np.ndarray, np.ndarray, str, np.ndarray]:
        """Draw a case and a location (on foreground when ``forced``) and extract (1, C, *extract_size)
        image and label arrays."""
        size = self.extract_size
        offset = [(e - p) // 2 for e, p in zip(size, self.patch_size, strict=True)]
        case_id = self.case_ids[int(rng.integers(len(self.case_ids)))]
        case = self._open(case_id)
        channels = case.image.shape[0]
        if self._channels is None:
            self._channels = channels
        elif channels != self._channels:
            raise DatasetError(
                f"{self.folder / (case_id + '.npy')}: {channels} channels, other cases have {self._channels}"
            )
        data = np.zeros((1, channels, *size), dtype=np.float32)
        seg = np.full((1, 1 if case.prior is None else 2, *size), -1, dtype=np.int8)
        voxel = self._foreground_voxel(case, rng) if forced else self._annotated_voxel(case, rng)
        if len(size) == 2:
            z = int(voxel[0]) if voxel is not None else int(rng.integers(case.image.shape[1]))
            image, labels = case.image[:, z], case.seg[:, z]
            prior = case.prior[:, z] if case.prior is not None else None
            voxel = voxel[1:] if voxel is not None else None
        else:
            z, image, labels, prior = None, case.image, case.seg, case.prior
        lbs = self._bbox(image.shape[1:], voxel, rng)
        _crop_into(image, lbs, data[0])
        _crop_into(labels, lbs, seg[0, :1])
        if prior is not None:
            _crop_into(prior, lbs, seg[0, 1:])
        corner = [lb + o for lb, o in zip(lbs, offset, strict=True)]
        location = np.asarray(corner if z is None else [z, *corner], dtype=np.int64)
        return data, seg, case_id, location

    def _annotated_voxel(self, case: _Case, rng: np.random.Generator) -> np.ndarray | None:
        """With an ignore label (the case lists :data:`ANNOTATED` voxels): a random annotated voxel, on
        which a random patch is centred so that it does not learn from unannotated voxels alone, as
        nnU-Net v2 does; None otherwise (the patch is placed uniformly)."""
        coords = case.class_locations(self.folder).get(ANNOTATED)
        if coords is None or not len(coords):
            return None
        return coords[int(rng.integers(len(coords)))]

    def _foreground_voxel(self, case: _Case, rng: np.random.Generator) -> np.ndarray | None:
        """A random voxel of a random foreground class present in the case (None if none is)."""
        locations = case.class_locations(self.folder)
        classes = [k for k in sorted(locations) if len(locations[k]) and k != ANNOTATED]
        if not classes:
            return None
        coords = locations[classes[int(rng.integers(len(classes)))]]
        return coords[int(rng.integers(len(coords)))]

    def _bbox(self, shape: Sequence[int], voxel: np.ndarray | None, rng: np.random.Generator) -> list[int]:
        """Lower corner of the extracted region (as nnU-Net's ``get_bbox``).

        Random: the final (centre-cropped) patch lies inside the case where it fits, else the case is
        centred-ish with padding. Foreground: centred on ``voxel`` plus jitter, clamped to the same
        bounds; the voxel stays inside the final patch either way.
        """
        lbs = []
        for d, (n, big, p) in enumerate(zip(shape, self.extract_size, self.patch_size, strict=True)):
            need = max(big - p, big - n)  # total padding allowed beyond the case on this axis
            lo, hi = -(need // 2), n + (need - need // 2) - big
            if voxel is None:
                lbs.append(int(rng.integers(lo, hi + 1)))
                continue
            j = min(int(self.params.foreground_jitter * p), (p - 1) // 2)
            centre = int(voxel[d]) + int(rng.integers(-j, j + 1))
            lbs.append(min(max(centre - big // 2, lo), hi))
        return lbs

    def _open(self, case_id: str) -> _Case:
        case = self._cache.get(case_id)
        if case is None:
            case = _Case.open(self.folder, case_id, self.prior_folder)
            self._cache[case_id] = case
            while len(self._cache) > _CACHE_CASES:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(case_id)
        return case

    # ------------------------------------------------------------------ iteration

    def start(self, num_workers: int) -> None:
        """Start ``num_workers`` augmentation worker processes now (:meth:`iterate` starts them on
        first use otherwise); they serve every later epoch until :meth:`close`. A different count
        replaces the running workers. Workers start by :func:`medseg.parallel.mp_context`'s rule
        (spawn once torch is loaded), ignore SIGINT and use one torch thread."""
        if num_workers < 1:
            raise MedsegError(f"num_workers must be >= 1 to start workers, got {num_workers}")
        if len(self._workers) == num_workers:
            return
        self.close()
        context = mp_context()
        # a copy without workers or caches: no reference cycle, so garbage-collecting the source
        # stops its workers
        source = copy.copy(self)
        workers = []
        for _ in range(num_workers):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker_main, args=(source, theirs), daemon=True,
                                      name="medseg-augmentation")
            process.start()
            theirs.close()
            workers.append(_Worker(process, ours))
        self._workers = workers
        self._shutdown = weakref.finalize(self, _stop, workers)

    def iterate(self, epoch: int, n_batches: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """Yield ``batch(epoch, i)`` for ``i = 0 .. n_batches - 1`` in order.

        With ``num_workers > 0``, the source's worker processes (:meth:`start`, kept from earlier
        epochs) compute up to ``2 * num_workers`` batches ahead, batch ``i`` on worker
        ``i % num_workers``; each worker has its own pipe, so no lock is shared with it. One
        iteration at a time. The workers are terminated when the iterator is closed early,
        garbage-collected or interrupted (workers ignore SIGINT; the parent handles it), or when a
        batch fails; a worker killed from outside (e.g. out of memory) raises :class:`MedsegError`
        instead of hanging.
        """
        if num_workers <= 0:
            for i in range(n_batches):
                yield self.batch(epoch, i)
            return
        if n_batches <= 0:
            return
        self.start(num_workers)
        workers = self._workers
        finished = False
        try:
            submitted = 0
            for i in range(n_batches):
                while submitted < n_batches and submitted - i < _PREFETCH_PER_WORKER * num_workers:
                    _send(workers[submitted % num_workers], (epoch, submitted))
                    submitted += 1
                yield _receive(workers[i % num_workers])
            finished = True
        finally:
            if not finished:  # batches still in flight go with the workers; the next epoch starts new ones
                self.close()


@dataclass
class _Case:
    """One opened case: memory-mapped arrays, class locations parsed on first use."""

    case_id: str
    image: np.ndarray  # (C, D0, D1, D2) memmap
    seg: np.ndarray  # (1, D0, D1, D2) memmap
    prior: np.ndarray | None = None  # (1, D0, D1, D2) memmap: a cascade's previous-stage labels
    _locations: dict[str, np.ndarray] | None = None

    @classmethod
    def open(cls, folder: Path, case_id: str, prior_folder: Path | None = None) -> _Case:
        paths = folder / f"{case_id}.npy", folder / f"{case_id}_seg.npy"
        arrays = []
        for path in paths:
            try:
                arrays.append(np.load(path, mmap_mode="r"))
            except (OSError, ValueError) as e:
                raise DatasetError(f"{path}: cannot read ({e}); re-run preprocessing") from e
        image, seg = arrays
        if image.ndim != 4 or seg.shape != (1, *image.shape[1:]):
            raise DatasetError(
                f"{paths[1]}: shape {seg.shape} does not fit image {paths[0].name} of shape {image.shape} "
                "(expected image (C, D0, D1, D2) and labels (1, D0, D1, D2))"
            )
        prior = None
        if prior_folder is not None:
            path = prior_folder / f"{case_id}.npy"
            try:
                prior = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise DatasetError(f"{path}: cannot read the previous stage's prior ({e})") from e
            if prior.shape != seg.shape:
                raise DatasetError(f"{path}: shape {prior.shape} does not fit the labels' {seg.shape}")
        return cls(case_id, image, seg, prior)

    def class_locations(self, folder: Path) -> dict[str, np.ndarray]:
        if self._locations is None:
            self._locations = load_class_locations(folder, self.case_id)
        return self._locations


def _crop_into(array: np.ndarray, lbs: Sequence[int], out: np.ndarray) -> None:
    """Copy the part of ``array[:, lbs : lbs + size]`` that lies inside it into the pre-filled ``out``
    (shape (C, *size)); only that region is read from disk."""
    src, dst = [slice(None)], [slice(None)]
    for lb, size, n in zip(lbs, out.shape[1:], array.shape[1:], strict=True):
        a, b = max(lb, 0), min(lb + size, n)
        if a >= b:
            return
        src.append(slice(a, b))
        dst.append(slice(a - lb, b - lb))
    out[tuple(dst)] = array[tuple(src)]


def _build_transforms(patch_size: Sequence[int], mirror_axes: Sequence[int],
                      p: AugmentationParams) -> AbstractTransform:
    """nnU-Net's training pipeline (batchgenerators), ranges and probabilities from ``p``."""
    ndim = len(patch_size)
    angle = p.rotation_rad(ndim)
    rotation = (-angle, angle)
    no_rotation = (0.0, 0.0)
    transforms: list[AbstractTransform] = [
        SpatialTransform(
            list(patch_size), patch_center_dist_from_border=None,
            do_elastic_deform=False, alpha=(0, 0), sigma=(0, 0),
            do_rotation=p.p_rotation > 0, angle_x=rotation,
            angle_y=rotation if ndim == 3 else no_rotation, angle_z=rotation if ndim == 3 else no_rotation,
            p_rot_per_axis=p.p_rotation_per_axis,
            do_scale=p.p_scale > 0, scale=p.scale_range,
            border_mode_data="constant", border_cval_data=0, order_data=p.order_data,
            border_mode_seg="constant", border_cval_seg=-1, order_seg=p.order_seg,
            random_crop=False, p_el_per_sample=0, p_scale_per_sample=p.p_scale,
            p_rot_per_sample=p.p_rotation, independent_scale_for_each_axis=False,
        ),
        GaussianNoiseTransform(noise_variance=p.noise_variance, p_per_sample=p.p_noise),
        GaussianBlurTransform(p.blur_sigma, different_sigma_per_channel=True, p_per_sample=p.p_blur,
                              p_per_channel=p.p_blur_per_channel),
        BrightnessMultiplicativeTransform(multiplier_range=p.brightness_range, p_per_sample=p.p_brightness),
        ContrastAugmentationTransform(contrast_range=p.contrast_range, p_per_sample=p.p_contrast),
        SimulateLowResolutionTransform(zoom_range=p.low_res_zoom_range, per_channel=True,
                                       p_per_channel=p.p_low_res_per_channel, order_downsample=0,
                                       order_upsample=3, p_per_sample=p.p_low_res),
        GammaTransform(p.gamma_range, invert_image=True, per_channel=True, retain_stats=True,
                       p_per_sample=p.p_gamma_inverted),
        GammaTransform(p.gamma_range, invert_image=False, per_channel=True, retain_stats=True,
                       p_per_sample=p.p_gamma),
    ]
    if mirror_axes:
        transforms.append(MirrorTransform(tuple(mirror_axes)))
    return Compose(transforms)


# ---------------------------------------------------------------------- worker processes


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection  # (epoch, index) in; (ok, batch or exception, traceback) out


class _WorkerTraceback(Exception):
    """The cause attached to an exception raised in a worker: the worker's traceback."""

    def __str__(self) -> str:
        return str(self.args[0])


def _worker_main(source: BatchSource, conn: multiprocessing.connection.Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    while True:
        try:
            epoch, index = conn.recv()
        except EOFError:  # the parent closed its end
            return
        try:
            reply = (True, source.batch(epoch, index), "")
        except Exception as exc:  # raised in the parent as itself
            reply = (False, exc, traceback.format_exc())
        conn.send(reply)


def _send(worker: _Worker, task: tuple[int, int]) -> None:
    try:
        worker.conn.send(task)
    except OSError:  # the worker's end is gone
        _raise_dead(worker)


def _receive(worker: _Worker) -> dict[str, Any]:
    """The worker's next result; raises instead of waiting forever if the worker died."""
    try:
        multiprocessing.connection.wait([worker.conn, worker.process.sentinel])
        if not worker.conn.poll():  # the sentinel fired and nothing was sent
            _raise_dead(worker)
        ok, value, remote_traceback = worker.conn.recv()
    except (EOFError, OSError):
        _raise_dead(worker)
    if not ok:
        raise value from _WorkerTraceback(remote_traceback)
    return value


def _raise_dead(worker: _Worker) -> None:
    worker.process.join(timeout=5)
    raise MedsegError(
        f"a data-loading worker died (exit code {worker.process.exitcode}; -9 usually means out of "
        "memory); use fewer workers or a smaller patch/batch"
    ) from None


def _stop(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.process.terminate()
    for worker in workers:
        worker.process.join()
        worker.conn.close()
