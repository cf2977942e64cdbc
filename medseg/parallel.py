"""One ordered parallel map over worker processes, and the one rule for how workers start.

:func:`parallel_map` runs a function over jobs in worker processes (or inline) and returns the
results in job order, with an optional progress bar; check, fingerprint, preprocessing,
evaluation and find-best all use it. :func:`process_pool` makes a pool to share between several
maps (``workflow.plan`` shares one between check and fingerprint).

Start-method rule (:func:`mp_context`): **fork while this process runs no other thread and has
not imported torch; spawn otherwise** (and spawn off Linux, where fork is not the platform's safe
default). Why: fork copies only the calling thread, so a lock another thread holds at that moment
stays locked forever in the child: a thread importing modules (the import lock), rich's progress
refresh thread, and torch's intra-op OpenMP pool (libgomp is not fork-safe; a forked child that
enters a parallel region waits for threads that do not exist). Whether torch's pool has started
cannot be seen from Python, so an imported torch counts as started. OpenBLAS's threads (numpy)
are fork-safe (they register fork handlers) and do not count. Spawn starts a fresh interpreter
and is always safe, but every worker pays the interpreter start and imports the job's module
again. Measured on this 2-core machine (Python 3.11, from creating the pool to the first result
of each worker, median of 5, 1 / 2 workers): a trivial job 18 / 15 ms with fork, 77 / 117 ms
with spawn; a ``medseg.io.check`` job 24 / 31 ms with fork, 0.5 / 0.8 s with spawn (its
imports); a :class:`~medseg.training.data.BatchSource` worker 25 / 31 ms
with fork, 1.7 / 3.2 s with spawn (scipy.signal and batchgenerators take ~1.4 s to import).
So fork is kept where it is safe: ``workflow.plan`` creates its pool before it starts the
thread that imports torch and MONAI, so check and fingerprint fork. Pools made after torch has
loaded spawn (training's augmentation workers, which start once per run; evaluation and find-best
after training; preprocessing after planning).

Jobs, their functions and results must pickle (module-level functions; ``functools.partial`` of
them). Results travel through pipes, not shared memory, so a container's default 64 MB
``/dev/shm`` suffices.
"""

from __future__ import annotations

import multiprocessing
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import nullcontext
from multiprocessing.context import BaseContext
from typing import TypeVar

from medseg.progress import track

__all__ = ["mp_context", "parallel_map", "process_pool"]

J = TypeVar("J")
R = TypeVar("R")


def mp_context() -> BaseContext:
    """The multiprocessing context for new worker processes, by the rule in the module docstring:
    'fork' while this process runs no other thread and has not imported torch (Linux only),
    'spawn' otherwise. Decided at each call, so call it when the workers are created."""
    forkable = sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
    if forkable and threading.active_count() == 1 and "torch" not in sys.modules:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def process_pool(num_workers: int) -> ProcessPoolExecutor:
    """A pool of ``num_workers`` processes started by :func:`mp_context`'s rule. Forked workers
    exist when this returns, so threads the caller starts afterwards are not copied into them.
    Use it as a context manager (``with process_pool(n) as pool:``)."""
    context = mp_context()
    pool = ProcessPoolExecutor(num_workers, mp_context=context)
    if context.get_start_method() == "fork":
        pool.submit(int).result()  # a fork pool forks all its workers on the first submit
    return pool


def parallel_map(fn: Callable[[J], R], jobs: Iterable[J], *, num_workers: int, description: str = "",
                 progress: bool = False, executor: Executor | None = None) -> list[R]:
    """``[fn(job) for job in jobs]``, computed in worker processes, results in job order.

    Runs inline (in this process) when no ``executor`` is given and ``num_workers <= 1`` or there
    is at most one job; otherwise in ``executor`` when given (``num_workers`` is then ignored and
    the executor stays open), else in a pool of ``min(num_workers, len(jobs))`` processes made for
    this call (:func:`process_pool`). The results are the same either way. A job's exception is
    raised here as itself (the worker's traceback as its ``__cause__``), after the jobs not yet
    started are cancelled. ``progress`` shows a bar labelled ``description`` on stderr, advanced
    as results arrive in order.
    """
    jobs = list(jobs)
    if executor is None and (num_workers <= 1 or len(jobs) <= 1):
        return list(track(map(fn, jobs), total=len(jobs), description=description, enabled=progress))
    with nullcontext(executor) if executor is not None else process_pool(min(num_workers, len(jobs))) as pool:
        # every job is submitted before the progress bar starts its refresh thread
        futures = [pool.submit(fn, job) for job in jobs]
        try:
            return list(track(_results(futures), total=len(jobs), description=description, enabled=progress))
        finally:
            for future in futures:
                future.cancel()  # no-op for finished ones; frees a shared executor after a failure


def _results(futures: list[Future]) -> Iterable:
    for future in futures:
        yield future.result()
