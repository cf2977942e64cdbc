"""Training curves as a picture: losses, pseudo-Dice and learning rate per epoch."""

from __future__ import annotations

from pathlib import Path

from medseg.plotting import new_figure, save_figure


def plot_curves(history: list[dict], path: Path) -> None:
    """``history``: the log's records (epoch, train_loss, val_loss, pseudo_dice, pseudo_dice_ema, lr)."""
    ep = [h["epoch"] for h in history]
    fig = new_figure(figsize=(8, 7))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.plot(ep, [h["train_loss"] for h in history], label="train loss")
    ax1.plot(ep, [h["val_loss"] for h in history], label="val loss")
    ax1.set_ylabel("loss")
    ax1b = ax1.twinx()
    ax1b.plot(ep, [h["pseudo_dice"] for h in history], "g.", alpha=0.5, label="pseudo-Dice")
    ax1b.plot(ep, [h["pseudo_dice_ema"] for h in history], "g-", label="pseudo-Dice (EMA)")
    ax1b.set_ylabel("pseudo-Dice")
    ax1b.set_ylim(0, 1)
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax1b.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="center right")
    ax2.plot(ep, [h["lr"] for h in history], "k-")
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("epoch")
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
