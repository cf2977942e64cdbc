"""CPU inference backends side by side: s/case of the whole ``predict_folder`` (read, preprocess,
sliding window, export, write; in one process after a warm-up) and foreground Dice on held-out
fold-0 validation cases, for torch with and without mirroring and each backend of
medseg.inference.backends without mirroring. The variants are interleaved per case (rotating
order) because the machine is shared; medians are reported.

    .venv/bin/python benchmarks/cpu_backends.py /tmp/hb_work --cases 10 --repeats 2

writes docs/benchmarks/cpu_backends/<dataset>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medseg.inference.backends import available
from medseg.inference.predictor import LoadedModel, predict_folder
from medseg.io.image import read_image
from medseg.workdir import WorkDir

VARIANTS = [  # (name, backend, mirroring)
    ("torch, mirroring", "torch", True),
    ("torch", "torch", False),
    ("onnxruntime fp32", "onnxruntime", False),
    ("onnxruntime int8", "onnxruntime-int8", False),
    ("openvino fp32", "openvino", False),
    ("openvino int8 (QDQ model)", "openvino-int8", False),
]


def dice_fg(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean Dice over the foreground labels present in either (1.0 for a label absent from both)."""
    scores = []
    for k in sorted(set(np.unique(ref)) - {0}):
        a, b = pred == k, ref == k
        denom = a.sum() + b.sum()
        scores.append(1.0 if denom == 0 else 2.0 * (a & b).sum() / denom)
    return float(np.mean(scores))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/cpu_backends"))
    args = ap.parse_args()
    work = WorkDir(args.workdir)
    dataset = work.dataset_path()
    val = json.loads(work.splits.read_text())[0]["val"][: args.cases]
    variants = [v for v in VARIANTS if available(v[1])]
    models = {}
    build_s = {}
    for _, backend, _ in variants:
        if backend not in models:
            t = time.perf_counter()
            models[backend] = LoadedModel.load(work.root, config_name="3d_fullres", folds=[0], backend=backend)
            build_s[backend] = time.perf_counter() - t
    times: dict[str, list[float]] = {v[0]: [] for v in variants}
    dice: dict[str, list[float]] = {v[0]: [] for v in variants}
    agree: dict[str, list[float]] = {v[0]: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def run(name, backend, mirroring, case) -> tuple[float, np.ndarray]:
            out = tmp / name.replace(" ", "_").replace(",", "")
            t = time.perf_counter()
            predict_folder(dataset / "imagesTr" / f"{case}.nii.gz", out, models[backend], tta=mirroring,
                           overwrite=True)
            return time.perf_counter() - t, np.asarray(read_image(out / f"{case}.nii.gz")[0][0])

        for name, backend, mirroring in variants:  # warm-up (and the exports, cached in the run dir)
            run(name, backend, mirroring, val[0])
        for i, case in enumerate(val):
            ref = np.asarray(read_image(dataset / "labelsTr" / f"{case}.nii.gz")[0][0])
            order = variants[i % len(variants):] + variants[: i % len(variants)]
            segs = {}
            for _ in range(args.repeats):
                for name, backend, mirroring in order:
                    s, seg = run(name, backend, mirroring, case)
                    times[name].append(s)
                    segs[name] = seg
            for name in segs:
                dice[name].append(dice_fg(segs[name], ref))
                agree[name].append(float((segs[name] == segs["torch"]).mean()))
    base = statistics.median(times["torch"])
    rows = [{"variant": n, "backend": b, "mirroring": m, "s_per_case": statistics.median(times[n]),
             "speedup_vs_torch": base / statistics.median(times[n]), "dice_fg": float(np.mean(dice[n])),
             "dice_vs_torch": float(np.mean(dice[n]) - np.mean(dice["torch"])),
             "label_agreement_vs_torch": float(np.mean(agree[n])), "first_load_s": build_s[b]}
            for n, b, m in variants]
    plans = json.loads(work.plans.read_text())
    c = plans["configurations"]["3d_fullres"]
    model = {"config": "3d_fullres", "patch": c["patch_size"], "features": c["architecture"]["features"],
             "time_budget_planned_min": c["training"].get("time_budget_min")}
    result = {"workdir": str(work.root), "dataset": str(dataset), "model": model,
              "command": "python benchmarks/cpu_backends.py " + " ".join(sys.argv[1:]),
              "cases": val, "repeats": args.repeats,
              "torch_threads": torch.get_num_threads(), "rows": rows, "times": times, "dice": dice}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{dataset.name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"{len(val)} fold-0 validation cases of {dataset.name}, {args.repeats} interleaved repeats, "
          f"{torch.get_num_threads()} threads; medians; {path}\n")
    print("| variant | s/case | speedup vs torch (no mirroring) | foreground Dice | Δ Dice vs torch | labels = torch's |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['s_per_case']:.3f} | {r['speedup_vs_torch']:.2f}× | {r['dice_fg']:.4f} | "
              f"{r['dice_vs_torch']:+.4f} | {100 * r['label_agreement_vs_torch']:.2f}% |")


if __name__ == "__main__":
    main()
