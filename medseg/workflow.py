"""The planning stages the CLI calls (`plan`, `preprocess`, `info`); training, prediction and
selection are called from `medseg.orchestration` and `medseg.inference` directly."""

from __future__ import annotations

import importlib
import logging
import os
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from types import ModuleType

from medseg.errors import DatasetError, MedsegError
from medseg.fingerprint import Fingerprint, compute_fingerprint, source_digest
from medseg.io.check import check_dataset
from medseg.io.dataset import Dataset, load_dataset
from medseg.parallel import process_pool
from medseg.plans.schema import Plans, label_values
from medseg.preprocessing.labels import check_class_count
from medseg.preprocessing.pipeline import preprocess_dataset
from medseg.utils import atomic_write_json, resolve_device
from medseg.workdir import WorkDir

# The planner imports torch and MONAI (~3 s on 2 cores); `plan` imports it while worker processes
# check and fingerprint the dataset, so this module must not import it at the top.
PLANNER = "medseg.planning.planner"

log = logging.getLogger(__name__)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def plan(dataset: Path, workdir: Path, *, memory_gb: float | None = None, device: str | None = "cpu",
         configs: list[str] | None = None, time_budget_min: float | None = None, preprocess: bool = True,
         num_workers: int | None = None, progress: bool = False, throughput: float | None = None,
         variants: list[str] | None = None, timing_cache: Path | None = None, remeasure: bool = False,
         plans_from: Path | None = None) -> Plans:
    """check → fingerprint → plans → preprocess. Nothing is written before the check passes.
    ``plans_from``: a trained work directory whose configurations the plans take (transfer, see
    :func:`~medseg.planning.planner.transfer_plans`) instead of planning anew.
    ``device`` None or "auto": CUDA when available (decided once torch has loaded). On a CPU, step
    times the planner measures are remembered in ``timing_cache`` (default
    :func:`~medseg.planning.planner.default_timing_cache`); ``remeasure`` measures them again."""
    num_workers = num_workers or default_workers()
    timing: dict[str, float] = {}
    ds = load_dataset(dataset)
    for note in ds.notes:
        log.info("note: %s", note)
    check_class_count(label_values(ds.labels), f"{ds.root}: labels")  # before anything is written
    work = WorkDir(workdir)
    source = None
    if plans_from is not None:  # before anything is written
        if WorkDir(plans_from).root.resolve() == work.root.resolve():
            raise MedsegError(f"--plans-from {plans_from}: that is the work directory being planned")
        source = Plans.load(WorkDir(plans_from).plans)
    # one pool for every step, forked before the planner's thread imports torch (medseg.parallel's
    # start-method rule), so that check, fingerprint and preprocessing all run in forked workers
    with process_pool(num_workers) if num_workers > 1 and len(ds.cases) > 1 else nullcontext() as pool:
        fp, planner, fresh = _check_and_fingerprint(ds, work, num_workers, progress, pool, timing)
        planner.resolve_variants(variants or ["plain"])  # unknown variant names fail before anything is written
        device = resolve_device(device)
        work.root.mkdir(parents=True, exist_ok=True)
        if fresh:  # a reused fingerprint is left as it is
            fp.save(work.fingerprint)
        work.write_source(dataset)
        t = time.perf_counter()
        if source is not None and not work.plans.exists():
            plans = planner.transfer_plans(source, fp, str(Path(plans_from).resolve()))
            plans.save(work.plans)
        else:
            plans = _plans(planner, fp, work, device=device, memory_gb=memory_gb, configs=configs,
                           time_budget_min=time_budget_min, throughput=throughput, variants=variants,
                           timer=planner.StepTimer(timing_cache or planner.default_timing_cache(), refresh=remeasure))
        timing["plan_s"], t = time.perf_counter() - t, time.perf_counter()
        if preprocess:
            preprocess_dataset(ds, plans, work.root, num_workers=num_workers, progress=progress, executor=pool)
            timing["preprocess_s"] = time.perf_counter() - t
    atomic_write_json(work.plan_timing, timing)
    log.info("timing: %s", ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in timing.items()))
    return plans


def _check_and_fingerprint(ds: Dataset, work: WorkDir, num_workers: int, progress: bool, pool: Executor | None,
                           timing: dict[str, float]) -> tuple[Fingerprint, ModuleType, bool]:
    """Check the cases (a DatasetError listing every problem), fingerprint them unless
    ``fingerprint.json`` was made from the same files (:func:`~medseg.fingerprint.source_digest`), and
    return it with the planner module, imported on a thread meanwhile (torch and MONAI, ~3 s on 2 cores),
    and whether it was computed now."""
    t = time.perf_counter()
    fp = _current_fingerprint(work, ds)
    fresh = fp is None
    # leaving the `with` waits for the import on every path, so no caller going on forks a process while it runs
    with ThreadPoolExecutor(1) as thread:
        importing = thread.submit(importlib.import_module, PLANNER)
        problems = check_dataset(ds, num_workers=num_workers, progress=progress, executor=pool)
        if problems:
            raise DatasetError(f"{len(problems)} problem(s) found by `medseg check`:\n" + "\n".join(problems))
        timing["check_s"], t = time.perf_counter() - t, time.perf_counter()
        if fp is None:
            fp = compute_fingerprint(ds, num_workers=num_workers, progress=progress, executor=pool)
            if work.plans.exists():
                log.warning("%s: the dataset changed since it was planned (new fingerprint); %s is kept, delete it "
                            "to re-plan", ds.root, work.plans)
        timing["fingerprint_s"], t = time.perf_counter() - t, time.perf_counter()
        planner = importing.result()
        timing["import_wait_s"] = time.perf_counter() - t
    return fp, planner, fresh


def _current_fingerprint(work: WorkDir, ds: Dataset) -> Fingerprint | None:
    """``fingerprint.json`` when it was made from ``ds``'s files as they are now, else None."""
    if not work.fingerprint.exists():
        return None
    try:
        fp = Fingerprint.load(work.fingerprint)
    except ValueError:  # unreadable or of another schema: computed again
        return None
    if fp.made_from != source_digest(ds):
        log.info("%s: the dataset's files changed (or the fingerprint predates their record); fingerprinting again",
                 ds.root)
        return None
    return fp


def _plans(planner: ModuleType, fp: Fingerprint, work: WorkDir, *, timer, configs: list[str] | None,
           variants: list[str] | None, **options) -> Plans:
    """The work directory's plans: kept when ``plans.json`` exists (delete it to re-plan), else planned."""
    if work.plans.exists():
        log.info("%s exists; keeping it (delete it to re-plan)", work.plans)
        return Plans.load(work.plans)
    plans = planner.plan_dataset(fp, configs=configs or list(planner.DEFAULT_CONFIGS), variants=variants or ["plain"],
                                 timer=timer, **options)
    plans.save(work.plans)
    if timer.measured or timer.reused:
        log.info("planner step times: %d measured, %d remembered from %s", timer.measured, timer.reused, timer.cache)
    return plans


def preprocess(workdir: Path, configs: list[str] | None = None, num_workers: int | None = None,
               progress: bool = False) -> dict[str, int]:
    work = WorkDir(workdir)
    plans = Plans.load(work.plans)
    ds = load_dataset(work.dataset_path())
    return preprocess_dataset(ds, plans, work.root, configs=configs, num_workers=num_workers or default_workers(),
                              progress=progress)


NNUNET_REFERENCE = {
    "hippocampus": {"3d_fullres": "spacing 1x1x1, patch 40x56x40, batch 7, 4 stages (32,64,128,256)",
                    "2d": "patch 56x40, batch 292"},
}


def info(workdir: Path) -> str:
    """The plan in nnU-Net's terms: spacing, patch, batch, stages and features, and why."""
    plans = Plans.load(WorkDir(workdir).plans)
    lines = [f"dataset {plans.dataset_name}: {len(plans.channel_names)} channel(s) {plans.channel_names}, "
             f"labels {plans.labels}, planned for {plans.device}"]
    if plans.recommended:
        lines.append(f"train by default: {', '.join(plans.recommended)}")
        lines.append(f"    why: {plans.recommendation}")
    for name, c in plans.configurations.items():
        a = c.architecture
        spacing = "x".join(f"{s:g}" for s in (c.spacing if c.dim == 3 else c.spacing[1:]))
        lines.append(f"{name}: spacing {spacing}, patch {'x'.join(map(str, c.patch_size))}, batch {c.batch_size}, "
                     f"{a.num_stages} stages ({','.join(map(str, a.features))}), median shape "
                     f"{'x'.join(map(str, c.median_shape))}, transpose {c.transpose_forward}")
        lines.append(f"    strides {a.strides}")
        lines.append(f"    kernels {a.kernel_sizes}")
        lines.append(f"    training: {c.training.epochs} epochs x {c.training.iterations_per_epoch} iterations"
                     + (f", planned for {c.training.time_budget_min:g} min" if c.training.time_budget_min else ""))
        lines.append(f"    memory: {c.memory.estimate_gb:.2f} GB of {c.memory.budget_gb:.1f} GB"
                     f" ({c.memory.flops_per_step / 1e9:.0f} GFLOP per step)")
        lines.append(f"    why: {c.memory.decision}")
        ref = NNUNET_REFERENCE.get(plans.dataset_name.lower(), {}).get(name)
        if ref:
            lines.append(f"    nnU-Net v2 default for this dataset: {ref}")
    return "\n".join(lines)
