"""The faster CPU backends (medseg.inference.backends): the exported network computes what the torch
one does, int8 agrees in argmax, the export is cached and remade for a new checkpoint, a missing
package is a one-line error, and ``medseg predict --backend`` gives torch's labels."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.errors import MedsegError
from medseg.inference import backends
from medseg.inference.predictor import LoadedModel, load_models
from medseg.plans.schema import ChosenModel, InferenceChoice, Plans
from medseg.workdir import WorkDir

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def work(tiny_model, tmp_path_factory) -> WorkDir:
    """A copy of the tiny trained model (the exports are written into its run directory)."""
    dst = tmp_path_factory.mktemp("backends") / "wd"
    shutil.copytree(tiny_model, dst)
    return WorkDir(dst)


def _load(work: WorkDir, backend: str):
    plans = Plans.load(work.plans)
    config = plans.config("3d_fullres")
    return load_models(work, plans, config, [0], "cpu", backend=backend)[0], config


def _windows(work: WorkDir, config, n: int = 4) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(backends.calibration_windows(work, config, 0, n=n, seed=1)))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_fp32_backend_matches_torch_on_random_windows(work, backend):
    if not backends.available(backend):
        pytest.skip(f"{backend} is not installed")
    net, config = _load(work, "torch")
    fast, _ = _load(work, backend)
    x = torch.randn(3, 1, *config.patch_size)  # an odd batch: the last sliding-window batch may be smaller
    with torch.no_grad():
        expected = net(x)
    got = fast.eval()(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


def test_int8_agrees_with_torch_in_argmax(work):
    net, config = _load(work, "torch")
    fast, _ = _load(work, "onnxruntime-int8")
    x = _windows(work, config)
    with torch.no_grad():
        logits = net(x)
    top2 = logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) >= 0.5  # voxels where the tiny, barely trained model is not near a tie
    same = fast(x).argmax(1) == logits.argmax(1)
    assert same.float().mean().item() >= 0.9
    assert clear.float().mean().item() > 0.3 and same[clear].float().mean().item() >= 0.99


def test_export_is_cached_and_remade_for_a_new_checkpoint(work):
    run = work.run("3d_fullres", 0)
    _load(work, "onnxruntime")
    onnx, stamp = run.backend_model("fp32"), run.backend_model("fp32", suffix=".json")
    assert onnx.is_file() and stamp.is_file() and onnx.parent == run.backends
    before = onnx.stat().st_mtime_ns
    _load(work, "onnxruntime")
    assert onnx.stat().st_mtime_ns == before  # reused
    st = run.final.stat()
    os.utime(run.final, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a "new" checkpoint
    _load(work, "onnxruntime")
    assert onnx.stat().st_mtime_ns != before
    assert str(st.st_mtime_ns + 10**9) in stamp.read_text()


def test_missing_package_is_a_one_line_error(work, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(MedsegError, match=r"needs onnxruntime.*pip install 'medseg\[cpu-fast\]'"):
        _load(work, "onnxruntime")
    assert not backends.available("onnxruntime")


def test_unknown_backend_and_gpu_are_refused(work):
    with pytest.raises(MedsegError, match="expected one of torch, onnxruntime"):
        _load(work, "tensorrt")
    net, config = _load(work, "torch")
    with pytest.raises(MedsegError, match="runs on the CPU"):
        backends.backend_network(net, "onnxruntime", run=work.run("3d_fullres", 0), work=work, config=config,
                                 in_channels=1, device="cuda")


def test_model_json_chooses_the_backend_and_old_files_default_to_torch(work):
    old = InferenceChoice.model_validate({"mirroring": False, "decided": "old"})
    assert old.backend == "torch" and old.dice_backend == {}
    chosen = ChosenModel(members=["3d_fullres"], folds={"3d_fullres": [0]}, cv_dice=0.5, cv_dice_per_class={},
                         cv_cases=1, inference=InferenceChoice(backend="onnxruntime"), decided="test")
    chosen.save(work.model)
    try:
        assert LoadedModel.load(work.root).backend == "onnxruntime"
        assert LoadedModel.load(work.root, backend="torch").backend == "torch"
    finally:
        work.model.unlink()


def test_cli_predict_with_onnxruntime_gives_torchs_labels(work, tmp_path):
    from typer.testing import CliRunner

    from medseg.cli import app
    from medseg.io.image import read_image

    images = sorted((Path(work.dataset_path()) / "imagesTr").glob("*.nii.gz"))[:1]
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(images[0], src / images[0].name)
    labels = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        result = CliRunner().invoke(app, ["predict", "-i", str(src), "-o", str(out), "-m", str(work.root),
                                          "--backend", backend, "--no-tta", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        labels[backend] = np.asarray(read_image(next(out.glob("*.nii.gz")))[0])
    assert (labels["torch"] == labels["onnxruntime"]).mean() >= 0.995


def test_decide_backend_switches_only_within_the_tolerance():
    from medseg.orchestration.selection import decide_backend

    base = InferenceChoice(mirroring=False)
    fast = decide_backend(base, 0.900, {"openvino": 0.897, "onnxruntime": 0.900})
    assert fast.backend == "openvino" and fast.dice_torch == 0.900 and "within" in fast.backend_decided
    slow = decide_backend(base, 0.900, {"openvino": 0.890, "onnxruntime": 0.899})
    assert slow.backend == "onnxruntime"
    none = decide_backend(base, 0.900, {"openvino": 0.80})
    assert none.backend == "torch" and "beyond" in none.backend_decided and not none.mirroring


@pytest.fixture(scope="module")
def two_fold_cv(tmp_path_factory) -> WorkDir:
    """3d_fullres cross-validated on a 2-case dataset (2 folds of 1 epoch), for find-best --try-backends."""
    from helpers import make_msd_dataset
    from test_training import _tiny_plan

    from medseg.orchestration.crossval import parse_folds, train_folds

    root = tmp_path_factory.mktemp("cv_backends")
    _tiny_plan(make_msd_dataset(root / "ds", n_cases=2), root / "wd")
    train_folds(root / "wd", "3d_fullres", parse_folds(root / "wd", "3d_fullres", "all"), epochs=1)
    return WorkDir(root / "wd")


def test_find_best_without_try_backends_keeps_torch(two_fold_cv):
    from medseg.orchestration.selection import NOT_TRIED, find_best

    chosen, report = find_best(two_fold_cv)
    assert chosen.inference.backend == "torch" and chosen.inference.backend_decided == NOT_TRIED
    assert chosen.inference.dice_backend == {} and NOT_TRIED in report


def test_find_best_try_backends_records_the_choice_in_model_json(two_fold_cv, monkeypatch):
    from medseg.orchestration import selection

    chosen, report = selection.find_best(two_fold_cv, try_backends=["onnxruntime"])
    inf = ChosenModel.load(two_fold_cv.model).inference
    assert inf == chosen.inference and set(inf.dice_backend) == {"onnxruntime"}
    torch_dice = inf.dice_with_mirroring if inf.mirroring else inf.dice_without_mirroring
    assert inf.dice_torch == torch_dice
    cost = inf.dice_torch - inf.dice_backend["onnxruntime"]
    assert abs(cost) < 0.005  # the same network, exported
    assert inf.backend == "onnxruntime" and "within" in inf.backend_decided and inf.backend_decided in report
    assert not two_fold_cv.backend_trials.exists()  # the re-predictions are removed once evaluated
    # a backend worse than the tolerance: torch stays
    real = selection.BackendPredictions.probabilities

    def worse(self, key, case_id):
        p = real(self, key, case_id)
        return np.concatenate([p[:1] + p[1:].max(0, keepdims=True), p[1:]])  # background gains: less foreground

    monkeypatch.setattr(selection.BackendPredictions, "probabilities", worse)
    chosen, _ = selection.find_best(two_fold_cv, try_backends="auto")
    inf = chosen.inference
    assert inf.dice_torch > 2 * inf.tolerance  # the tiny model finds some foreground, which "worse" removes
    assert inf.dice_torch - inf.dice_backend["onnxruntime"] > inf.tolerance
    assert inf.backend == "torch" and "beyond" in inf.backend_decided
    assert ChosenModel.load(two_fold_cv.model).inference.backend == "torch"


def test_try_backends_skips_missing_packages(monkeypatch):
    from medseg.orchestration.selection import backend_candidates

    monkeypatch.setattr(backends, "available", lambda name: name == "onnxruntime")
    names, notes = backend_candidates("onnxruntime,torch,openvino")
    assert names == ["onnxruntime"] and len(notes) == 1 and "openvino skipped: not installed" in notes[0]
    with pytest.raises(MedsegError, match="expected one of"):
        backend_candidates(["tensorrt"])
