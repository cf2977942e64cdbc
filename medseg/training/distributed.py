"""Data-parallel training over several processes with ``torch.distributed``.

A run is distributed when its process was started as one of several ranks: by ``medseg train
--nproc N`` (:func:`launch`: torch.distributed's elastic launcher, what ``torchrun --standalone``
runs), by ``torchrun`` itself, or by ``srun`` with more than one task (Slurm's variables; several
nodes included). :func:`from_environment` reads which; :func:`join` joins the process group (gloo
on CPU, NCCL on CUDA, one GPU per local rank) with a timeout, so that a rank that hangs fails the
job instead of holding it forever. A rank that dies fails it at once: the launcher (torchrun's agent,
``srun --kill-on-bad-exit``) stops the others, and a peer's collective fails on the closed
connection.

The plan's batch is the global batch: rank ``r`` of ``W`` trains on elements
:func:`rank_elements` of every batch, which :class:`~medseg.training.data.BatchSource` computes
as a pure function of ``(seed, epoch, index, element)``, so the ranks together see exactly the
batch a single process sees, and a resumed run the batches it would have seen.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from medseg.errors import MedsegError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0  # rank 0 validates and checkpoints while the others wait at the next collective


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the group."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" or "slurm"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment(environ: Mapping[str, str] | None = None) -> DistEnv | None:
    """The group this process was started in, or None for a single process.

    torchrun (and :func:`launch`) export ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. ``srun`` with several tasks exports
    ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_STEP_TASKS_PER_NODE`` and
    ``SLURM_STEP_NODELIST``: the master is the step's first node, the port ``MASTER_PORT`` if set,
    else derived from the job id (two jobs sharing a node do not collide)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        if world <= 1:
            return None
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise MedsegError(f"distributed start: WORLD_SIZE={world} but {', '.join(missing)} not set")
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), world,
                       int(env.get("LOCAL_WORLD_SIZE", world)), env["MASTER_ADDR"], int(env["MASTER_PORT"]),
                       "torchrun")
    tasks = env.get("SLURM_STEP_NUM_TASKS")
    if tasks and int(tasks) > 1 and "SLURM_PROCID" in env:
        nodes = _expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
        if not nodes:
            raise MedsegError("srun with several tasks: SLURM_STEP_NODELIST is not set")
        port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE", "")
        local_world = int(per_node.split("(")[0].split(",")[0]) if per_node[:1].isdigit() else int(tasks)
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(tasks), local_world,
                       nodes[0], int(port), "slurm")
    return None


def _expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list (``node[01-03],gpu7``) as host names."""
    if not nodelist:
        return []
    if "[" not in nodelist:
        return nodelist.split(",")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise MedsegError(f"cannot expand the Slurm node list {nodelist!r} with scontrol ({exc})") from exc
    return out.split()


def rank_elements(batch_size: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s elements of a global batch of ``batch_size``: consecutive, sizes differing by at most one."""
    if batch_size < world_size:
        raise MedsegError(f"the plan's batch size {batch_size} cannot be split over {world_size} processes; "
                          f"use at most {batch_size} processes or raise batch_size in plans.json")
    return range(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)


def join(env: DistEnv, device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Join the process group described by ``env`` (once per process) and return this rank's
    device: ``cuda:LOCAL_RANK`` when ``device`` is CUDA (NCCL), else ``cpu`` (gloo, torch threads
    shared out among the node's ranks)."""
    cuda = device.startswith("cuda")
    if cuda:
        if torch.cuda.device_count() < env.local_world_size:
            raise MedsegError(f"{env.local_world_size} processes on this node need as many GPUs; "
                              f"{torch.cuda.device_count()} visible")
        device = f"cuda:{env.local_rank}"
        torch.cuda.set_device(device)
    else:
        cpus = os.environ.get("SLURM_CPUS_PER_TASK") if env.source == "slurm" else None
        torch.set_num_threads(int(cpus) if cpus and cpus.isdigit()
                              else max(1, len(os.sched_getaffinity(0)) // env.local_world_size))
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=env.rank,
                                world_size=env.world_size, timeout=timedelta(seconds=timeout_s))
        log.debug("rank %d/%d joined (%s, %s)", env.rank, env.world_size, env.source, device)
    return device


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the group's size); (0, 1) without a group."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def rank_device(device: str) -> str:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` for CUDA in a joined group, else ``device``."""
    if dist.is_initialized() and device.startswith("cuda"):
        return f"cuda:{torch.cuda.current_device()}"
    return device


def is_main_process() -> bool:
    """True unless this process is a rank other than 0 of a joined group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def leave(sync: bool = True, timeout_s: float = 60.0) -> None:
    """Leave the group joined by :func:`join` (nothing without one). ``sync`` (after success): all
    ranks meet at a barrier first, and rank 0, whose process may host the group's TCP store, waits
    until every other rank has destroyed its group before destroying its own, so that no rank's
    teardown meets a store or peer that has already gone (a rank aborted at exit under srun).
    After a failure (``sync=False``) each rank leaves at once, since a peer may be gone."""
    if not dist.is_initialized():
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    store = None
    if sync and world > 1:
        try:
            dist.barrier()
            store = dist.distributed_c10d._get_default_store()
        except Exception as exc:  # a peer that is gone: leave without waiting
            log.debug("rank %d: leaving without the barrier (%s)", rank, exc)
    dist.destroy_process_group()
    if store is None:
        return
    try:
        left = store.add("medseg/left", 1)
        deadline = time.monotonic() + timeout_s
        while rank == 0 and left < world and time.monotonic() < deadline:
            time.sleep(0.05)
            left = store.add("medseg/left", 0)
    except Exception as exc:
        log.debug("rank %d: the store went before all ranks had left (%s)", rank, exc)


def launch(nproc: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in ``nproc`` local processes started by torch.distributed's elastic
    launcher (as ``torchrun --standalone --nproc-per-node N``); rank 0's return value. A rank that
    fails (an exception, a signal, an exit) ends all of them: :class:`MedsegError` naming the rank
    and how it ended."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 2:
        raise MedsegError(f"--nproc {nproc}: launching needs at least 2 processes")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          start_method="spawn")
    for name in ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing"):
        # the agent's chatter, and its multi-line report of a failure: the MedsegError below says it
        logging.getLogger(name).setLevel(logging.CRITICAL)
    level = logging.getLogger().getEffectiveLevel()
    try:
        results = elastic_launch(config, _rank_main)(fn, level, args, kwargs)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise MedsegError(f"distributed training failed: rank {rank} of {nproc} {_describe(failure)}") from None
    return results[0]


def _describe(failure: Any) -> str:
    if failure.exitcode < 0:
        return f"was killed by {failure.signal_name()}"
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    message = str(message or "").strip().splitlines()
    detail = message[-1] if message and not message[-1].startswith("To enable traceback") else ""
    detail = detail.removeprefix(f"{MedsegError.__name__}: ")
    return f"exited with code {failure.exitcode}" + (f": {detail}" if detail else "")


@record
def _rank_main(fn: Callable[..., Any], level: int, args: tuple, kwargs: dict) -> Any:
    """One launched rank: logging as the parent's (rank 0; the others warnings only), then ``fn``.
    An exception is recorded for the launcher (``record``), whose :func:`launch` raises it as one line."""
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=level if rank == 0 else max(level, logging.WARNING),
                        format="%(message)s" if rank == 0 else f"[rank {rank}] %(message)s", force=True)
    try:
        result = fn(*args, **kwargs)
    except BaseException:
        leave(sync=False)
        raise
    leave()
    return result


def all_mean(value: float, device: str) -> float:
    """The mean of ``value`` over the group (``value`` itself without one)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def broadcast_floats(values: list[float], device: str) -> list[float]:
    """Rank 0's ``values`` on every rank (``values`` itself without a group)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
