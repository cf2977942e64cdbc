"""Fine-tuning: plans transferred from a trained work directory (``plan --plans-from``), a run that
starts from its weights (``train --init-from``), with the encoder frozen for its first epochs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_nnunetv2_dataset, run_medseg
from test_training import _tiny_plan

from medseg import workflow
from medseg.errors import CheckpointError
from medseg.networks.checkpoint import load_checkpoint
from medseg.plans.schema import Plans
from medseg.training.loop import resolve_init_source, train_fold
from medseg.workdir import WorkDir


@pytest.fixture
def pretrained(msd_dataset, tmp_path_factory):
    """A tiny model trained on the one-channel synthetic dataset: fold ``full``, 1 epoch."""
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("pretrained") / "work"
    _tiny_plan(msd_dataset, work)
    train_fold(work, "3d_fullres", "full", epochs=1, num_workers=0)
    return work


def _final(work, fold):
    return load_checkpoint(WorkDir(work).run("3d_fullres", fold).final)["model"]


def test_transferred_plans_keep_the_network_and_take_the_new_datasets_normalisation(pretrained, tmp_path):
    new = make_nnunetv2_dataset(tmp_path / "new", channel_names=("T1", "CT"))
    work = tmp_path / "work"
    plans = workflow.plan(new, work, plans_from=pretrained, num_workers=1)
    source = Plans.load(WorkDir(pretrained).plans)
    a, b = source.config("3d_fullres"), plans.config("3d_fullres")
    for field in ("spacing", "patch_size", "batch_size", "architecture", "transpose_forward", "training"):
        assert getattr(a, field) == getattr(b, field), field
    assert plans.channel_names == ["T1", "CT"] and [n.scheme for n in b.normalization] == ["zscore", "ct"]
    assert plans.transferred_from == str(pretrained.resolve())
    assert "transferred from" in b.memory.decision and "first layer is re-initialised" in plans.recommendation
    assert list(WorkDir(work).preprocessed("3d_fullres").glob("*_seg.npy"))


def test_a_run_starts_from_the_trained_weights_and_the_frozen_encoder_does_not_move(pretrained, tmp_path):
    torch.set_num_threads(1)
    new = make_nnunetv2_dataset(tmp_path / "new")  # two channels: the first convolution cannot be copied
    work = tmp_path / "work"
    workflow.plan(new, work, plans_from=pretrained, num_workers=1)
    run = train_fold(work, "3d_fullres", 0, epochs=1, num_workers=0, init_from=str(pretrained),
                     freeze_encoder_epochs=1)
    meta = json.loads((run / "run.json").read_text())
    init = meta["init_from"]
    assert meta["freeze_encoder_epochs"] == 1
    assert init["checkpoint"].endswith("fold_full/checkpoint_final.pt") and len(init["sha256"]) == 64
    assert init["reinitialised"] == ["encoder.0.0.0.weight"] and init["loaded"] > 10
    before, after = _final(pretrained, "full"), _final(work, 0)
    moved = {k for k in after if k in before and before[k].shape == after[k].shape and not torch.equal(before[k], after[k])}
    encoder = {k for k in after if k.startswith("encoder.") and k.endswith("weight") and k not in init["reinitialised"]}
    assert encoder and not moved & encoder  # frozen: the transferred encoder weights are exactly the source's
    assert any(k.startswith("decoder.") for k in moved)  # the rest trained
    assert after["encoder.0.0.0.weight"].shape[1] == 2  # the re-initialised first layer takes both channels


def test_the_init_source_is_named_exactly_or_refused_in_one_line(pretrained, tmp_path):
    assert resolve_init_source(str(pretrained), "3d_fullres").parent.name == "fold_full"
    assert resolve_init_source(f"{pretrained}:3d_fullres:full", "2d").parent.name == "fold_full"
    with pytest.raises(CheckpointError, match="fold 3 of 3d_fullres .* has finished training"):
        resolve_init_source(f"{pretrained}:3d_fullres:3", "3d_fullres")
    result = run_medseg("train", pretrained, "-f", "0", "--epochs", "1", "--init-from", f"{tmp_path}/nothing")
    assert result.returncode == 2 and "plans" in result.stderr.strip().splitlines()[-1]
