"""Training loop contracts: exact resume, checkpoints, budgets, splits."""

from __future__ import annotations

import json

import pytest
import torch

from medseg import workflow
from medseg.errors import CheckpointError
from medseg.networks.checkpoint import load_checkpoint
from medseg.plans.schema import Plans
from medseg.training.loop import poly_lr, train_fold
from medseg.training.splits import make_splits


def _tiny_plan(dataset, workdir):
    workflow.plan(dataset, workdir, configs=["3d_fullres"], num_workers=1, throughput=1e12, preprocess=False)
    plans = Plans.load(workdir / "plans.json")
    c = plans.configurations["3d_fullres"]
    c.patch_size = [16, 16, 16]
    c.batch_size = 2
    c.architecture.strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    c.architecture.kernel_sizes = [[3, 3, 3]] * 3
    c.architecture.features = [4, 8, 16]
    c.training.iterations_per_epoch = 3
    c.training.val_iterations = 2
    plans.save(workdir / "plans.json")
    workflow.preprocess(workdir, num_workers=1)
    return plans


def _weights(run):
    return load_checkpoint(run / "checkpoint_latest.pt")["model"]


def test_resume_gives_identical_weights(msd_dataset, tmp_path):
    torch.set_num_threads(1)
    a, b = tmp_path / "a", tmp_path / "b"
    _tiny_plan(msd_dataset, a)
    _tiny_plan(msd_dataset, b)
    run_a = train_fold(a, "3d_fullres", 0, epochs=2)
    train_fold(b, "3d_fullres", 0, epochs=1)
    run_b = train_fold(b, "3d_fullres", 0, epochs=2, resume=True)
    wa, wb = _weights(run_a), _weights(run_b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    log = [json.loads(line) for line in (run_b / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert (run_b / "curves.png").stat().st_size > 0
    assert (run_b / "checkpoint_final.pt").exists() and (run_b / "checkpoint_best.pt").exists()


def test_existing_run_needs_resume_and_resume_needs_a_run(msd_dataset, tmp_path):
    _tiny_plan(msd_dataset, tmp_path)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train_fold(tmp_path, "3d_fullres", 0, epochs=1, resume=True)
    train_fold(tmp_path, "3d_fullres", 0, epochs=1)
    with pytest.raises(CheckpointError, match="--resume"):
        train_fold(tmp_path, "3d_fullres", 0, epochs=1)
    run = train_fold(tmp_path, "3d_fullres", 0, epochs=2, resume=True)  # extend a finished run
    assert load_checkpoint(run / "checkpoint_final.pt")["epoch"] == 2


def test_checkpoints_load_with_weights_only(msd_dataset, tmp_path):
    _tiny_plan(msd_dataset, tmp_path)
    run = train_fold(tmp_path, "3d_fullres", 1, epochs=1)
    for name in ("latest", "best", "final"):
        state = torch.load(run / f"checkpoint_{name}.pt", weights_only=True)
        assert "model" in state


def test_poly_schedule_and_splits_are_well_formed():
    assert poly_lr(0.01, 0.0) == 0.01
    assert poly_lr(0.01, 1.0) == 0.0
    assert poly_lr(0.01, 0.5) == pytest.approx(0.01 * 0.5**0.9)
    ids = [f"c{i:02d}" for i in range(23)]
    splits = make_splits(ids, seed=3)
    assert len(splits) == 5
    vals = [c for s in splits for c in s["val"]]
    assert sorted(vals) == ids
    for s in splits:
        assert not set(s["train"]) & set(s["val"])
    assert make_splits(ids, seed=3) == splits


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(msd_dataset, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO_ROOT

    torch.set_num_threads(1)
    a, b = tmp_path / "a", tmp_path / "b"
    _tiny_plan(msd_dataset, a)
    _tiny_plan(msd_dataset, b)
    run_a = train_fold(a, "3d_fullres", 0, epochs=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "medseg", "train", str(b), "-c", "3d_fullres", "-f", "0",
                             "--epochs", "8", "--no-validation"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = b / "runs" / "3d_fullres" / "fold_0" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 1):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_b = log.parent
    assert not (run_b / "checkpoint_final.pt").exists(), "the run finished before it could be killed"
    train_fold(b, "3d_fullres", 0, epochs=8, resume=True)
    wa, wb = _weights(run_a), _weights(run_b)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert [json.loads(x)["epoch"] for x in log.read_text().splitlines()] == list(range(1, 9))


def test_a_variant_trains_into_its_own_run_and_shares_the_preprocessed_data(msd_dataset, tmp_path):
    from medseg.inference.predictor import predict_folder

    plans = _tiny_plan(msd_dataset, tmp_path)
    base = plans.configurations["3d_fullres"]
    variant = base.model_copy(deep=True, update={"variant": "attention"})
    variant.architecture.blocks.attention_gates = True
    variant.architecture.blocks.squeeze_excitation = "cse"
    plans.configurations[variant.key] = variant
    plans.save(tmp_path / "plans.json")
    run = train_fold(tmp_path, "3d_fullres_attention", 0, epochs=1)
    assert run == tmp_path / "runs" / "3d_fullres_attention" / "fold_0"
    assert not (tmp_path / "preprocessed" / "3d_fullres_attention").exists()
    written = predict_folder(msd_dataset / "imagesTr", tmp_path / "pred", tmp_path, config_name="3d_fullres_attention",
                             tta=False)
    assert len(written) == 4


def test_the_batch_sources_are_closed_when_training_ends_or_fails(msd_dataset, tmp_path, monkeypatch):
    from medseg.training import loop
    from medseg.training.data import BatchSource

    closed = []
    real_close = BatchSource.close

    def close(self):
        closed.append("train" if self.augment else "val")
        real_close(self)

    monkeypatch.setattr(BatchSource, "close", close)
    _tiny_plan(msd_dataset, tmp_path)
    train_fold(tmp_path, "3d_fullres", 0, epochs=1)
    assert set(closed) == {"train", "val"}
    closed.clear()

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(loop, "plot_curves", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        train_fold(tmp_path, "3d_fullres", 0, epochs=2, resume=True)
    assert set(closed) == {"train", "val"}
    assert load_checkpoint(tmp_path / "runs" / "3d_fullres" / "fold_0" / "checkpoint_final.pt")["epoch"] == 1


def test_the_latest_checkpoint_holds_the_best_smoothed_pseudo_dice_so_far(msd_dataset, tmp_path):
    """A resumed run compares its next epochs with the same best as an uninterrupted one."""
    _tiny_plan(msd_dataset, tmp_path)
    run = train_fold(tmp_path, "3d_fullres", 0, epochs=3)
    latest = load_checkpoint(run / "checkpoint_latest.pt")
    assert latest["best_ema"] == max(h["pseudo_dice_ema"] for h in latest["history"])
    assert load_checkpoint(run / "checkpoint_best.pt")["best_ema"] == latest["best_ema"]
