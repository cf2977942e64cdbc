"""``medseg report WORK``: one self-contained HTML page per work directory (every image embedded as
PNG data, no network): the dataset (from the fingerprint), the plans and the planner's reasons,
training curves per fold, the cross-validation table, find-best's choice, per-case metric plots
with the worst cases named, and overlays of the worst and best cases (three orthogonal slices through
the structure, reference and prediction contours in two colours).

Sections whose files do not exist yet (nothing trained, no find-best) say so instead of failing.
After the page loads, a small script counts the images that decoded and writes the count into the
``<body>``'s ``data-images-loaded`` / ``data-images-total`` attributes (the browser test reads them).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from medseg import __version__
from medseg.fingerprint import Fingerprint
from medseg.io.dataset import load_dataset
from medseg.io.image import read_image
from medseg.plans.schema import ChosenModel, Plans
from medseg.plotting import new_figure
from medseg.utils import atomic_write_text
from medseg.workdir import WorkDir

log = logging.getLogger(__name__)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } img { max-width: 100%; margin: .4em 0; } .note { color: #666; }
.reason { max-width: 60em; font-size: .85em; color: #444; }
"""

_CHECK_IMAGES = """
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  document.body.dataset.imagesTotal = imgs.length;
  document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
});
"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return _img_tag(buf.getvalue())


def _img_tag(data: bytes, alt: str = "") -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(frame: pd.DataFrame, table_id: str) -> str:
    return frame.to_html(index=False, border=0, table_id=table_id, na_rep="–", float_format=lambda v: f"{v:.4g}")


def _dataset_section(work: WorkDir) -> str:
    if not work.fingerprint.exists():
        return "<p class='note'>No fingerprint yet (run <code>medseg plan</code>).</p>"
    fp = Fingerprint.load(work.fingerprint)
    spacings, shapes = fp.spacings(), np.array([c.shape_after_crop for c in fp.cases], dtype=float)
    rows = [{"": what, **{f"axis {i}": f"{np.median(v[:, i]):.3g} ({v[:, i].min():.3g}–{v[:, i].max():.3g})"
                         for i in range(v.shape[1])}}
            for what, v in (("spacing mm, median (range)", spacings), ("shape after crop", shapes))]
    out = [f"<p>{len(fp.cases)} cases, channels {', '.join(map(html.escape, fp.channel_names))}, labels "
           f"{html.escape(json.dumps({str(k): v for k, v in fp.labels.items()}))} ({html.escape(fp.layout)} layout)</p>",
           _table(pd.DataFrame(rows), "dataset-geometry")]
    channels = pd.DataFrame([{"channel": c.name, "mean": c.mean, "std": c.std, "p0.5": c.p00_5, "median": c.median,
                              "p99.5": c.p99_5} for c in fp.channels])
    out.append(_table(channels, "dataset-intensities"))
    fig = new_figure(figsize=(4 * (len(fp.channels) + 1), 3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(fp.channels) + 1))
    ds = _dataset(work)
    for c, (ax, stats) in enumerate(zip(axes, fp.channels, strict=False)):
        values = _sample_intensities(ds, c) if ds is not None else None
        if values is not None and values.size:  # the sample's p0.5..p99.5: scanners' outliers would squash it
            lo, hi = np.percentile(values, [0.5, 99.5])
            ax.hist(np.clip(values, lo, hi), bins=60, range=(lo, hi) if hi > lo else None, color="#4477aa")
        ax.set_title(f"{stats.name}: foreground intensities of {min(len(ds.cases), 8) if ds else 0} cases "
                     f"(all cases: p0.5 {stats.p00_5:.4g}, p99.5 {stats.p99_5:.4g})", fontsize=7)
    names = {k: v for k, v in fp.labels.items() if k != 0}
    volumes = [[c.class_volume_ml.get(k, 0.0) for c in fp.cases] for k in names]
    if volumes:
        axes[-1].boxplot(volumes, tick_labels=list(names.values()))
    axes[-1].set_title("class volume per case (ml)", fontsize=8)
    out.append(_png(fig))
    return "\n".join(out)


def _dataset(work: WorkDir):
    try:
        return load_dataset(work.dataset_path())
    except Exception as exc:  # the dataset moved: the report goes on without its pictures
        log.info("%s: dataset not readable (%s); intensity histograms and overlays left out", work, exc)
        return None


def _sample_intensities(ds, channel: int, cases: int = 8, per_case: int = 20000) -> np.ndarray:
    rng = np.random.default_rng(0)
    out = []
    for case in ds.cases[:cases]:
        if case.label is None:
            continue
        image = read_image(case.images[min(channel, len(case.images) - 1)])[0]
        data = image[channel] if image.shape[0] > channel else image[0]
        label = read_image(case.label)[0][0]
        values = data[label > 0]
        out.append(rng.choice(values, min(per_case, values.size), replace=False) if values.size else values)
    return np.concatenate(out) if out else np.zeros(0)


def _plans_section(work: WorkDir) -> str:
    if not work.plans.exists():
        return "<p class='note'>No plans yet.</p>"
    plans = Plans.load(work.plans)
    rows, reasons = [], []
    for key, c in plans.configurations.items():
        a = c.architecture
        rows.append({"configuration": key, "spacing": "×".join(f"{s:.3g}" for s in c.spacing),
                     "patch": "×".join(map(str, c.patch_size)), "batch": c.batch_size,
                     "stages": len(a.features), "features": f"{a.features[0]}…{a.features[-1]}",
                     "normalisation": ", ".join(n.scheme for n in c.normalization),
                     "epochs × iterations": f"{c.training.epochs} × {c.training.iterations_per_epoch}",
                     "step s (estimate)": c.memory.step_seconds_estimate})
        reasons.append(f"<p class='reason'><b>{html.escape(key)}</b>: {html.escape(c.memory.decision)}</p>")
    head = (f"<p>Trained by default: <b>{html.escape(', '.join(plans.default_configurations()))}</b>. "
            f"{html.escape(plans.recommendation)}</p>")
    return head + _table(pd.DataFrame(rows), "plans") + "\n".join(reasons)


def _training_section(work: WorkDir, plans: Plans) -> str:
    out = []
    for key in plans.configurations:
        for run in work.runs_of(key):
            if run.curves.exists():
                out.append(f"<h3>{html.escape(key)} fold {run.fold}</h3>" + _img_tag(run.curves.read_bytes(),
                                                                                       f"{key} fold {run.fold}"))
    return "\n".join(out) or "<p class='note'>No training curves yet.</p>"


def _metrics(work: WorkDir, key: str) -> tuple[pd.DataFrame | None, dict | None, str]:
    """The per-case metrics and summary of ``key``: the out-of-fold report, else the first validated fold's."""
    cv = work.crossval(key)
    if (cv.report / "summary.json").exists():
        return pd.read_csv(cv.report / "metrics.csv"), json.loads((cv.report / "summary.json").read_text()), "out of fold"
    for run in work.runs_of(key):
        if run.validated:
            return (pd.read_csv(run.val_report / "metrics.csv"),
                    json.loads((run.val_report / "summary.json").read_text()), f"fold {run.fold} validation")
    return None, None, ""


def _crossval_section(work: WorkDir, plans: Plans) -> tuple[str, dict]:
    rows, frames = [], {}
    for key in plans.configurations:
        frame, summary, source = _metrics(work, key)
        if summary is None:
            continue
        frames[key] = (frame, source)
        row = {"configuration": key, "evaluated": f"{summary['n_cases']} cases, {source}"}
        for entry in summary["classes"].values():
            row[f"Dice {entry['name']}"] = entry["dice"]["mean"]
            row[f"HD95 {entry['name']} mm"] = entry["hd95_mm"]["mean"]
        row["Dice fg"] = summary["foreground_mean"]["dice"]
        rows.append(row)
    if not rows:
        return "<p class='note'>No validated fold yet.</p>", frames
    return _table(pd.DataFrame(rows), "cross-validation"), frames


def _find_best_section(work: WorkDir) -> str:
    if not work.model.exists():
        return "<p class='note'>No find-best yet (run <code>medseg find-best</code>).</p>"
    chosen = ChosenModel.load(work.model)
    rows = [{"members": " + ".join(chosen.members),
             "folds": "; ".join(f"{k}: {v}" for k, v in chosen.folds.items()),
             "cv Dice": chosen.cv_dice, "cv HD95 mm": chosen.cv_hd95,
             "postprocessing": json.dumps(chosen.postprocessing.model_dump()),
             "mirroring": chosen.inference.mirroring, "backend": chosen.inference.backend}]
    out = [_table(pd.DataFrame(rows), "find-best"), f"<p class='reason'>{html.escape(chosen.decided)}</p>"]
    for png in sorted(work.find_best.glob("*.png")) if work.find_best.is_dir() else []:
        out.append(_img_tag(png.read_bytes(), png.stem))
    return "\n".join(out)


def _per_case_section(work: WorkDir, plans: Plans, frames: dict) -> str:
    out = []
    ds = _dataset(work)
    for key, (frame, source) in frames.items():
        per_case = frame.groupby("case")["dice"].mean().sort_values()
        worst, best = list(per_case.index[:3]), list(per_case.index[-2:])
        fig = new_figure(figsize=(10, 3), layout="constrained")
        ax = fig.subplots()
        ax.bar(range(len(per_case)), per_case.to_numpy(), color="#4477aa")
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean Dice over classes")
        ax.set_title(f"{key}: per case ({source}), sorted; worst: {', '.join(worst)}", fontsize=9)
        out.append(f"<h3>{html.escape(key)}</h3><p>Worst cases: "
                   + ", ".join(f"{html.escape(c)} ({per_case[c]:.3f})" for c in worst) + "</p>" + _png(fig))
        if ds is not None:
            for case, tag in [*((c, "worst") for c in worst[:2]), *((c, "best") for c in best[-1:])]:
                picture = _overlay(work, plans, key, ds, case, f"{key} {tag}: {case} (Dice {per_case[case]:.3f})")
                if picture:
                    out.append(picture)
    return "\n".join(out) or "<p class='note'>No per-case metrics yet.</p>"


def _prediction_of(work: WorkDir, key: str, case: str) -> tuple[Path, Path] | None:
    cv = work.crossval(key)
    for pred_dir, ref_dir in [(cv.predictions, cv.reference), *((r.val, r.val_reference) for r in work.runs_of(key))]:
        preds = sorted(pred_dir.glob(f"{case}.nii*")) if pred_dir.is_dir() else []
        refs = sorted(ref_dir.glob(f"{case}.*")) if ref_dir.is_dir() else []
        if preds and refs:
            return preds[0], refs[0]
    return None


def _overlay(work: WorkDir, plans: Plans, key: str, ds, case: str, title: str) -> str | None:
    found = _prediction_of(work, key, case)
    if found is None:
        return None
    image = read_image(ds.case(case).images[0])[0][0].astype(np.float32)
    pred = np.rint(read_image(found[0])[0][0]).astype(int)
    ref = np.rint(read_image(found[1])[0][0]).astype(int)
    fg = np.argwhere(ref > 0)
    centre = fg.mean(0).round().astype(int) if len(fg) else np.asarray(ref.shape) // 2
    lo, hi = np.percentile(image, [0.5, 99.5])
    fig = new_figure(figsize=(10, 3.4), layout="constrained")
    for axis, ax in enumerate(np.atleast_1d(fig.subplots(1, 3))):
        img2, ref2, pred2 = (np.take(a, centre[axis], axis=axis).T for a in (image, ref, pred))
        ax.imshow(img2, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        for value in sorted(plans.class_labels):
            if value and (ref2 == value).any():
                ax.contour(ref2 == value, levels=[0.5], colors="lime", linewidths=1.0)
            if value and (pred2 == value).any():
                ax.contour(pred2 == value, levels=[0.5], colors="magenta", linewidths=1.0, linestyles="--")
        ax.set_title(f"axis {axis}, slice {centre[axis]}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{title} — reference green, prediction magenta dashed", fontsize=9)
    return _png(fig)


def write_report(workdir: Path | WorkDir, output: Path | None = None) -> Path:
    """Write the work directory's report (default ``WORK/report.html``, atomically); its path."""
    work = WorkDir.of(workdir)
    plans = Plans.load(work.plans)
    crossval, frames = _crossval_section(work, plans)
    sections = [("Dataset", _dataset_section(work)), ("Plans", _plans_section(work)),
                ("Training curves", _training_section(work, plans)), ("Cross-validation", crossval),
                ("Model chosen by find-best", _find_best_section(work)),
                ("Per case: metrics and overlays", _per_case_section(work, plans, frames))]
    body = "\n".join(f"<h2 id='{title.split(':')[0].lower().replace(' ', '-')}'>{html.escape(title)}</h2>\n{content}"
                     for title, content in sections)
    page = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>medseg report: "
            f"{html.escape(plans.dataset_name)}</title><style>{_STYLE}</style><script>{_CHECK_IMAGES}</script></head>"
            f"<body><h1>medseg report: {html.escape(plans.dataset_name)}</h1><p class='note'>{html.escape(str(work.root))}"
            f" · medseg {__version__} · {time.strftime('%Y-%m-%d %H:%M')}</p>\n{body}\n</body></html>\n")
    output = Path(output) if output is not None else work.root / "report.html"
    atomic_write_text(output, page)
    log.info("report written to %s", output)
    return output
