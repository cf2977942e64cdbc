"""The planner: fingerprint → :class:`~medseg.plans.schema.Plans`.

On CUDA it sizes patch and batch for the GPU memory budget, like nnU-Net. On a CPU the binding
constraint is compute time, not memory, so it sizes the network for learning per second within
the training time budget: the width is the largest of :data:`CPU_WIDTH_CHOICES` whose step at
batch 2 still allows :data:`CPU_TARGET_ITERATIONS` optimiser steps in the budget, then the batch
is raised toward that step time (capped by memory and 5% of the dataset's voxels), timed again
when its estimate lands within 10% of the target. Every decision is written into
``memory.decision``. The variants offered are those of :data:`medseg.networks.variants.VARIANTS`.

GPU memory budget (the default of ``--memory-gb`` on CUDA, :func:`default_memory_gb`): the chosen
device's (``cuda:N``) total memory less :data:`GPU_CONTEXT_GB` for what lives outside PyTorch's
allocator (the CUDA context, cuDNN and cuBLAS handles), times :data:`GPU_ALLOCATOR_SHARE` (the
memory model is checked to +-25% against measured peaks, and 1/1.25 = 0.8 keeps a peak the model
under-estimated by that much on the device; the caching allocator's fragmentation is small for a
training loop of fixed shapes), and at most :data:`GPU_REFERENCE_GB`. The cap is nnU-Net's reason
for its fixed 8 GB target: a plan made on a large GPU must still train on the 11-12 GB cards common
at other sites, so plans (and results) do not depend on the planning machine; a larger patch than
the one the reference budget allows buys little for the time each step then costs. Ask for more
with ``--memory-gb``. The total memory is read, not the free memory, so that the plan does not
depend on what else runs at planning time. CUDA plans are sized for AMP training (fp16 autocast,
as the training loop runs it): ``estimate_costs(..., amp=True)``; CPU plans for float32.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medseg import __version__
from medseg.errors import PlanError
from medseg.fingerprint import Fingerprint
from medseg.io.dataset import channel_normalization
from medseg.networks.unet import CostEstimate, check_buildable, estimate_costs
from medseg.networks.variants import BLOCKS_BY_VARIANT, presets
from medseg.planning.memory import synthetic_training_step
from medseg.plans import topology
from medseg.plans.schema import (
    Architecture,
    Blocks,
    Configuration,
    MemoryEstimate,
    MemoryTrade,
    Normalization,
    Plans,
    Training,
    label_values,
)
from medseg.training.precision import training_autocast
from medseg.utils import atomic_write_json, look_up
from medseg.workdir import medseg_home

log = logging.getLogger(__name__)

BASE_FEATURES = 32
MAX_FEATURES = {2: 512, 3: 320}
INITIAL_PATCH_VOXELS = {2: 2048**2, 3: 256**3}
MAX_DATASET_FRACTION = 0.05
MIN_BATCH = 2
CPU_TARGET_ITERATIONS = 2000
CPU_WIDTH_CHOICES = (32, 24, 16, 12, 8)
DEFAULT_CPU_TIME_BUDGET_MIN = 30.0
GPU_EPOCHS, GPU_ITERATIONS = 1000, 250
CPU_ITERATIONS_PER_EPOCH = 50  # at most; fewer when an epoch would take more than CPU_EPOCH_SHARE of the budget
CPU_MIN_ITERATIONS = 10
CPU_EPOCH_SHARE = 0.04
CPU_PATCH_TRADE = 1.25  # the narrowest width's step over the target beyond which the patch is shrunk as well
CPU_MIN_PATCH_SHARE = 0.25  # ... to at least this share of the memory-fitted patch's voxels
BATCH_EXTRAPOLATION_MARGIN = 0.9  # a larger batch is timed only when batch-2 scaling lands within 10% of the target
CPU_STEP_OVERHEAD = 1.15  # data loading in a worker process and the per-epoch validation patches
GPU_REFERENCE_GB = 8.0  # the default GPU budget's cap (nnU-Net's reference budget; see the module docstring)
GPU_CONTEXT_GB = 1.0  # device memory outside PyTorch's allocator: CUDA context, cuDNN/cuBLAS handles
GPU_ALLOCATOR_SHARE = 0.8  # of the rest: room for the memory model's +-25% and allocator fragmentation
CPU_TIMING_WARMUP, CPU_TIMING_REPEATS = 2, 3  # CPU step timing: warm-up steps, then the fastest of these
CPU_PARALLEL_EFFICIENCY = 0.6  # each intra-op thread beyond the first adds this share of one thread's speed
TIMING_METHOD = "thread-cpu-time/v1"  # part of the step-time cache key: wall times measured before are not reused


VARIANTS = BLOCKS_BY_VARIANT  # variant name → the Blocks its configurations record (read from the registry)


def resolve_variants(names: Sequence[str]) -> list[str]:
    """Expand presets and check names (whether a variant can be built depends on the patch, and is
    checked per configuration by the planner)."""
    named = presets()
    out: list[str] = []
    for name in names:
        for v in named.get(name, [name]):
            look_up(v, list(VARIANTS) + list(named), "variant")
            if v not in out:
                out.append(v)
    return out


def gpu_budget_gb(total_gb: float) -> float:
    """The default budget for a GPU of ``total_gb``: ``min(GPU_REFERENCE_GB, GPU_ALLOCATOR_SHARE x
    (total_gb - GPU_CONTEXT_GB))`` (module docstring). 8 GB for any GPU of 11 GB or more."""
    return min(GPU_REFERENCE_GB, GPU_ALLOCATOR_SHARE * (total_gb - GPU_CONTEXT_GB))


def default_memory_gb(device: str) -> float:
    """On CUDA, :func:`gpu_budget_gb` of the chosen device (``cuda:N``; plain ``cuda`` is the current
    device); on a CPU a quarter of RAM, at most 8 GB."""
    dev = torch.device(device)
    if dev.type == "cuda":
        index = torch.cuda.current_device() if dev.index is None else dev.index
        return gpu_budget_gb(torch.cuda.get_device_properties(index).total_memory / 1e9)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        ram = 16.0
    return min(0.25 * ram, 8.0)


def cpu_speedup(threads: int) -> float:
    """How many times faster a training step runs on ``threads`` intra-op threads than on one:
    ``1 + CPU_PARALLEL_EFFICIENCY x (threads - 1)`` (the cost model's one machine-independent constant,
    measured on the development machine; see :data:`CPU_PARALLEL_EFFICIENCY`)."""
    return 1.0 + CPU_PARALLEL_EFFICIENCY * (max(1, threads) - 1)


def measure_step_seconds(arch: Architecture, patch: Sequence[int], batch: int, in_channels: int,
                         num_classes: int, device: str = "cpu", steps: int = CPU_TIMING_REPEATS) -> float:
    """Seconds per real training step (forward, deep-supervision loss, backward, SGD) on random data,
    the fastest of ``steps`` after :data:`CPU_TIMING_WARMUP` warm-up steps (which pay the kernel and
    allocator set-up).

    On CUDA: wall-clock seconds. On a CPU the step runs on *one* thread and its thread CPU time is
    measured (``time.thread_time``), then divided by :func:`cpu_speedup` of the threads training will
    use. CPU time of one thread does not depend on what else the machine runs (another process on
    the other core, or time-sliced with this one), where the wall time of a multi-threaded step does
    (measured on 2 cores with other work running: 0.25-0.3 s of thread time against 1.0-7.5 s of
    wall time for the same 3D step), so the plan does not depend on the load at planning time."""
    if device.startswith("cuda"):
        _, _, step = synthetic_training_step(arch, patch, batch, in_channels, num_classes, device,
                                             torch_optimizer=False, amp=training_autocast(device))
        best = float("inf")
        for i in range(steps + 1):
            t = time.perf_counter()
            step()
            torch.cuda.synchronize(device)
            if i:
                best = min(best, time.perf_counter() - t)
        return best
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, _, step = synthetic_training_step(arch, patch, batch, in_channels, num_classes, device,
                                             torch_optimizer=False, amp=None)
        best = float("inf")
        for i in range(CPU_TIMING_WARMUP + steps):
            t = time.thread_time()
            step()
            if i >= CPU_TIMING_WARMUP:
                best = min(best, time.thread_time() - t)
    finally:
        torch.set_num_threads(threads)
    return best / cpu_speedup(threads)


def default_timing_cache() -> Path:
    """Where measured step times are remembered: ``$MEDSEG_HOME/step_times.json`` (default
    ``~/.cache/medseg``)."""
    return medseg_home() / "step_times.json"


@functools.cache
def _machine_key(device: str) -> tuple:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return (cpu, os.cpu_count(), torch.get_num_threads(), torch.__version__, device, gpu, TIMING_METHOD)


class StepTimer:
    """:func:`measure_step_seconds`, remembered: measured once per machine (CPU model, cores,
    threads, torch version, device) and step (architecture, patch, batch, channels, classes) in a
    JSON file, so re-planning (another dataset of the same shape class, a variant, a re-run) costs
    no measurement. ``cache=None``: measure every time; ``refresh``: measure again and overwrite."""

    def __init__(self, cache: Path | None = None, *, refresh: bool = False) -> None:
        self.cache = Path(cache) if cache else None
        self.memo: dict[str, float] = {}
        self.measured = self.reused = 0
        if self.cache and self.cache.is_file() and not refresh:
            try:
                self.memo = {k: float(v) for k, v in json.loads(self.cache.read_text()).items()}
            except (ValueError, AttributeError, TypeError):  # a damaged cache is only a cache
                log.warning("%s: unreadable step-time cache; measuring again", self.cache)

    def __call__(self, arch: Architecture, patch: Sequence[int], batch: int, in_channels: int, num_classes: int,
                 device: str = "cpu") -> float:
        key = hashlib.sha1(json.dumps([_machine_key(device), arch.model_dump(mode="json"), list(map(int, patch)),
                                       int(batch), in_channels, num_classes], sort_keys=True).encode()).hexdigest()
        if key in self.memo:
            self.reused += 1
            return self.memo[key]
        seconds = measure_step_seconds(arch, patch, batch, in_channels, num_classes, device)
        self.memo[key] = seconds
        self.measured += 1
        if self.cache:
            try:
                self.cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(self.cache, self.memo)
            except OSError as exc:  # a read-only home must not stop planning
                log.warning("%s: cannot save step times (%s)", self.cache, exc)
        return seconds


def _features(base: int, stages: int, dim: int) -> list[int]:
    return [min(base * 2**i, MAX_FEATURES[dim]) for i in range(stages)]


def _architecture(spacing: Sequence[float], patch: Sequence[int], base: int,
                  blocks: Blocks | None = None) -> tuple[Architecture, list[int]]:
    strides, kernels = topology.pooling_plan(spacing, patch)
    patch = topology.pad_to_multiple(patch, topology.divisibility(strides))
    strides, kernels = topology.pooling_plan(spacing, patch)
    arch = Architecture(features=_features(base, len(strides), len(patch)), kernel_sizes=kernels, strides=strides,
                        blocks=blocks or Blocks())
    return arch, patch


def _initial_patch(spacing: Sequence[float], median_shape: Sequence[float]) -> list[int]:
    dim = len(spacing)
    inv = 1.0 / np.asarray(spacing)
    patch = np.round(inv * (INITIAL_PATCH_VOXELS[dim] / np.prod(inv)) ** (1 / dim)).astype(int)
    return [int(p) for p in np.minimum(patch, np.ceil(median_shape))]


@dataclass(frozen=True)
class PlanningContext:
    """What every configuration of one planning run shares: the dataset and the budgets."""

    fp: Fingerprint
    device: str  # "cpu" or "cuda"
    memory_gb: float
    time_budget_min: float  # CPU: the training time to plan for
    throughput: float | None  # CPU: FLOP/s for an analytic step time instead of measured steps
    timer: StepTimer
    dataset_voxels: float  # as nnU-Net: the 3D median shape times the number of cases

    @property
    def amp(self) -> bool:
        """Whether training runs under autocast (fp16 on CUDA), which the memory model then assumes."""
        return training_autocast(self.device) is not None

    def costs(self, arch: Architecture, patch: Sequence[int], batch: int) -> CostEstimate:
        """:func:`~medseg.networks.unet.estimate_costs` of a step at this context's precision."""
        return estimate_costs(arch, patch, batch, self.in_channels, self.num_classes, amp=self.amp)

    @property
    def in_channels(self) -> int:
        return len(self.fp.channel_names)

    @property
    def num_classes(self) -> int:
        """The network's outputs: one per label value, however sparse the values (plans.schema.label_values)."""
        return len(label_values(self.fp.labels))


@dataclass(frozen=True)
class Sizing:
    """The width, batch and schedule a device rule chose for a configuration, and why."""

    arch: Architecture
    patch: list[int]
    batch: int
    step_seconds: float | None
    decision: str
    epochs: int
    iterations_per_epoch: int
    time_budget_min: float | None


def _fit_patch(ctx: PlanningContext, name: str, spacing: Sequence[float], median_shape: Sequence[float],
               blocks: Blocks) -> tuple[Architecture, list[int]]:
    """Shrink the largest-relative-to-the-median axis until batch 2 fits the memory budget."""
    budget = ctx.memory_gb * 1e9
    arch, p = _architecture(spacing, _initial_patch(spacing, median_shape), BASE_FEATURES, blocks)
    while ctx.costs(arch, p, MIN_BATCH).training_bytes > budget:
        ratios = np.asarray(p) / np.asarray(median_shape)
        axis = int(np.argmax(ratios))
        step = topology.divisibility(arch.strides)[axis]
        if p[axis] - step < 2 * topology.MIN_FEATURE_MAP:
            raise PlanError(f"{ctx.fp.dataset_name}: no {name} patch fits in {ctx.memory_gb:.1f} GB; raise --memory-gb")
        p[axis] -= step
        arch, p = _architecture(spacing, p, BASE_FEATURES, blocks)
    return arch, p


def _reversible_trade(ctx: PlanningContext, name: str, spacing: Sequence[float], median_shape: Sequence[float],
                      blocks: Blocks, patch: list[int]) -> MemoryTrade:
    """What the memory saving of reversible ``blocks`` bought: ``patch`` against the patch the same
    blocks stored conventionally fit."""
    _, stored_patch = _fit_patch(ctx, name, spacing, median_shape, blocks.model_copy(update={"reversible": False}))
    gain = float(np.prod(patch) / np.prod(stored_patch))
    return MemoryTrade(versus="the same blocks without reversible couplings", patch_size=list(patch),
                       versus_patch_size=list(stored_patch), voxel_ratio=gain,
                       note=(f"reversible couplings let patch {patch} fit in {ctx.memory_gb:.1f} GB where stored "
                             f"activations allow {stored_patch} ({gain:.2f}x the voxels)") if gain > 1 else
                       (f"no larger patch to buy: {stored_patch} already fits (capped by the median shape "
                        f"{list(map(int, median_shape))}); the saving is headroom"))


def _batch_limits(ctx: PlanningContext, arch: Architecture, patch: Sequence[int]) -> tuple[int, int]:
    """(the largest batch the memory budget holds, 5% of the dataset's voxels in patches), both at
    least :data:`MIN_BATCH`."""
    batch_cap = max(MIN_BATCH, int(MAX_DATASET_FRACTION * ctx.dataset_voxels / np.prod(patch)))
    one = ctx.costs(arch, patch, 1)
    per_sample, weights = one.activation_bytes + one.workspace_bytes, one.weight_state_bytes
    mem_batch = max(MIN_BATCH, int((ctx.memory_gb * 1e9 - weights) // per_sample))
    return mem_batch, batch_cap


def _gpu_sizing(ctx: PlanningContext, arch: Architecture, patch: list[int], median_shape: Sequence[float],
                mem_batch: int, batch_cap: int) -> Sizing:
    """nnU-Net's rule: the fitted patch at base width, the largest batch memory and the 5% rule allow."""
    batch = min(mem_batch, batch_cap)
    why = (f"GPU plan: patch {patch} covers the median shape {list(map(int, median_shape))} as far as "
           f"{ctx.memory_gb:.1f} GB allow (AMP: fp16 activations); batch {batch} = min(memory {mem_batch}, "
           f"5% of dataset voxels {batch_cap})")
    return Sizing(arch, patch, batch, None, why, GPU_EPOCHS, GPU_ITERATIONS, None)


def _cpu_step_time(ctx: PlanningContext) -> tuple[Callable[[Architecture, Sequence[int], int], float], str]:
    """Seconds per training step of (architecture, patch, batch), and how they are obtained."""
    n_in, n_cls, throughput = ctx.in_channels, ctx.num_classes, ctx.throughput
    if throughput:  # analytic model at a given FLOP/s (deterministic; used by tests and dry runs)
        def analytic(a: Architecture, p: Sequence[int], b: int) -> float:
            return estimate_costs(a, p, b, n_in, n_cls).train_flops / throughput
        return analytic, f"analytic FLOPs at {throughput / 1e9:.0f} GFLOP/s"

    def measured(a: Architecture, p: Sequence[int], b: int) -> float:  # small networks: overheads FLOPs do not see
        return CPU_STEP_OVERHEAD * ctx.timer(a, p, b, n_in, n_cls)
    return measured, (f"one-thread CPU time of a training step / {cpu_speedup(torch.get_num_threads()):.2f} for "
                      f"{torch.get_num_threads()} threads x {CPU_STEP_OVERHEAD} for data loading and validation")


def _widest_fitting(step_seconds: Callable[[int], float], target: float) -> tuple[int, float]:
    """The widest of :data:`CPU_WIDTH_CHOICES` whose step takes at most ``target`` seconds (the
    narrowest when none does), and its step time. Step time grows with width, so the search starts
    in the middle of the choices and moves one way: planning measures two or three candidates
    instead of every width from the widest (the most expensive to time) down."""
    widths = sorted(CPU_WIDTH_CHOICES, reverse=True)
    seen: dict[int, float] = {}

    def fits(i: int) -> bool:
        seen[i] = step_seconds(widths[i])
        return seen[i] <= target

    i = len(widths) // 2
    if fits(i):
        while i > 0 and fits(i - 1):
            i -= 1
    else:
        while i < len(widths) - 1 and not fits(i + 1):
            i += 1
        i = min(i + 1, len(widths) - 1)
    return widths[i], seen[i]


def _batch_choices(cap: int) -> list[int]:
    """The batches a CPU plan chooses from, up to ``cap``: :data:`MIN_BATCH`, 3, 4, 6, 8, 12, 16 ...
    (powers of two and 1.5 x powers of two), so that a small difference between two measurements of
    the same step moves the batch rarely, and then by one coarse step."""
    out = sorted({b for k in range(12) for b in (2**k, 3 * 2**k // 2) if MIN_BATCH <= b <= max(cap, MIN_BATCH)})
    return out or [MIN_BATCH]


def _cpu_batch(step_time: Callable[[Architecture, int], float], arch: Architecture, step_s: float,
               target_step: float, cap: int) -> tuple[int, float, str]:
    """Raise the batch from :data:`MIN_BATCH` (whose step takes ``step_s``) toward ``target_step``,
    at most ``cap``, choosing from :func:`_batch_choices`. Returns (batch, its step seconds, a note
    when they were extrapolated)."""
    choices = _batch_choices(cap)
    fitting = [b for b in choices if step_s * b / MIN_BATCH <= target_step] or [MIN_BATCH]
    i = choices.index(fitting[-1])
    if choices[i] <= MIN_BATCH:
        return MIN_BATCH, step_s, ""
    # per-sample cost falls with batch size when overheads dominate, or rises a little
    linear = step_s * choices[i] / MIN_BATCH
    if linear <= BATCH_EXTRAPOLATION_MARGIN * target_step:
        return choices[i], linear, ", batch step time extrapolated from batch 2"
    longer = step_time(arch, choices[i])  # close to the target: time this batch, one choice down if it misses
    while longer > target_step and i > 0:
        i -= 1
        longer = step_time(arch, choices[i]) if choices[i] > MIN_BATCH else step_s
    return choices[i], longer, ""


def _cpu_schedule(budget_min: float, step_s: float) -> tuple[int, int]:
    """(epochs, iterations per epoch) that fill ``budget_min`` at ``step_s`` seconds per step: an epoch
    is at most :data:`CPU_EPOCH_SHARE` of the budget (:data:`CPU_MIN_ITERATIONS` to
    :data:`CPU_ITERATIONS_PER_EPOCH` steps), so a time-budgeted run, which decides before every epoch
    whether another one fits (``medseg.training.loop``), ends within half an epoch of its budget."""
    budget_s = budget_min * 60.0
    iters = int(np.clip(CPU_EPOCH_SHARE * budget_s // step_s, CPU_MIN_ITERATIONS, CPU_ITERATIONS_PER_EPOCH))
    return max(1, int(round(budget_s / (step_s * iters)))), iters


def _cpu_patch_trade(step_time: Callable[[Architecture, list[int], int], float], spacing: Sequence[float],
                     patch: list[int], blocks: Blocks, base: int, step_s: float,
                     target_step: float) -> tuple[Architecture, list[int], float, str]:
    """When even the narrowest width's step is more than :data:`CPU_PATCH_TRADE` times the target,
    shrink the patch too (all axes by one factor, to the target's share of the voxels but at least
    :data:`CPU_MIN_PATCH_SHARE`): a CPU plan that gets a few hundred steps in its budget learns less
    than one that sees smaller patches more often. Returns (architecture, patch, step seconds, note)."""
    arch, _ = _architecture(spacing, patch, base, blocks)
    if step_s <= CPU_PATCH_TRADE * target_step:
        return arch, patch, step_s, ""
    share = max(CPU_MIN_PATCH_SHARE, target_step / step_s)
    scale = share ** (1.0 / len(patch))
    smaller = [max(2 * topology.MIN_FEATURE_MAP, int(p * scale)) for p in patch]
    small_arch, smaller = _architecture(spacing, smaller, base, blocks)
    if np.prod(smaller) >= np.prod(patch):
        return arch, patch, step_s, ""
    small_s = step_time(small_arch, smaller, MIN_BATCH)
    return small_arch, smaller, small_s, (f"; even width {base} takes {step_s:.3f} s per step at patch {patch}, "
                                          f"{step_s / target_step:.1f}x the target, so the patch was shrunk to "
                                          f"{smaller} ({np.prod(smaller) / np.prod(patch):.0%} of the voxels, "
                                          f"est. {small_s:.3f} s/step)")


def _cpu_sizing(ctx: PlanningContext, spacing: Sequence[float], patch: list[int], median_shape: Sequence[float],
                blocks: Blocks, cap: int) -> Sizing:
    """Compute-bound rule: the widest width whose batch-2 step meets the time budget's step target
    (the patch shrunk as well when even the narrowest misses it by far), then the batch raised
    toward that target (at most ``cap``, the GPU-style batch); the schedule fills the budget."""
    target_step = ctx.time_budget_min * 60.0 / CPU_TARGET_ITERATIONS
    step_time, how = _cpu_step_time(ctx)
    base, step_s = _widest_fitting(lambda w: step_time(_architecture(spacing, patch, w, blocks)[0], patch, MIN_BATCH),
                                   target_step)
    arch, patch, step_s, traded = _cpu_patch_trade(step_time, spacing, patch, blocks, base, step_s, target_step)
    batch, step_s, extrapolated = _cpu_batch(lambda a, b: step_time(a, patch, b), arch, step_s, target_step, cap)
    epochs, iters = _cpu_schedule(ctx.time_budget_min, step_s)
    why = (f"CPU plan (compute-bound): {ctx.time_budget_min:g} min budget / {CPU_TARGET_ITERATIONS} target steps "
           f"= {target_step:.3f} s per step ({how}); widest base width from {list(CPU_WIDTH_CHOICES)} meeting "
           f"it is {base} at batch {batch} (est. {step_s:.3f} s/step{extrapolated}); patch {patch} from median shape "
           f"{list(map(int, median_shape))}{traded}; GPU-style batch would be {cap}; schedule {epochs} epochs x "
           f"{iters} iterations = {epochs * iters} steps to fill the budget")
    return Sizing(arch, patch, batch, step_s, why, epochs, iters, ctx.time_budget_min)


def _plan_configuration(ctx: PlanningContext, name: str, spacing: list[float], median_shape: list[float],
                        transpose: list[int], variant: str = "plain") -> Configuration:
    """One configuration of one variant: the patch fitted to memory, then width and batch by the
    device's rule, checked buildable, with its costs."""
    blocks = VARIANTS[variant]
    arch, patch = _fit_patch(ctx, name, spacing, median_shape, blocks)
    trade = _reversible_trade(ctx, name, spacing, median_shape, blocks, patch) if blocks.reversible else None
    mem_batch, batch_cap = _batch_limits(ctx, arch, patch)
    if ctx.device.startswith("cuda"):
        sizing = _gpu_sizing(ctx, arch, patch, median_shape, mem_batch, batch_cap)
    else:
        sizing = _cpu_sizing(ctx, spacing, patch, median_shape, blocks, min(batch_cap, mem_batch))
    patch = sizing.patch
    try:
        check_buildable(sizing.arch, patch)
    except PlanError as e:
        raise PlanError(f"{ctx.fp.dataset_name}: variant {variant!r} of {name} cannot be built: {e}") from None
    costs = ctx.costs(sizing.arch, patch, sizing.batch)
    iters = sizing.iterations_per_epoch
    return Configuration(
        name=name, variant=variant, spacing=spacing, transpose_forward=transpose,
        median_shape=[int(round(m)) for m in median_shape],
        patch_size=patch, batch_size=sizing.batch, normalization=_normalization(ctx.fp), architecture=sizing.arch,
        training=Training(epochs=sizing.epochs, iterations_per_epoch=iters, val_iterations=max(5, iters // 5),
                          mirror_axes=list(range(len(spacing))), time_budget_min=sizing.time_budget_min),
        memory=MemoryEstimate(budget_gb=ctx.memory_gb, estimate_gb=costs.training_bytes / 1e9,
                              activations_gb=costs.activation_bytes / 1e9, workspace_gb=costs.workspace_bytes / 1e9,
                              weights_gb=costs.weight_state_bytes / 1e9, flops_per_step=costs.train_flops,
                              step_seconds_estimate=sizing.step_seconds, decision=sizing.decision, trade=trade),
    )


def _normalization(fp: Fingerprint) -> list[Normalization]:
    before = np.array([np.prod(c.shape_before_crop) for c in fp.cases], dtype=float)
    after = np.array([np.prod(c.shape_after_crop) for c in fp.cases], dtype=float)
    use_mask = bool(np.median(after / before) < 0.75)
    out = []
    for stats in fp.channels:
        scheme = channel_normalization(stats.name)
        if scheme == "ct":
            out.append(Normalization(scheme="ct", mean=stats.mean, std=stats.std, lower=stats.p00_5, upper=stats.p99_5))
        else:
            out.append(Normalization(scheme=scheme, use_mask=use_mask and scheme == "zscore"))
    return out


LOWRES_MIN_COVERAGE = 0.25  # a 3d_lowres stage is added when the full-resolution patch covers less of the median image
LOWRES_SPACING_STEP = 1.1  # the low-resolution spacing grows by this factor per step
LOWRES_MIN_REDUCTION = 2.0  # ... and is dropped unless the median image has at least this many times fewer voxels
DEFAULT_CONFIGS = ("2d", "3d_fullres", "3d_lowres")  # 3d_lowres (and the cascade) only where needed
ALL_CONFIGS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")


def lowres_spacing(spacing: Sequence[float], median_shape: Sequence[float], fits_coverage) -> list[float] | None:
    """Coarsen ``spacing`` step by step (the finest axes first, until they reach the coarsest, then
    all together) until ``fits_coverage(spacing, median_shape_there)`` holds. None when the result is
    not clearly smaller than full resolution (fewer than :data:`LOWRES_MIN_REDUCTION` times the voxels)."""
    full = np.asarray(spacing, dtype=float)
    s = full.copy()
    median = np.asarray(median_shape, dtype=float)
    for _ in range(200):
        fine = s < s.max() - 1e-9
        s = np.where(fine, np.minimum(s * LOWRES_SPACING_STEP, s.max()), s) if fine.any() else s * LOWRES_SPACING_STEP
        shape = median * full / s
        if fits_coverage(list(s), list(shape)):
            break
    if np.prod(median) / np.prod(median * full / s) < LOWRES_MIN_REDUCTION:
        return None
    return [float(round(v, 6)) for v in s]


def plan_dataset(fp: Fingerprint, *, device: str = "cpu", memory_gb: float | None = None,
                 configs: Sequence[str] = DEFAULT_CONFIGS, time_budget_min: float | None = None,
                 throughput: float | None = None, seed: int = 0, variants: Sequence[str] = ("plain",),
                 timer: StepTimer | None = None) -> Plans:
    """Derive the plans for ``configs`` × ``variants`` from a fingerprint. A variant that cannot be
    built is refused here with a one-line reason.

    ``3d_lowres`` (or ``3d_cascade_fullres``) adds the low-resolution stage and the cascade only when
    the full-resolution patch covers less than :data:`LOWRES_MIN_COVERAGE` of the median image."""
    variants = resolve_variants(variants)
    unknown = [c for c in configs if c not in ALL_CONFIGS]
    if unknown:
        raise PlanError(f"unknown configuration(s) {unknown}; available: {', '.join(ALL_CONFIGS)}")
    dev = "cuda" if device.startswith("cuda") else "cpu"
    memory_gb = memory_gb or default_memory_gb(device)
    time_budget_min = time_budget_min or DEFAULT_CPU_TIME_BUDGET_MIN
    spacings = fp.spacings()
    spacing = topology.target_spacing(spacings)
    tf = topology.transpose_forward(spacing)
    shapes = fp.shapes_after_crop() * spacings / np.asarray(spacing)
    median_shape = np.median(shapes, axis=0)[tf]
    spacing_t = [spacing[i] for i in tf]
    ctx = PlanningContext(fp=fp, device=dev, memory_gb=memory_gb, time_budget_min=time_budget_min, throughput=throughput,
                          timer=timer or StepTimer(),  # one per planning run: the same step is never measured twice
                          dataset_voxels=float(np.prod(median_shape, dtype=np.float64)) * len(fp.cases))
    out = {}
    cascade = any(c in configs for c in ("3d_lowres", "3d_cascade_fullres"))
    for name in [c for c in ALL_CONFIGS if c in configs or (c == "3d_fullres" and cascade)]:
        if name in ("3d_lowres", "3d_cascade_fullres"):
            continue
        for variant in variants:
            if name == "3d_fullres":
                c = _plan_configuration(ctx, name, spacing_t, list(median_shape), tf, variant)
            else:
                c = _plan_configuration(ctx, name, spacing_t[1:], list(median_shape[1:]), tf, variant)
                c.spacing = [spacing_t[0], *c.spacing]  # 2d keeps the out-of-plane spacing as is
            out[c.key] = c
            if name != "3d_fullres" or not cascade:
                continue
            coverage = float(np.prod(c.patch_size) / np.prod(median_shape))
            if coverage >= LOWRES_MIN_COVERAGE:
                log.info("3d_lowres not needed: the 3d_fullres patch covers %.0f%% of the median image", 100 * coverage)
                continue

            def covers(s: list[float], shape: list[float], v: str = variant) -> bool:
                _, p = _fit_patch(ctx, "3d_lowres", s, shape, VARIANTS[v])
                return np.prod(p) / np.prod(shape) >= LOWRES_MIN_COVERAGE

            low_spacing = lowres_spacing(spacing_t, list(median_shape), covers)
            if low_spacing is None:
                log.info("3d_lowres dropped: its median image would not be clearly smaller than 3d_fullres's")
                continue
            low_median = list(np.asarray(median_shape) * np.asarray(spacing_t) / np.asarray(low_spacing))
            low = _plan_configuration(ctx, "3d_lowres", low_spacing, low_median, tf, variant)
            low.memory.decision += (f"; low-resolution stage: the 3d_fullres patch covers {coverage:.0%} of the median "
                                    f"image, so spacing was coarsened to {low_spacing}")
            casc = c.model_copy(deep=True, update={"name": "3d_cascade_fullres", "inherits_from": c.key,
                                                   "previous_stage": low.key})
            casc.memory.decision = (f"3d_fullres's plan, with the one-hot {low.key} segmentation as "
                                    f"{ctx.num_classes - 1} extra input channel(s); " + c.memory.decision)
            out[low.key], out[casc.key] = low, casc
    recommended, why = recommend(out, dev, time_budget_min)
    return Plans(dataset_name=fp.dataset_name, channel_names=fp.channel_names, labels=fp.labels, device=dev,
                 seed=seed, configurations=out, medseg_version=__version__, recommended=recommended,
                 recommendation=why)


CPU_3D_MIN_WIDTH = 16  # 3d_fullres is chosen on a CPU when it gets its target steps at this base width or wider
CPU_BOTH_MIN_WIDTH = 24  # ... and 2d is trained beside it (for find-best's ensemble) from this width


def _steps_in_budget(c: Configuration, budget_min: float) -> int:
    return int(budget_min * 60.0 / c.memory.step_seconds_estimate) if c.memory.step_seconds_estimate else 0


def recommend(configs: dict[str, Configuration], device: str, budget_min: float) -> tuple[list[str], str]:
    """Which planned configuration(s) to train by default, and why.

    On CUDA: 3d_fullres (nnU-Net's usual winner; train the others too and let ``find-best`` choose).
    On a CPU the budget decides, from what learns fastest per second: a 3D network learns more per
    step (context in all three axes) but needs its steps. 3d_fullres is chosen when its plan gets
    :data:`CPU_TARGET_ITERATIONS` steps in the budget at base width :data:`CPU_3D_MIN_WIDTH` or more
    without shrinking the patch (2d beside it from :data:`CPU_BOTH_MIN_WIDTH`); otherwise 2d, whose
    steps are an order of magnitude cheaper. Measured on hippocampus (docs/benchmarks.md): at 5 CPU
    minutes per fold 2d reaches 0.859 and 3d_fullres 0.747 (narrowest width, ~1/3 of its target
    steps); at 30 minutes 3d_fullres, 16 wide with its 2000 steps, reaches 0.868. The first variant
    planned is the one recommended."""
    first = {}
    for key, c in configs.items():
        first.setdefault(c.name, key)
    if not first:
        return [], ""
    if device == "cuda" or not ({"2d", "3d_fullres"} & set(first)):
        key = first.get("3d_fullres", next(iter(first.values())))
        return [key], (f"{device.upper()} plan: {key} (nnU-Net's usual choice); train the other configurations too "
                       "and run `medseg find-best` to let cross-validation choose")
    if "3d_fullres" not in first or "2d" not in first:
        key = next(k for n, k in first.items() if n in ("2d", "3d_fullres"))
        return [key], f"{key}: the only one of 2d and 3d_fullres planned"
    c3, c2 = configs[first["3d_fullres"]], configs[first["2d"]]
    steps3, steps2 = _steps_in_budget(c3, budget_min), _steps_in_budget(c2, budget_min)
    width3, width2 = c3.architecture.features[0], c2.architecture.features[0]
    traded = "patch was shrunk" in c3.memory.decision
    meets = steps3 >= 0.9 * CPU_TARGET_ITERATIONS and not traded
    facts = (f"in {budget_min:g} min 3d_fullres gets ~{steps3} steps at width {width3}, patch "
             f"{'x'.join(map(str, c3.patch_size))}; 2d ~{steps2} steps at width {width2}")
    if meets and width3 >= CPU_BOTH_MIN_WIDTH:
        return [first["3d_fullres"], first["2d"]], (
            f"CPU plan: 3d_fullres and 2d ({facts}): the budget gives 3d_fullres its {CPU_TARGET_ITERATIONS} steps at "
            f"width >= {CPU_BOTH_MIN_WIDTH}, and 2d beside it is cheap; `medseg find-best` chooses or ensembles")
    if meets and width3 >= CPU_3D_MIN_WIDTH:
        return [first["3d_fullres"]], (
            f"CPU plan: 3d_fullres ({facts}): the budget gives it its {CPU_TARGET_ITERATIONS} steps at width >= "
            f"{CPU_3D_MIN_WIDTH}, where a 3D network learns more per second than 2d")
    short = "a shrunk patch" if traded else (f"too few steps or too narrow a network (needs {CPU_TARGET_ITERATIONS} "
                                              f"steps at width >= {CPU_3D_MIN_WIDTH})")
    return [first["2d"]], (
        f"CPU plan: 2d ({facts}): 3d_fullres would get {short} "
        f"in this budget, where 2d learns faster per second (hippocampus, 5 min per fold: 2d 0.859 vs "
        f"3d_fullres 0.747); plan with a larger --time-budget for 3d_fullres")


def transfer_plans(source: Plans, fp: Fingerprint, source_dir: str) -> Plans:
    """Plans for ``fp``'s dataset that take ``source``'s configurations whole — spacing, axis order,
    patch, batch, topology, blocks, training schedule — so that a network trained on them fits
    (``medseg train --init-from``); normalisation, channels and labels are the new dataset's. A
    different number of channels or classes only re-initialises the first or last layers."""
    norm = _normalization(fp)
    configs = {}
    for key, c in source.configurations.items():
        copy = c.model_copy(deep=True)
        copy.normalization = norm
        copy.memory.decision = (f"transferred from {source_dir} ({key}), whose weights fit it: spacing, patch, "
                                f"batch, topology and blocks as planned there; normalisation from this dataset. "
                                f"There: {c.memory.decision}")
        configs[key] = copy
    notes = []
    if len(fp.channel_names) != len(source.channel_names):
        notes.append(f"{len(fp.channel_names)} channel(s) here, {len(source.channel_names)} there: the first layer "
                     "is re-initialised")
    if len(label_values(fp.labels)) != source.num_classes:
        notes.append(f"{len(label_values(fp.labels))} classes here, {source.num_classes} there: the output layers "
                     "are re-initialised")
    for note in notes:
        log.info("plans from %s: %s", source_dir, note)
    return Plans(dataset_name=fp.dataset_name, channel_names=fp.channel_names, labels=fp.labels, device=source.device,
                 seed=source.seed, configurations=configs, medseg_version=__version__,
                 recommended=list(source.recommended),
                 recommendation=f"as in {source_dir}" + (f" ({source.recommendation})" if source.recommendation else "")
                 + ("; " + "; ".join(notes) if notes else ""), transferred_from=source_dir)
