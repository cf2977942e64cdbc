"""medseg's Python API, for notebooks and scripts: the CLI's steps as functions, and a model loaded
once that segments images in memory.

>>> import medseg
>>> model = medseg.load_model("WORK")                    # a trained work directory or a model .zip
>>> seg = model.predict(nib.load("case.nii.gz"))         # nibabel in → nibabel out, same geometry
>>> seg = model.predict(sitk.ReadImage("case.mha"))      # SimpleITK in → SimpleITK out
>>> labels = model.predict(array, spacing=(1.0, 1.0, 1.0))   # (X, Y, Z) array in → label array out

``predict`` runs exactly what ``medseg predict`` runs (preprocessing, sliding window, the
configurations and folds of ``model.json``, postprocessing): the image goes through a temporary file,
so that the geometry handling is the one the CLI's outputs are checked against.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.evaluation import evaluate_folder
from medseg.inference.archive import cached_import, export_model, import_model
from medseg.inference.predictor import LoadedModel, PredictOptions, predict_folder
from medseg.utils import resolve_device
from medseg.workdir import Fold
from medseg.workflow import plan

__all__ = ["Model", "evaluate", "export_model", "import_model", "load_model", "plan", "train"]


def train(workdir: str | Path, configs: Sequence[str] | None = None, folds: str = "0", *,
          time_budget_min: float | None = None, epochs: int | None = None, resume: bool = False,
          device: str | None = None, validate: bool = True, **options: Any) -> list[str]:
    """``medseg train WORK -c CONFIGS -f FOLDS``: ``folds`` is ``"0"``..``"4"``, ``"all"`` or
    ``"full"``; ``configs`` default to the plan's choice. ``options``: ``iterations_per_epoch``,
    ``num_workers``, ``init_from``, ``freeze_encoder_epochs``. Returns the summary lines."""
    from medseg.orchestration.crossval import train_configs
    from medseg.plans.schema import Plans
    from medseg.workdir import WorkDir

    names = list(configs) if configs else Plans.load(WorkDir(workdir).plans).default_configurations()
    return train_configs(workdir, names, folds, resume=resume, device=resolve_device(device), epochs=epochs,
                         time_budget_min=time_budget_min, validate_full=validate, **options)


def evaluate(predictions: str | Path, references: str | Path, output: str | Path,
             labels: dict[int, str] | None = None, num_workers: int = 1) -> dict:
    """``medseg evaluate``: Dice, IoU, HD95 and volumes per case and class; the summary (as summary.json)."""
    return evaluate_folder(Path(predictions), Path(references), Path(output), labels=labels, num_workers=num_workers)


def load_model(model: str | Path, *, config: str | None = None, folds: Sequence[Fold] | None = None,
               device: str | None = None, backend: str | None = None) -> Model:
    """A trained work directory (or a ``medseg export-model`` archive) loaded once for many
    :meth:`Model.predict` calls. ``config``/``folds``: as ``medseg predict -c/-f`` (default:
    ``model.json``'s choice); ``device``: ``cpu``/``cuda`` (default: CUDA when available)."""
    path = Path(model)
    if path.is_file():
        path = cached_import(path)
    loaded = LoadedModel.load(path, config_name=config, folds=list(folds) if folds is not None else None,
                              device=resolve_device(device), backend=backend)
    return Model(loaded)


class Model:
    """A loaded model (:func:`load_model`)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    @property
    def labels(self) -> dict[int, str]:
        """The label values a prediction holds, with their names."""
        return self.loaded.plans.class_labels

    def predict(self, image: Any, *, spacing: Sequence[float] | None = None, affine: np.ndarray | None = None,
                tta: bool | None = None, step: float = 0.5) -> Any:
        """The label map of ``image``, of the same kind and geometry: a ``nibabel`` image, a
        ``SimpleITK.Image``, or a NumPy array ``(X, Y, Z)`` with ``spacing`` (mm per axis) or a 4×4
        ``affine`` (returns an array). Several channels: a list of such images, one per channel.
        ``tta``: mirroring (default: ``model.json``'s choice)."""
        channels = list(image) if isinstance(image, list | tuple) else [image]
        if not channels:
            raise MedsegError("predict: no image given")
        kind = _kind(channels[0])
        tmp = Path(tempfile.mkdtemp(prefix="medseg_api_"))
        try:
            inputs, out = tmp / "in", tmp / "out"
            inputs.mkdir()
            for c, ch in enumerate(channels):
                if _kind(ch) != kind:
                    raise MedsegError("predict: every channel must be the same kind of image")
                _write(ch, inputs / f"case_{c:04d}", kind, spacing, affine)
            options = PredictOptions(tta=tta, step=step, overwrite=True)
            (written,) = predict_folder(inputs, out, self.loaded, options)
            return _read(written, kind)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _kind(image: Any) -> str:
    if isinstance(image, sitk.Image):
        return "sitk"
    if isinstance(image, nib.spatialimages.SpatialImage):
        return "nibabel"
    if isinstance(image, np.ndarray):
        return "array"
    raise MedsegError(f"predict: a nibabel image, a SimpleITK image or a NumPy array is needed, not {type(image).__name__}")


def _write(image: Any, stem: Path, kind: str, spacing: Sequence[float] | None, affine: np.ndarray | None) -> None:
    if kind == "sitk":
        sitk.WriteImage(image, str(stem) + ".mha")
        return
    if kind == "array":
        if image.ndim != 3:
            raise MedsegError(f"predict: an array must be (X, Y, Z); got shape {image.shape}")
        if affine is None:
            if spacing is None:
                raise MedsegError("predict: an array needs its spacing (spacing=(sx, sy, sz) in mm) or affine")
            affine = np.diag([*map(float, spacing), 1.0])
        image = nib.Nifti1Image(np.asarray(image, dtype=np.float32), np.asarray(affine, dtype=float))
    nib.save(image, str(stem) + ".nii.gz")


def _read(path: Path, kind: str) -> Any:
    if kind == "sitk":
        return sitk.ReadImage(str(path))
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    if kind == "array":
        return data
    return nib.Nifti1Image(data, img.affine, img.header)
