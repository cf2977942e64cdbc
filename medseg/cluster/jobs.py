"""The pipeline's stages as Slurm jobs, submitted through submitit.

Every job runs an idempotent task: a finished fold is never trained again, an interrupted one
resumes from its latest checkpoint, a prediction skips the cases whose output exists. So a job
that is requeued — by submitit when Slurm signals the time limit or a preemption
(``--signal=USR2@signal_delay_s``), by ``scontrol requeue``, or after a node failure — simply
runs its task again and continues exactly where the last checkpoint left it (at most the epoch
in progress is lost). A task that fails for a real error raises, and its job ends FAILED; the
jobs that depend on it (``afterok``) are then cancelled by Slurm (``--kill-on-invalid-dep``).

Every submission is recorded in ``WORK/jobs/jobs.jsonl``; :func:`job_table` joins those records
with the scheduler's states and the runs' own progress (``medseg jobs``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import submitit

from medseg.cluster import slurm
from medseg.cluster.config import ClusterConfig
from medseg.errors import MedsegError
from medseg.plans.schema import Plans
from medseg.training.splits import NUM_FOLDS, cv_folds
from medseg.workdir import FULL, Fold, WorkDir, parse_fold_tag

# The tasks import the stage they run inside __call__ ("deferred" below): training, inference and
# planning load torch and MONAI (~3-6 s on 2 cores), which neither a submission nor `medseg jobs`
# needs, and the plan job must fork its workers before torch loads (medseg.parallel).
log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the tasks that run in jobs


def _job_setup(*, torch_threads: bool = True) -> None:
    """In a Slurm job (nothing elsewhere): log lines with times to stderr (the job's ``.err`` file,
    unbuffered: submitit runs ``python -u`` under ``srun --unbuffered``), stdin closed, torch on the
    CPUs Slurm gave."""
    if "SLURM_JOB_ID" not in os.environ:
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr,
                        force=True)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - nothing may wait for keyboard input in a batch job
    cpus = _job_cpus()
    if cpus and torch_threads:
        import torch  # deferred: see the top of the module

        torch.set_num_threads(cpus)


def _job_cpus() -> int | None:
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    return int(cpus) if cpus and cpus.isdigit() else None


@dataclass
class PlanTask(submitit.helpers.Checkpointable):
    """``medseg plan`` (check, fingerprint, plans, preprocessing; finished cases are kept)."""

    dataset: str
    workdir: str
    options: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> str:
        _job_setup(torch_threads=False)
        from medseg import workflow  # deferred

        workflow.plan(Path(self.dataset), Path(self.workdir), **{"num_workers": _job_cpus(), **self.options})
        return f"planned {self.workdir}"


@dataclass
class TrainTask(submitit.helpers.Checkpointable):
    """One fold of one configuration: skipped when done, resumed when a latest checkpoint exists,
    then (for a cross-validation fold) its full validation. ``options``: of
    :func:`~medseg.orchestration.crossval.train_and_validate`."""

    workdir: str
    config: str
    fold: Fold
    options: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> str:
        _job_setup()
        from medseg.orchestration.crossval import train_and_validate  # deferred
        from medseg.utils import resolve_device

        work = WorkDir(self.workdir)
        key = Plans.load(work.plans).config(self.config).key
        run = work.run(key, self.fold)
        validate = self.options.get("validate_full", True) and self.fold != FULL
        if run.validated or (run.trained and not validate):
            log.info("%s fold %s: already done (%s)", key, self.fold, run.path)
            return str(run.path)
        options = {**self.options, "device": resolve_device(self.options.get("device"))}
        # a trained fold that was not validated resumes at its last epoch: it only validates
        from medseg.training import distributed  # deferred

        try:  # each of a distributed job's tasks (srun) joins the group from Slurm's variables
            train_and_validate(work, key, self.fold, resume=run.latest.exists(), **options)
        except BaseException:
            distributed.leave(sync=False)
            raise
        distributed.leave()
        return str(run.path)


@dataclass
class CrossvalTask(submitit.helpers.Checkpointable):
    """The out-of-fold report of each configuration once all its folds are validated."""

    workdir: str
    configs: list[str]

    def __call__(self) -> str:
        _job_setup()
        from medseg.orchestration.crossval import collect_out_of_fold  # deferred

        work = WorkDir(self.workdir)
        plans = Plans.load(work.plans)
        lines = []
        for name in self.configs:
            key = plans.config(name).key
            _require_folds(work, plans, key)
            summary = collect_out_of_fold(work, plans, key)
            lines.append(f"{key}: foreground Dice {summary['foreground_mean']['dice']:.4f} over {summary['n_cases']} cases")
            log.info("cross-validation of %s", lines[-1])
        return "; ".join(lines)


@dataclass
class FindBestTask(submitit.helpers.Checkpointable):
    """``medseg find-best``, after checking that every fold of the configurations trained here is
    validated (else a one-line error naming the fold and its job's log)."""

    workdir: str
    configs: list[str] | None = None

    def __call__(self) -> str:
        _job_setup()
        from medseg.orchestration.selection import find_best  # deferred

        work = WorkDir(self.workdir)
        plans = Plans.load(work.plans)
        for name in self.configs or sorted({r.config for r in read_registry(work) if r.kind == "train" and r.config}):
            _require_folds(work, plans, plans.config(name).key)
        chosen, _ = find_best(work, configs=self.configs, num_workers=_job_cpus() or 1)
        return f"chose {'+'.join(chosen.members)}"


@dataclass
class PredictTask(submitit.helpers.Checkpointable):
    """``medseg predict`` of one shard (``options['part']`` of ``options['num_parts']``)."""

    input: str
    output: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> str:
        _job_setup()
        from medseg.inference.predictor import PredictOptions, predict_folder  # deferred
        from medseg.utils import resolve_device

        load = {**self.load, "device": resolve_device(self.load.get("device"))}
        written = predict_folder(Path(self.input), Path(self.output), Path(self.model), PredictOptions(**self.options),
                                 **load)
        return f"{len(written)} segmentation(s) written to {self.output}"


def _require_folds(work: WorkDir, plans: Plans, key: str) -> None:
    missing = [f for f in cv_folds(work, plans, plans.config(key)) if not work.run(key, f).validated]
    if missing:
        # train records hold the configuration's key (TrainTask is given it)
        records = {(r.config, r.fold): r for r in read_registry(work) if r.kind == "train"}
        rec = records.get((key, str(missing[0])))
        where = f" (job {rec.job_id}; log {rec.stderr})" if rec else ""
        raise MedsegError(f"{work.root}: {key} fold {missing[0]} is not trained and validated{where}; "
                          f"fix it and run `medseg train {work.root} -c {key} -f {missing[0]}` again")


# ---------------------------------------------------------------- the registry of submitted jobs


@dataclass
class JobRecord:
    job_id: str
    kind: str  # plan, train, cv-report, find-best, predict
    name: str
    stdout: str
    stderr: str
    submitted: str
    depends_on: list[str] = field(default_factory=list)
    config: str | None = None
    fold: str | None = None
    part: int | None = None


def read_registry(work: WorkDir) -> list[JobRecord]:
    if not work.job_registry.exists():
        return []
    records = []
    for n, line in enumerate(work.job_registry.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(JobRecord(**json.loads(line)))
        except (ValueError, TypeError) as exc:
            raise MedsegError(f"{work.job_registry}:{n}: unreadable job record ({type(exc).__name__})") from exc
    return records


def _append_records(work: WorkDir, records: list[JobRecord]) -> None:
    """Appended under an exclusive lock, so that concurrent submissions interleave whole lines."""
    work.jobs.mkdir(parents=True, exist_ok=True)
    with open(work.job_registry, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write("".join(json.dumps(asdict(r)) + "\n" for r in records))
        fh.flush()
        os.fsync(fh.fileno())


# ---------------------------------------------------------------- submission


@dataclass(frozen=True)
class Job:
    """A task to submit, with what the registry records about it."""

    task: submitit.helpers.Checkpointable
    kind: str
    name: str
    config: str | None = None
    fold: Fold | None = None
    part: int | None = None


def submit(work: WorkDir, jobs: list[Job], cluster: ClusterConfig, *, after: list[str] = (),
           gpus: bool = True, resources: dict[str, Any] | None = None) -> list[str]:
    """Submit ``jobs`` (several: one job array) to start when every job of ``after`` succeeded;
    returns their ids (``123`` or ``123_0`` .. ``123_K``) and records them. ``resources``: submitit
    parameters over the cluster settings (a distributed job's nodes and tasks)."""
    if not jobs:
        return []
    folder = work.job_logs
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=cluster.max_timeouts)
    params = cluster.sbatch_parameters() if gpus else cluster.merged(gpus_per_job=0).sbatch_parameters()
    params.update(resources or {})
    if after:
        params["dependency"] = "afterok:" + ":".join(sorted({a.split("_")[0] for a in after}))
    executor.update_parameters(job_name=f"medseg-{jobs[0].kind}", **params)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        if len(jobs) == 1:
            submitted = [executor.submit(jobs[0].task)]
        else:
            with executor.batch():
                submitted = [executor.submit(j.task) for j in jobs]
    except (submitit.core.utils.FailedJobError, OSError) as exc:
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        raise MedsegError(f"slurm: sbatch refused the {jobs[0].kind} job(s): {lines[-1] if lines else exc}") from None
    now = datetime.now(UTC).isoformat(timespec="seconds")
    records = [JobRecord(job_id=s.job_id, kind=j.kind, name=j.name, stdout=str(s.paths.stdout),
                         stderr=str(s.paths.stderr), submitted=now, depends_on=list(after), config=j.config,
                         fold=None if j.fold is None else str(j.fold), part=j.part)
               for j, s in zip(jobs, submitted, strict=True)]
    _append_records(work, records)
    for r in records:
        log.info("submitted %s: job %s", r.name, r.job_id)
    return [r.job_id for r in records]


def submit_plan(dataset: Path, workdir: Path, cluster: ClusterConfig, **options: Any) -> list[str]:
    """``medseg plan`` as one job (on the hardware the training jobs get: the planner measures it)."""
    work = WorkDir(workdir)
    work.root.mkdir(parents=True, exist_ok=True)
    task = PlanTask(str(Path(dataset).resolve()), str(work.root.resolve()), {"progress": False, **options})
    return submit(work, [Job(task, "plan", f"plan {Path(dataset).name}")], cluster)


def distributed_resources(nodes: int | None = None, gpus_per_node: int | None = None,
                          tasks_per_node: int | None = None) -> dict[str, Any]:
    """submitit parameters of a data-parallel training job: ``nodes`` × ``tasks_per_node`` ranks
    (default: one per GPU), each run by srun; a rank that fails ends the step at once
    (``--kill-on-bad-exit``) instead of leaving the others waiting for it. Empty for one process."""
    tasks = tasks_per_node or gpus_per_node or 1
    if (nodes or 1) * tasks <= 1 and not gpus_per_node:
        return {}
    if gpus_per_node and tasks != gpus_per_node:
        raise MedsegError(f"--nproc {tasks} with --gpus-per-node {gpus_per_node}: one process per GPU")
    resources: dict[str, Any] = {"nodes": nodes or 1, "ntasks_per_node": tasks, "srun_args": ["--kill-on-bad-exit=1"]}
    if gpus_per_node:
        resources["gpus_per_node"] = gpus_per_node
    return resources


def submit_training(workdir: Path, configs: list[str], fold_spec: str, cluster: ClusterConfig, *,
                    after: list[str] = (), num_folds: int | None = None, nodes: int | None = None,
                    gpus_per_node: int | None = None, tasks_per_node: int | None = None,
                    **options: Any) -> dict[str, list[str]]:
    """One job array over (configuration × fold), and, for cross-validation folds with validation,
    the out-of-fold report as a job after it. Folds already done are not submitted. A cascade stage
    whose previous stage is submitted too is a second array, after the previous stage's folds
    (it trains on their out-of-fold predictions). ``num_folds``: the number of cross-validation
    folds when the work directory is not planned yet (a chain that starts with ``plan``).
    ``nodes``, ``gpus_per_node``, ``tasks_per_node``: each fold is one data-parallel job of that
    many ranks (:func:`distributed_resources`)."""
    from medseg.orchestration.crossval import parse_folds  # deferred

    resources = distributed_resources(nodes, gpus_per_node, tasks_per_node)
    work = WorkDir(Path(workdir).resolve())
    validate = options.get("validate_full", True)
    waves: list[list[Job]] = [[], []]  # configurations, then cascade stages after their previous stage
    cv_configs, previous = [], {}
    plans = Plans.load(work.plans) if num_folds is None else None
    for name in configs:
        if plans is not None:
            config = plans.config(name)
            key, previous[config.key] = config.key, config.previous_stage
            folds = parse_folds(work, key, fold_spec)
        else:
            key, previous[name] = name, "3d_lowres" if name == "3d_cascade_fullres" else None
            folds = list(range(num_folds)) if fold_spec.strip().lower() in ("all", "cv") else parse_folds(work, key,
                                                                                                             fold_spec)
        wave = waves[1] if previous[key] in configs else waves[0]
        for fold in folds:
            run = work.run(key, fold)
            if run.validated or (run.trained and not (validate and fold != FULL)):
                log.info("%s fold %s: already trained (%s); not submitted", key, fold, run.path)
                continue
            wave.append(Job(TrainTask(str(work.root), key, fold, {"progress": False, **options}), "train",
                            f"train {key} fold {fold}", config=key, fold=fold))
        if validate and FULL not in folds:
            cv_configs.append(key)
    train_ids = submit(work, waves[0], cluster, after=after, resources=resources)
    stages = {j.config for j in waves[1]}
    first = [i for j, i in zip(waves[0], train_ids, strict=True) if j.config in {previous[c] for c in stages}]
    train_ids += submit(work, waves[1], cluster, after=[*after, *first], resources=resources)
    cv_ids = []
    if cv_configs:
        cv_ids = submit(work, [Job(CrossvalTask(str(work.root), cv_configs), "cv-report",
                                   f"cross-validation report {','.join(cv_configs)}")],
                        cluster, after=[*after, *train_ids], gpus=False)
    return {"train": train_ids, "cv-report": cv_ids}


def submit_find_best(workdir: Path, cluster: ClusterConfig, *, configs: list[str] | None = None,
                     after: list[str] | None = None) -> list[str]:
    """``medseg find-best`` as a job that starts once the training and cross-validation jobs of this
    work directory the scheduler still knows as not ended (or ``after``) have succeeded."""
    work = WorkDir(Path(workdir).resolve())
    if after is None:
        pending = [r.job_id for r in read_registry(work) if r.kind in ("plan", "train", "cv-report")]
        states = slurm.query(pending) if pending else {}
        after = [j for j, s in states.items() if not slurm.is_ended(s)]
    return submit(work, [Job(FindBestTask(str(work.root), configs), "find-best", "find-best")], cluster,
                  after=after, gpus=False)


def submit_predict(inputs: Path, output: Path, model: Path, cluster: ClusterConfig, *, options: dict[str, Any],
                   load: dict[str, Any], shards: int = 1, parts: list[int] | None = None,
                   after: list[str] = ()) -> list[str]:
    """``medseg predict`` as ``shards`` jobs (one array), each one disjoint part of the cases; ``parts``
    submits only those (a failed shard re-run alone). Recorded in the model's work directory."""
    work = WorkDir(Path(model).resolve())
    parts = list(range(shards)) if parts is None else parts
    bad = [p for p in parts if not 0 <= p < shards]
    if bad:
        raise MedsegError(f"--part {bad[0]}: expected 0..{shards - 1} for {shards} shard(s)")
    jobs = [Job(PredictTask(str(Path(inputs).resolve()), str(Path(output).resolve()), str(work.root),
                            {**options, "num_parts": shards, "part": p, "progress": False}, load),
                "predict", f"predict shard {p} of {shards}", part=p) for p in parts]
    return submit(work, jobs, cluster, after=after)


def submit_pipeline(dataset: Path, workdir: Path, configs: list[str], cluster: ClusterConfig, *,
                    plan_options: dict[str, Any], train_options: dict[str, Any],
                    predict: tuple[Path, Path] | None = None, predict_options: dict[str, Any] | None = None,
                    shards: int = 1) -> dict[str, list[str]]:
    """plan → training array (every cross-validation fold of ``configs``) → cross-validation report →
    find-best (→ predict ``predict[0]`` into ``predict[1]``), each starting when the one before succeeded.
    Returns at once with the job ids."""
    from medseg.io.dataset import load_dataset  # deferred: ~1 s (SimpleITK, nibabel)

    work = WorkDir(Path(workdir).resolve())
    n_cases = len(load_dataset(dataset).cases)  # the folds, before the plan job makes splits.json
    num_folds = len(json.loads(work.splits.read_text())) if work.splits.exists() else min(NUM_FOLDS, n_cases)
    ids = {"plan": submit_plan(dataset, work.root, cluster, configs=configs, **plan_options)}
    ids.update(submit_training(work.root, configs, "all", cluster, after=ids["plan"], num_folds=num_folds,
                               **train_options))
    ids["find-best"] = submit_find_best(work.root, cluster, configs=configs, after=ids["cv-report"])
    if predict is not None:
        ids["predict"] = submit_predict(predict[0], predict[1], work.root, cluster, options=predict_options or {},
                                        load={}, shards=shards, after=ids["find-best"])
    return ids


# ---------------------------------------------------------------- medseg jobs


@dataclass
class JobRow:
    job_id: str
    name: str
    state: str
    progress: str
    log: str


def job_table(workdir: Path) -> list[JobRow]:
    """Each recorded job with the scheduler's state (and reason while pending or cancelled) and, for
    training, the run's own progress: epoch, last smoothed pseudo-Dice, ETA."""
    work = WorkDir(workdir)
    records = read_registry(work)
    if not records:
        raise MedsegError(f"{work.job_registry}: no jobs submitted for this work directory (--executor slurm)")
    states = slurm.query([r.job_id for r in records])
    rows = []
    for r in records:
        s = states.get(r.job_id)
        if s is None:
            state = ("ended (no longer known to the scheduler; see the log)"
                     if Path(r.stdout).with_name(f"{r.job_id}_0_result.pkl").exists()
                     else "not known to the scheduler (cancelled before it started, or ended long ago)")
        else:
            state = s.state + (f" ({s.reason})" if s.reason not in ("", "None") else "")
            if s.restarts:
                state += f", requeued {s.restarts}x"
            if s.state == "CANCELLED" and "Dependency" in s.reason:
                cause = _root_failure(r, records, states)
                if cause is not None:
                    state += f": {cause.name} ({cause.job_id}) failed"
        rows.append(JobRow(r.job_id, r.name, state, _progress(work, r), r.stderr))
    return rows


def _root_failure(record: JobRecord, records: list[JobRecord], states: dict[str, slurm.JobState]) -> JobRecord | None:
    """The job that failed first along ``record``'s dependencies (an array dependency means every task)."""
    arrays = {d.split("_")[0] for d in record.depends_on}
    for dep in (r for r in records if r.job_id.split("_")[0] in arrays):
        s = states.get(dep.job_id)
        if s is None:
            continue
        if s.state in slurm.ENDED - {"COMPLETED", "CANCELLED"}:
            return dep
        if s.state == "CANCELLED" and "Dependency" in s.reason:
            cause = _root_failure(dep, records, states)
            if cause is not None:
                return cause
    return None


def _progress(work: WorkDir, record: JobRecord) -> str:
    if record.kind != "train" or record.config is None or record.fold is None:
        return ""
    run = work.run(record.config, parse_fold_tag(record.fold))
    if run.validated:
        return "trained, validated"
    if not run.log.exists():
        return ""
    lines = [json.loads(ln) for ln in run.log.read_text().splitlines() if ln.strip()]
    if not lines:
        return ""
    last = lines[-1]
    budget = json.loads(run.run_json.read_text()).get("budget", {}) if run.run_json.exists() else {}
    epochs = budget.get("epochs")
    text = f"epoch {last['epoch']}" + (f"/{epochs}" if epochs else "") + f", pseudo-Dice {last['pseudo_dice_ema']:.3f}"
    if run.trained:
        return text + ", validating"
    epoch_s = sum(rec["epoch_s"] for rec in lines) / len(lines)
    left = (epochs - last["epoch"]) * epoch_s if epochs else None
    if budget.get("time_budget_min"):
        by_clock = max(0.0, budget["time_budget_min"] * 60 - last["elapsed_s"])
        left = by_clock if left is None else min(left, by_clock)
    if left is not None:
        text += f", ETA {time.strftime('%H:%M:%S', time.gmtime(left))}"
    return text
