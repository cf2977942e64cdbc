"""``train_fold``: the training loop, short and explicit, over components built from the plan.

Budget: epochs × iterations per epoch, optionally capped by wall-clock minutes. The poly learning
rate follows whichever budget is further along, so a time-limited run still anneals to ~0.
Checkpoints (latest each epoch, best by smoothed pseudo-Dice, final) are written atomically and
hold everything needed to resume exactly: model, optimiser, epoch, RNG state, history, elapsed time.
Batches are a pure function of (seed, epoch, index), so a resumed run sees the same data.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from medseg import __version__
from medseg.errors import CheckpointError
from medseg.networks.checkpoint import load_checkpoint, save_checkpoint
from medseg.networks.unet import build_network
from medseg.plans.schema import Configuration, Plans
from medseg.progress import make_progress
from medseg.training.cascade import build_priors
from medseg.training.curves import plot_curves
from medseg.training.data import BatchSource
from medseg.training.losses import DeepSupervisionLoss
from medseg.training.splits import NUM_FOLDS, fold_case_ids
from medseg.utils import atomic_write_text
from medseg.workdir import FULL, WorkDir

log = logging.getLogger(__name__)
EMA_DECAY = 0.9


@dataclass
class Budget:
    epochs: int
    iterations_per_epoch: int
    val_iterations: int
    time_budget_min: float | None = None

    @classmethod
    def from_plan(cls, config: Configuration, epochs: int | None = None, iterations_per_epoch: int | None = None,
                  time_budget_min: float | None = None) -> Budget:
        t = config.training
        if time_budget_min is None and epochs is None and iterations_per_epoch is None:
            time_budget_min = t.time_budget_min  # the plan's wall clock applies unless the user set a budget
        return cls(epochs or t.epochs, iterations_per_epoch or t.iterations_per_epoch, t.val_iterations,
                   time_budget_min)


def poly_lr(initial: float, progress: float, exponent: float = 0.9) -> float:
    return initial * (1.0 - min(max(progress, 0.0), 1.0)) ** exponent


def _progress(epoch: int, elapsed_s: float, budget: Budget) -> float:
    p = epoch / budget.epochs
    if budget.time_budget_min:
        p = max(p, elapsed_s / (60.0 * budget.time_budget_min))
    return p


def _pseudo_dice(logits: torch.Tensor, target: torch.Tensor, n_classes: int) -> np.ndarray:
    """Per-foreground-class (tp, fp, fn) of the argmax on a batch: shape (K-1, 3)."""
    pred = logits.argmax(1)
    tgt = target[:, 0]
    out = np.zeros((n_classes - 1, 3))
    for k in range(1, n_classes):
        p, t = pred == k, tgt == k
        out[k - 1] = [(p & t).sum().item(), (p & ~t).sum().item(), (~p & t).sum().item()]
    return out


def train_fold(workdir: Path, config_name: str, fold: int | str, *, epochs: int | None = None,
               iterations_per_epoch: int | None = None, time_budget_min: float | None = None,
               resume: bool = False, device: str = "cpu", num_workers: int | None = None,
               progress: bool = False) -> Path:
    """Train one fold (0..4, or "full": all cases) of a configuration. Returns the run directory.
    A cascade stage needs its previous stage's out-of-fold predictions (all its folds trained).
    The full validation of the fold's held-out cases is a separate stage
    (:func:`medseg.orchestration.validation.validate_fold`).

    ``num_workers``: augmentation processes (default 1 on CPU, up to 8 on CUDA)."""
    work = WorkDir.of(workdir)
    if num_workers is None:  # on a CPU the cores belong to torch; a GPU wants augmentation in parallel
        num_workers = 1 if device == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))
    plans = Plans.load(work.plans)
    config = plans.config(config_name)
    run_dir = work.run(config.key, fold)
    run, latest = run_dir.path, run_dir.latest
    if latest.exists() and not resume:
        raise CheckpointError(f"{run}: a run exists already; pass --resume to continue it (or delete the folder)")
    if resume and not latest.exists():
        raise CheckpointError(f"{latest}: nothing to resume")
    train_ids, val_ids = fold_case_ids(work, plans, config, fold)
    prior_folder = build_priors(work, plans, config) if config.previous_stage else None
    budget = Budget.from_plan(config, epochs, iterations_per_epoch, time_budget_min)
    seed = plans.seed + (NUM_FOLDS if fold == FULL else int(fold))
    torch.manual_seed(seed)
    n_classes = plans.num_classes
    model = build_network(config.architecture, plans.input_channels(config), n_classes).to(device)
    t = config.training
    optimizer = torch.optim.SGD(model.parameters(), lr=t.initial_lr, momentum=t.momentum, nesterov=True,
                                weight_decay=t.weight_decay)
    amp = device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    loss_fn = DeepSupervisionLoss()
    state = {"epoch": 0, "elapsed_s": 0.0, "best_ema": -1.0, "ema": None, "history": []}
    if resume:
        ckpt = load_checkpoint(latest, map_location=device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"]) if amp and ckpt.get("scaler") else None
        torch.set_rng_state(ckpt["torch_rng"])
        state = {k: ckpt[k] for k in state}
        log.info("resumed %s at epoch %d", run, state["epoch"])
    run.mkdir(parents=True, exist_ok=True)
    folder = work.preprocessed(config.data_config)
    prior = dict(prior_folder=prior_folder, num_classes=n_classes)
    train_src = BatchSource(folder, train_ids, config.patch_size, config.batch_size,
                            oversample_foreground=t.oversample_foreground, augment=True, seed=seed,
                            mirror_axes=t.mirror_axes, **prior)
    val_src = BatchSource(folder, val_ids, config.patch_size, config.batch_size,
                          oversample_foreground=t.oversample_foreground, augment=False, seed=seed + 7919, **prior)
    meta = {"plans_config": config.model_dump(), "fold": fold, "device": device, "budget": asdict(budget),
            "train_cases": len(train_ids), "val_cases": len(val_ids), "seed": seed, "medseg_version": __version__,
            "torch_version": torch.__version__}
    atomic_write_text(run_dir.run_json, json.dumps(meta, indent=2))
    log_path = run_dir.log

    def elapsed() -> float:
        return state["elapsed_s"] + (time.perf_counter() - t_start)

    t_start = time.perf_counter()
    bar = make_progress() if progress else None
    task = bar.add_task(f"train {config.key} fold {fold}", total=budget.epochs, completed=state["epoch"]) if bar else None
    if bar:
        bar.start()
    try:
        while state["epoch"] < budget.epochs and _progress(state["epoch"], elapsed(), budget) < 1.0:
            epoch = state["epoch"]
            lr = poly_lr(t.initial_lr, _progress(epoch, elapsed(), budget), t.poly_exponent)
            for g in optimizer.param_groups:
                g["lr"] = lr
            model.train()
            t_epoch = time.perf_counter()
            losses = []
            for batch in train_src.iterate(epoch, budget.iterations_per_epoch, num_workers):
                x = torch.from_numpy(batch["data"]).to(device, non_blocking=True)
                y = torch.from_numpy(batch["target"].astype(np.int64)).to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                    loss = loss_fn(model(x), y)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                losses.append(loss.item())
            train_s = time.perf_counter() - t_epoch
            model.eval()
            val_losses, counts = [], np.zeros((n_classes - 1, 3))
            with torch.no_grad():
                for batch in val_src.iterate(0, budget.val_iterations, 0):
                    x = torch.from_numpy(batch["data"]).to(device)
                    y = torch.from_numpy(batch["target"].astype(np.int64)).to(device)
                    with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                        out = model(x)
                    val_losses.append(loss_fn(out.float(), y).item())
                    counts += _pseudo_dice(out, y, n_classes)
            tp, fp, fn = counts.T
            per_class = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
            pseudo = float(per_class.mean())
            state["ema"] = pseudo if state["ema"] is None else EMA_DECAY * state["ema"] + (1 - EMA_DECAY) * pseudo
            state["epoch"] = epoch + 1
            rec = {"epoch": epoch + 1, "lr": lr, "train_loss": float(np.mean(losses)),
                   "val_loss": float(np.mean(val_losses)), "pseudo_dice": pseudo,
                   "pseudo_dice_per_class": per_class.tolist(), "pseudo_dice_ema": state["ema"],
                   "epoch_s": time.perf_counter() - t_epoch, "train_s": train_s,
                   "samples_per_s": budget.iterations_per_epoch * config.batch_size / max(train_s, 1e-9),
                   "elapsed_s": elapsed()}
            state["history"].append(rec)
            log.info("epoch %d/%d  train %.4f  val %.4f  pseudo-Dice %.3f (ema %.3f)  lr %.5f  %.1fs",
                     epoch + 1, budget.epochs, rec["train_loss"], rec["val_loss"], pseudo, state["ema"], lr,
                     rec["epoch_s"])
            state["elapsed_s"] = elapsed()
            t_start = time.perf_counter()
            ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if amp else None, "torch_rng": torch.get_rng_state(),
                    "config": config.key, "fold": str(fold), **state}
            save_checkpoint(latest, ckpt)
            # the log is rewritten from the checkpoint's history, so a kill never leaves them disagreeing
            atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in state["history"]))
            if state["ema"] > state["best_ema"]:
                state["best_ema"] = state["ema"]
                ckpt["best_ema"] = state["ema"]
                save_checkpoint(run_dir.best, ckpt)
            plot_curves(state["history"], run_dir.curves)
            if bar:
                bar.update(task, completed=state["epoch"])
    finally:
        if bar:
            bar.stop()
    save_checkpoint(run_dir.final, {"model": model.state_dict(), "config": config.key,
                                                  "fold": str(fold), "epoch": state["epoch"],
                                                  "elapsed_s": state["elapsed_s"]})
    log.info("training done: %d epochs in %.1f min", state["epoch"], state["elapsed_s"] / 60)
    return run
