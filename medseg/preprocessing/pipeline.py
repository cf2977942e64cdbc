"""Preprocessing: crop to nonzero → transpose (out-of-plane axis first) → normalise → resample.

Each case becomes ``<case>.npy`` (float32 (C, *spatial)), ``<case>_seg.npy`` (int8 (1, *spatial))
and ``<case>.json`` (the properties that invert every step, plus foreground locations for
sampling). The json is written last, so its presence marks a finished case (resumable).
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from medseg.io.dataset import Case, Dataset, read_case_image, read_case_label
from medseg.io.image import Geometry
from medseg.plans.schema import Configuration, Plans
from medseg.plans.topology import is_anisotropic
from medseg.preprocessing.cropping import bbox_of, crop, nonzero_mask
from medseg.preprocessing.normalization import normalize
from medseg.preprocessing.resampling import (
    new_shape_for,
    resample_image,
    resample_labels,
    resample_probabilities,
)
from medseg.utils import atomic_save_npy, atomic_write_json
from medseg.workdir import WorkDir

LOCATIONS_PER_CLASS = 10_000


def preprocess_image(image: np.ndarray, geometry: Geometry, config: Configuration) -> tuple[np.ndarray, dict]:
    """(C, X, Y, Z) raw image → (preprocessed (C, *spatial_t), properties to invert it)."""
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
    props = {"geometry": geometry.to_dict(), "bbox": bbox, "shape_cropped_transposed": list(mask.shape),
             "spacing_transposed": spacing, "shape_preprocessed": new_shape}
    return data, props


def preprocess_label(label: np.ndarray, props: dict, config: Configuration, labels: list[int]) -> np.ndarray:
    seg = crop(label, props["bbox"]).transpose(config.transpose_forward)
    aniso = is_anisotropic(props["spacing_transposed"]) or is_anisotropic(config.spacing)
    return resample_labels(seg, props["shape_preprocessed"], labels, aniso)


def one_hot(seg: np.ndarray, num_classes: int) -> np.ndarray:
    """(*S) label map → (K-1, *S) float32 one-hot of the foreground classes (the cascade's extra input)."""
    return np.stack([(seg == k) for k in range(1, num_classes)]).astype(np.float32)


def prior_channels(prior: np.ndarray, props: dict, config: Configuration, num_classes: int) -> np.ndarray:
    """A previous stage's label map in the input grid (X, Y, Z) → one-hot (K-1, *spatial_t) in this
    configuration's preprocessed grid (the input a cascade stage gets beside the image)."""
    return one_hot(preprocess_label(prior, props, config, list(range(num_classes))), num_classes)


def export_probabilities(probs: np.ndarray, props: dict, config: Configuration) -> np.ndarray:
    """Invert preprocessing for softmax probabilities (K, *spatial_t) → label map (X, Y, Z) in the
    original voxel grid (background outside the crop)."""
    aniso = is_anisotropic(props["spacing_transposed"]) or is_anisotropic(config.spacing)
    probs = resample_probabilities(probs, props["shape_cropped_transposed"], aniso)
    seg = np.argmax(probs, axis=0).astype(np.uint8).transpose(config.transpose_backward)
    out = np.zeros(props["geometry"]["shape"], dtype=np.uint8)
    out[tuple(slice(a, b) for a, b in props["bbox"])] = seg
    return out


def export_probability_maps(probs: np.ndarray, props: dict, config: Configuration,
                            background_first: bool = True) -> np.ndarray:
    """Like :func:`export_probabilities` but keeps the (K, X, Y, Z) maps: channel 0 is 1 outside the
    crop when ``background_first`` (probabilities), every channel 0 otherwise (e.g. attention maps)."""
    aniso = is_anisotropic(props["spacing_transposed"]) or is_anisotropic(config.spacing)
    probs = resample_probabilities(probs, props["shape_cropped_transposed"], aniso)
    probs = probs.transpose([0] + [t + 1 for t in config.transpose_backward])
    out = np.zeros((probs.shape[0], *props["geometry"]["shape"]), dtype=np.float32)
    if background_first:
        out[0] = 1.0
    out[(slice(None), *(slice(a, b) for a, b in props["bbox"]))] = probs
    return out


def class_locations(seg: np.ndarray, labels: list[int], rng: np.random.Generator) -> dict[str, list[list[int]]]:
    out = {}
    for lab in labels:
        if lab == 0:
            continue
        idx = np.argwhere(seg == lab)
        if len(idx) > LOCATIONS_PER_CLASS:
            idx = idx[rng.choice(len(idx), LOCATIONS_PER_CLASS, replace=False)]
        out[str(lab)] = idx.tolist()
    return out


def _preprocess_case(args: tuple[Case, Configuration, list[int], Path, int]) -> str:
    case, config, labels, out_dir, seed = args
    image, geometry = read_case_image(case)
    label, _ = read_case_label(case)
    data, props = preprocess_image(image, geometry, config)
    seg = preprocess_label(label, props, config, labels)
    props["case_id"] = case.case_id
    props["class_locations"] = class_locations(seg, labels, np.random.default_rng(seed))
    atomic_save_npy(out_dir / f"{case.case_id}.npy", data.astype(np.float32))
    atomic_save_npy(out_dir / f"{case.case_id}_seg.npy", seg[None].astype(np.int8))
    atomic_write_json(out_dir / f"{case.case_id}.json", props)
    return case.case_id


def preprocess_dataset(ds: Dataset, plans: Plans, workdir: Path, configs: list[str] | None = None,
                       num_workers: int = 1, progress: bool = False) -> dict[str, int]:
    """Preprocess every case for each configuration; cases already done are skipped.
    Returns the number of cases processed per configuration."""
    from medseg.progress import track

    done: dict[str, int] = {}
    by_data: dict[str, Configuration] = {}
    for key in configs or list(plans.configurations):  # variants of one configuration share its data
        config = plans.config(key)
        by_data.setdefault(config.data_config, config)  # the cascade preprocesses exactly as 3d_fullres
    for name, config in by_data.items():
        out_dir = WorkDir.of(workdir).preprocessed(name)
        out_dir.mkdir(parents=True, exist_ok=True)
        todo = [c for c in ds.cases if not (out_dir / f"{c.case_id}.json").exists()]
        jobs = [(c, config, sorted(plans.labels), out_dir, plans.seed + ds.cases.index(c)) for c in todo]
        if num_workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(num_workers) as pool:
                list(track(pool.map(_preprocess_case, jobs), total=len(jobs), description=f"preprocess {name}",
                           enabled=progress))
        else:
            list(track(map(_preprocess_case, jobs), total=len(jobs), description=f"preprocess {name}",
                       enabled=progress))
        done[name] = len(jobs)
    return done


def load_properties(folder: Path, case_id: str) -> dict:
    return json.loads((Path(folder) / f"{case_id}.json").read_text())
