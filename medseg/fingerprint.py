"""Dataset fingerprint: per-case geometry and shapes, per-channel foreground intensity statistics,
per-class voxel counts and volumes. Written as ``fingerprint.json``, with ``made_from``: the digest of
the dataset it was computed from (:func:`source_digest`), so that a changed dataset is fingerprinted again."""

from __future__ import annotations

from concurrent.futures import Executor
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from medseg.io.dataset import Case, Dataset, read_case_image, read_case_label
from medseg.parallel import parallel_map
from medseg.plans.schema import ignore_value
from medseg.preprocessing.cropping import bbox_of, crop, nonzero_mask
from medseg.preprocessing.provenance import dataset_digest
from medseg.utils import atomic_write_text

SAMPLES_PER_CASE = 10_000
FINGERPRINT_VERSION = 1  # bump when what a fingerprint computes changes


class CaseFingerprint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    case_id: str
    spacing: list[float]
    shape_before_crop: list[int]
    shape_after_crop: list[int]
    class_voxels: dict[int, int]
    class_volume_ml: dict[int, float]


class ChannelStats(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    mean: float
    std: float
    median: float
    min: float
    max: float
    p00_5: float
    p99_5: float
    n_samples: int


class Fingerprint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = 1
    dataset_name: str
    layout: str
    channel_names: list[str]
    labels: dict[int, str]
    cases: list[CaseFingerprint]
    channels: list[ChannelStats]
    notes: list[str] = []
    made_from: str | None = None  # source_digest() of the dataset; None: written before it was recorded

    def spacings(self) -> np.ndarray:
        return np.array([c.spacing for c in self.cases], dtype=float)

    def shapes_after_crop(self) -> np.ndarray:
        return np.array([c.shape_after_crop for c in self.cases], dtype=float)

    def save(self, path: Path) -> None:
        atomic_write_text(path, self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: Path) -> Fingerprint:
        return cls.model_validate_json(Path(path).read_text())


def _fingerprint_case(args: tuple[Case, list[int], int, int | None]) -> tuple[CaseFingerprint, list[np.ndarray]]:
    case, labels, seed, ignore = args
    image, geometry = read_case_image(case)
    label, _ = read_case_label(case)
    bbox = bbox_of(nonzero_mask(image))
    image_c, label_c = crop(image, bbox), crop(label, bbox)
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    counts = {k: int(np.count_nonzero(label_c == k)) for k in labels}
    fg = label_c > 0
    if ignore is not None:  # unannotated voxels are no foreground: they would skew the CT statistics
        fg &= label_c != ignore
    rng = np.random.default_rng(seed)
    samples = []
    for ch in image_c:
        values = ch[fg] if fg.any() else ch.ravel()
        if values.size > SAMPLES_PER_CASE:
            values = rng.choice(values, SAMPLES_PER_CASE, replace=False)
        samples.append(values.astype(np.float32))
    fp = CaseFingerprint(
        case_id=case.case_id,
        spacing=[float(s) for s in geometry.spacing],
        shape_before_crop=list(image.shape[1:]),
        shape_after_crop=list(image_c.shape[1:]),
        class_voxels=counts,
        class_volume_ml={k: v * voxel_ml for k, v in counts.items()},
    )
    return fp, samples


def source_digest(ds: Dataset, seed: int = 0) -> str:
    """The digest of what a fingerprint of ``ds`` is computed from: every case's files (name, size,
    mtime), the layout, channels and labels, the seed and :data:`FINGERPRINT_VERSION`."""
    return dataset_digest(ds, version=FINGERPRINT_VERSION, seed=seed)


def compute_fingerprint(ds: Dataset, num_workers: int = 1, progress: bool = False, seed: int = 0,
                        executor: Executor | None = None) -> Fingerprint:
    """Fingerprint every case (parallel over cases in ``num_workers`` processes, or in ``executor``;
    deterministic given ``seed``)."""
    jobs = [(c, sorted(ds.labels), seed + i, ignore_value(ds.labels)) for i, c in enumerate(ds.cases)]
    results = parallel_map(_fingerprint_case, jobs, num_workers=num_workers, description="fingerprint",
                           progress=progress, executor=executor)
    channels = []
    for c, name in enumerate(ds.channel_names):
        v = np.concatenate([r[1][c] for r in results])
        channels.append(ChannelStats(
            name=name, mean=float(v.mean()), std=float(v.std()), median=float(np.median(v)),
            min=float(v.min()), max=float(v.max()), p00_5=float(np.percentile(v, 0.5)),
            p99_5=float(np.percentile(v, 99.5)), n_samples=int(v.size)))
    return Fingerprint(dataset_name=ds.root.name, layout=ds.layout, channel_names=ds.channel_names,
                       labels=ds.labels, cases=[r[0] for r in results], channels=channels, notes=ds.notes,
                       made_from=source_digest(ds, seed))
