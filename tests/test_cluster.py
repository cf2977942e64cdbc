"""Batch jobs on a real one-node Slurm (tests/slurm_cluster.py) through submitit: a fold array equals
local training, a signalled or requeued job resumes to the uninterrupted weights, find-best waits
for the folds and is stopped by a failed one, sharded prediction equals unsharded. Plus the
settings and the scheduler-unreachable error, which need no cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
import torch
from helpers import make_msd_dataset
from test_training import _tiny_plan

from medseg.cluster.config import ClusterConfig, parse_slurm_options
from medseg.cluster.jobs import FindBestTask, job_table, read_registry
from medseg.cluster.slurm import query as slurm_query
from medseg.errors import MedsegError
from medseg.networks.checkpoint import load_checkpoint
from medseg.orchestration.crossval import train_folds
from medseg.training.loop import train_fold
from medseg.utils import atomic_write_json
from medseg.workdir import WorkDir

needs_slurm = pytest.mark.skipif(not slurm_cluster.available() and not os.environ.get("MEDSEG_REQUIRE_SLURM"),
                                 reason="Slurm not installed (.ci/run installs slurm-wlm)")
JOB = ["--executor", "slurm", "--cpus-per-job", "1", "--time", "30"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    subprocess.run(["scancel", "--user", "root"], capture_output=True)
    cluster.stop()
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous


def _medseg(*args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "medseg", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"medseg {' '.join(map(str, args))}: rc {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def _scontrol(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True).stdout
    return dict(t.split("=", 1) for t in out.split() if "=" in t)


def _wait(condition, what: str, cluster, timeout: float = 240.0, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last job states {_last_states})\n{cluster.logs()}")


_last_states: dict[str, str | None] = {}


def _ended(job_ids: list[str]):
    known = slurm_query(job_ids)
    states = {j: known[j].state if j in known else None for j in job_ids}
    _last_states.update(states)
    return states if all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for s in states.values()) else None


def _job_log(work: Path) -> str:
    return "\n".join(f"--- {r.name} ({r.job_id})\n" + (Path(r.stderr).read_text()[-2500:] if Path(r.stderr).exists()
                                                        else "(no log)") for r in read_registry(WorkDir(work)))


def _two_fold_work(root: Path) -> Path:
    ds = make_msd_dataset(root / "ds", n_cases=4)
    work = root / "wd"
    _tiny_plan(ds, work)
    ids = sorted(p.stem for p in WorkDir(work).preprocessed("3d_fullres").glob("*.json"))
    atomic_write_json(WorkDir(work).splits, [{"train": ids[:2], "val": ids[2:]}, {"train": ids[2:], "val": ids[:2]}])
    return work


def _final_weights(work: Path, fold: int, which: str = "final") -> dict[str, torch.Tensor]:
    return load_checkpoint(WorkDir(work).run("3d_fullres", fold).checkpoint(which))["model"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


# ---------------------------------------------------------------- no cluster needed


def test_settings_merge_file_and_options(tmp_path):
    work = WorkDir(tmp_path)
    ClusterConfig(partition="gpu", gpus_per_job=1, time_min=120, slurm={"constraint": "a100"}).save(work.cluster_config)
    merged = ClusterConfig.load(work.cluster_config).merged(time_min=30, mem_gb=16, partition=None,
                                                           slurm=parse_slurm_options(["exclusive=", "nice=5"]))
    assert (merged.partition, merged.gpus_per_job, merged.time_min, merged.mem_gb) == ("gpu", 1, 30, 16)
    params = merged.sbatch_parameters()
    assert params["gpus_per_node"] == 1 and params["mem"] == "16384M" and params["time"] == 30
    assert params["additional_parameters"] == {"requeue": True, "kill-on-invalid-dep": "yes", "constraint": "a100",
                                               "exclusive": True, "nice": "5"}
    with pytest.raises(MedsegError, match="KEY=VALUE"):
        parse_slurm_options(["constraint"])
    (tmp_path / "cluster.json").write_text('{"gpus": 2}')
    with pytest.raises(MedsegError, match="cluster.json: gpus"):
        ClusterConfig.load(work.cluster_config)


def test_a_cascade_stage_is_a_second_array_after_its_previous_stage(tmp_path, monkeypatch):
    """The dependency graph alone (the submissions are recorded, not sent; the real sbatch path is
    the cluster tests' below)."""
    from medseg.cluster import jobs

    sent = []

    def record(work, batch, cluster, *, after=(), gpus=True, resources=None):
        ids = [f"{len(sent) + 1}_{k}" for k in range(len(batch))] if len(batch) > 1 else [f"{len(sent) + 1}"] * len(batch)
        sent.append(([j.name for j in batch], sorted(after)))
        return ids

    monkeypatch.setattr(jobs, "submit", record)
    ids = jobs.submit_training(tmp_path, ["3d_lowres", "3d_cascade_fullres", "2d"], "all", ClusterConfig(),
                               after=["9"], num_folds=2)
    assert sent == [
        (["train 3d_lowres fold 0", "train 3d_lowres fold 1", "train 2d fold 0", "train 2d fold 1"], ["9"]),
        (["train 3d_cascade_fullres fold 0", "train 3d_cascade_fullres fold 1"], ["1_0", "1_1", "9"]),
        (["cross-validation report 3d_lowres,3d_cascade_fullres,2d"], ["1_0", "1_1", "1_2", "1_3", "2_0", "2_1", "9"]),
    ]
    assert ids == {"train": ["1_0", "1_1", "1_2", "1_3", "2_0", "2_1"], "cv-report": ["3"]}


def test_a_distributed_fold_is_one_job_of_nodes_times_tasks(tmp_path, monkeypatch):
    from medseg.cluster import jobs

    assert jobs.distributed_resources() == {} == jobs.distributed_resources(nodes=1, tasks_per_node=1)
    assert jobs.distributed_resources(nodes=2, gpus_per_node=4) == {
        "nodes": 2, "ntasks_per_node": 4, "gpus_per_node": 4, "srun_args": ["--kill-on-bad-exit=1"]}
    assert jobs.distributed_resources(tasks_per_node=2) == {"nodes": 1, "ntasks_per_node": 2,
                                                            "srun_args": ["--kill-on-bad-exit=1"]}
    with pytest.raises(MedsegError, match="one process per GPU"):
        jobs.distributed_resources(gpus_per_node=2, tasks_per_node=3)
    sent = []
    monkeypatch.setattr(jobs, "submit", lambda work, batch, cluster, *, after=(), gpus=True, resources=None:
                        sent.append((len(batch), resources)) or [str(len(sent))] * len(batch))
    jobs.submit_training(tmp_path, ["3d_fullres"], "all", ClusterConfig(), num_folds=2, nodes=2, gpus_per_node=4)
    assert sent[0] == (2, jobs.distributed_resources(nodes=2, gpus_per_node=4))  # each fold one job of 8 ranks


def test_jobs_without_a_reachable_scheduler_is_one_line_error(tmp_path):
    work = WorkDir(tmp_path)
    work.jobs.mkdir()
    work.job_registry.write_text(json.dumps({"job_id": "7", "kind": "train", "name": "train 3d_fullres fold 0",
                                             "stdout": "x", "stderr": "y", "submitted": "now"}) + "\n")
    env = {**os.environ, "SLURM_CONF": str(tmp_path / "absent.conf")}
    proc = subprocess.run([sys.executable, "-m", "medseg", "jobs", str(tmp_path)], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: slurm: "), proc.stderr
    proc = subprocess.run([sys.executable, "-m", "medseg", "train", str(tmp_path), "--partition", "gpu"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--partition needs --executor slurm" in proc.stderr


# ---------------------------------------------------------------- on the test cluster


@needs_slurm
@pytest.mark.slow
def test_fold_array_equals_local_and_find_best_waits_for_it(slurm, tmp_path):
    torch.set_num_threads(1)
    local, cluster = _two_fold_work(tmp_path / "local"), _two_fold_work(tmp_path / "cluster")
    train_folds(local, "3d_fullres", [0, 1], epochs=2)
    t = time.monotonic()
    _medseg("train", cluster, "-c", "3d_fullres", "-f", "all", "--epochs", "2", *JOB)
    _medseg("find-best", cluster, *JOB)
    records = read_registry(WorkDir(cluster))
    assert [r.kind for r in records] == ["train", "train", "cv-report", "find-best"]
    train_ids = [r.job_id for r in records if r.kind == "train"]
    assert len({j.split("_")[0] for j in train_ids}) == 1  # one array
    find_best = records[-1]
    assert set(find_best.depends_on) == {r.job_id for r in records[:3]}
    states = _wait(lambda: _ended([r.job_id for r in records]), "the array, crossval and find-best", slurm)
    assert set(states.values()) == {"COMPLETED"}, (states, _job_log(cluster))
    started = {r.kind: _scontrol(r.job_id) for r in records}
    assert started["find-best"]["StartTime"] >= max(_scontrol(j)["EndTime"] for j in train_ids)
    print(f"slurm array of 2 folds + crossval + find-best: {time.monotonic() - t:.1f} s")
    for fold in (0, 1):
        _assert_same_weights(_final_weights(local, fold), _final_weights(cluster, fold))
    runs = WorkDir(cluster).runs("3d_fullres")
    assert _files(runs) == _files(WorkDir(local).runs("3d_fullres"))
    a = json.loads((WorkDir(local).crossval("3d_fullres").report / "summary.json").read_text())
    b = json.loads((WorkDir(cluster).crossval("3d_fullres").report / "summary.json").read_text())
    assert a == b
    assert json.loads(WorkDir(cluster).model.read_text())["members"] == ["3d_fullres"]
    table = job_table(cluster)
    assert [row.state for row in table] == ["COMPLETED"] * 4
    assert table[0].progress == "trained, validated"
    shown = _medseg("jobs", cluster).stdout
    assert "train 3d_fullres fold 1" in shown and "find-best" in shown
    # a second submission finds every fold done and submits no training
    _medseg("train", cluster, "-c", "3d_fullres", "-f", "all", "--epochs", "2", *JOB)
    assert [r.kind for r in read_registry(WorkDir(cluster))][4:] == ["cv-report"]


@needs_slurm
@pytest.mark.slow
def test_a_fold_trained_by_two_srun_tasks_has_the_single_process_weights(slurm, tmp_path):
    """``--nproc 2`` with ``--executor slurm``: one job, two tasks started by srun, which join one
    gloo group from Slurm's variables (tolerance as in test_distributed)."""
    from test_distributed import TOLERANCE, _max_difference

    torch.set_num_threads(1)
    local, cluster = _two_fold_work(tmp_path / "local"), _two_fold_work(tmp_path / "cluster")
    train_fold(local, "3d_fullres", 0, epochs=2, num_workers=0)
    _medseg("train", cluster, "-c", "3d_fullres", "-f", "0", "--epochs", "2", "--workers", "0", "--no-validation",
            "--nproc", "2", *JOB)
    (record,) = read_registry(WorkDir(cluster))
    states = _wait(lambda: _ended([record.job_id]), "the two-task training job", slurm)
    assert states == {record.job_id: "COMPLETED"}, _job_log(cluster)
    assert _scontrol(record.job_id)["NumTasks"] == "2"
    assert _max_difference(_final_weights(local, 0), _final_weights(cluster, 0)) < TOLERANCE
    run = WorkDir(cluster).run("3d_fullres", 0)
    assert json.loads(run.run_json.read_text())["world_size"] == 2


@needs_slurm
@pytest.mark.slow
def test_signalled_and_requeued_training_resumes_to_uninterrupted_weights(slurm, tmp_path):
    torch.set_num_threads(1)
    local, cluster = _two_fold_work(tmp_path / "local"), _two_fold_work(tmp_path / "cluster")
    epochs = 40
    train_fold(local, "3d_fullres", 0, epochs=epochs)
    _medseg("train", cluster, "-f", "0", "--epochs", epochs, "--no-validation", *JOB)
    (record,) = read_registry(WorkDir(cluster))
    job, run = record.job_id, WorkDir(cluster).run("3d_fullres", 0)

    def epochs_done() -> int:
        return len(run.log.read_text().splitlines()) if run.log.exists() else 0

    def restarted(n: int):
        info = _scontrol(job)
        if int(info.get("Restarts", 0)) >= n and info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            # Slurm holds a requeued job ~2 minutes before it may start; the test releases it now
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        return int(info.get("Restarts", 0)) >= n and info.get("JobState") == "RUNNING"

    # 1. Slurm's time-limit/preemption signal (what --signal=USR2@N sends): submitit requeues the job
    _wait(lambda: epochs_done() >= 3, "3 epochs", slurm)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    _wait(lambda: restarted(1), "the requeue after USR2", slurm)
    # 2. an administrator's requeue (SIGTERM, then the job restarts from its batch script)
    first = epochs_done()
    _wait(lambda: epochs_done() >= first + 3 or run.final.exists(), "3 more epochs", slurm)
    if not run.final.exists():
        subprocess.run(["scontrol", "requeue", job], check=True)
        _wait(lambda: restarted(2), "the scontrol requeue", slurm)
    states = _wait(lambda: _ended([job]), "the training job", slurm)
    assert states[job] == "COMPLETED", _job_log(cluster)
    log = Path(record.stderr).read_text()
    assert "this job is preempted" in log and "resumed" in log, log[-3000:]
    restarts = int(_scontrol(job)["Restarts"])
    print(f"training job requeued {restarts} time(s)")
    assert restarts >= 1
    _assert_same_weights(_final_weights(local, 0), _final_weights(cluster, 0))
    history = [json.loads(ln) for ln in run.log.read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))


@needs_slurm
@pytest.mark.slow
def test_failed_fold_stops_find_best_with_a_clear_message(slurm, tmp_path):
    cluster = _two_fold_work(tmp_path)
    blocker = WorkDir(cluster).run("3d_fullres", 1).path
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder")  # fold 1 cannot write its run: a real error, not a preemption
    _medseg("train", cluster, "-f", "all", "--epochs", "1", *JOB)
    _medseg("find-best", cluster, *JOB)
    records = read_registry(WorkDir(cluster))
    states = _wait(lambda: _ended([r.job_id for r in records]), "the jobs to end", slurm)
    by_name = {r.name: states[r.job_id] for r in records}
    assert by_name["train 3d_fullres fold 0"] == "COMPLETED"
    assert by_name["train 3d_fullres fold 1"] == "FAILED"
    assert by_name["find-best"] == "CANCELLED"
    assert _scontrol(records[1].job_id).get("Restarts") == "0"  # not requeued
    rows = {row.name: row for row in job_table(cluster)}
    assert rows["find-best"].state.endswith(f"train 3d_fullres fold 1 ({records[1].job_id}) failed"), rows
    with pytest.raises(MedsegError, match=r"3d_fullres fold 1 is not trained and validated \(job "):
        FindBestTask(str(cluster))()


def _predict_inputs(root: Path, n: int = 5) -> Path:
    ds = make_msd_dataset(root / "ds", n_cases=n)
    return ds / "imagesTr"


@needs_slurm
@pytest.mark.slow
def test_sharded_predict_equals_unsharded_and_a_killed_shard_rerun_completes(slurm, tiny_model, tmp_path):
    from medseg.inference.predictor import predict_folder

    inputs = _predict_inputs(tmp_path)
    whole = tmp_path / "whole"
    predict_folder(inputs, whole, tiny_model, tta=False)
    sharded, killed = tmp_path / "sharded", tmp_path / "killed"
    for out in (sharded, killed):
        _medseg("predict", "-i", inputs, "-o", out, "-m", tiny_model, "--no-tta", "--shards", "3", *JOB)
    records = [r for r in read_registry(WorkDir(tiny_model)) if r.kind == "predict"]
    assert [r.part for r in records] == [0, 1, 2, 0, 1, 2]
    subprocess.run(["scancel", records[4].job_id], check=True)  # shard 1 of the second set
    others = [r.job_id for i, r in enumerate(records) if i != 4]
    states = _wait(lambda: _ended(others), "the shards", slurm)
    assert set(states.values()) == {"COMPLETED"}, _job_log(tiny_model)
    # Slurm drops an array task cancelled while pending; one cancelled while running shows CANCELLED
    cancelled = slurm_query([records[4].job_id]).get(records[4].job_id)
    assert cancelled is None or cancelled.state == "CANCELLED"
    assert not (killed / "predict_summary.json").exists() or len(
        json.loads((killed / "predict_summary.json").read_text())["cases"]) < 5
    _medseg("predict", "-i", inputs, "-o", killed, "-m", tiny_model, "--no-tta", "--num-parts", "3", "--part", "1")
    for out in (sharded, killed):
        assert {p.name for p in out.glob("*.nii.gz")} == {p.name for p in whole.glob("*.nii.gz")}
        for p in whole.glob("*.nii.gz"):
            import nibabel as nib

            assert (nib.load(p).get_fdata() == nib.load(out / p.name).get_fdata()).all(), p.name
        _assert_same_summary(out, whole)


def _assert_same_summary(out: Path, reference: Path) -> None:
    """Equal but for the QC score's last float32 digits: the jobs compute it on 1 CPU thread, the
    reference on this process's threads, and a float32 sum's order follows the threads."""
    import pandas as pd

    a, b = (json.loads((d / "predict_summary.json").read_text()) for d in (out, reference))
    assert [c["qc_score"] for c in a["cases"]] == pytest.approx([c["qc_score"] for c in b["cases"]], rel=1e-6)
    for summary in (a, b):
        for case in summary["cases"]:
            case.pop("qc_score")
    assert a == b
    csv_a, csv_b = (pd.read_csv(d / "predict_summary.csv") for d in (out, reference))
    pd.testing.assert_frame_equal(csv_a, csv_b, rtol=1e-6)


@needs_slurm
@pytest.mark.slow
def test_pipeline_submits_the_whole_chain_at_once(slurm, tmp_path):
    ds = make_msd_dataset(tmp_path / "ds", n_cases=4)
    work, out = tmp_path / "wd", tmp_path / "pred"
    t = time.monotonic()
    shown = _medseg("pipeline", ds, "-o", work, "-c", "3d_fullres", "--time-budget", "1", "--epochs", "1",
                    "--iterations-per-epoch", "2", "--predict-input", ds / "imagesTr", "--predict-output", out,
                    "--shards", "2", *JOB).stderr
    assert time.monotonic() - t < 60  # returned at once (the plan job may already have run: it is quick here)
    assert "submitted plan" in shown and "submitted predict" in shown
    records = read_registry(WorkDir(work))
    assert [r.kind for r in records] == ["plan"] + ["train"] * 4 + ["cv-report", "find-best", "predict", "predict"]
    assert records[1].depends_on == [records[0].job_id]
    states = _wait(lambda: _ended([r.job_id for r in records]), "the pipeline", slurm, timeout=400)
    assert set(states.values()) == {"COMPLETED"}, (states, _job_log(work))
    assert json.loads(WorkDir(work).model.read_text())["members"] == ["3d_fullres"]
    summary = json.loads((out / "predict_summary.json").read_text())
    assert len(summary["cases"]) == 4 and len(list(out.glob("*.nii.gz"))) == 4
