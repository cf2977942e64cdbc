"""Contracts of ``medseg.parallel``: results in job order, the inline path equals the pool path, a
job's exception surfaces as itself, a shared executor, and the start-method rule."""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
import threading
import time
import types

import pytest

from medseg import parallel
from medseg.errors import MedsegError
from medseg.parallel import mp_context, parallel_map, process_pool

JOBS = list(range(7))


def _square_late_first(x: int) -> int:
    """Early jobs finish last, so a map that returned in completion order would be caught."""
    time.sleep(0.02 * (len(JOBS) - x))
    return x * x


def _pid(_: object) -> int:
    return os.getpid()


def _fail_on_three(x: int) -> int:
    if x == 3:
        raise MedsegError(f"case {x}: unreadable label file")
    return x


@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_results_come_in_job_order_inline_or_in_workers(num_workers: int) -> None:
    assert parallel_map(_square_late_first, JOBS, num_workers=num_workers) == [x * x for x in JOBS]


def test_inline_with_one_worker_or_one_job_and_in_workers_otherwise() -> None:
    me = os.getpid()
    assert parallel_map(_pid, JOBS, num_workers=1) == [me] * len(JOBS)
    assert parallel_map(_pid, ["only"], num_workers=4) == [me]
    assert parallel_map(_pid, [], num_workers=4) == []
    assert me not in parallel_map(_pid, JOBS, num_workers=2)


def test_progress_bar_does_not_change_the_results(capsys: pytest.CaptureFixture[str]) -> None:
    assert parallel_map(_square_late_first, JOBS, num_workers=2, description="squares", progress=True) == [
        x * x for x in JOBS
    ]


@pytest.mark.parametrize("num_workers", [1, 2])
def test_a_failing_job_raises_its_own_exception(num_workers: int) -> None:
    with pytest.raises(MedsegError) as info:
        parallel_map(_fail_on_three, JOBS, num_workers=num_workers)
    assert str(info.value) == "case 3: unreadable label file"
    assert type(info.value) is MedsegError


def test_a_shared_executor_runs_the_jobs_and_stays_open() -> None:
    with process_pool(2) as pool:
        first = parallel_map(_pid, JOBS, num_workers=1, executor=pool)
        assert os.getpid() not in first
        with pytest.raises(MedsegError, match="case 3"):
            parallel_map(_fail_on_three, JOBS, num_workers=1, executor=pool)
        assert parallel_map(_square_late_first, JOBS, num_workers=1, executor=pool) == [x * x for x in JOBS]


def test_spawned_workers_give_the_same_results(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "mp_context", lambda: multiprocessing.get_context("spawn"))
    assert parallel_map(math.factorial, JOBS, num_workers=2) == [math.factorial(x) for x in JOBS]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is used on Linux only")
def test_start_method_forks_only_a_single_threaded_process_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    real_active_count = threading.active_count
    # earlier tests in this process may leave threads behind: the count is set, then real again
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    assert mp_context().get_start_method() == "fork"
    monkeypatch.setattr(threading, "active_count", lambda: 2)
    assert mp_context().get_start_method() == "spawn"
    monkeypatch.setattr(threading, "active_count", real_active_count)

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert mp_context().get_start_method() == "spawn"  # a real second thread
    finally:
        stop.set()
        thread.join()

    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    assert mp_context().get_start_method() == "spawn"
