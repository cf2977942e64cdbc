"""Preprocessing: crop to nonzero → transpose (out-of-plane axis first) → normalise → resample.

Each case becomes ``<case>.npy`` (float32 (C, *spatial)), ``<case>_seg.npy`` (int8 (1, *spatial),
class indices 0..K-1: the label values in sorted order, see :mod:`medseg.preprocessing.labels`)
and ``<case>.json`` (its :class:`CaseProperties`: what inverts every step, foreground locations for
sampling, and ``made_from``, the digest of what made the case). The json is written last, so its
presence with the digest the case would get now marks a finished, current case: an interrupted case,
a case of another plan (spacing, normalisation, axis order, labels) and a case whose source files
changed are redone (:func:`case_recipe`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import DatasetError
from medseg.io.dataset import Case, Dataset, read_case_image, read_case_label
from medseg.io.geometry import Geometry
from medseg.parallel import parallel_map
from medseg.plans.schema import Configuration, Plans, label_values
from medseg.plans.topology import is_anisotropic
from medseg.preprocessing.cropping import bbox_of, crop, nonzero_mask
from medseg.preprocessing.labels import check_class_count, labels_to_classes
from medseg.preprocessing.normalization import normalize
from medseg.preprocessing.provenance import case_signature, digest
from medseg.preprocessing.resampling import (
    new_shape_for,
    resample_image,
    resample_labels,
    resample_probabilities_argmax,
    resampled_channels,
)
from medseg.utils import atomic_save_npy, atomic_write_json
from medseg.workdir import WorkDir

LOCATIONS_PER_CLASS = 10_000
# Bump when preprocessing's code changes what it writes (crop rule, resampling, normalisation,
# label mapping, the properties), so that cases preprocessed before are redone.
PREPROCESSING_VERSION = 1

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseProperties:
    """What preprocessing did to one case, enough to invert it; ``<case>.json`` holds it
    (:meth:`to_dict`, same keys as the fields; lists as in the file).

    ``geometry``: the input's grid (X, Y, Z). ``bbox``: the crop to nonzero, ``[[start, stop), …]``
    per input axis. ``shape_cropped_transposed``, ``spacing_transposed``: the crop's shape and
    spacing (mm) after the plan's ``transpose_forward``. ``shape_preprocessed``: the resampled grid
    ``*spatial_t`` the network sees. Training cases also carry ``case_id``, ``class_locations``:
    per foreground class (the class index as a string, as in JSON) up to
    :data:`LOCATIONS_PER_CLASS` sampled voxels ``[d0, d1, d2]`` of the preprocessed grid, and
    ``made_from``: the :func:`case_recipe` digest of what made them.
    """

    geometry: Geometry
    bbox: list[list[int]]
    shape_cropped_transposed: list[int]
    spacing_transposed: list[float]
    shape_preprocessed: list[int]
    case_id: str | None = None
    class_locations: dict[str, list[list[int]]] | None = None
    made_from: str | None = None

    def to_dict(self) -> dict:
        """The ``<case>.json`` content (``case_id``/``class_locations``/``made_from`` only when set)."""
        out = {"geometry": self.geometry.to_dict(), "bbox": self.bbox,
               "shape_cropped_transposed": self.shape_cropped_transposed,
               "spacing_transposed": self.spacing_transposed, "shape_preprocessed": self.shape_preprocessed}
        if self.case_id is not None:
            out["case_id"] = self.case_id
        if self.class_locations is not None:
            out["class_locations"] = self.class_locations
        if self.made_from is not None:
            out["made_from"] = self.made_from
        return out

    @classmethod
    def from_dict(cls, d: dict) -> CaseProperties:
        return cls(Geometry.from_dict(d["geometry"]), d["bbox"], d["shape_cropped_transposed"],
                   d["spacing_transposed"], d["shape_preprocessed"], d.get("case_id"), d.get("class_locations"),
                   d.get("made_from"))

    def save(self, path: Path) -> None:
        """Write ``path`` atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> CaseProperties:
        """Read a ``<case>.json``; any problem is one :class:`DatasetError` line naming the file."""
        raw = _read_json(path, "case properties")
        try:
            return cls.from_dict(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{path}: not a medseg case properties file ({type(e).__name__}: {e}); "
                               "re-run preprocessing") from e

    def anisotropic(self, config: Configuration) -> bool:
        """Whether resampling between this case's grid and ``config``'s treats axis 0 separately."""
        return is_anisotropic(self.spacing_transposed) or is_anisotropic(config.spacing)


def preprocess_image(image: np.ndarray, geometry: Geometry,
                     config: Configuration) -> tuple[np.ndarray, CaseProperties]:
    """(C, X, Y, Z) raw image → (preprocessed (C, *spatial_t), the properties that invert it)."""
    mask = nonzero_mask(image)
    bbox = bbox_of(mask)
    data, mask = crop(image, bbox), crop(mask, bbox)
    tf = config.transpose_forward
    data = data.transpose([0] + [t + 1 for t in tf])
    mask = mask.transpose(tf)
    spacing = [geometry.spacing[t] for t in tf]
    data = normalize(data, config.normalization, mask)
    target = config.spacing
    new_shape = new_shape_for(data.shape[1:], spacing, target)
    data = resample_image(data, spacing, target, new_shape)
    return data, CaseProperties(geometry, bbox, list(mask.shape), spacing, new_shape)


def preprocess_label(label: np.ndarray, props: CaseProperties, config: Configuration, labels: list[int]) -> np.ndarray:
    """A label map (X, Y, Z) in the input grid → (*spatial_t) in the preprocessed grid of ``props``;
    ``labels``: the values it holds (class indices ``range(K)`` for a case, see
    :func:`~medseg.preprocessing.labels.labels_to_classes`)."""
    seg = crop(label, props.bbox).transpose(config.transpose_forward)
    return resample_labels(seg, props.shape_preprocessed, labels, props.anisotropic(config))


def one_hot(seg: np.ndarray, num_classes: int) -> np.ndarray:
    """(*S) label map → (K-1, *S) float32 one-hot of the foreground classes (the cascade's extra input)."""
    return np.stack([(seg == k) for k in range(1, num_classes)]).astype(np.float32)


def prior_channels(prior: np.ndarray, props: CaseProperties, config: Configuration,
                   num_classes: int) -> np.ndarray:
    """A previous stage's map of class indices in the input grid (X, Y, Z) → one-hot (K-1, *spatial_t) in this
    configuration's preprocessed grid (the input a cascade stage gets beside the image)."""
    return one_hot(preprocess_label(prior, props, config, list(range(num_classes))), num_classes)


def export_probabilities(probs: np.ndarray, props: CaseProperties, config: Configuration) -> np.ndarray:
    """Invert preprocessing for softmax probabilities (K, *spatial_t) → map of class indices (X, Y, Z)
    in the original voxel grid (background outside the crop); label values:
    :func:`~medseg.preprocessing.labels.classes_to_labels`."""
    seg = resample_probabilities_argmax(probs, props.shape_cropped_transposed, props.anisotropic(config))
    seg = seg.transpose(config.transpose_backward)  # one channel at a time: never (K, *cropped) at once
    out = np.zeros(props.geometry.shape, dtype=np.uint8)
    out[tuple(slice(a, b) for a, b in props.bbox)] = seg
    return out


def export_probability_maps(probs: np.ndarray, props: CaseProperties, config: Configuration,
                            background_first: bool = True) -> np.ndarray:
    """Like :func:`export_probabilities` but keeps the (K, X, Y, Z) maps: channel 0 is 1 outside the
    crop when ``background_first`` (probabilities), every channel 0 otherwise (e.g. attention maps).
    Each channel is resampled and pasted on its own: the result is the only (K, X, Y, Z) array made."""
    out = np.zeros((probs.shape[0], *props.geometry.shape), dtype=np.float32)
    if background_first:
        out[0] = 1.0
    inside = tuple(slice(a, b) for a, b in props.bbox)
    channels = resampled_channels(probs, props.shape_cropped_transposed, props.anisotropic(config))
    for k, p in enumerate(channels):
        out[k][inside] = p.transpose(config.transpose_backward)
        del p
    return out


ANNOTATED = "annotated"  # the class_locations key of annotated voxels, in datasets with an ignore label


def class_locations(seg: np.ndarray, labels: list[int], rng: np.random.Generator,
                    ignore_class: int | None = None) -> dict[str, list[list[int]]]:
    """Up to :data:`LOCATIONS_PER_CLASS` sampled voxels of each nonzero value of ``labels`` in ``seg``;
    with ``ignore_class``, also of the annotated voxels (any class but that one) under
    :data:`ANNOTATED`, where the sampler centres its random patches."""
    out = {}
    for lab in labels:
        if lab == 0:
            continue
        idx = np.argwhere(seg == lab)
        if len(idx) > LOCATIONS_PER_CLASS:
            idx = idx[rng.choice(len(idx), LOCATIONS_PER_CLASS, replace=False)]
        out[str(lab)] = idx.tolist()
    if ignore_class is not None:
        idx = np.argwhere((seg >= 0) & (seg != ignore_class))
        if len(idx) > LOCATIONS_PER_CLASS:
            idx = idx[rng.choice(len(idx), LOCATIONS_PER_CLASS, replace=False)]
        out[ANNOTATED] = idx.tolist()
    return out


def case_recipe(case: Case, config: Configuration, values: list[int], seed: int, root: Path,
                ignore: int | None = None) -> str:
    """The digest of everything that makes a preprocessed case: :data:`PREPROCESSING_VERSION`, the
    configuration's spacing, axis order and normalisation, the label values (the class mapping) and
    the ignore label's, the sampling seed and size of ``class_locations``, and the case's files
    (name, size, mtime)."""
    recipe = {"version": PREPROCESSING_VERSION, "spacing": config.spacing,
              "transpose_forward": config.transpose_forward,
              "normalization": [n.model_dump(mode="json") for n in config.normalization],
              "label_values": values, "seed": seed, "locations_per_class": LOCATIONS_PER_CLASS,
              "files": case_signature(case, root)}
    if ignore is not None:  # absent otherwise: the digests of datasets without one stay as they were
        recipe["ignore_value"] = ignore
    return digest(recipe)


def _recorded_recipe(path: Path) -> str | None:
    """The ``made_from`` digest of a finished case's ``<case>.json`` (None: absent or unreadable)."""
    try:
        return json.loads(path.read_text()).get("made_from")
    except (OSError, ValueError, AttributeError):
        return None


def _preprocess_case(args: tuple[Case, Configuration, list[int], int | None, Path, int, str]) -> str:
    case, config, values, ignore, out_dir, seed, recipe = args
    (out_dir / f"{case.case_id}.json").unlink(missing_ok=True)  # unfinished until the new one is written
    image, geometry = read_case_image(case)
    label, _ = read_case_label(case)
    data, props = preprocess_image(image, geometry, config)
    classes = list(range(len(values)))  # the ignore label, if any, is class len(values): resampled, never sampled
    seg = preprocess_label(labels_to_classes(label, values, str(case.label), ignore), props, config,
                           classes + ([len(values)] if ignore is not None else []))
    props = dataclasses.replace(props, case_id=case.case_id, made_from=recipe,
                                class_locations=class_locations(seg, classes, np.random.default_rng(seed),
                                                                None if ignore is None else len(values)))
    atomic_save_npy(out_dir / f"{case.case_id}.npy", data.astype(np.float32))
    atomic_save_npy(out_dir / f"{case.case_id}_seg.npy", seg[None].astype(np.int8))
    props.save(out_dir / f"{case.case_id}.json")
    return case.case_id


def preprocess_dataset(ds: Dataset, plans: Plans, workdir: Path, configs: list[str] | None = None,
                       num_workers: int = 1, progress: bool = False, executor: Executor | None = None) -> dict[str, int]:
    """Preprocess every case for each configuration; cases already done from the same inputs (their
    :func:`case_recipe`) are skipped (in ``executor``'s workers when given, e.g. ``medseg plan``'s
    pool, forked before torch loaded). Returns the number of cases processed per configuration."""
    values, ignore = label_values(plans.labels), plans.ignore_value
    check_class_count(values, f"{workdir}: plans")
    done: dict[str, int] = {}
    by_data: dict[str, Configuration] = {}
    for key in configs or list(plans.configurations):  # variants of one configuration share its data
        config = plans.config(key)
        by_data.setdefault(config.data_config, config)  # the cascade preprocesses exactly as 3d_fullres
    for name, config in by_data.items():
        out_dir = WorkDir.of(workdir).preprocessed(name)
        out_dir.mkdir(parents=True, exist_ok=True)
        jobs = []
        stale = 0
        for i, c in enumerate(ds.cases):
            recipe = case_recipe(c, config, values, plans.seed + i, ds.root, ignore)
            recorded = _recorded_recipe(out_dir / f"{c.case_id}.json")
            if recorded != recipe:
                jobs.append((c, config, values, ignore, out_dir, plans.seed + i, recipe))
                stale += recorded is not None
        if stale:
            log.info("preprocess %s: %d case(s) made by another plan or from changed files; redoing them", name, stale)
        parallel_map(_preprocess_case, jobs, num_workers=num_workers, description=f"preprocess {name}",
                     progress=progress, executor=executor)
        done[name] = len(jobs)
    return done


def load_properties(folder: Path, case_id: str) -> CaseProperties:
    """The :class:`CaseProperties` of ``case_id`` in a preprocessed folder."""
    return CaseProperties.load(Path(folder) / f"{case_id}.json")


def load_class_locations(folder: Path, case_id: str) -> dict[str, np.ndarray]:
    """The sampled voxels of each foreground class of ``case_id``, int64 (N, 3) per label (as a string),
    and of its annotated voxels under :data:`ANNOTATED` (datasets with an ignore label).
    Only the ``class_locations`` key is read, so a file with nothing else works too; nnU-Net's
    ``[c, d0, d1, d2]`` coordinates are accepted (the last three used)."""
    path = Path(folder) / f"{case_id}.json"
    raw = _read_json(path, "class locations").get("class_locations", {})
    return {str(k): np.asarray(v, dtype=np.int64).reshape(len(v), -1)[:, -3:] if len(v) else np.zeros((0, 3), np.int64)
            for k, v in raw.items()}


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read {what} ({e}); re-run preprocessing") from e
