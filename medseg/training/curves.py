"""Training curves as a picture: losses, pseudo-Dice and learning rate per epoch."""

from __future__ import annotations

import io
from pathlib import Path

from medseg.utils import atomic_write_bytes


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
