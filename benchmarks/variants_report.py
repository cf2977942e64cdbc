"""Tabulate the variants benchmark (benchmarks/variants.sh): one row per variant from its run folder.

Usage: python benchmarks/variants_report.py WORKDIR --variants plain,residual,... --minutes 20
Writes WORKDIR/variants.json (raw figures), WORKDIR/variants.md (the table) and WORKDIR/variants.png.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np


def _max_rss_gb(path: Path) -> float | None:
    if not path.exists():
        return None
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", path.read_text())
    return int(m.group(1)) / 1e6 if m else None


def collect(workdir: Path, variant: str) -> dict:
    from medseg.planning.memory import measure_training_peak
    from medseg.plans.schema import Plans

    key = "3d_fullres" if variant == "plain" else f"3d_fullres_{variant}"
    run = workdir / "runs" / key / "fold_0"
    plans = Plans.load(workdir / "plans.json")
    config = plans.config(key)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    summary = json.loads((run / "val_report" / "summary.json").read_text())
    timing = json.loads((run / "val_report" / "timing.json").read_text())
    fg = summary["foreground_mean"]
    measured = measure_training_peak(config, len(plans.channel_names), plans.num_classes)
    return {
        "variant": variant, "key": key,
        "base_width": config.architecture.features[0], "patch": config.patch_size, "batch": config.batch_size,
        "parameters": measured["parameters"],
        "epochs": len(log), "iterations": len(log) * config.training.iterations_per_epoch,
        "train_min": log[-1]["elapsed_s"] / 60.0,
        "samples_per_s": float(np.median([r["samples_per_s"] for r in log])),
        "dice": fg["dice"], "hd95_mm": fg["hd95_mm"],
        "dice_per_class": {summary["classes"][c]["name"]: summary["classes"][c]["dice"]["mean"] for c in summary["classes"]},
        "hd95_per_class": {summary["classes"][c]["name"]: summary["classes"][c]["hd95_mm"]["mean"]
                           for c in summary["classes"]},
        "predict_s_per_case": timing["predict_s"] / timing["cases"],
        "peak_step_memory_gb": measured["peak_bytes"] / 1e9,
        "model_estimate_gb": measured["estimate_bytes"] / 1e9,
        "train_process_max_rss_gb": _max_rss_gb(workdir / f"train_{variant}.time"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--variants", default="plain,residual,attention,se,reversible,graph")
    ap.add_argument("--minutes", type=float, required=True)
    args = ap.parse_args()
    rows = [collect(args.workdir, v) for v in args.variants.split(",")]
    plain = next((r for r in rows if r["variant"] == "plain"), rows[0])
    (args.workdir / "variants.json").write_text(json.dumps({"minutes": args.minutes, "rows": rows}, indent=1))
    lines = [f"| variant | width | params | iterations in {args.minutes:g} min | samples/s | Dice (fg mean) | "
             "Δ vs plain | HD95 mm | peak step memory (measured / model) | train process max RSS | predict s/case |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rss = f"{r['train_process_max_rss_gb']:.2f} GB" if r["train_process_max_rss_gb"] else "n/a"
        lines.append(f"| {r['variant']} | {r['base_width']} | {r['parameters'] / 1e6:.2f} M | {r['iterations']} | "
                     f"{r['samples_per_s']:.2f} | {r['dice']:.3f} | {r['dice'] - plain['dice']:+.3f} | "
                     f"{r['hd95_mm']:.2f} | {r['peak_step_memory_gb'] * 1e3:.0f} / {r['model_estimate_gb'] * 1e3:.0f} MB "
                     f"| {rss} | {r['predict_s_per_case']:.2f} |")
    table = "\n".join(lines) + "\n"
    (args.workdir / "variants.md").write_text(table)
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    names = [r["variant"] for r in rows]
    for ax, field, label in zip(axes, ["dice", "samples_per_s", "peak_step_memory_gb"],
                                ["validation Dice (fold 0, fg mean)", "training samples/s", "peak step memory (GB)"],
                                strict=True):
        vals = [r[field] for r in rows]
        ax.bar(names, vals, color="tab:blue")
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", rotation=30)
        if field == "dice":
            ax.set_ylim(max(0.0, min(vals) - 0.05), min(1.0, max(vals) + 0.02))
    fig.suptitle(f"U-Net variants, hippocampus fold 0, {args.minutes:g} CPU minutes each")
    fig.tight_layout()
    fig.savefig(args.workdir / "variants.png", dpi=110)


if __name__ == "__main__":
    main()
