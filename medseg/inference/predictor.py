"""Prediction of new images: load → preprocess → sliding window (+ mirroring) → mean over folds →
export in the input's exact geometry."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medseg.errors import CheckpointError, MedsegError
from medseg.inference.sliding_window import predict_volume
from medseg.io.dataset import Case, read_case_image
from medseg.io.image import image_suffix, write_image
from medseg.networks.unet import build_network
from medseg.plans.schema import Configuration, Plans
from medseg.preprocessing.pipeline import export_probabilities, export_probability_maps, preprocess_image
from medseg.training.checkpoint import load_checkpoint

log = logging.getLogger(__name__)
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


@dataclass
class InputCase:
    case_id: str
    files: list[Path]
    suffix: str


def find_inputs(path: Path, num_channels: int) -> list[InputCase]:
    """A single image file or a folder of them; nnU-Net-style ``_0000`` files are grouped by case."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(f for f in path.iterdir() if image_suffix(f) and not f.name.startswith("."))
    else:
        raise MedsegError(f"{path}: input not found")
    if not files:
        raise MedsegError(f"{path}: no images to predict (.nii.gz, .nii, .nrrd, .mha, .mhd)")
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
    image, geometry = read_case_image(Case(case.case_id, case.files, None))
    if image.shape[0] != num_channels:
        raise MedsegError(f"{case.files[0]}: {image.shape[0]} channel(s); the model expects {num_channels}")
    if not np.isfinite(image).all():
        raise MedsegError(f"{case.files[0]}: image contains NaN/Inf voxels")
    return image, geometry


def run_dir(workdir: Path, config: str, fold: int | str) -> Path:
    return Path(workdir) / "runs" / config / f"fold_{fold}"


def load_models(workdir: Path, plans: Plans, config: Configuration, folds: list[int | str], device: str,
                checkpoint: str = "final") -> list[torch.nn.Module]:
    models = []
    for fold in folds:
        rd = run_dir(workdir, config.key, fold)
        path = rd / f"checkpoint_{checkpoint}.pt"
        if not path.exists() and checkpoint == "final":
            raise CheckpointError(f"{path}: no final checkpoint; finish training fold {fold} of {config.key} first")
        state = load_checkpoint(path, map_location=device)
        net = build_network(config.architecture, len(plans.channel_names), plans.num_classes)
        net.load_state_dict(state["model"])
        models.append(net.to(device).eval())
    return models


def available_folds(workdir: Path, config: str) -> list[int | str]:
    base = Path(workdir) / "runs" / config
    folds = []
    for d in sorted(base.glob("fold_*")) if base.exists() else []:
        if (d / "checkpoint_final.pt").exists():
            tag = d.name.removeprefix("fold_")
            folds.append(int(tag) if tag.isdigit() else tag)
    return folds


def predict_case(models: list[torch.nn.Module], image: np.ndarray, geometry, config: Configuration, *,
                 step: float = 0.5, tta: bool = True, device: str = "cpu",
                 attention: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """Raw image (C, X, Y, Z) → (label map (X, Y, Z) in the input grid, preprocessed-grid probabilities, props).
    With ``attention``, ``props["attention"]`` holds the attention coefficients in the input grid
    ((gates, X, Y, Z), full resolution first, mean over models and mirrorings)."""
    data, props = preprocess_image(image, geometry, config)
    mirror = config.training.mirror_axes if tta else []
    probs = predict_volume(models, data, config.patch_size, step=step, mirror_axes=mirror, device=device)
    if attention:
        maps = predict_volume(models, data, config.patch_size, step=step, mirror_axes=mirror, device=device,
                              attention=True)
        props["attention"] = export_probability_maps(maps, props, config, background_first=False)
    return export_probabilities(probs, props, config), probs, props


def predict_folder(inputs: Path, output: Path, workdir: Path, *, config_name: str | None = None,
                   folds: list[int | str] | None = None, step: float = 0.5, tta: bool = True,
                   save_probabilities: bool = False, save_attention: bool = False, overwrite: bool = False,
                   device: str = "cpu", progress: bool = False) -> list[Path]:
    """Predict every image in ``inputs`` (file or folder) into ``output`` with the trained model in
    ``workdir``. Cases whose output exists are skipped unless ``overwrite``. ``save_attention`` writes
    each case's attention coefficients as ``<case>_attention`` (one volume per gate) beside it."""
    from medseg.progress import track

    plans = Plans.load(Path(workdir) / "plans.json")
    if config_name is None:
        trained = [c for c in plans.configurations if available_folds(workdir, c)]
        if not trained:
            raise CheckpointError(f"{workdir}: no trained configuration (no runs/*/fold_*/checkpoint_final.pt)")
        config_name = "3d_fullres" if "3d_fullres" in trained else trained[0]
    config = plans.config(config_name)
    folds = folds if folds is not None else available_folds(workdir, config.key)
    if not folds:
        raise CheckpointError(f"{workdir}: configuration {config.key} has no finished fold")
    if save_attention and not config.architecture.blocks.attention_gates:
        gated = [k for k, c in plans.configurations.items() if c.architecture.blocks.attention_gates]
        raise MedsegError(f"{workdir}: configuration {config.key} has no attention gates to save"
                          + (f"; choose one that has: {', '.join(gated)}" if gated else ""))
    cases = find_inputs(inputs, len(plans.channel_names))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    models = load_models(workdir, plans, config, folds, device)
    written = []
    todo = [c for c in cases if overwrite or not (output / f"{c.case_id}{c.suffix}").exists()]
    if len(todo) < len(cases):
        log.info("skipping %d case(s) already predicted (use --overwrite to redo)", len(cases) - len(todo))
    for case in track(todo, total=len(todo), description="predict", enabled=progress):
        image, geometry = read_input(case, len(plans.channel_names))
        seg, probs, props = predict_case(models, image, geometry, config, step=step, tta=tta, device=device,
                                         attention=save_attention)
        out_path = output / f"{case.case_id}{case.suffix}"
        if save_probabilities:
            maps = export_probability_maps(probs, props, config)
            write_image(output / f"{case.case_id}_probabilities{case.suffix}", maps, geometry, np.float32)
        if save_attention:
            write_image(output / f"{case.case_id}_attention{case.suffix}", props["attention"], geometry, np.float32)
        write_image(out_path, seg, geometry, np.uint8)
        written.append(out_path)
    return written
