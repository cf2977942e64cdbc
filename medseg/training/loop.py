"""``train_fold``: the training loop, short and explicit, over components built from the plan.

Budget: epochs × iterations per epoch, optionally capped by wall-clock minutes. The poly learning
rate follows whichever budget is further along, so a time-limited run still anneals to ~0.
Checkpoints (latest each epoch, best by smoothed pseudo-Dice, final) are written atomically and
hold everything needed to resume exactly (:class:`~medseg.networks.checkpoint.TrainingCheckpoint`:
model, optimiser, RNG state and the :class:`~medseg.networks.checkpoint.TrainingState`: epoch,
elapsed time, EMA, history). Batches are a pure function of (seed, epoch, index), so a resumed run
sees the same data.

Distributed (:mod:`medseg.training.distributed`: ``--nproc``, torchrun, srun): the model is wrapped
in DDP, each rank trains on its elements of the plan's (global) batch, the loss's batch Dice is the
global batch's; rank 0 decides at each epoch's start whether the budget allows another epoch and at
which learning rate (so all ranks stop together), and alone validates and writes checkpoints, logs,
curves and run.json.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from medseg import __version__
from medseg.errors import CheckpointError, MedsegError
from medseg.networks.checkpoint import (
    FinalCheckpoint,
    TrainingCheckpoint,
    TrainingState,
    load_checkpoint,
    load_training_checkpoint,
    save_checkpoint,
)
from medseg.networks.unet import build_network
from medseg.plans.schema import Configuration, Plans, Training
from medseg.progress import make_progress
from medseg.training import distributed
from medseg.training.cascade import build_priors
from medseg.training.curves import plot_curves
from medseg.training.data import BatchSource
from medseg.training.losses import DeepSupervisionLoss
from medseg.training.precision import training_autocast
from medseg.training.splits import NUM_FOLDS, fold_case_ids
from medseg.utils import atomic_write_text, file_sha256
from medseg.workdir import FULL, Fold, RunDir, WorkDir, parse_fold_tag

log = logging.getLogger(__name__)
EMA_DECAY = 0.9


@dataclass
class Budget:
    """How long a run trains. ``fill``: a time budget without a fixed number of epochs: ``epochs`` is
    then the plan's estimate, and the run trains epoch after epoch while the next one is expected to
    end within half an epoch of ``time_budget_min`` (the learning rate annealed over the time)."""

    epochs: int
    iterations_per_epoch: int
    val_iterations: int
    time_budget_min: float | None = None
    fill: bool = False

    @classmethod
    def from_plan(cls, config: Configuration, epochs: int | None = None, iterations_per_epoch: int | None = None,
                  time_budget_min: float | None = None) -> Budget:
        t = config.training
        if time_budget_min is None and epochs is None and iterations_per_epoch is None:
            time_budget_min = t.time_budget_min  # the plan's wall clock applies unless the user set a budget
        return cls(epochs or t.epochs, iterations_per_epoch or t.iterations_per_epoch, t.val_iterations,
                   time_budget_min, fill=bool(time_budget_min) and epochs is None)


def poly_lr(initial: float, progress: float, exponent: float = 0.9) -> float:
    return initial * (1.0 - min(max(progress, 0.0), 1.0)) ** exponent


def _progress(epoch: int, elapsed_s: float, budget: Budget) -> float:
    """How far the run is, 0 → 1: the time's share of a filled budget, else the further along of epochs and time."""
    p = 0.0 if budget.fill else epoch / budget.epochs
    if budget.time_budget_min:
        p = max(p, elapsed_s / (60.0 * budget.time_budget_min))
    return p


EPOCH_TIME_WINDOW = 3  # epochs whose mean duration predicts the next one's


def _epoch_seconds(history: list[dict[str, Any]], elapsed_s: float) -> float | None:
    """Mean wall seconds of the last :data:`EPOCH_TIME_WINDOW` epochs, checkpointing included (from
    the epochs' ``elapsed_s`` marks and the time now); None before the first epoch."""
    if not history:
        return None
    k = min(EPOCH_TIME_WINDOW, len(history))
    start = history[-k - 1]["elapsed_s"] if len(history) > k else 0.0
    return (elapsed_s - start) / k


def _pseudo_dice(logits: torch.Tensor, target: torch.Tensor, n_classes: int) -> np.ndarray:
    """Per-foreground-class (tp, fp, fn) of the argmax on a batch: shape (K-1, 3). Target voxels of
    class ``n_classes`` (the ignore label) count for nothing."""
    pred = logits.argmax(1)
    tgt = target[:, 0]
    valid = tgt != n_classes
    out = np.zeros((n_classes - 1, 3))
    for k in range(1, n_classes):
        p, t = (pred == k) & valid, tgt == k
        out[k - 1] = [(p & t).sum().item(), (p & ~t).sum().item(), (~p & t).sum().item()]
    return out


@dataclass(frozen=True)
class FoldSetup:
    """One fold's training as read from the work directory and the plan."""

    plans: Plans
    config: Configuration
    fold: Fold
    run_dir: RunDir
    data_folder: Path  # the preprocessed cases
    train_ids: list[str]
    val_ids: list[str]
    prior_folder: Path | None  # a cascade stage's priors
    budget: Budget
    seed: int
    group: distributed.DistEnv | None = None  # this rank's place in a distributed run
    freeze_encoder_epochs: int = 0  # the first epochs train all but the encoder (its learning rate 0)
    init_report: dict[str, Any] | None = None  # where the initial weights came from (--init-from)

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (the only process, or rank 0)."""
        return self.group is None or self.group.is_main

    @property
    def training(self) -> Training:
        return self.config.training

    @property
    def num_classes(self) -> int:
        return self.plans.num_classes


@dataclass
class TrainingComponents:
    """What the plan builds for training: network, optimiser, AMP gradient scaler, loss. ``model``
    is what training steps call: the network, or in a distributed run its DDP wrapper."""

    network: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: DeepSupervisionLoss
    device: str
    init_report: dict[str, Any] | None = None  # where the initial weights came from (--init-from)

    @property
    def amp(self) -> bool:
        """Mixed precision with loss scaling (on CUDA)."""
        return self.device.startswith("cuda")

    @property
    def autocast(self) -> torch.dtype | None:
        return training_autocast(self.device)

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type


@dataclass(frozen=True)
class PatchValidation:
    """An epoch's validation patches: mean loss and per-foreground-class pseudo-Dice, shape (K-1,)."""

    loss: float
    per_class: np.ndarray

    @property
    def pseudo_dice(self) -> float:
        return float(self.per_class.mean())


@dataclass(frozen=True)
class EpochRecord:
    """One line of ``log.jsonl`` (and one entry of the state's history, as ``asdict``)."""

    epoch: int
    lr: float
    train_loss: float
    val_loss: float
    pseudo_dice: float
    pseudo_dice_per_class: list[float]
    pseudo_dice_ema: float
    epoch_s: float
    train_s: float
    samples_per_s: float
    elapsed_s: float


class _Clock:
    """Training seconds over all sessions: the state's ``elapsed_s`` plus this session's since the last checkpoint."""

    def __init__(self, state: TrainingState) -> None:
        self.state = state
        self.t_start = time.perf_counter()

    def elapsed(self) -> float:
        return self.state.elapsed_s + (time.perf_counter() - self.t_start)

    def bank(self) -> None:
        """Move the time so far into the state (before it is checkpointed) and count on from zero."""
        self.state.elapsed_s = self.elapsed()
        self.t_start = time.perf_counter()


def train_fold(workdir: Path, config_name: str, fold: int | str, *, epochs: int | None = None,
               iterations_per_epoch: int | None = None, time_budget_min: float | None = None,
               resume: bool = False, device: str = "cpu", num_workers: int | None = None,
               progress: bool = False, init_from: str | None = None, freeze_encoder_epochs: int = 0) -> Path:
    """Train one fold (0..4, or "full": all cases) of a configuration. Returns the run directory.
    A cascade stage needs its previous stage's out-of-fold predictions (all its folds trained).
    The full validation of the fold's held-out cases is a separate stage
    (:func:`medseg.orchestration.validation.validate_fold`).

    ``num_workers``: augmentation processes (default 1 on CPU, up to 8 on CUDA). A process started
    as one rank of several (:func:`medseg.training.distributed.from_environment`) joins its group
    and trains its share of every batch (``device`` then means this rank's GPU).

    ``init_from``: ``TRAINED_WORK[:config[:fold]]`` (:func:`resolve_init_source`), whose final weights a
    new run starts from (tensors whose shapes differ are re-initialised and named in the log);
    ``freeze_encoder_epochs``: the encoder's learning rate is 0 for that many first epochs. Both are
    recorded in ``run.json``; a resumed run keeps what its start recorded."""
    work = WorkDir.of(workdir)
    if freeze_encoder_epochs < 0:
        raise MedsegError(f"--freeze-encoder-epochs {freeze_encoder_epochs}: must be 0 or more")
    group = distributed.from_environment()
    if group is not None:
        device = distributed.join(group, device)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed patch shapes: let cuDNN pick the fastest kernels once
    num_workers = _default_num_workers(device) if num_workers is None else num_workers
    plans = Plans.load(work.plans)
    config = plans.config(config_name)
    budget = Budget.from_plan(config, epochs, iterations_per_epoch, time_budget_min)
    setup = _set_up(work, plans, config, fold, budget, resume, group)
    init, init_report = None, None
    if resume:  # the run goes on as it started
        if init_from:
            log.info("%s: resumed from its own checkpoint; --init-from applies to new runs only", setup.run_dir.path)
        recorded = json.loads(setup.run_dir.run_json.read_text()) if setup.run_dir.run_json.exists() else {}
        init_report, freeze_encoder_epochs = recorded.get("init_from"), int(recorded.get("freeze_encoder_epochs", 0))
    elif init_from:
        init = resolve_init_source(init_from, config.key)
    setup = replace(setup, freeze_encoder_epochs=freeze_encoder_epochs, init_report=init_report)
    parts = _build_components(setup, device, init)
    setup = replace(setup, init_report=parts.init_report)
    state = _resume(parts, setup.run_dir) if resume else TrainingState()
    if setup.is_main:
        setup.run_dir.path.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        train_src, val_src = _batch_sources(setup, stack)
        if setup.is_main:
            _write_run_json(setup, device)
        clock = _Clock(state)
        # a filled budget's bar counts seconds (its ETA is the budget's end), else epochs
        done = (lambda: int(clock.elapsed())) if budget.fill else (lambda: state.epoch)
        total = int(60 * budget.time_budget_min) if budget.fill else budget.epochs
        with _progress_bar(f"train {config.key} fold {fold}", total, done(), progress and setup.is_main) as advance:
            while (lr := _next_epoch(setup, state, clock, device)) is not None:
                _run_epoch(setup, parts, state, clock, lr, train_src, val_src, num_workers)
                if setup.is_main:
                    with _signals_held():
                        _save_epoch(setup, parts, state)
                advance(min(done(), total))
    if setup.is_main:
        save_checkpoint(setup.run_dir.final, FinalCheckpoint(parts.network.state_dict(), config.key, str(fold),
                                                             state.epoch, state.elapsed_s))
        schedule = _record_schedule(setup, state)
        log.info("training done: %d epochs in %.1f min (planned: %d epochs, %s)", state.epoch, state.elapsed_s / 60,
                 budget.epochs, f"{budget.time_budget_min:g} min" if budget.time_budget_min else "no time budget")
        if schedule["actual"]["budget_used"] is not None:
            log.info("time budget used: %.0f%%", 100 * schedule["actual"]["budget_used"])
    distributed.barrier()
    return setup.run_dir.path


# ---------------------------------------------------------------- set-up


def resolve_init_source(spec: str, config_key: str) -> Path:
    """The final checkpoint that ``--init-from TRAINED_WORK[:config[:fold]]`` names. Without a
    configuration: the one being trained when the trained directory has it, else its default; without
    a fold: ``full`` when trained, else the first trained cross-validation fold."""
    path, _, rest = spec.partition(":")
    name, _, fold_tag = rest.partition(":")
    work = WorkDir(path)
    plans = Plans.load(work.plans)
    if name:
        key = plans.config(name).key
    else:
        key = config_key if config_key in plans.configurations else plans.config(plans.default_configurations()[0]).key
    folds: list[Fold] = [parse_fold_tag(fold_tag)] if fold_tag else [FULL, *range(NUM_FOLDS)]
    for fold in folds:
        if work.run(key, fold).final.exists():
            return work.run(key, fold).final
    which = f"fold {folds[0]}" if fold_tag else "no fold"
    raise CheckpointError(f"--init-from {spec}: {which} of {key} in {work.root} has finished training "
                          f"(no {work.run(key, folds[0]).final.name})")


def _initialise_from(network: torch.nn.Module, checkpoint: Path) -> dict[str, Any]:
    """Copy the checkpoint's tensors into ``network`` where name and shape agree; the others keep
    their fresh initialisation (a different number of channels or classes: the first or last
    layers), named in the log. Returns what ``run.json`` records."""
    source = load_checkpoint(checkpoint)["model"]
    own = network.state_dict()
    loaded = {k: v for k, v in source.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    fresh = [k for k in own if k not in loaded]
    network.load_state_dict(loaded, strict=False)
    log.info("initialised from %s: %d of %d tensors; re-initialised (shape differs or absent there): %s",
             checkpoint, len(loaded), len(own), ", ".join(fresh) or "none")
    return {"checkpoint": str(Path(checkpoint).resolve()), "sha256": file_sha256(checkpoint),
            "loaded": len(loaded), "reinitialised": fresh,
            "unused": [k for k in source if k not in loaded]}


def _default_num_workers(device: str) -> int:
    # on a CPU the cores belong to torch; a GPU wants augmentation in parallel
    return 1 if device == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))


def _set_up(work: WorkDir, plans: Plans, config: Configuration, fold: Fold, budget: Budget,
            resume: bool, group: distributed.DistEnv | None = None) -> FoldSetup:
    """The fold's run folder (checked against ``resume``), cases, priors and seed."""
    run_dir = work.run(config.key, fold)
    if run_dir.latest.exists() and not resume:
        raise CheckpointError(f"{run_dir.path}: a run exists already; pass --resume to continue it (or delete the folder)")
    if resume and not run_dir.latest.exists():
        raise CheckpointError(f"{run_dir.latest}: nothing to resume")
    train_ids, val_ids = fold_case_ids(work, plans, config, fold)
    prior_folder = None
    if config.previous_stage:  # built once, by rank 0, while the other ranks wait
        if group is None or group.is_main:
            prior_folder = build_priors(work, plans, config)
        distributed.barrier()
        prior_folder = work.priors(plans.config(config.previous_stage).key)
    seed = plans.seed + (NUM_FOLDS if fold == FULL else int(fold))
    return FoldSetup(plans, config, fold, run_dir, work.preprocessed(config.data_config), train_ids, val_ids,
                     prior_folder, budget, seed, group)


def _build_components(setup: FoldSetup, device: str, init: Path | None = None) -> TrainingComponents:
    """The network (initial weights from the fold's seed, then ``init``'s where they fit; DDP-wrapped
    in a distributed run), SGD with Nesterov momentum, the scaler, the loss."""
    torch.manual_seed(setup.seed)
    config, t = setup.config, setup.training
    network = build_network(config.architecture, setup.plans.input_channels(config), setup.num_classes).to(device)
    report = _initialise_from(network, init) if init is not None else setup.init_report
    model, share = network, None
    if setup.group is not None:
        # every parameter gets a gradient in every step (the loss gives the deep-supervision head of
        # weight 0 a zero one), so DDP need not search the graph for unused ones
        model = DistributedDataParallel(network, device_ids=[torch.device(device).index] if device.startswith("cuda")
                                        else None, find_unused_parameters=False)
        share = len(_rank_elements(setup)) / config.batch_size
    params: Any = network.parameters()
    if setup.freeze_encoder_epochs:
        # group 0: the encoder's transferred weights, at learning rate 0 while frozen (a re-initialised
        # first layer trains from the start)
        fresh = set(report["reinitialised"]) if report else set()
        frozen = {id(p) for name, p in network.encoder.named_parameters() if f"encoder.{name}" not in fresh}
        params = [{"params": [p for p in network.parameters() if id(p) in frozen]},
                  {"params": [p for p in network.parameters() if id(p) not in frozen]}]
    optimizer = torch.optim.SGD(params, lr=t.initial_lr, momentum=t.momentum, nesterov=True,
                                weight_decay=t.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.startswith("cuda"))
    loss = DeepSupervisionLoss(group_share=share, ignore_class=setup.plans.ignore_class)
    return TrainingComponents(network, model, optimizer, scaler, loss, device, report)


def _rank_elements(setup: FoldSetup) -> range | None:
    """This rank's elements of the global batch (None: a single process takes all)."""
    if setup.group is None:
        return None
    return distributed.rank_elements(setup.config.batch_size, setup.group.rank, setup.group.world_size)


def _resume(parts: TrainingComponents, run_dir: RunDir) -> TrainingState:
    """Load the latest checkpoint into ``parts`` and the torch RNG; the state it was saved in."""
    ckpt = load_training_checkpoint(run_dir.latest, map_location=parts.device)
    parts.network.load_state_dict(ckpt.model)
    parts.optimizer.load_state_dict(ckpt.optimizer)
    if parts.amp and ckpt.scaler:
        parts.scaler.load_state_dict(ckpt.scaler)
    # map_location moved the RNG states to the device; torch keeps them as CPU byte tensors
    torch.set_rng_state(ckpt.torch_rng.cpu())
    if parts.amp and ckpt.cuda_rng is not None:
        torch.cuda.set_rng_state(ckpt.cuda_rng.cpu(), parts.device)
    log.info("resumed %s at epoch %d", run_dir.path, ckpt.state.epoch)
    return ckpt.state


def _batch_sources(setup: FoldSetup, stack: ExitStack) -> tuple[BatchSource, BatchSource | None]:
    """Augmented training batches (this rank's elements) and plain validation patches (the main
    process only; None elsewhere); ``stack`` closes them (their workers)."""
    config, t = setup.config, setup.training
    common: dict[str, Any] = dict(oversample_foreground=t.oversample_foreground, prior_folder=setup.prior_folder,
                                  num_classes=setup.num_classes)
    train = stack.enter_context(BatchSource(setup.data_folder, setup.train_ids, config.patch_size, config.batch_size,
                                            augment=True, seed=setup.seed, mirror_axes=t.mirror_axes,
                                            elements=_rank_elements(setup), **common))
    if not setup.is_main:
        return train, None
    val = stack.enter_context(BatchSource(setup.data_folder, setup.val_ids, config.patch_size, config.batch_size,
                                          augment=False, seed=setup.seed + 7919, **common))
    return train, val


def _write_run_json(setup: FoldSetup, device: str) -> None:
    meta = {"plans_config": setup.config.model_dump(), "fold": setup.fold, "device": device,
            "budget": asdict(setup.budget), "train_cases": len(setup.train_ids), "val_cases": len(setup.val_ids),
            "seed": setup.seed, "medseg_version": __version__, "torch_version": torch.__version__,
            "world_size": setup.group.world_size if setup.group else 1,
            "init_from": setup.init_report, "freeze_encoder_epochs": setup.freeze_encoder_epochs}
    atomic_write_text(setup.run_dir.run_json, json.dumps(meta, indent=2))


def _record_schedule(setup: FoldSetup, state: TrainingState) -> dict[str, Any]:
    """Planned against actual (epochs, steps, minutes, seconds per step) into ``run.json``'s ``schedule``."""
    budget, config = setup.budget, setup.config
    steps = state.epoch * budget.iterations_per_epoch
    train_s = sum(h.get("train_s", 0.0) for h in state.history)
    schedule = {
        "planned": {"epochs": budget.epochs, "iterations_per_epoch": budget.iterations_per_epoch,
                    "steps": budget.epochs * budget.iterations_per_epoch, "minutes": budget.time_budget_min,
                    "fill": budget.fill, "step_seconds_estimate": config.memory.step_seconds_estimate},
        "actual": {"epochs": state.epoch, "steps": steps, "minutes": state.elapsed_s / 60,
                   "step_seconds": train_s / steps if steps and train_s else None,
                   "epoch_seconds": state.elapsed_s / state.epoch if state.epoch else None,
                   "budget_used": (state.elapsed_s / (60 * budget.time_budget_min)
                                   if budget.time_budget_min else None),
                   "final_lr": state.history[-1]["lr"] if state.history else None},
    }
    meta = json.loads(setup.run_dir.run_json.read_text()) if setup.run_dir.run_json.exists() else {}
    meta["schedule"] = schedule
    atomic_write_text(setup.run_dir.run_json, json.dumps(meta, indent=2))
    return schedule


@contextmanager
def _progress_bar(description: str, total: int, completed: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A bar of epochs when ``enabled``; yields ``advance(epochs_done)``."""
    if not enabled:
        yield lambda done: None
        return
    bar = make_progress()
    task = bar.add_task(description, total=total, completed=completed)
    bar.start()
    try:
        yield lambda done: bar.update(task, completed=done)
    finally:
        bar.stop()


# ---------------------------------------------------------------- epochs


def _continues(state: TrainingState, clock: _Clock, budget: Budget) -> bool:
    elapsed = clock.elapsed()
    if budget.fill:  # another epoch when it is expected to end no later than half an epoch past the budget
        epoch_s = _epoch_seconds(state.history, elapsed) or 0.0
        return elapsed + 0.5 * epoch_s < 60.0 * budget.time_budget_min
    return state.epoch < budget.epochs and _progress(state.epoch, elapsed, budget) < 1.0


def _next_epoch(setup: FoldSetup, state: TrainingState, clock: _Clock, device: str) -> float | None:
    """The learning rate of the next epoch, or None when the budget is spent; in a distributed run
    rank 0's decision, so that all ranks stop together."""
    budget = setup.budget
    go = _continues(state, clock, budget)
    lr = poly_lr(setup.training.initial_lr, _progress(state.epoch, clock.elapsed(), budget),
                 setup.training.poly_exponent)
    go_all, lr = distributed.broadcast_floats([float(go), lr], device)
    return lr if go_all else None


def _run_epoch(setup: FoldSetup, parts: TrainingComponents, state: TrainingState, clock: _Clock, lr: float,
               train_src: BatchSource, val_src: BatchSource | None, num_workers: int) -> None:
    """Training steps at ``lr``, then (main process) the validation patches; the epoch's record goes
    into ``state`` (epoch, EMA, history, elapsed time)."""
    epoch, budget, t = state.epoch, setup.budget, setup.training
    t_epoch = time.perf_counter()
    # a filled budget ends inside an epoch that overruns it (a machine slowed by other work); not in a
    # distributed run, whose ranks must all take the same steps
    over = ((lambda: clock.elapsed() >= 60.0 * budget.time_budget_min) if budget.fill and setup.group is None
            else None)
    frozen = epoch < setup.freeze_encoder_epochs
    if frozen and epoch == 0:
        log.info("encoder frozen for the first %d epoch(s)", setup.freeze_encoder_epochs)
    losses = _train_steps(parts, train_src.iterate(epoch, budget.iterations_per_epoch, num_workers), lr, t.grad_clip,
                          over, frozen_encoder=frozen)
    train_s = time.perf_counter() - t_epoch
    train_loss = distributed.all_mean(float(np.mean(losses)), parts.device)  # the global batch's loss
    if val_src is None:  # another rank validates
        state.epoch = epoch + 1
        clock.bank()
        return
    val = _validate_patches(parts, val_src.iterate(0, budget.val_iterations, 0), setup.num_classes,
                            setup.plans.ignore_class)
    pseudo = val.pseudo_dice
    state.ema = pseudo if state.ema is None else EMA_DECAY * state.ema + (1 - EMA_DECAY) * pseudo
    state.epoch = epoch + 1
    rec = EpochRecord(epoch=epoch + 1, lr=lr, train_loss=train_loss, val_loss=val.loss,
                      pseudo_dice=pseudo, pseudo_dice_per_class=val.per_class.tolist(), pseudo_dice_ema=state.ema,
                      epoch_s=time.perf_counter() - t_epoch, train_s=train_s,
                      samples_per_s=len(losses) * setup.config.batch_size / max(train_s, 1e-9),
                      elapsed_s=clock.elapsed())
    state.history.append(asdict(rec))
    log.info("epoch %d/%d  train %.4f  val %.4f  pseudo-Dice %.3f (ema %.3f)  lr %.5f  %.1fs", rec.epoch,
             budget.epochs, rec.train_loss, rec.val_loss, pseudo, state.ema, lr, rec.epoch_s)
    clock.bank()


def _to_device(batch: dict[str, Any], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's image (B, C, *S) float32 and target (B, 1, *S) int64 on ``device`` (on CUDA copied
    from pinned memory, asynchronously)."""
    x, y = torch.from_numpy(batch["data"]), torch.from_numpy(batch["target"].astype(np.int64))
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


def _train_steps(parts: TrainingComponents, batches: Iterable[dict[str, Any]], lr: float,
                 grad_clip: float, over: Callable[[], bool] | None = None, frozen_encoder: bool = False) -> list[float]:
    """One SGD step per batch at ``lr`` (AMP on CUDA, gradients clipped); the losses. ``over``: when
    it returns True after a step, the epoch ends there. ``frozen_encoder``: parameter group 0 (the
    encoder, see :func:`_build_components`) at learning rate 0, so its weights do not move."""
    model, optimizer, scaler = parts.model, parts.optimizer, parts.scaler
    for i, g in enumerate(optimizer.param_groups):
        g["lr"] = 0.0 if frozen_encoder and i == 0 else lr
    model.train()
    losses = []
    for batch in batches:
        x, y = _to_device(batch, parts.device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(parts.device_type, dtype=parts.autocast, enabled=parts.autocast is not None):
            loss = parts.loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parts.network.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
        if over is not None and over():
            break
    return losses


def _validate_patches(parts: TrainingComponents, batches: Iterable[dict[str, Any]], n_classes: int,
                      ignore_class: int | None = None) -> PatchValidation:
    """Loss and pseudo-Dice (Dice of the summed tp/fp/fn over all patches) of the validation patches
    (the bare network: in a distributed run only rank 0 validates, and DDP's forward would wait for
    the others)."""
    network = parts.network
    network.eval()
    losses, counts = [], np.zeros((n_classes - 1, 3))
    loss_fn = DeepSupervisionLoss(ignore_class=ignore_class)  # this process's patches only
    with torch.no_grad():
        for batch in batches:
            x, y = _to_device(batch, parts.device)
            with torch.autocast(parts.device_type, dtype=parts.autocast, enabled=parts.autocast is not None):
                out = network(x)
            losses.append(loss_fn(out.float(), y).item())
            counts += _pseudo_dice(out, y, n_classes)
    tp, fp, fn = counts.T
    return PatchValidation(float(np.mean(losses)), 2 * tp / np.maximum(2 * tp + fp + fn, 1))


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGTERM, SIGUSR2 (Slurm's time-limit and preemption signal, on which a cluster job
    requeues itself and exits) and SIGINT until the epoch's files are all written, so that the latest
    checkpoint, the best checkpoint and the log always agree: a signal that arrives meanwhile is
    recorded and raised again, to its own handler, on leaving."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(received):
            signal.raise_signal(sig)


def _save_epoch(setup: FoldSetup, parts: TrainingComponents, state: TrainingState) -> None:
    """``checkpoint_latest.pt``, the log, ``checkpoint_best.pt`` when the smoothed pseudo-Dice improved, the curves."""
    run_dir = setup.run_dir
    improved = state.ema > state.best_ema
    if improved:  # before the latest checkpoint is taken, so that a resumed run compares with the same best
        state.best_ema = state.ema
    ckpt = TrainingCheckpoint(model=parts.network.state_dict(), optimizer=parts.optimizer.state_dict(),
                              scaler=parts.scaler.state_dict() if parts.amp else None,
                              torch_rng=torch.get_rng_state(), config=setup.config.key, fold=str(setup.fold),
                              state=replace(state),
                              cuda_rng=torch.cuda.get_rng_state(parts.device) if parts.amp else None)
    save_checkpoint(run_dir.latest, ckpt)
    # the log is rewritten from the checkpoint's history, so a kill never leaves them disagreeing
    atomic_write_text(run_dir.log, "".join(json.dumps(r) + "\n" for r in state.history))
    if improved:
        save_checkpoint(run_dir.best, ckpt)
    plot_curves(state.history, run_dir.curves)
