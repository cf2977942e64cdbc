"""The cascade's full-resolution stage: its extra input is the low-resolution stage's segmentation.

Training uses the previous stage's *out-of-fold* predictions (each fold's ``val/<case>``):
each case's prior comes from the fold that did not train on it, so the cascade learns from the
errors the previous stage really makes on unseen cases. The priors are resampled once into the
full-resolution preprocessed grid (the work directory's priors folder, ``<case>.npy``, int8 (1, *S),
class indices as in the preprocessed label maps; the ``val/`` files hold label values).

During training the prior is augmented as in nnU-Net (:func:`augment_prior`): random
dilation/erosion/opening/closing per class and removal of a random connected component, so that
the second stage learns to correct the first rather than copy it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.io.image import read_image
from medseg.plans.schema import Configuration, Plans
from medseg.preprocessing.labels import labels_to_classes
from medseg.preprocessing.pipeline import load_properties, preprocess_label
from medseg.progress import track
from medseg.utils import atomic_save_npy
from medseg.workdir import WorkDir

log = logging.getLogger(__name__)

P_BINARY_OPERATOR = 0.4  # per sample, per class
STREL_RADIUS = (1, 8)
P_REMOVE_COMPONENT = 0.2  # per sample, per class
REMOVE_IF_COVERS_AT_MOST = 0.15  # of the patch; larger components are never removed


def oof_path(workdir: Path | WorkDir, previous_key: str, case_id: str) -> Path:
    """The previous stage's out-of-fold label map file of ``case_id``."""
    work = WorkDir.of(workdir)
    hits = work.cv_prediction_files(previous_key, case_id)
    if not hits:
        raise MedsegError(f"{work.runs(previous_key)}: no out-of-fold prediction of case {case_id}; "
                          f"train every fold of {previous_key} first (medseg train -c {previous_key} -f all)")
    return hits[0]


def oof_segmentation(workdir: Path | WorkDir, previous_key: str, case_id: str, values: Sequence[int]) -> np.ndarray:
    """The previous stage's out-of-fold segmentation of ``case_id`` (input grid) as class indices;
    ``values``: the label value of each class (:attr:`Plans.label_values`), which the file holds."""
    path = oof_path(workdir, previous_key, case_id)
    return labels_to_classes(read_image(path)[0][0], values, str(path))


def build_priors(workdir: Path | WorkDir, plans: Plans, config: Configuration) -> Path:
    """Resample every case's out-of-fold previous-stage prediction into ``config``'s preprocessed grid
    (again for a case whose prediction or preprocessed case is newer than its prior, e.g. after
    retraining that stage or re-preprocessing)."""
    work = WorkDir.of(workdir)
    prev = plans.config(config.previous_stage).key
    data = work.preprocessed(config.data_config)
    out = work.priors(prev)
    out.mkdir(parents=True, exist_ok=True)
    ids = sorted(p.stem for p in data.glob("*.json"))
    sources = {c: oof_path(work, prev, c) for c in ids}
    def newest_input(c: str) -> float:
        return max(sources[c].stat().st_mtime, (data / f"{c}.json").stat().st_mtime)

    todo = [c for c in ids if not (out / f"{c}.npy").exists() or (out / f"{c}.npy").stat().st_mtime < newest_input(c)]
    for cid in track(todo, total=len(todo), description=f"priors from {prev}", enabled=bool(todo)):
        props = load_properties(data, cid)
        oof = oof_segmentation(work, prev, cid, plans.label_values)
        seg = preprocess_label(oof, props, config, list(range(plans.num_classes)))
        atomic_save_npy(out / f"{cid}.npy", seg[None].astype(np.int8))
    return out


def _ball(radius: int, ndim: int) -> np.ndarray:
    grid = np.indices((2 * radius + 1,) * ndim) - radius
    return (grid**2).sum(axis=0) <= radius**2


def augment_prior(onehot: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(B, K-1, *S) one-hot priors → augmented copies (morphological changes, removed components)."""
    out = onehot.copy()
    for b in range(out.shape[0]):
        for k in rng.permutation(out.shape[1]):
            mask = out[b, k] > 0.5
            if rng.random() < P_BINARY_OPERATOR:
                op = (ndimage.binary_dilation, ndimage.binary_erosion, ndimage.binary_opening,
                      ndimage.binary_closing)[int(rng.integers(4))]
                changed = op(mask, structure=_ball(int(rng.integers(STREL_RADIUS[0], STREL_RADIUS[1] + 1)),
                                                   mask.ndim))
                out[b, k] = changed
                others = [j for j in range(out.shape[1]) if j != k]
                if others:  # a grown class takes the voxels over from the others
                    out[b, others] *= ~changed[None] | mask[None]
                mask = changed
            if rng.random() < P_REMOVE_COMPONENT and mask.any():
                labelled, n = ndimage.label(mask)
                sizes = np.bincount(labelled.ravel())[1:]
                small = [i + 1 for i in range(n) if sizes[i] <= REMOVE_IF_COVERS_AT_MOST * mask.size]
                if small:
                    out[b, k][labelled == small[int(rng.integers(len(small)))]] = 0
    return out
