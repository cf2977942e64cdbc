"""Prediction of new images: load → preprocess → sliding window (+ mirroring) → mean over folds →
export in the input's exact geometry → mean over configurations → postprocessing.

A :class:`Stage` is one configuration with its fold models; a cascade stage holds its previous
stage and runs it first. :func:`predict_folder` takes *which model* (a work directory, or a
:class:`LoadedModel` loaded once) apart from *how to predict* (:class:`PredictOptions`). Without
``-c``, the model follows ``model.json`` (written by ``medseg find-best``): its configurations,
folds, postprocessing and QC threshold.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import pandas as pd
import torch

from medseg.errors import CheckpointError, MedsegError
from medseg.inference.backends import available, backend_network, check_backend
from medseg.inference.case_report import save_preview, structure_statistics
from medseg.inference.postprocessing import apply_postprocessing
from medseg.inference.sliding_window import predict_volume
from medseg.inference.uncertainty import entropy_map
from medseg.io.dataset import Case, read_case_image
from medseg.io.image import image_suffix, write_image
from medseg.networks.checkpoint import load_checkpoint
from medseg.networks.unet import build_network
from medseg.plans.schema import ChosenModel, Configuration, Plans
from medseg.preprocessing.labels import classes_to_labels, label_dtype, labels_to_classes
from medseg.preprocessing.pipeline import (
    export_probabilities,
    export_probability_maps,
    preprocess_image,
    prior_channels,
)
from medseg.progress import track
from medseg.utils import atomic_path, atomic_write_json, resolve_device

if TYPE_CHECKING:
    from medseg.io.dicom import Series
from medseg.workdir import Fold, WorkDir

log = logging.getLogger(__name__)
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


@dataclass
class InputCase:
    case_id: str
    files: list[Path]
    suffix: str
    series: Series | None = None  # a DICOM series (files are its slices, or its multi-frame objects)


def _hashed_uid(uid: str) -> str:
    return "series_" + hashlib.sha1(uid.encode()).hexdigest()[:12]


def _dicom_case_id(series: Series) -> str:
    return series.series_uid if re.fullmatch(r"[0-9.]+", series.series_uid) else _hashed_uid(series.series_uid)


def find_inputs(path: Path, num_channels: int, channel_names: list[str] | None = None,
                series: str | None = None) -> list[InputCase]:
    """A single image file or a folder of them (nnU-Net-style ``_0000`` files are grouped by case), or
    a DICOM folder tree: one case per chosen series (see :func:`medseg.io.dicom.select_series`),
    named by its SeriesInstanceUID and written as NIfTI."""
    path = Path(path)
    if path.is_file():
        files = [path] if image_suffix(path) else []
    elif path.is_dir():
        files = sorted(f for f in path.iterdir() if image_suffix(f) and not f.name.startswith("."))
    else:
        raise MedsegError(f"{path}: input not found")
    if not files or series:
        from medseg.io.dicom import SeriesSelector, find_series, select_series

        found = find_series(path)
        if found:
            chosen = select_series(found, channel_names or ["image"] * num_channels, SeriesSelector.parse(series), path)
            return [InputCase(_dicom_case_id(s), s.files, ".nii.gz", s) for s in chosen]
    if not files:
        raise MedsegError(f"{path}: no images to predict (.nii.gz, .nii, .nrrd, .mha, .mhd, or DICOM series)")
    groups: dict[str, dict[int, Path]] = {}
    singles = []
    for f in files:
        suffix = image_suffix(f)
        stem = f.name[: -len(suffix)]
        m = _CHANNEL_RE.match(stem)
        if m and (num_channels > 1 or path.is_dir()):
            groups.setdefault(m["case"], {})[int(m["ch"])] = f
        else:
            singles.append(InputCase(stem, [f], suffix))
    cases = list(singles)
    for case_id, chans in sorted(groups.items()):
        if sorted(chans) != list(range(len(chans))):
            raise MedsegError(f"{path / case_id}: channel files {sorted(chans)} are not numbered 0..{len(chans) - 1}")
        cases.append(InputCase(case_id, [chans[c] for c in sorted(chans)], image_suffix(chans[0])))
    return sorted(cases, key=lambda c: c.case_id)


def read_input(case: InputCase, num_channels: int):
    """All channels of an input case as float32 (C, X, Y, Z) + geometry, checked against the model."""
    if case.series is not None:
        from medseg.io.dicom import read_series

        image, geometry = read_series(case.series)
    else:
        image, geometry = read_case_image(Case(case.case_id, case.files, None))
    if image.shape[0] != num_channels:
        raise MedsegError(f"{case.files[0]}: {image.shape[0]} channel(s); the model expects {num_channels}")
    if not np.isfinite(image).all():
        raise MedsegError(f"{case.files[0]}: image contains NaN/Inf voxels")
    return image, geometry


def load_models(workdir: Path | WorkDir, plans: Plans, config: Configuration, folds: list[Fold], device: str,
                checkpoint: str = "final", backend: str = "torch") -> list[torch.nn.Module]:
    """Each fold's network on ``device``; for a ``backend`` other than ``torch``, a predictor running
    its exported copy instead (see :mod:`medseg.inference.backends`; CPU only)."""
    work = WorkDir.of(workdir)
    check_backend(backend)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # every window has the patch's shape: cuDNN tunes once
    models = []
    for fold in folds:
        path = work.run(config.key, fold).checkpoint(checkpoint)
        if not path.exists() and checkpoint == "final":
            raise CheckpointError(f"{path}: no final checkpoint; finish training fold {fold} of {config.key} first")
        state = load_checkpoint(path, map_location=device)
        net = build_network(config.architecture, plans.input_channels(config), plans.num_classes)
        net.load_state_dict(state["model"])
        models.append(backend_network(net.to(device).eval(), backend, run=work.run(config.key, fold), work=work,
                                      config=config, in_channels=plans.input_channels(config), checkpoint=checkpoint,
                                      device=device))
    return models


def default_folds(workdir: Path | WorkDir, config: str) -> list[Fold]:
    """The cross-validation folds when any is finished, else the model trained on all cases (``full``)."""
    folds = WorkDir.of(workdir).trained_folds(config)
    numbered = [f for f in folds if isinstance(f, int)]
    return numbered or folds


@dataclass
class Stage:
    """One configuration's fold models; ``previous`` is the stage a cascade runs first."""

    config: Configuration
    models: list[torch.nn.Module]
    num_classes: int
    previous: Stage | None = None


def load_stage(workdir: Path | WorkDir, plans: Plans, key: str, folds: list[Fold] | None, device: str,
               backend: str = "torch") -> Stage:
    config = plans.config(key)
    folds = folds if folds is not None else default_folds(workdir, config.key)
    if not folds:
        raise CheckpointError(f"{workdir}: configuration {config.key} has no finished fold")
    previous = None
    if config.previous_stage:
        prev = plans.config(config.previous_stage)
        if not default_folds(workdir, prev.key):
            raise CheckpointError(f"{workdir}: {config.key} needs its previous stage {prev.key}, which has no "
                                  "finished fold")
        previous = load_stage(workdir, plans, prev.key, None, device, backend)
    return Stage(config, load_models(workdir, plans, config, folds, device, backend=backend), plans.num_classes,
                 previous)


@dataclass
class CasePrediction:
    """Softmax probabilities (K, X, Y, Z) in the input's grid (mean over models and mirrorings), each
    model's QC score and, on request, attention coefficients (gates, X, Y, Z). A prediction made
    without probabilities (``predict_case(..., probabilities=False)``) has ``probabilities`` None and
    only ``classes``, the argmax taken channel by channel while resampling."""

    probabilities: np.ndarray | None
    qc_scores: list[float] = field(default_factory=list)
    attention: np.ndarray | None = None
    bbox: list[list[int]] | None = None  # the preprocessing crop; every channel but 0 is 0 outside it
    unmirrored: np.ndarray | None = None  # on request: the probabilities without mirroring (K, X, Y, Z)
    classes: np.ndarray | None = None  # (X, Y, Z) uint8 class indices, when probabilities were not kept

    @property
    def segmentation(self) -> np.ndarray:
        """(X, Y, Z) class indices (the argmax); files hold label values (:func:`classes_to_labels`)."""
        if self.classes is not None:
            return self.classes
        probs = self.probabilities
        out = np.empty(probs.shape[1:], dtype=np.uint8)
        for i in range(probs.shape[1]):  # slab by slab: no int64 (X, Y, Z) index array
            out[i] = probs[:, i].argmax(axis=0)
        return out


def predict_case(stage: Stage, image: np.ndarray, geometry, *, step: float = 0.5, tta: bool = True,
                 device: str = "cpu", attention: bool = False, prior: np.ndarray | None = None,
                 keep_unmirrored: bool = False, stitch_device: str | None = None,
                 probabilities: bool = True) -> CasePrediction:
    """Raw image (C, X, Y, Z) → :class:`CasePrediction` in the input grid. A cascade stage runs its
    previous stage first unless ``prior`` (that stage's label map in the input grid) is given.
    ``probabilities=False`` keeps only the class map (``classes``; the same labels, without any
    (K, X, Y, Z) array: see :func:`~medseg.preprocessing.pipeline.export_probabilities`).
    ``keep_unmirrored`` also returns the pass without mirroring (free: it is one of the mirrorings).
    ``stitch_device``: where the stitched probabilities live, see
    :func:`~medseg.inference.sliding_window.predict_volume` (None: its rule)."""
    config = stage.config
    data, props = preprocess_image(image, geometry, config)
    if config.previous_stage:
        if prior is None:
            prior = predict_case(stage.previous, image, geometry, step=step, tta=tta, device=device,
                                 stitch_device=stitch_device, probabilities=False).segmentation
        data = np.concatenate([data, prior_channels(prior, props, config, stage.num_classes)])
    mirror = config.training.mirror_axes if tta else []
    scores: list[float] = []
    plain: list | None = [] if keep_unmirrored else None
    probs = predict_volume(stage.models, data, config.patch_size, step=step, mirror_axes=mirror, device=device,
                           qc_scores=scores, unmirrored=plain, stitch_device=stitch_device)
    if probabilities:
        out = CasePrediction(export_probability_maps(probs, props, config), scores, bbox=props.bbox)
    else:
        out = CasePrediction(None, scores, bbox=props.bbox, classes=export_probabilities(probs, props, config))
    del probs
    if plain:
        out.unmirrored = export_probability_maps(plain[0], props, config)
    if attention:
        maps = predict_volume(stage.models, data, config.patch_size, step=step, mirror_axes=mirror, device=device,
                              attention=True, stitch_device=stitch_device)
        out.attention = export_probability_maps(maps, props, config, background_first=False)
    return out


def ensemble(predictions: list[CasePrediction]) -> CasePrediction:
    """Mean of the members' probabilities; the QC scores of all their models."""
    if len(predictions) == 1:
        return predictions[0]
    if any(p.probabilities is None for p in predictions):
        raise MedsegError("ensemble: every member needs its probabilities (predict_case(..., probabilities=True))")
    probs = predictions[0].probabilities.copy()  # summed in place: the same values as np.mean, one copy
    for p in predictions[1:]:
        probs += p.probabilities
    probs /= len(predictions)
    return CasePrediction(probs, [s for p in predictions for s in p.qc_scores])


def _chosen_model(work: WorkDir, plans: Plans, config_name: str | None,
                  folds: list[Fold] | None) -> tuple[list[str], dict, ChosenModel | None]:
    """Which configurations and folds to run: ``config_name`` when given, else ``model.json``, else
    the trained configuration the plan recommends, else 3d_fullres, else the first trained."""
    if config_name is None and work.model.exists():
        chosen = ChosenModel.load(work.model)
        if folds is not None:
            return chosen.members, {m: folds for m in chosen.members}, chosen
        return chosen.members, dict(chosen.folds), chosen
    if config_name is None:
        trained = [c for c in plans.configurations if work.trained_folds(c)]
        if not trained:
            raise CheckpointError(f"{work}: no trained configuration (no {work.describe_trained()})")
        preferred = [c for c in plans.default_configurations() if c in trained]  # the plan's choice first
        config_name = (preferred or (["3d_fullres"] if "3d_fullres" in trained else trained))[0]
    key = plans.config(config_name).key
    return [key], {key: folds}, None


@dataclass
class LoadedModel:
    """A work directory's model in memory: which configurations, folds and postprocessing
    :func:`predict_folder` runs, on which device. Load it once to predict many inputs
    (``medseg serve`` does)."""

    workdir: Path
    plans: Plans
    members: list[str]
    chosen: ChosenModel | None
    stages: list[Stage]
    device: str
    backend: str = "torch"

    @classmethod
    def load(cls, workdir: Path, *, config_name: str | None = None, folds: list[Fold] | None = None,
             device: str = "cpu", backend: str | None = None) -> LoadedModel:
        """``config_name``/``folds``: as given, else ``model.json``'s, else the trained configuration
        (3d_fullres first) with every finished fold (see :func:`default_folds`). ``backend``: the
        forward pass's (:data:`~medseg.inference.backends.BACKENDS`); None: ``model.json``'s choice on
        a CPU, else torch."""
        work = WorkDir.of(workdir)
        plans = Plans.load(work.plans)
        members, member_folds, chosen = _chosen_model(work, plans, config_name, folds)
        if backend is None:
            backend = chosen.inference.backend if chosen and device.startswith("cpu") else "torch"
            if not available(backend):
                log.warning("model.json chose backend %s, which is not installed here (pip install "
                            "'medseg[cpu-fast]'); predicting with torch", backend)
                backend = "torch"
        stages = [load_stage(work, plans, m, member_folds[m], device, backend) for m in members]
        return cls(work.root, plans, members, chosen, stages, device, backend)


OutputFormat = Literal["nifti", "dicom-seg", "both"]


@dataclass(frozen=True, kw_only=True)
class PredictOptions:
    """How :func:`predict_folder` predicts (which model is its own argument).

    - ``step``: sliding-window step as a fraction of the patch.
    - ``tta``: mirroring; ``None`` follows ``model.json``'s choice made on cross-validation, else on.
    - ``save_probabilities``: also write ``<case>_probabilities`` (K, X, Y, Z) beside each output;
      ``save_attention`` the attention gates' coefficients as ``<case>_attention`` (one volume per
      gate); ``save_uncertainty`` the normalised predictive entropy as ``<case>_uncertainty``.
    - ``postprocess``: apply ``model.json``'s postprocessing.
    - ``overwrite``: predict cases whose output exists again (else they are skipped).
    - ``series``: which DICOM series, see :class:`medseg.io.dicom.SeriesSelector`.
    - ``output_format``: ``nifti``; ``dicom-seg`` (or ``both``) writes ``<case>.dcm``, a DICOM SEG
      referencing the source series, for DICOM inputs.
    - ``num_parts``/``part``: predict only shard ``part`` of ``num_parts``: every ``num_parts``-th
      case of the sorted case ids from the ``part``-th on (disjoint, the same on every run). Shards
      may write into one folder at the same time: each case leaves its summary row in
      ``OUT/.predict_summary/``, and ``predict_summary.json/.csv`` is rebuilt from all rows under a
      file lock.
    - ``progress``: a progress bar on stderr.
    - ``stitch_device``: where the sliding window's stitched output and the sums over mirrorings
      live: ``auto`` (the model's device when that output fits comfortably in its free memory, else
      the CPU: :func:`~medseg.inference.sliding_window.choose_stitch_device`), ``cpu`` or a CUDA device.
    - ``backend``: the network's forward pass: ``torch``, or a faster CPU runtime of
      :data:`~medseg.inference.backends.BACKENDS`; ``None`` follows ``model.json``'s choice (torch without one).
    """

    step: float = 0.5
    tta: bool | None = None
    save_probabilities: bool = False
    save_attention: bool = False
    save_uncertainty: bool = False
    postprocess: bool = True
    overwrite: bool = False
    series: str | None = None
    output_format: OutputFormat = "nifti"
    num_parts: int = 1
    part: int = 0
    progress: bool = False
    stitch_device: str = "auto"
    backend: str | None = None
    statistics: bool = False
    preview: bool = False


def predict_folder(inputs: Path, output: Path, model: Path | LoadedModel, options: PredictOptions | None = None, *,
                   config_name: str | None = None, folds: list[Fold] | None = None, device: str | None = None,
                   **overrides: Any) -> list[Path]:
    """Predict every image in ``inputs`` (file or folder, see :func:`find_inputs`) into ``output``.
    Every run writes ``predict_summary.json``/``.csv``: each case's QC score and whether it is flagged.
    Returns the main output of each case predicted (cases skipped as already done are not listed).

    ``model``: a trained work directory, loaded here with ``config_name``, ``folds`` and ``device``
    (see :meth:`LoadedModel.load`; device ``cpu`` by default), or a :class:`LoadedModel` already in
    memory, which has its own (giving them too is an error). ``options``: how to predict;
    ``overrides`` replace single fields of it (``predict_folder(src, dst, work, tta=False)``)."""
    options = dataclasses.replace(options or PredictOptions(), **overrides)
    if options.output_format not in get_args(OutputFormat):
        raise MedsegError(f"--output-format {options.output_format!r}: expected nifti, dicom-seg or both")
    if options.num_parts < 1:
        raise MedsegError(f"--num-parts {options.num_parts}: expected 1 or more")
    if not 0 <= options.part < options.num_parts:
        raise MedsegError(f"--part {options.part}: expected 0..{options.num_parts - 1} for --num-parts "
                          f"{options.num_parts}")
    stitch_device = None if options.stitch_device == "auto" else resolve_device(options.stitch_device,
                                                                                 what="--stitch-device")
    if isinstance(model, LoadedModel):
        given = [name for name, value in (("config_name", config_name), ("folds", folds), ("device", device))
                 if value is not None]
        if options.backend is not None and options.backend != model.backend:
            given.append("backend")
        if given:
            raise MedsegError(f"predict_folder: {', '.join(given)} choose what to load from a work directory; the "
                              "LoadedModel given has its own (pass them to LoadedModel.load)")
    else:
        model = LoadedModel.load(Path(model), config_name=config_name, folds=folds, device=device or "cpu",
                                 backend=options.backend)
    plans, members, chosen = model.plans, model.members, model.chosen
    if options.save_attention:
        ungated = [m for m in members if not plans.config(m).architecture.blocks.attention_gates]
        if ungated:
            gated = [k for k, c in plans.configurations.items() if c.architecture.blocks.attention_gates]
            raise MedsegError(f"{model.workdir}: configuration {ungated[0]} has no attention gates to save"
                              + (f"; choose one that has: {', '.join(gated)}" if gated else ""))
    cases = find_inputs(inputs, len(plans.channel_names), plans.channel_names, options.series)
    if options.num_parts > 1:
        n_all, cases = len(cases), cases[options.part::options.num_parts]
        log.info("shard %d of %d: %d of %d case(s)", options.part, options.num_parts, len(cases), n_all)
    seg_out, nifti_out = options.output_format in ("dicom-seg", "both"), options.output_format in ("nifti", "both")
    if seg_out and any(c.series is None for c in cases):
        raise MedsegError(f"{inputs}: --output-format {options.output_format} needs DICOM input (a DICOM SEG "
                          "references its source instances)")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tta = options.tta if options.tta is not None else (chosen.inference.mirroring if chosen else True)
    pp = chosen.postprocessing.model_dump() if chosen and options.postprocess else None
    threshold = chosen.qc.threshold if chosen and chosen.qc else None
    written = []

    def main_output(c: InputCase) -> Path:
        return output / (f"{c.case_id}{c.suffix}" if nifti_out else f"{c.case_id}.dcm")

    # a case is done once its output and its summary row exist (a kill between the two redoes it)
    done = _summary_cases(output)
    todo = [c for c in cases if options.overwrite or not main_output(c).exists() or c.case_id not in done]
    if len(todo) < len(cases):
        log.info("skipping %d case(s) already predicted (use --overwrite to redo)", len(cases) - len(todo))
    flagged = []
    # the (K, X, Y, Z) probabilities only when written or averaged over configurations; else labels only
    keep_probabilities = options.save_probabilities or options.save_uncertainty or len(model.stages) > 1
    for case in track(todo, total=len(todo), description="predict", enabled=options.progress):
        image, geometry = read_input(case, len(plans.channel_names))
        preds = [predict_case(s, image, geometry, step=options.step, tta=tta, device=model.device,
                              attention=options.save_attention, stitch_device=stitch_device,
                              probabilities=keep_probabilities) for s in model.stages]
        pred = ensemble(preds)
        values = plans.label_values  # files hold the dataset's label values; model.json's classes are values too
        seg = apply_postprocessing(classes_to_labels(pred.segmentation, values), pp)
        out_path = output / f"{case.case_id}{case.suffix}"
        if options.save_probabilities:
            write_image(output / f"{case.case_id}_probabilities{case.suffix}", pred.probabilities, geometry, np.float32)
        if options.save_uncertainty:
            write_image(output / f"{case.case_id}_uncertainty{case.suffix}", entropy_map(pred.probabilities),
                        geometry, np.float32)
        if options.save_attention:
            write_image(output / f"{case.case_id}_attention{case.suffix}", np.mean([p.attention for p in preds], 0),
                        geometry, np.float32)
        if seg_out:
            from medseg.io.dicom_seg import write_dicom_seg

            # segment numbers are the classes (DICOM SEG numbers segments 1, 2, … without gaps), named by their labels
            write_dicom_seg(output / f"{case.case_id}.dcm", case.series, labels_to_classes(seg, values, str(out_path)),
                            {k: plans.labels.get(v, "background") for k, v in enumerate(values)},
                            model_name=f"medseg {plans.dataset_name} {'+'.join(members)}")
        if nifti_out:
            write_image(out_path, seg, geometry, label_dtype(values))
        if options.statistics:
            rows = structure_statistics(seg, image, geometry.spacing, plans.class_labels, plans.channel_names)
            atomic_write_json(_statistics_rows(output) / f"{case.case_id}.json", {"case": case.case_id, "structures": rows})
        if options.preview:
            save_preview(output / f"{case.case_id}_preview.png", image, seg, geometry.spacing, plans.class_labels,
                         _loggable_id(case))
        score = float(np.mean(pred.qc_scores))
        row = {"case": case.case_id, "source": case.series.label() if case.series else str(case.files[0]),
               "qc_score": score, "flagged": bool(threshold is not None and score > threshold),
               "foreground_voxels": int((seg > 0).sum())}
        atomic_write_json(_summary_rows(output) / f"{case.case_id}.json", row)
        if row["flagged"]:
            flagged.append(case)
        written.append(main_output(case))
    write_summary(output, members, threshold)
    if options.statistics:
        write_statistics(output)
    if flagged:
        log.warning("QC: %d case(s) flagged as likely failures (score > %.4f): %s (see predict_summary.json)",
                    len(flagged), threshold, ", ".join(_loggable_id(c) for c in flagged))
    return written


def _summary_rows(output: Path) -> Path:
    """The folder of one JSON row per predicted case, so that shards writing into one folder lose none."""
    return output / ".predict_summary"


def _statistics_rows(output: Path) -> Path:
    return output / ".predict_statistics"


def write_statistics(output: Path) -> None:
    """Rebuild ``predict_statistics.json`` (per case, per structure) and ``.csv`` (one row per case
    and structure) from the per-case rows, under the summary's lock (shards write into one folder)."""
    output = Path(output)
    rows_dir = _statistics_rows(output)
    with open(output / ".predict_summary.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cases = [json.loads(f.read_text()) for f in sorted(rows_dir.glob("[!.]*.json"))] if rows_dir.is_dir() else []
        if not cases:
            return
        atomic_write_json(output / "predict_statistics.json", {
            "columns": "volume_ml = voxels × voxel volume; mean_/std_<channel>: the input's intensities inside "
                       "the structure (None when absent)", "cases": cases})
        flat = [{"case": c["case"], **r} for c in cases for r in c["structures"]]
        with atomic_path(output / "predict_statistics.csv") as tmp:
            pd.DataFrame(flat).to_csv(tmp, index=False)


def _loggable_id(case: InputCase) -> str:
    """The case id, or for DICOM input (named by SeriesInstanceUID) a hash of its UID."""
    return case.case_id if case.series is None else _hashed_uid(case.series.series_uid)


def _summary_cases(output: Path) -> dict[str, dict]:
    """Every case row in ``output`` by case id: the row files, and the cases of an older
    ``predict_summary.json`` that have none."""
    rows = {}
    path = output / "predict_summary.json"
    if path.exists():
        try:
            rows = {r["case"]: r for r in json.loads(path.read_text()).get("cases", [])}
        except (ValueError, KeyError, AttributeError, TypeError):
            rows = {}
    rows_dir = _summary_rows(output)
    # names starting with a dot are rows still being written (atomic_path's temporary files)
    for f in sorted(rows_dir.glob("[!.]*.json")) if rows_dir.is_dir() else []:
        row = json.loads(f.read_text())
        rows[row["case"]] = row
    return rows


def write_summary(output: Path, members: list[str], threshold: float | None) -> None:
    """Rebuild ``predict_summary.json`` / ``.csv`` from every case row in ``output`` (see
    :func:`_summary_cases`) while holding an exclusive lock on ``output/.predict_summary.lock``, so
    that concurrent shards lose no rows: the last summary written has every case. No rows, no summary."""
    output = Path(output)
    with open(output / ".predict_summary.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = _summary_cases(output)
        if not rows:
            return
        merged = [rows[k] for k in sorted(rows)]
        atomic_write_json(output / "predict_summary.json", {
            "configurations": members, "qc_threshold": threshold,
            "qc_score": "mean normalised predictive entropy inside the predicted foreground",
            "flagged": [r["case"] for r in merged if r["flagged"]], "cases": merged})
        with atomic_path(output / "predict_summary.csv") as tmp:
            pd.DataFrame(merged).to_csv(tmp, index=False)
