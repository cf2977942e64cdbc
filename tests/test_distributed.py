"""Data-parallel training with torch.distributed (gloo on the CPU): two processes train the
weights one process trains at the same global batch; a killed rank ends the run with one clear
error, and the run resumes exactly after it.

Tolerance for "the same weights": 1e-5 absolute, on weights of magnitude ~0.1–1. The two runs
compute the same sums in a different order (each rank's convolution gradients over half the batch,
then gloo's all-reduce, against one process's gradients over the whole batch), so float32 rounding
differs at ~1e-7 per step (measured: 6e-8 after 6 steps); a wrong split of the work (per-rank
batch Dice, gradients summed instead of averaged, a rank training on the other's elements) moves
the weights by a learning-rate step, lr 1e-2 × gradients ~1e-1 = ~1e-3, a hundred times the tolerance.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT
from monai.losses import DiceCELoss
from test_training import _tiny_plan

from medseg.errors import MedsegError
from medseg.networks.checkpoint import load_checkpoint
from medseg.plans.schema import Plans
from medseg.training import distributed
from medseg.training.data import BatchSource
from medseg.training.distributed import from_environment, rank_elements
from medseg.training.loop import train_fold
from medseg.training.losses import GroupDiceCELoss
from medseg.training.splits import fold_case_ids
from medseg.utils import atomic_write_json
from medseg.workdir import WorkDir

TOLERANCE = 1e-5


def _final_weights(work: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(work / "runs" / "3d_fullres" / "fold_0" / "checkpoint_final.pt")["model"]


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _log(work: Path) -> list[dict]:
    path = work / "runs" / "3d_fullres" / "fold_0" / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_environment_says_whether_and_how_a_process_joins_a_group():
    assert from_environment({}) is None
    assert from_environment({"RANK": "0", "WORLD_SIZE": "1"}) is None  # torchrun with one process
    env = from_environment({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                            "MASTER_ADDR": "node1", "MASTER_PORT": "29500"})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 1, 4, 2)
    assert (env.master_addr, env.master_port, env.source, env.is_main) == ("node1", 29500, "torchrun", False)
    # srun, two nodes of two tasks: the master is the first node, the port follows the job id
    env = from_environment({"SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "4",
                            "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "gpu7,gpu8",
                            "SLURM_JOB_ID": "123"})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (2, 0, 4, 2)
    assert (env.master_addr, env.master_port, env.source) == ("gpu7", 20123, "slurm")
    # a one-task step (every ordinary Slurm job) is no group
    assert from_environment({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_NODELIST": "n"}) is None
    with pytest.raises(MedsegError, match="MASTER_ADDR, MASTER_PORT not set"):
        from_environment({"RANK": "0", "WORLD_SIZE": "2"})


def test_the_ranks_share_out_the_global_batch():
    assert [rank_elements(5, r, 2) for r in range(2)] == [range(0, 2), range(2, 5)]
    assert [rank_elements(4, r, 4) for r in range(4)] == [range(i, i + 1) for i in range(4)]
    with pytest.raises(MedsegError, match="batch size 2 cannot be split over 3 processes"):
        rank_elements(2, 0, 3)


def test_the_ranks_elements_together_are_the_single_process_batch(msd_dataset, tmp_path):
    plans = _tiny_plan(msd_dataset, tmp_path / "wd")
    folder = WorkDir(tmp_path / "wd").preprocessed(plans.config("3d_fullres").data_config)
    cases = sorted(p.name[:-4] for p in folder.glob("*.npy") if not p.name.endswith("_seg.npy"))
    kw = dict(patch_size=(16, 16, 16), batch_size=5, seed=3, oversample_foreground=0.4)
    whole = BatchSource(folder, cases, **kw).batch(2, 1)
    parts = [BatchSource(folder, cases, elements=rank_elements(5, r, 2), **kw).batch(2, 1) for r in range(2)]
    assert torch.equal(torch.from_numpy(whole["data"]), torch.cat([torch.from_numpy(p["data"]) for p in parts]))
    assert (whole["target"] == [*parts[0]["target"], *parts[1]["target"]]).all()
    assert whole["case_ids"] == parts[0]["case_ids"] + parts[1]["case_ids"]
    # the forced-foreground elements are the last ones of the global batch, whichever rank holds them
    assert all((p["target"][-1] > 0).any() for p in parts[1:])


def test_the_group_loss_is_monais_dice_ce_in_one_process():
    torch.manual_seed(0)
    logits = torch.randn(3, 3, 8, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (3, 1, 8, 8, 8))
    ours = GroupDiceCELoss()(logits, target)
    (g_ours,) = torch.autograd.grad(ours, logits)
    monai = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5,
                       smooth_dr=1e-5)(logits, target)
    (g_monai,) = torch.autograd.grad(monai, logits)
    assert torch.allclose(ours, monai, atol=1e-6)
    assert torch.allclose(g_ours, g_monai, atol=1e-8)


def test_two_processes_train_the_weights_of_one_at_the_same_global_batch(msd_dataset, tmp_path):
    torch.set_num_threads(1)
    one, two = tmp_path / "one", tmp_path / "two"
    _tiny_plan(msd_dataset, one)
    _tiny_plan(msd_dataset, two)
    train_fold(one, "3d_fullres", 0, epochs=2, num_workers=0)
    distributed.launch(2, train_fold, two, "3d_fullres", 0, epochs=2, num_workers=0)
    assert _max_difference(_final_weights(one), _final_weights(two)) < TOLERANCE
    # rank 0 logged the global batch's loss and validated; run.json says how the run was made
    for a, b in zip(_log(one), _log(two), strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5 and abs(a["val_loss"] - b["val_loss"]) < 1e-5
    assert json.loads((two / "runs" / "3d_fullres" / "fold_0" / "run.json").read_text())["world_size"] == 2


def _medseg(*args: str | Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "medseg", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _ranks_of(pid: int) -> list[int]:
    """The launched ranks: the spawned children of the launching process."""
    out = subprocess.run(["pgrep", "-P", str(pid), "-f", "spawn_main"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_killed_rank_ends_the_run_with_one_clear_error_and_the_run_resumes_exactly(msd_dataset, tmp_path):
    torch.set_num_threads(1)
    one, two = tmp_path / "one", tmp_path / "two"
    _tiny_plan(msd_dataset, one)
    _tiny_plan(msd_dataset, two)
    epochs = 8
    # the reference is the same two-process run uninterrupted: after 8 epochs the one-process
    # weights differ by rounding alone (2.2e-5 measured), while a resumed run must equal its own kind
    distributed.launch(2, train_fold, one, "3d_fullres", 0, epochs=epochs, num_workers=0)
    train = ("train", two, "-c", "3d_fullres", "-f", "0", "--epochs", epochs, "--nproc", 2, "--workers", 0,
             "--no-validation")
    run = _medseg(*train)
    log = two / "runs" / "3d_fullres" / "fold_0" / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and log.read_text()) and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    ranks = _ranks_of(run.pid)
    assert len(ranks) == 2 and run.poll() is None, "the run ended before a rank could be killed"
    os.kill(ranks[-1], signal.SIGKILL)
    t_kill = time.monotonic()
    _, stderr = run.communicate(timeout=distributed.DEFAULT_TIMEOUT_S)
    assert time.monotonic() - t_kill < 60  # the launcher notices at once, not after the collective timeout
    assert run.returncode == 2
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert errors == [errors[0]] and "rank" in errors[0] and "of 2 was killed by SIGKILL" in errors[0], stderr
    assert "Traceback" not in stderr
    done = len(_log(two))
    assert 1 <= done < epochs
    resumed = _medseg(*train, "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert [r["epoch"] for r in _log(two)] == list(range(1, epochs + 1))
    assert _max_difference(_final_weights(one), _final_weights(two)) < 1e-7


def test_medseg_train_started_by_torchrun_joins_the_group_from_the_environment(msd_dataset, tmp_path):
    torch.set_num_threads(1)
    one, two = tmp_path / "one", tmp_path / "two"
    for work in (one, two):
        plans = _tiny_plan(msd_dataset, work)
        ids = sorted(p.stem for p in WorkDir(work).preprocessed(plans.config("3d_fullres").data_config).glob("*.json"))
        atomic_write_json(WorkDir(work).splits, [{"train": ids[:2], "val": ids[2:]}])  # two cases to share out
    train_fold(one, "3d_fullres", 0, epochs=2, num_workers=0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "medseg", "train", str(two), "-c", "3d_fullres", "-f", "0", "--epochs", "2",
                           "--workers", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _max_difference(_final_weights(one), _final_weights(two)) < TOLERANCE
    assert proc.stderr.count("fold 0 done") == 1  # rank 0 alone reports
    # the ranks shared out the validation cases, rank 0 reported on all of them
    plans = Plans.load(WorkDir(two).plans)
    _, val_ids = fold_case_ids(WorkDir(two), plans, plans.config("3d_fullres"), 0)
    run = WorkDir(two).run("3d_fullres", 0)
    assert len(val_ids) == 2 and run.validated and all(run.val_prediction(c).exists() for c in val_ids)
    assert json.loads((run.val_report / "timing.json").read_text())["cases"] == len(val_ids)


def _fails_on_rank_one() -> str:
    if os.environ["RANK"] == "1":
        raise MedsegError("rank one cannot go on")
    return "rank 0 done"


def test_a_failing_rank_is_one_error_naming_it_and_a_batch_too_small_is_refused_before_launching(
        msd_dataset, tmp_path):
    with pytest.raises(MedsegError, match=r"^distributed training failed: rank 1 of 2 exited with code 1: "
                                          r"rank one cannot go on$"):
        distributed.launch(2, _fails_on_rank_one)
    _tiny_plan(msd_dataset, tmp_path / "wd")  # batch 2
    proc = _medseg("train", tmp_path / "wd", "-c", "3d_fullres", "-f", "0", "--nproc", "3")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert stderr.strip().splitlines() == ["error: the plan's batch size 2 cannot be split over 3 processes; use at "
                                           "most 2 processes or raise batch_size in plans.json"]
    assert not WorkDir(tmp_path / "wd").run("3d_fullres", 0).path.exists()
