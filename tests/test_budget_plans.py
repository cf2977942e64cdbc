"""Plans that do not depend on the load at planning time, schedules that fill their time budget, and
the configuration the CPU planner chooses for the budget (issue 17)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from test_planner import CPU_FLOPS, hippocampus_like
from test_training import _tiny_plan

from medseg import workflow
from medseg.planning import planner
from medseg.planning.planner import StepTimer, plan_dataset
from medseg.plans.schema import Plans
from medseg.training.loop import Budget, _epoch_seconds, train_fold
from medseg.workdir import WorkDir


def _structure(plans: Plans) -> dict:
    """Everything a plan decides (network, patch, batch, iterations, the recommendation); the
    continuous estimates (step seconds, planned epochs) are compared separately."""
    out = {key: (c.patch_size, c.batch_size, c.architecture.model_dump(), c.training.iterations_per_epoch)
           for key, c in plans.configurations.items()}
    out["recommended"] = plans.recommended
    return out


def _busy_core() -> subprocess.Popen:
    """Another process keeping one core busy for as long as it runs."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _plan(timer: StepTimer) -> Plans:
    return plan_dataset(hippocampus_like(), device="cpu", memory_gb=8, configs=["2d", "3d_fullres"],
                        time_budget_min=3, timer=timer)


def test_a_plan_made_while_another_process_keeps_a_core_busy_equals_the_idle_plan(tmp_path):
    """Two parts. (1) What makes a first plan independent of the load: the planner's measurement of
    a step (one thread's CPU time) is the same idle and with the other core busy, where a
    multi-threaded step's wall time is not. (2) Step times are measured once per machine and step
    (the calibration) and remembered, so a later plan under load is the idle plan exactly."""
    cache = tmp_path / "step_times.json"
    idle_timer = StepTimer(cache)
    idle = _plan(idle_timer)  # measures the 2d and 3d_fullres candidates: several widths, batches, patches
    fresh, remembered = StepTimer(None), StepTimer(cache)
    busy = _busy_core()
    try:
        _plan(fresh)
        loaded = _plan(remembered)
    finally:
        busy.kill()
        busy.wait()
    common = sorted(set(idle_timer.memo) & set(fresh.memo))
    assert len(common) >= 4
    ratios = [fresh.memo[k] / idle_timer.memo[k] for k in common]
    # wall time of a 2-thread step: up to 7x under load; thread time: median 0.95-1.10, single steps
    # up to 1.31 in CI (the two cores share caches and memory bandwidth with the busy one)
    assert 0.8 < float(np.median(ratios)) < 1.25 and all(0.67 < r < 1.5 for r in ratios), ratios
    assert remembered.measured == 0 and remembered.reused > 0
    assert _structure(loaded) == _structure(idle)
    assert loaded.model_dump() == idle.model_dump()


def test_cpu_step_times_are_one_thread_cpu_time_scaled_to_the_training_threads(monkeypatch):
    import torch

    from medseg.plans.schema import Architecture

    arch = Architecture(features=[4, 8], kernel_sizes=[[3, 3, 3]] * 2, strides=[[1, 1, 1], [2, 2, 2]])
    threads = torch.get_num_threads()
    seen = []
    real = planner.synthetic_training_step

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(planner, "synthetic_training_step", spy)
    assert planner.measure_step_seconds(arch, (16, 16, 16), 2, 1, 3) > 0
    assert seen == [1] and torch.get_num_threads() == threads  # measured on one thread, the threads restored
    assert planner.cpu_speedup(1) == 1.0
    assert planner.cpu_speedup(2) == pytest.approx(1 + planner.CPU_PARALLEL_EFFICIENCY)


@pytest.mark.parametrize("minutes,step_s", [(3, 0.09), (3, 0.3), (30, 0.9), (30, 5.8), (600, 2.0), (0.2, 0.01)])
def test_the_schedule_fills_the_budget_in_short_epochs(minutes, step_s):
    epochs, iters = planner._cpu_schedule(minutes, step_s)
    planned_s = epochs * iters * step_s
    assert planned_s == pytest.approx(60 * minutes, rel=0.1) or iters == planner.CPU_MIN_ITERATIONS
    assert iters <= planner.CPU_ITERATIONS_PER_EPOCH
    # an epoch is a small share of the budget unless even the fewest iterations take longer
    assert iters * step_s <= planner.CPU_EPOCH_SHARE * 60 * minutes or iters == planner.CPU_MIN_ITERATIONS


def test_the_epoch_time_estimate_is_the_mean_of_the_last_epochs():
    history = [{"elapsed_s": t} for t in (10.0, 20.0, 32.0, 44.0)]
    assert _epoch_seconds([], 5.0) is None
    assert _epoch_seconds(history[:1], 11.0) == 11.0
    assert _epoch_seconds(history, 45.0) == pytest.approx((45.0 - 10.0) / 3)  # the last 3 epochs and the save


def test_a_time_budget_without_epochs_fills_it_and_explicit_epochs_do_not(tmp_path):
    plans = Plans.load(_tiny_plan_path(tmp_path))
    c = plans.configurations["3d_fullres"]
    assert Budget.from_plan(c, time_budget_min=2).fill
    assert not Budget.from_plan(c, epochs=3).fill
    assert not Budget.from_plan(c, epochs=3, time_budget_min=2).fill  # epochs cap a run that has both
    c.training.time_budget_min = 5
    assert Budget.from_plan(c).fill


def _tiny_plan_path(tmp_path):
    from helpers import make_msd_dataset

    ds = make_msd_dataset(tmp_path / "ds", n_cases=4)
    _tiny_plan(ds, tmp_path / "wd")
    return tmp_path / "wd" / "plans.json"


def test_a_time_budgeted_run_ends_within_ten_percent_of_its_budget_with_the_lr_annealed(tmp_path):
    plans_path = _tiny_plan_path(tmp_path)
    plans = Plans.load(plans_path)
    c = plans.configurations["3d_fullres"]
    c.training.epochs = 2  # the plan's estimate is far too few: the run must keep going to fill the budget
    c.training.iterations_per_epoch = 2  # short epochs: the run ends within half an epoch of the budget
    plans.save(plans_path)
    minutes = 0.4
    run = train_fold(tmp_path / "wd", "3d_fullres", 0, time_budget_min=minutes)
    meta = json.loads((run / "run.json").read_text())
    schedule = meta["schedule"]
    assert schedule["planned"]["epochs"] == 2 and schedule["planned"]["minutes"] == minutes
    actual = schedule["actual"]
    assert actual["epochs"] > 2
    assert actual["minutes"] == pytest.approx(minutes, rel=0.1)
    assert actual["budget_used"] == pytest.approx(actual["minutes"] / minutes)
    history = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(history) == actual["epochs"]
    assert history[-1]["lr"] < 0.25 * c.training.initial_lr  # annealed over the time, not cut off at full lr
    assert all(a["lr"] >= b["lr"] for a, b in zip(history, history[1:], strict=False))


# --- the configuration chosen for the budget ---------------------------------------------------------------


def _analytic(minutes: float, configs=("2d", "3d_fullres"), throughput: float = CPU_FLOPS) -> Plans:
    return plan_dataset(hippocampus_like(), device="cpu", memory_gb=8, throughput=throughput,
                        configs=list(configs), time_budget_min=minutes)


def test_a_short_cpu_budget_trains_2d_and_says_why():
    plans = _analytic(3)
    assert plans.recommended == ["2d"]
    assert plans.recommendation.startswith("CPU plan: 2d")
    assert "3d_fullres gets ~" in plans.recommendation and "learns faster per second" in plans.recommendation
    assert plans.default_configurations() == ["2d"]


def test_a_budget_that_gives_3d_its_steps_at_a_useful_width_trains_3d_fullres():
    widths = {}
    for minutes in (3, 30, 120, 600, 3000):
        plans = _analytic(minutes)
        c3 = plans.config("3d_fullres")
        widths[minutes] = (c3.architecture.features[0], plans.recommended)
        steps = minutes * 60 / c3.memory.step_seconds_estimate
        if "3d_fullres" in plans.recommended:
            assert steps >= 0.9 * planner.CPU_TARGET_ITERATIONS
            assert c3.architecture.features[0] >= planner.CPU_3D_MIN_WIDTH
    chosen = [r for _, r in widths.values()]
    assert chosen[0] == ["2d"] and "3d_fullres" in chosen[-1], widths
    # once 3d_fullres is chosen, a larger budget never goes back to 2d alone
    first_3d = next(i for i, r in enumerate(chosen) if "3d_fullres" in r)
    assert all("3d_fullres" in r for r in chosen[first_3d:])


def test_the_narrowest_width_missing_its_target_by_far_shrinks_the_patch_too():
    plans = _analytic(3, configs=("3d_fullres",), throughput=1e10)
    c = plans.config("3d_fullres")
    assert "patch was shrunk" in c.memory.decision
    assert np.prod(c.patch_size) < 40 * 56 * 40
    assert np.prod(c.patch_size) >= planner.CPU_MIN_PATCH_SHARE * 40 * 56 * 40 / 2  # padded to the divisibility
    assert c.architecture.features[0] == min(planner.CPU_WIDTH_CHOICES)


def test_gpu_plans_recommend_3d_fullres():
    plans = plan_dataset(hippocampus_like(), device="cuda", memory_gb=8, configs=["2d", "3d_fullres"])
    assert plans.recommended == ["3d_fullres"] and "find-best" in plans.recommendation


def test_plans_made_before_the_recommendation_default_to_3d_fullres(tmp_path):
    plans = _analytic(3)
    old = plans.model_copy(update={"recommended": [], "recommendation": ""})
    assert old.default_configurations() == ["3d_fullres"]
    data = json.loads(old.model_dump_json())
    del data["recommended"], data["recommendation"]
    (tmp_path / "plans.json").write_text(json.dumps(data))
    assert Plans.load(tmp_path / "plans.json").default_configurations() == ["3d_fullres"]


def test_info_prints_the_choice_and_train_uses_it(tmp_path, msd_dataset):
    work = tmp_path / "wd"
    workflow.plan(msd_dataset, work, configs=["2d", "3d_fullres"], num_workers=1, throughput=1e12, preprocess=False,
                  time_budget_min=1)
    plans = Plans.load(WorkDir(work).plans)
    assert plans.recommended
    text = workflow.info(work)
    assert f"train by default: {', '.join(plans.recommended)}" in text and plans.recommendation in text
