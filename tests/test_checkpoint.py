"""Checkpoint records: the typed contents round-trip through the plain dicts on disk, in the format
earlier versions wrote."""

from __future__ import annotations

import pytest
import torch

from medseg.errors import CheckpointError
from medseg.networks.checkpoint import (
    FinalCheckpoint,
    TrainingCheckpoint,
    TrainingState,
    load_checkpoint,
    load_training_checkpoint,
    save_checkpoint,
)

# the keys (in order) of checkpoint_latest.pt / checkpoint_best.pt and checkpoint_final.pt as
# medseg wrote them before the records existed
TRAINING_KEYS = ["model", "optimizer", "scaler", "torch_rng", "config", "fold", "epoch", "elapsed_s", "best_ema",
                 "ema", "history"]
FINAL_KEYS = ["model", "config", "fold", "epoch", "elapsed_s"]


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    return model, opt


def _old_format_dict(model, opt) -> dict:
    """A latest checkpoint exactly as the dict-based training loop built it."""
    state = {"epoch": 2, "elapsed_s": 12.5, "best_ema": 0.25, "ema": 0.3,
             "history": [{"epoch": 1, "lr": 0.01, "pseudo_dice": 0.2}, {"epoch": 2, "lr": 0.005, "pseudo_dice": 0.3}]}
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": None,
            "torch_rng": torch.get_rng_state(), "config": "3d_fullres", "fold": "0", **state}


def test_a_training_checkpoint_saves_as_the_dict_earlier_versions_wrote(tmp_path):
    model, opt = _model_and_optimizer()
    state = TrainingState(epoch=2, elapsed_s=12.5, best_ema=0.25, ema=0.3,
                          history=[{"epoch": 1, "lr": 0.01, "pseudo_dice": 0.2},
                                   {"epoch": 2, "lr": 0.005, "pseudo_dice": 0.3}])
    ckpt = TrainingCheckpoint(model.state_dict(), opt.state_dict(), None, torch.get_rng_state(), "3d_fullres", "0",
                              state)
    save_checkpoint(tmp_path / "new.pt", ckpt)
    save_checkpoint(tmp_path / "old.pt", _old_format_dict(model, opt))
    new, old = load_checkpoint(tmp_path / "new.pt"), load_checkpoint(tmp_path / "old.pt")
    assert isinstance(new, dict) and list(new) == list(old) == TRAINING_KEYS
    for k in ("scaler", "config", "fold", "epoch", "elapsed_s", "best_ema", "ema", "history"):
        assert new[k] == old[k], k
    assert torch.equal(new["torch_rng"], old["torch_rng"])
    assert all(torch.equal(new["model"][k], old["model"][k]) for k in old["model"])


def test_an_old_format_checkpoint_reads_as_a_record_and_round_trips(tmp_path):
    model, opt = _model_and_optimizer()
    save_checkpoint(tmp_path / "latest.pt", _old_format_dict(model, opt))
    ckpt = load_training_checkpoint(tmp_path / "latest.pt")
    assert ckpt.config == "3d_fullres" and ckpt.fold == "0" and ckpt.scaler is None
    assert ckpt.state == TrainingState(2, 12.5, 0.25, 0.3, [{"epoch": 1, "lr": 0.01, "pseudo_dice": 0.2},
                                                            {"epoch": 2, "lr": 0.005, "pseudo_dice": 0.3}])
    fresh = torch.nn.Linear(3, 2)
    fresh.load_state_dict(ckpt.model)
    assert torch.equal(fresh.weight, model.weight)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    fresh_opt.load_state_dict(ckpt.optimizer)
    momentum = [o.state_dict()["state"][0]["momentum_buffer"] for o in (fresh_opt, opt)]
    assert torch.equal(*momentum)
    again = TrainingCheckpoint.from_dict(ckpt.to_dict())
    assert again.state == ckpt.state and list(again.to_dict()) == TRAINING_KEYS


def test_a_checkpoint_without_a_scaler_entry_reads_as_none(tmp_path):
    model, opt = _model_and_optimizer()
    d = _old_format_dict(model, opt)
    del d["scaler"]
    assert TrainingCheckpoint.from_dict(d).scaler is None


def test_the_final_checkpoint_is_the_small_form(tmp_path):
    model, _ = _model_and_optimizer()
    save_checkpoint(tmp_path / "final.pt", FinalCheckpoint(model.state_dict(), "3d_fullres", "full", 3, 40.0))
    d = load_checkpoint(tmp_path / "final.pt")
    assert list(d) == FINAL_KEYS and d["epoch"] == 3 and d["fold"] == "full"
    back = FinalCheckpoint.from_dict(d)
    assert (back.config, back.fold, back.epoch, back.elapsed_s) == ("3d_fullres", "full", 3, 40.0)
    assert torch.equal(back.model["weight"], model.weight)


def test_resuming_from_a_final_or_foreign_checkpoint_names_the_file_and_the_missing_field(tmp_path):
    model, _ = _model_and_optimizer()
    save_checkpoint(tmp_path / "final.pt", FinalCheckpoint(model.state_dict(), "3d_fullres", "0", 3, 40.0))
    with pytest.raises(CheckpointError, match=r"final\.pt: not a resumable training checkpoint \(no 'optimizer'"):
        load_training_checkpoint(tmp_path / "final.pt")
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match=r"tensor\.pt: holds a Tensor"):
        load_training_checkpoint(tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_training_checkpoint(tmp_path / "missing.pt")


def test_a_cuda_runs_generator_state_is_saved_last_and_read_back(tmp_path):
    """A CUDA run also saves its device's generator state (resume restores both, from the CPU copies
    whatever ``map_location`` did); a CPU run's checkpoint keeps the earlier format."""
    model, opt = _model_and_optimizer()
    cuda_rng = torch.randint(0, 256, (16,), dtype=torch.uint8)  # what torch.cuda.get_rng_state() returns
    ckpt = TrainingCheckpoint(model.state_dict(), opt.state_dict(), None, torch.get_rng_state(), "3d_fullres", "0",
                              TrainingState(epoch=1), cuda_rng=cuda_rng)
    save_checkpoint(tmp_path / "cuda.pt", ckpt)
    assert list(load_checkpoint(tmp_path / "cuda.pt")) == [*TRAINING_KEYS, "cuda_rng"]
    back = load_training_checkpoint(tmp_path / "cuda.pt")
    assert torch.equal(back.cuda_rng, cuda_rng) and torch.equal(back.torch_rng, ckpt.torch_rng)
    save_checkpoint(tmp_path / "old.pt", _old_format_dict(model, opt))
    assert load_training_checkpoint(tmp_path / "old.pt").cuda_rng is None
