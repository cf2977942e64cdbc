#!/usr/bin/env python
"""Wall time and peak memory of ``medseg predict`` (mirroring off) and of preprocessing against volume
size, on CT-like volumes built from the real spleen CT case.

    .venv/bin/python benchmarks/scaling.py --model WORKDIR [--sizes 64x64x64,128x128x128,...]
                                           [--baseline-rev HEAD] [--work /tmp/scaling] [--redo]

``--model``: a medseg work directory with a finished ``3d_fullres`` fold ``full`` planned on
``../shared/data/spleen-ct`` (its weights' quality does not matter for time and memory). Each volume
is the spleen case (164×166×26 at 0.79×0.79×5 mm) tiled by mirroring and cropped to the size, at
the case's spacing (the plan's target spacing, so preprocessing resamples nothing and the network
sees every voxel: the worst case for stitching memory), stored as int16 NIfTI like a scanner's CT.

Per size: ``medseg predict --no-tta`` as a subprocess (wall time; peak memory = the largest sum of
PSS over its process tree, sampled every 0.2 s as in ``benchmarks/side_by_side.py``), the same with
the code of ``--baseline-rev`` (``git archive`` of the package put first on ``PYTHONPATH``; the
labels of both are compared voxel by voxel), and ``preprocess_image`` alone in a subprocess (its
in-process time and the subprocess's peak). ``--skip-baseline-above N`` skips the baseline above N
voxels. Results go to ``WORK/scaling.json`` after every run (runs already there are kept unless
``--redo``), then ``docs/benchmarks/scaling/results.json`` and ``scaling.png`` (log-log).

nnU-Net v2 (``--nnunet-venv bench/nnunet-venv``, made by ``benchmarks/side_by_side.py``): its own
predictor (``nnUNetPredictor.predict_from_files``, mirroring off, one preprocessing and one export
process, ``torch.set_num_threads(cpu_count)`` as ``nnUNetv2_predict -device cpu`` does) on the same
file, with a network of the same size: nnU-Net's ``PlainConvUNet`` built from the medseg plan's
widths, kernels and strides (6 stages, 8..256 features), *randomly initialised* (time and memory do
not depend on the weights), and the plan's CT normalisation, spacing and transpose written as an
nnU-Net plans file. This script runs itself inside that venv for it (``nnunet-predict``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from side_by_side import _tree_memory_mb, say  # noqa: E402  (same sampling as the side-by-side benchmark)

ROOT = Path(__file__).resolve().parents[1]
SPLEEN = ROOT.parent / "shared" / "data" / "spleen-ct" / "imagesTr" / "spleen_002_0000.nii.gz"
DOCS = ROOT / "docs" / "benchmarks" / "scaling"
SIZES = "64x64x64,128x128x128,256x256x128,384x384x192,512x512x400"

PREPROCESS = """
import json, sys, time
from pathlib import Path
from medseg.inference.predictor import find_inputs, read_input
from medseg.plans.schema import Plans
from medseg.preprocessing.pipeline import preprocess_image
plans = Plans.model_validate_json(Path(sys.argv[1], "plans.json").read_text())
config = plans.config("3d_fullres")
case = find_inputs(Path(sys.argv[2]), len(plans.channel_names), plans.channel_names)[0]
t0 = time.perf_counter()
image, geometry = read_input(case, len(plans.channel_names))
t1 = time.perf_counter()
data, props = preprocess_image(image, geometry, config)
t2 = time.perf_counter()
print("RESULT " + json.dumps({"read_s": t1 - t0, "preprocess_s": t2 - t1, "shape": list(data.shape)}))
"""


def nnunet_plans(medseg_plans: dict) -> tuple[dict, dict]:
    """(nnU-Net v2 plans, dataset.json) for the medseg plan's 3d_fullres: same spacing, transpose,
    patch, CT normalisation and U-Net (PlainConvUNet with the plan's widths, kernels, strides)."""
    c = medseg_plans["configurations"]["3d_fullres"]
    a, norm = c["architecture"], c["normalization"][0]
    tf = c["transpose_forward"]
    n = len(a["features"])
    res = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": c["batch_size"], "patch_size": c["patch_size"], "median_image_size_in_voxels": c["median_shape"],
        "spacing": c["spacing"], "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": res,
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": {**res, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**res, "order": 1},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": n, "features_per_stage": a["features"], "conv_op": "torch.nn.modules.conv.Conv3d",
                            "kernel_sizes": a["kernel_sizes"], "strides": a["strides"],
                            "n_conv_per_stage": [a["convs_per_stage"]] * n,
                            "n_conv_per_stage_decoder": [a["convs_per_stage"]] * (n - 1), "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False,
    }
    plans = {
        "dataset_name": "Dataset009_Spleen", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": c["spacing"], "original_median_shape_after_transp": c["median_shape"],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": tf,
        "transpose_backward": [tf.index(i) for i in range(len(tf))], "configurations": {"3d_fullres": config},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "mean": norm["mean"], "std": norm["std"], "percentile_00_5": norm["lower"], "percentile_99_5": norm["upper"],
            "min": norm["lower"], "max": norm["upper"], "median": norm["mean"]}},
    }
    labels = {("background" if int(k) == 0 else v): int(k) for k, v in medseg_plans["labels"].items()}
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii"}
    return plans, dataset


def nnunet_predict(model: Path, image: Path, out: Path) -> None:
    """Inside the nnU-Net venv: predict ``image`` into ``out`` with a random-weight network of the plan's size."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet  # noqa: F401  (import check)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans, dataset = nnunet_plans(json.loads((model / "plans.json").read_text()))
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    torch.set_num_threads(os.cpu_count() or 1)  # as nnUNetv2_predict does with -device cpu
    torch.manual_seed(0)
    arch = cm.network_arch_init_kwargs
    net = get_network_from_plans(cm.network_arch_class_name, arch, cm.network_arch_init_kwargs_req_import, 1,
                                 pm.get_label_manager(dataset).num_segmentation_heads, allow_init=True,
                                 deep_supervision=False)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(net, pm, cm, [net.state_dict()], dataset, "nnUNetTrainer", None)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    predictor.predict_from_files([[str(image)]], [str(out / "ct")], save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)
    print("RESULT " + json.dumps({"predict_s": time.perf_counter() - t0}), flush=True)


def run(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Like ``side_by_side.run``: wall time, peak PSS of the process tree (sampled every 0.2 s) and the
    ``RESULT {json}`` line; also ``maxrss_mb``, the exact peak RSS of the command's main process
    (``wait4``'s ``ru_maxrss``: a short spike between two samples is not missed)."""
    import threading

    log.parent.mkdir(parents=True, exist_ok=True)
    peak, done = [0.0], threading.Event()
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})),
                                start_new_session=True)

        def sample():
            while not done.wait(0.2):
                peak[0] = max(peak[0], _tree_memory_mb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n" + "\n".join(text.splitlines()[-25:]))
    result = next((json.loads(line[7:]) for line in reversed(text.splitlines()) if line.startswith("RESULT ")), None)
    return {"wall_s": wall, "peak_mb": peak[0], "maxrss_mb": usage.ru_maxrss / 1024, "result": result}


def parse_shape(text: str) -> tuple[int, int, int]:
    return tuple(int(v) for v in text.lower().split("x"))  # type: ignore[return-value]


def make_volume(shape: tuple[int, ...], path: Path) -> None:
    """The spleen case tiled by mirroring (``np.pad`` symmetric) and cropped centrally to ``shape``."""
    import nibabel as nib

    src = nib.load(str(SPLEEN))
    data = np.asarray(src.dataobj, dtype=np.float32)
    pads = [(max(0, (s - d + 1) // 2), max(0, s - d - (s - d + 1) // 2)) for s, d in zip(shape, data.shape, strict=True)]
    tiled = np.pad(data, pads, mode="symmetric")
    lo = [(t - s) // 2 for t, s in zip(tiled.shape, shape, strict=True)]
    vol = tiled[tuple(slice(a, a + s) for a, s in zip(lo, shape, strict=True))]
    img = nib.Nifti1Image(np.round(vol).astype(np.int16), src.affine)
    img.header.set_zooms(src.header.get_zooms())
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def baseline_src(rev: str, dest: Path) -> Path:
    """The ``medseg`` package at git revision ``rev``, unpacked under ``dest`` (for ``PYTHONPATH``)."""
    out = dest / f"src-{rev.replace('/', '_')}"
    if not (out / "medseg").exists():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "medseg"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def labels_equal(a: Path, b: Path) -> bool:
    import nibabel as nib

    return bool(np.array_equal(np.asarray(nib.load(str(a)).dataobj), np.asarray(nib.load(str(b)).dataobj)))


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [("predict", "medseg predict", "o-"), ("baseline", "medseg predict (before)", "s--"),
              ("nnunet", "nnU-Net v2 predict", "^-"), ("preprocess", "medseg preprocess only", "d:")]
    for key, label, style in series:
        rows = sorted((r["voxels"], r[key]) for r in results["sizes"].values() if r.get(key))
        if not rows:
            continue
        vox = [v for v, _ in rows]
        axes[0].plot(vox, [m.get("time_s", m["wall_s"]) for _, m in rows], style, label=label)
        axes[1].plot(vox, [m.get("maxrss_mb", m["peak_mb"]) / 1024 for _, m in rows], style, label=label)
    titles = ("wall time (s)", "peak RSS of the main process (GB, wait4 ru_maxrss)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("voxels")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"medseg scaling on CT-like volumes (mirroring off, {results['machine']})", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def table(results: dict) -> str:
    head = ("| size | voxels | medseg s | medseg peak RSS / PSS GB | before: s | before: peak RSS / PSS GB | "
            "labels equal | preprocess s | nnU-Net s | nnU-Net peak RSS / PSS GB |\n|" + "---|" * 10)
    lines = [head]

    def f(m, key, scale=1.0, digits=1):
        return f"{m[key] / scale:.{digits}f}" if m and m.get(key) is not None else "–"

    for tag, r in sorted(results["sizes"].items(), key=lambda kv: kv[1]["voxels"]):
        p, b, pp, n = r.get("predict"), r.get("baseline"), r.get("preprocess"), r.get("nnunet")
        eq = "–" if r.get("labels_equal") is None else ("yes" if r["labels_equal"] else "NO")
        def mem(m):
            return f"{f(m, 'maxrss_mb', 1024, 2)} / {f(m, 'peak_mb', 1024, 2)}" if m else "–"

        lines.append(f"| {tag} | {r['voxels'] / 1e6:.2f} M | {f(p, 'wall_s')} | {mem(p)} | {f(b, 'wall_s')} | {mem(b)} | "
                     f"{eq} | {f(pp, 'time_s', digits=2)} | {f(n, 'wall_s')} | {mem(n)} |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["nnunet-predict"]:
        nnunet_predict(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--sizes", default=SIZES)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "medseg_scaling")
    ap.add_argument("--baseline-rev", default=None, help="git revision of the path before (e.g. HEAD)")
    ap.add_argument("--skip-baseline-above", type=float, default=float("inf"), help="voxels")
    ap.add_argument("--skip-predict-above", type=float, default=float("inf"), help="voxels")
    ap.add_argument("--nnunet-venv", type=Path, default=None, help="e.g. bench/nnunet-venv")
    ap.add_argument("--skip-nnunet-above", type=float, default=float("inf"), help="voxels")
    ap.add_argument("--only", default="", help="comma-separated parts to run: preprocess,predict,baseline,nnunet")
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "scaling.json"
    results = json.loads(store.read_text()) if store.exists() and not args.redo else {}
    results.setdefault("sizes", {})
    results["machine"] = f"{os.cpu_count()} CPU cores"
    results["model"] = str(args.model)
    medseg = [sys.executable, "-m", "medseg"]

    def save():  # re-read first: another invocation (--only) may have added runs meanwhile
        current = json.loads(store.read_text()) if store.exists() else {"sizes": {}}
        for tag, r in results["sizes"].items():  # keep the dicts the loop holds: merge into them
            for key, value in current["sizes"].get(tag, {}).items():
                r.setdefault(key, value)
        store.write_text(json.dumps(results, indent=1))

    def want(part: str) -> bool:
        return not args.only or part in args.only.split(",")

    for text in ([] if args.plot_only else args.sizes.split(",")):
        shape = parse_shape(text)
        tag = "x".join(map(str, shape))
        r = results["sizes"].setdefault(tag, {"shape": list(shape), "voxels": int(np.prod(shape))})
        inputs = args.work / "inputs" / tag
        image = inputs / "ct_0000.nii"
        if not image.exists():
            say(f"{tag}: building the volume")
            make_volume(shape, image)
        if want("preprocess") and "preprocess" not in r:
            say(f"{tag}: preprocess")
            m = run([sys.executable, "-c", PREPROCESS, str(args.model), str(inputs)], args.work / "logs" / f"pre_{tag}.log")
            r["preprocess"] = {"time_s": m["result"]["preprocess_s"], "read_s": m["result"]["read_s"],
                               "wall_s": m["wall_s"], "peak_mb": m["peak_mb"],
                               "maxrss_mb": m["maxrss_mb"]}
            save()
        predict = [*medseg, "predict", "-i", str(inputs), "-m", str(args.model), "-c", "3d_fullres", "-f", "full",
                   "--no-tta", "--overwrite"]
        if want("predict") and "predict" not in r and r["voxels"] <= args.skip_predict_above:
            say(f"{tag}: medseg predict")
            m = run([*predict, "-o", str(args.work / "out" / tag)], args.work / "logs" / f"predict_{tag}.log")
            r["predict"] = {"wall_s": m["wall_s"], "peak_mb": m["peak_mb"],
                               "maxrss_mb": m["maxrss_mb"]}
            save()
        if args.baseline_rev and want("baseline") and "baseline" not in r and r["voxels"] <= args.skip_baseline_above:
            src = baseline_src(args.baseline_rev, args.work)
            say(f"{tag}: medseg predict at {args.baseline_rev}")
            m = run([*predict, "-o", str(args.work / "out_baseline" / tag)], args.work / "logs" / f"baseline_{tag}.log",
                    env={"PYTHONPATH": str(src)})
            r["baseline"] = {"wall_s": m["wall_s"], "peak_mb": m["peak_mb"], "maxrss_mb": m["maxrss_mb"],
                             "rev": args.baseline_rev}
            save()
        if (args.nnunet_venv and want("nnunet") and "nnunet" not in r and r["voxels"] <= args.skip_nnunet_above):
            say(f"{tag}: nnU-Net v2 predict")
            m = run([str(args.nnunet_venv.resolve() / "bin" / "python"), __file__, "nnunet-predict", str(args.model),
                     str(image), str(args.work / "out_nnunet" / tag)], args.work / "logs" / f"nnunet_{tag}.log",
                    env={"nnUNet_raw": str(args.work), "nnUNet_preprocessed": str(args.work),
                         "nnUNet_results": str(args.work)})
            r["nnunet"] = {"wall_s": m["wall_s"], "peak_mb": m["peak_mb"], "maxrss_mb": m["maxrss_mb"],
                           "predict_s": m["result"]["predict_s"]}
            save()
        new, old = args.work / "out" / tag / "ct.nii", args.work / "out_baseline" / tag / "ct.nii"
        if new.exists() and old.exists() and r.get("labels_equal") is None:
            r["labels_equal"] = labels_equal(new, old)
            save()
        say(f"{tag}: {json.dumps({k: v for k, v in r.items() if k not in ('shape',)})}")
    DOCS.mkdir(parents=True, exist_ok=True)
    results["generated"] = time.strftime("%Y-%m-%d %H:%M")
    (DOCS / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, DOCS / "scaling.png")
    print(table(results))


if __name__ == "__main__":
    main()
