"""The scheduler's view of jobs, read with ``scontrol`` (and ``sacct`` where accounting runs):
one call for every job the controller knows, and a one-line error when it cannot be reached."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from medseg.errors import MedsegError

# states after which a job never runs again (squeue's long names)
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


@dataclass(frozen=True)
class JobState:
    job_id: str  # "123" or, for an array task, "123_4"
    state: str  # RUNNING, PENDING, COMPLETED, FAILED, ...
    reason: str  # Slurm's reason (None, Dependency, DependencyNeverSatisfied, ...)
    run_time: str
    restarts: int


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise MedsegError(f"slurm: `{cmd[0]}` not found on PATH; run this on a machine of the cluster "
                          "(a login node), or use --executor local")
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise MedsegError(f"slurm: `{' '.join(cmd)}` did not answer within 60 s; is the controller up?") from None


def _fields(line: str) -> dict[str, str]:
    out = {}
    for token in line.split():
        key, sep, value = token.partition("=")
        if sep:
            out[key] = value
    return out


def query(job_ids: list[str]) -> dict[str, JobState]:
    """The state of every job of ``job_ids`` that the scheduler still knows (the controller keeps
    ended jobs for MinJobAge seconds; older ones come from accounting, when it runs)."""
    proc = _run(["scontrol", "show", "job", "--oneliner"])
    if proc.returncode != 0 and "no jobs in the system" not in (proc.stdout + proc.stderr).lower():
        first = (proc.stderr or proc.stdout).strip().splitlines()
        raise MedsegError(f"slurm: cannot reach the scheduler: {first[0] if first else f'scontrol exit {proc.returncode}'}")
    known: dict[str, JobState] = {}
    for line in proc.stdout.splitlines():
        f = _fields(line)
        if "JobId" not in f:
            continue
        ids = [f["JobId"]]
        if f.get("ArrayJobId") and f.get("ArrayTaskId"):
            ids = [f"{f['ArrayJobId']}_{t}" for t in _expand(f["ArrayTaskId"])]
        for job_id in ids:
            known[job_id] = JobState(job_id, f.get("JobState", "UNKNOWN"), f.get("Reason", ""), f.get("RunTime", ""),
                                     int(f.get("Restarts", "0") or 0))
    missing = [j for j in job_ids if j not in known]
    if missing:
        known.update(_accounting(missing))
    return {j: known[j] for j in job_ids if j in known}


def _expand(tasks: str) -> list[str]:
    """``0-2,5%4`` → ``["0", "1", "2", "5"]`` (a pending array's tasks in one record)."""
    out = []
    for part in tasks.split("%")[0].split(","):
        lo, sep, hi = part.partition("-")
        out += [str(i) for i in range(int(lo), int(hi) + 1)] if sep else [lo]
    return out


def _accounting(job_ids: list[str]) -> dict[str, JobState]:
    """``sacct``'s record of ended jobs; nothing where accounting is disabled or absent."""
    if shutil.which("sacct") is None:
        return {}
    proc = _run(["sacct", "--noheader", "--parsable2", "--format=JobID,State,Elapsed", "--jobs", ",".join(job_ids)])
    if proc.returncode != 0:
        return {}
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) >= 3 and parts[0] in job_ids:
            out[parts[0]] = JobState(parts[0], parts[1].split()[0], "", parts[2], 0)
    return out


def is_ended(state: JobState | None) -> bool:
    return state is not None and state.state in ENDED
