#!/usr/bin/env python
"""medseg and nnU-Net v2 side by side on one dataset and this machine, interleaved so drift cancels.

    .venv/bin/python benchmarks/side_by_side.py [DATASET] [--work DIR] [--budget-min 30] [--repeats 3]
                                                [--parts plan,throughput,accuracy,inference,hd95]

DATASET: an MSD (``dataset.json`` with ``modality``) or nnU-Net v2 dataset, default
``../shared/data/hippocampus``. Both tools read the same files: the dataset is linked once into
nnU-Net v2's raw layout, which medseg reads too. nnU-Net v2 runs in its own venv
(``bench/nnunet-venv``, made here when missing, with the project's torch==2.13.0 CPU build put back
after nnunetv2's install so that both tools run the same kernels). Parts:

1. plan: fingerprint + plan + preprocess of 3d_fullres (``medseg plan --configs 3d_fullres`` vs
   ``nnUNetv2_plan_and_preprocess -c 3d_fullres``): wall time and peak memory.
2. throughput: training samples/s at an equal setting (nnU-Net's 3d_fullres network, patch and
   depth, batch ``--batch``), data loading and augmentation included, after warm-up.
3. accuracy: each tool's own plan trained for ``--budget-min`` wall-clock minutes on fold 0 (the
   same split for both), then each tool's own validation of the held-out cases; Dice and HD95 per
   class by the same evaluator.
4. inference: s/case and peak memory predicting ``--cases`` held-out cases with the part-3 models,
   with and without mirroring, and the Dice of each; for medseg also the share of pure network
   forward time (the rest is reading, resampling, stitching and writing).
5. hd95: medseg's HD95 against MONAI's ``compute_hausdorff_distance`` on every case (reference vs
   a shifted copy of itself): time ratio and largest absolute difference.

Every figure is a median over ``--repeats`` runs with min and max, except part 3 (one training run
per tool: a 30-minute run is the unit). Writes ``WORK/side_by_side.json`` after every part (parts
already there are skipped unless ``--redo``), ``docs/benchmarks/side_by_side/results.json`` and the
generated block of ``docs/benchmarks.md``. Peak memory is the largest sum of PSS over the tool's
whole process tree (workers included), sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEDSEG = [sys.executable, "-m", "medseg"]
NNUNET_VERSION = "2.8.1"
TORCH_VERSION = "2.13.0"
BEGIN, END = "<!-- side_by_side:begin -->", "<!-- side_by_side:end -->"


# ---------------------------------------------------------------------------------------------- measuring

def _tree_memory_mb(sid: int) -> float:
    """Sum of PSS (MB) of every process in session ``sid`` (the tool and all its workers)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) != sid:  # field 6 of stat: session id
                continue
            with open(f"/proc/{entry.name}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            continue
    return total / 1024.0


def run(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd`` in its own session; wall time, peak memory of its process tree, exit code, and
    the ``RESULT {json}`` line it printed, if any. Output goes to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ, **(env or {}))
    peak = [0.0]
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
                                start_new_session=True)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                peak[0] = max(peak[0], _tree_memory_mb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
    text = log.read_text(errors="replace")
    if rc != 0:
        tail = "\n".join(text.splitlines()[-25:])
        raise SystemExit(f"failed ({rc}): {' '.join(map(str, cmd))}\n--- {log} (last lines) ---\n{tail}")
    result = next((json.loads(line[7:]) for line in reversed(text.splitlines()) if line.startswith("RESULT ")), None)
    return {"wall_s": wall, "peak_mb": peak[0], "result": result}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- setup

def nnunet_venv(venv: Path) -> Path:
    """The nnU-Net venv's bin folder; created when missing (nnunetv2 pulls a CUDA torch through
    torchvision; torch 2.13.0 CPU is put back afterwards: nnU-Net's 3D U-Net path never imports
    torchvision or timm)."""
    bin_dir = venv / "bin"
    if not (bin_dir / "nnUNetv2_plan_and_preprocess").exists():
        say(f"creating the nnU-Net venv in {venv} (several GB; a few minutes)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(bin_dir / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, f"nnunetv2=={NNUNET_VERSION}"], check=True)
        subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    return bin_dir


def link_dataset(dataset: Path, raw: Path, dataset_id: int) -> tuple[str, dict]:
    """Link an MSD or nnU-Net v2 dataset into nnU-Net v2's raw layout; returns (name, dataset.json)."""
    import nibabel as nib

    meta = json.loads((dataset / "dataset.json").read_text())
    name = f"Dataset{dataset_id:03d}_{''.join(c for c in str(meta.get('name', dataset.name)) if c.isalnum())}"
    target = raw / name
    if (target / "dataset.json").exists():
        return name, json.loads((target / "dataset.json").read_text())
    (target / "imagesTr").mkdir(parents=True, exist_ok=True)
    (target / "labelsTr").mkdir(exist_ok=True)
    if "channel_names" in meta:  # nnU-Net v2 already
        for sub in ("imagesTr", "labelsTr"):
            for f in sorted((dataset / sub).iterdir()):
                (target / sub / f.name).symlink_to(f.resolve())
        new = meta
    else:  # MSD: one (possibly 4D) image per case
        modality = meta["modality"]
        channels = {str(k): str(modality[k]) for k in sorted(modality, key=int)}
        for entry in meta["training"]:
            image, label = (dataset / entry["image"]).resolve(), (dataset / entry["label"]).resolve()
            case = image.name.removesuffix(".nii.gz")
            if len(channels) == 1:
                (target / "imagesTr" / f"{case}_0000.nii.gz").symlink_to(image)
            else:
                img = nib.load(image)
                data = img.get_fdata(dtype="float32")
                for c in range(data.shape[-1]):
                    nib.save(nib.Nifti1Image(data[..., c], img.affine), target / "imagesTr" / f"{case}_{c:04d}.nii.gz")
            (target / "labelsTr" / f"{case}.nii.gz").symlink_to(label)
        new = {"name": name, "channel_names": channels,
               "labels": {v: int(k) for k, v in meta["labels"].items()},
               "numTraining": len(meta["training"]), "file_ending": ".nii.gz"}
    (target / "dataset.json").write_text(json.dumps(new, indent=1))
    return name, new


# ---------------------------------------------------------------------------------------------- parts

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.nn_bin = nnunet_venv(Path(args.nnunet_venv).resolve())
        self.raw = self.work / "nnUNet_raw"
        self.name, self.meta = link_dataset(Path(args.dataset).resolve(), self.raw, args.dataset_id)
        self.dataset = self.raw / self.name
        self.medseg_work = self.work / "medseg"
        self.nn_env = {"nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.work / "nnUNet_preprocessed"),
                       "nnUNet_results": str(self.work / "nnUNet_results"), "PYTHONUNBUFFERED": "1"}
        self.results_path = self.work / "side_by_side.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        self.logs = self.work / "logs"

    def save(self) -> None:
        self.results["machine"] = machine()
        self.results["dataset"] = {"path": str(Path(self.args.dataset).resolve()), "name": self.name,
                                   "cases": self.meta.get("numTraining")}
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(self.results_path)

    def order(self, r: int) -> list[str]:
        return ["medseg", "nnunet"] if r % 2 == 0 else ["nnunet", "medseg"]

    def nnunet(self, tool: str, *args: str) -> list[str]:
        return [str(self.nn_bin / tool), *args]

    def driver(self, *args: str) -> list[str]:
        return [str(self.nn_bin / "python"), str(ROOT / "benchmarks" / "nnunet_driver.py"), *args,
                "--dataset", str(self.args.dataset_id)]

    # ---------------------------------------------------------------- 1. plan + preprocess

    def part_plan(self) -> dict:
        """medseg cold (an empty step-time cache: it measures its candidate networks) and warm (the
        step times this machine measured before, as on any later plan), and nnU-Net."""
        runs: dict[str, list[dict]] = {"medseg": [], "medseg_warm": [], "nnunet": []}
        breakdown: dict[str, list[dict]] = {"medseg": [], "medseg_warm": []}
        for r in range(self.args.repeats):
            home = self.work / "plan" / f"medseg_home_{r}"
            shutil.rmtree(home, ignore_errors=True)
            for tool in self.order(r):
                tools = ["medseg", "medseg_warm"] if tool == "medseg" else ["nnunet"]
                for t in tools:
                    say(f"plan {t} (run {r + 1}/{self.args.repeats})")
                    out = self.work / "plan" / f"{t}_{r}"
                    shutil.rmtree(out, ignore_errors=True)
                    if t.startswith("medseg"):
                        m = run([*MEDSEG, "plan", str(self.dataset), "-o", str(out), "--configs", "3d_fullres",
                                 "--device", "cpu"], self.logs / f"plan_{t}_{r}.log", env={"MEDSEG_HOME": str(home)})
                        breakdown[t].append(json.loads((out / "plan_timing.json").read_text()))
                    else:
                        out.mkdir(parents=True)
                        m = run(self.nnunet("nnUNetv2_plan_and_preprocess", "-d", str(self.args.dataset_id),
                                            "-c", "3d_fullres"),
                                self.logs / f"plan_nnunet_{r}.log", env={**self.nn_env, "nnUNet_preprocessed": str(out)})
                    runs[t].append(m)
        # the first run's outputs are the ones the later parts use
        for link, target in ((self.medseg_work, self.work / "plan" / "medseg_0"),
                             (self.work / "nnUNet_preprocessed", self.work / "plan" / "nnunet_0")):
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
        for r in range(self.args.repeats):
            for t in ("medseg", "medseg_warm", "nnunet"):
                if r or t == "medseg_warm":
                    shutil.rmtree(self.work / "plan" / f"{t}_{r}", ignore_errors=True)
        out = {t: {"wall_s": summary([m["wall_s"] for m in ms]), "peak_mb": summary([m["peak_mb"] for m in ms])}
               for t, ms in runs.items()}
        for t, rows in breakdown.items():
            out[t]["phases_s"] = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        return out

    # ---------------------------------------------------------------- 2. throughput at an equal setting

    def _nnunet_plans(self, identifier: str = "nnUNetPlans") -> dict:
        return json.loads((self.work / "nnUNet_preprocessed" / self.name / f"{identifier}.json").read_text())

    def equal_setting(self) -> dict:
        """nnU-Net's 3d_fullres network and patch at batch ``--batch`` for both tools:
        ``nnUNetPlans_eq`` for nnU-Net, configuration ``3d_fullres_eq`` in medseg's plans.json."""
        plans = self._nnunet_plans()
        nn = plans["configurations"]["3d_fullres"]
        arch = nn["architecture"]["arch_kwargs"]
        eq = json.loads(json.dumps(plans))
        eq["plans_name"] = "nnUNetPlans_eq"
        eq["configurations"] = {"3d_fullres": {**nn, "batch_size": self.args.batch}}
        path = self.work / "nnUNet_preprocessed" / self.name / "nnUNetPlans_eq.json"
        path.write_text(json.dumps(eq, indent=1))

        mplans_path = self.medseg_work / "plans.json"
        mplans = json.loads(mplans_path.read_text())
        base = mplans["configurations"]["3d_fullres"]
        if base["transpose_forward"] != plans["transpose_forward"]:
            raise SystemExit(f"axis orders differ (medseg {base['transpose_forward']}, nnU-Net "
                             f"{plans['transpose_forward']}); the equal setting needs one order")
        cfg = json.loads(json.dumps(base))
        cfg.update(variant="eq", batch_size=self.args.batch, patch_size=list(nn["patch_size"]))
        cfg["architecture"].update(features=list(arch["features_per_stage"]),
                                   kernel_sizes=[list(k) for k in arch["kernel_sizes"]],
                                   strides=[list(s) for s in arch["strides"]],
                                   convs_per_stage=int(arch["n_conv_per_stage"][0]), deep_supervision=True)
        mplans["configurations"]["3d_fullres_eq"] = cfg
        mplans_path.write_text(json.dumps(mplans, indent=1))
        return {"patch_size": list(nn["patch_size"]), "batch_size": self.args.batch,
                "features": list(arch["features_per_stage"]), "strides": arch["strides"],
                "convs_per_stage": arch["n_conv_per_stage"]}

    def part_throughput(self) -> dict:
        setting = self.equal_setting()
        n, warm = self.args.iters, self.args.warmup
        rates: dict[str, list[float]] = {"medseg": [], "nnunet": []}
        peaks: dict[str, list[float]] = {"medseg": [], "nnunet": []}
        for r in range(self.args.repeats):
            for tool in self.order(r):
                say(f"throughput {tool} (run {r + 1}/{self.args.repeats})")
                if tool == "medseg":
                    run_dir = self.medseg_work / "runs" / "3d_fullres_eq"
                    shutil.rmtree(run_dir, ignore_errors=True)
                    # epoch 1 (n iterations) is the warm-up; epoch 2's training loop is measured
                    m = run([*MEDSEG, "train", str(self.medseg_work), "-c", "3d_fullres_eq", "-f", "0", "--epochs", "2",
                             "--iterations-per-epoch", str(n), "--no-validation", "--device", "cpu"],
                            self.logs / f"throughput_medseg_{r}.log")
                    log = [json.loads(x) for x in (run_dir / "fold_0" / "log.jsonl").read_text().splitlines()]
                    rates[tool].append(n * self.args.batch / log[-1]["train_s"])
                else:
                    m = run(self.driver("throughput", "--plans", "nnUNetPlans_eq", "--warmup", str(warm), "--iters", str(n)),
                            self.logs / f"throughput_nnunet_{r}.log", env=self.nn_env)
                    rates[tool].append(m["result"]["samples_per_s"])
                    setting["nnunet_da_processes"] = m["result"]["da_processes"]
                peaks[tool].append(m["peak_mb"])
        shutil.rmtree(self.medseg_work / "runs" / "3d_fullres_eq", ignore_errors=True)
        return {"setting": setting, "iterations": n,
                **{tool: {"samples_per_s": summary(rates[tool]), "peak_mb": summary(peaks[tool])} for tool in rates}}

    # ---------------------------------------------------------------- 3. accuracy at an equal budget

    def fold0(self) -> tuple[list[str], list[str]]:
        """medseg's fold 0 (made as ``medseg train`` makes it when the plan is fresh)."""
        from medseg.plans.schema import Plans
        from medseg.training.loop import fold_case_ids

        plans = Plans.load(self.medseg_work / "plans.json")
        return fold_case_ids(self.medseg_work, plans, plans.configurations["3d_fullres"], 0)

    def evaluate(self, predictions: Path, cases: list[str], name: str) -> dict:
        labels = self.work / "labels" / name
        shutil.rmtree(labels, ignore_errors=True)
        labels.mkdir(parents=True)
        for c in cases:
            (labels / f"{c}.nii.gz").symlink_to((self.dataset / "labelsTr" / f"{c}.nii.gz").resolve())
        preds = self.work / "eval_in" / name
        shutil.rmtree(preds, ignore_errors=True)
        preds.mkdir(parents=True)
        for c in cases:
            (preds / f"{c}.nii.gz").symlink_to((predictions / f"{c}.nii.gz").resolve())
        report = self.work / "reports" / name
        run([*MEDSEG, "evaluate", str(preds), str(labels), "-o", str(report)], self.logs / f"evaluate_{name}.log")
        return json.loads((report / "summary.json").read_text())

    @staticmethod
    def scores(summary_json: dict) -> dict:
        """Mean foreground Dice / HD95 and per class means from ``medseg evaluate``'s summary.json."""
        out = {"mean_fg_dice": summary_json["foreground_mean"]["dice"],
               "mean_fg_hd95": summary_json["foreground_mean"]["hd95_mm"]}
        for c in summary_json["classes"].values():
            out[c["name"]] = {"dice": c["dice"]["mean"], "hd95": c["hd95_mm"]["mean"]}
        return out

    def part_accuracy(self) -> dict:
        train_ids, val_ids = self.fold0()
        # nnU-Net uses medseg's fold 0, so both hold out the same cases
        splits = json.loads((self.medseg_work / "splits.json").read_text())
        (self.work / "nnUNet_preprocessed" / self.name / "splits_final.json").write_text(
            json.dumps([{"train": s["train"], "val": s["val"]} for s in splits]))
        minutes = self.args.budget_min
        out: dict = {"budget_min": minutes, "held_out_cases": len(val_ids)}
        say(f"accuracy medseg: {minutes} min training on fold 0 + validation of {len(val_ids)} cases")
        shutil.rmtree(self.medseg_work / "runs" / "3d_fullres", ignore_errors=True)
        m = run([*MEDSEG, "train", str(self.medseg_work), "-c", "3d_fullres", "-f", "0", "--time-budget", str(minutes),
                 "--device", "cpu"], self.logs / "accuracy_medseg.log")
        run_dir = self.medseg_work / "runs" / "3d_fullres" / "fold_0"
        log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
        meta = json.loads((run_dir / "run.json").read_text())
        plan = json.loads((self.medseg_work / "plans.json").read_text())["configurations"]["3d_fullres"]
        out["medseg"] = {"wall_s": m["wall_s"], "peak_mb": m["peak_mb"], "training_s": log[-1]["elapsed_s"],
                         "epochs": len(log), "iterations": len(log) * meta["budget"]["iterations_per_epoch"],
                         "batch_size": plan["batch_size"], "features": plan["architecture"]["features"],
                         "patch_size": plan["patch_size"],
                         "scores": self.scores(self.evaluate(run_dir / "val", val_ids, "accuracy_medseg"))}
        say(f"accuracy nnU-Net: {minutes} min training on fold 0 + validation")
        shutil.rmtree(self.work / "nnUNet_results", ignore_errors=True)
        m = run(self.driver("train", "--plans", "nnUNetPlans", "--fold", "0", "--minutes", str(minutes),
                            "--iterations", str(self.args.nnunet_iterations)),
                self.logs / "accuracy_nnunet.log", env=self.nn_env)
        res = m["result"]
        out["nnunet"] = {"wall_s": m["wall_s"], "peak_mb": m["peak_mb"], "training_s": res["training_s"],
                         "epochs": res["epochs"], "iterations": res["iterations"], "batch_size": res["batch_size"],
                         "features": res["features"],
                         "patch_size": self._nnunet_plans()["configurations"]["3d_fullres"]["patch_size"],
                         "scores": self.scores(self.evaluate(Path(res["validation_folder"]), val_ids, "accuracy_nnunet"))}
        return out

    # ---------------------------------------------------------------- 4. inference

    def part_inference(self) -> dict:
        _, val_ids = self.fold0()
        cases = val_ids[: self.args.cases]
        inputs = self.work / "infer_in"
        shutil.rmtree(inputs, ignore_errors=True)
        inputs.mkdir()
        for c in cases:
            (inputs / f"{c}_0000.nii.gz").symlink_to((self.dataset / "imagesTr" / f"{c}_0000.nii.gz").resolve())
        out: dict = {"cases": len(cases)}
        for tta in (True, False):
            key = "mirroring" if tta else "no_mirroring"
            times: dict[str, list[float]] = {"medseg": [], "nnunet": []}
            peaks: dict[str, list[float]] = {"medseg": [], "nnunet": []}
            for r in range(self.args.repeats):
                for tool in self.order(r):
                    say(f"inference {tool} {key} (run {r + 1}/{self.args.repeats})")
                    dst = self.work / "infer_out" / f"{tool}_{key}"
                    shutil.rmtree(dst, ignore_errors=True)
                    if tool == "medseg":
                        cmd = [*MEDSEG, "predict", "-i", str(inputs), "-o", str(dst), "-m", str(self.medseg_work),
                               "-c", "3d_fullres", "-f", "0", "--device", "cpu", *([] if tta else ["--no-tta"])]
                        m = run(cmd, self.logs / f"infer_medseg_{key}_{r}.log")
                    else:
                        cmd = self.nnunet("nnUNetv2_predict", "-i", str(inputs), "-o", str(dst), "-d",
                                          str(self.args.dataset_id), "-c", "3d_fullres", "-f", "0", "-device", "cpu",
                                          *([] if tta else ["--disable_tta"]))
                        m = run(cmd, self.logs / f"infer_nnunet_{key}_{r}.log", env=self.nn_env)
                    times[tool].append(m["wall_s"] / len(cases))
                    peaks[tool].append(m["peak_mb"])
            out[key] = {tool: {"s_per_case": summary(times[tool]), "peak_mb": summary(peaks[tool]),
                               "scores": self.scores(self.evaluate(self.work / "infer_out" / f"{tool}_{key}", cases,
                                                                   f"infer_{tool}_{key}"))}
                        for tool in times}
            out[key]["medseg"]["forward_share"] = self.forward_share(cases, tta)
        return out

    def forward_share(self, cases: list[str], tta: bool) -> dict:
        """medseg's predict in this process with the network's forward passes timed: end-to-end
        seconds vs the seconds inside ``model.forward`` for the same windows."""
        import torch

        from medseg.inference import predictor

        model = predictor.LoadedModel.load(self.medseg_work, config_name="3d_fullres", folds=[0], device="cpu")
        spent = [0.0]
        calls = [0]
        starts: list[float] = []
        for stage in model.stages:
            for net in stage.models:
                net.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))

                def done(*_):
                    spent[0] += time.perf_counter() - starts.pop()
                    calls[0] += 1
                net.register_forward_hook(done)
        inputs = self.work / "infer_in"
        dst = self.work / "infer_out" / "forward_share"
        shutil.rmtree(dst, ignore_errors=True)
        torch.set_num_threads(os.cpu_count() or 1)
        t0 = time.perf_counter()
        predictor.predict_folder(inputs, dst, model, tta=tta)
        total = time.perf_counter() - t0
        return {"end_to_end_s": total, "forward_s": spent[0], "forward_calls": calls[0],
                "ratio": total / spent[0] if spent[0] else None, "cases": len(cases)}

    # ---------------------------------------------------------------- 5. HD95

    def part_hd95(self) -> dict:
        out = self._hd95_on(sorted((self.dataset / "labelsTr").glob("*.nii.gz")),
                            sorted(int(v) for v in self.meta["labels"].values() if int(v) != 0))
        large = Path(self.args.hd95_large) if self.args.hd95_large else None
        if large and large.is_dir():  # one large volume: where cropping to the masks' box pays most
            out["large"] = {"folder": str(large),
                            **self._hd95_on(sorted(large.glob("*.nii.gz")), [1], repeats=self.args.repeats)}
        return out

    def _hd95_on(self, labels: list[Path], classes: list[int], repeats: int | None = None) -> dict:
        import nibabel as nib
        import numpy as np
        import torch
        from monai.metrics import compute_hausdorff_distance

        from medseg.evaluation.metrics import hd95

        pairs = []
        for path in labels:
            img = nib.load(path)
            ref = np.rint(np.asanyarray(img.dataobj)).astype(np.int16)
            pred = np.roll(ref, shift=(1, -1, 1), axis=(0, 1, 2))  # a prediction one voxel off on every axis
            pairs.append((pred, ref, tuple(float(z) for z in img.header.get_zooms()[:3])))

        def ours() -> list[float]:
            return [hd95(p == c, r == c, s) for p, r, s in pairs for c in classes]

        def monai() -> list[float]:
            values = []
            for p, r, s in pairs:
                for c in classes:
                    pt = torch.from_numpy((p == c)[None, None].astype(np.float32))
                    rt = torch.from_numpy((r == c)[None, None].astype(np.float32))
                    values.append(float(compute_hausdorff_distance(pt, rt, include_background=True, percentile=95,
                                                                   spacing=list(s))[0, 0]))
            return values

        t_ours, t_monai = [], []
        for r in range(repeats or self.args.repeats):
            for fn, store in ((ours, t_ours), (monai, t_monai)) if r % 2 == 0 else ((monai, t_monai), (ours, t_ours)):
                say(f"hd95 {fn.__name__} (run {r + 1}/{self.args.repeats})")
                t = time.perf_counter()
                values = fn()
                store.append(time.perf_counter() - t)
                if fn is ours:
                    a = values
                else:
                    b = values
        diff = max(abs(x - y) for x, y in zip(a, b, strict=True) if np.isfinite(x) and np.isfinite(y))
        return {"pairs": len(a), "cases": len(pairs), "medseg_s": summary(t_ours), "monai_s": summary(t_monai),
                "max_abs_diff_mm": diff, "non_finite_mismatch": sum(int(np.isfinite(x) != np.isfinite(y))
                                                               for x, y in zip(a, b, strict=True))}


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}


# ---------------------------------------------------------------------------------------------- report

def _fmt(s: dict | None, unit: str = "", digits: int = 1) -> str:
    if not s:
        return "—"
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def _ratio(a: float | None, b: float | None) -> str:
    return f"**{a / b:.2f}×**" if a and b else "—"


def _hd95_row(h: dict, what: str, target: str) -> str:
    return (f"| HD95 of {what}, s | {_fmt(h['medseg_s'], digits=3)} | MONAI {_fmt(h['monai_s'], digits=3)} | "
            f"{_ratio(h['monai_s']['median'], h['medseg_s']['median'])} faster, max |Δ| {h['max_abs_diff_mm']:.2g} mm "
            f"| {target} |")


def report(results: dict, command: str) -> str:
    commands: dict[str, list[str]] = {}  # the command that last measured each part, in part order
    for part, cmd in results.get("commands", {}).items():
        commands.setdefault(cmd, []).append(part)
    if not commands:
        commands = {command: []}
    lines = [BEGIN, "", "```bash"]
    for cmd, parts in commands.items():
        lines += [f"# {', '.join(parts)}"] if parts and len(commands) > 1 else []
        lines.append(cmd)
    lines += ["```", ""]
    m = results.get("machine", {})
    lines.append(f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')} for both "
                 f"tools, measured {m.get('date', '?')}. Dataset: {results.get('dataset', {}).get('name', '?')} "
                 f"({results.get('dataset', {}).get('cases', '?')} cases). Figures: median (min–max) over the runs; "
                 "memory: peak sum of PSS over the tool's process tree. Raw figures: "
                 "`docs/benchmarks/side_by_side/results.json`.")
    lines += ["", "| measure | medseg | nnU-Net v2 | medseg advantage | target |", "|---|---|---|---|---|"]
    p = results.get("plan")
    if p:
        lines.append(f"| plan + preprocess 3d_fullres, wall s | {_fmt(p['medseg']['wall_s'])} | "
                     f"{_fmt(p['nnunet']['wall_s'])} | "
                     f"{_ratio(p['nnunet']['wall_s']['median'], p['medseg']['wall_s']['median'])} faster | ≥ 3× |")
        if "medseg_warm" in p:
            lines.append(f"| plan + preprocess, medseg with this machine's step times remembered, wall s | "
                         f"{_fmt(p['medseg_warm']['wall_s'])} | {_fmt(p['nnunet']['wall_s'])} | "
                         f"{_ratio(p['nnunet']['wall_s']['median'], p['medseg_warm']['wall_s']['median'])} faster | |")
        lines.append(f"| plan + preprocess, peak memory MB | {_fmt(p['medseg']['peak_mb'], digits=0)} | "
                     f"{_fmt(p['nnunet']['peak_mb'], digits=0)} | "
                     f"{_ratio(p['nnunet']['peak_mb']['median'], p['medseg']['peak_mb']['median'])} less | |")
    t = results.get("throughput")
    if t:
        s = t["setting"]
        lines.append(f"| training samples/s (patch {'×'.join(map(str, s['patch_size']))}, batch {s['batch_size']}, "
                     f"features {','.join(map(str, s['features']))}) | {_fmt(t['medseg']['samples_per_s'], digits=2)} | "
                     f"{_fmt(t['nnunet']['samples_per_s'], digits=2)} | "
                     f"{_ratio(t['medseg']['samples_per_s']['median'], t['nnunet']['samples_per_s']['median'])} | ≥ 1.5× |")
        lines.append(f"| training peak memory MB | {_fmt(t['medseg']['peak_mb'], digits=0)} | "
                     f"{_fmt(t['nnunet']['peak_mb'], digits=0)} | | |")
    a = results.get("accuracy")
    if a:
        ms, ns = a["medseg"]["scores"], a["nnunet"]["scores"]
        lines.append(f"| mean fg Dice after {a['budget_min']:g} min training, fold 0 ({a['held_out_cases']} held-out) | "
                     f"{ms['mean_fg_dice']:.4f} | {ns['mean_fg_dice']:.4f} | {ms['mean_fg_dice'] - ns['mean_fg_dice']:+.4f} "
                     "| ≥ 0 |")
    i = results.get("inference")
    if i:
        for key, label in (("mirroring", "with mirroring"), ("no_mirroring", "without mirroring")):
            x = i[key]
            lines.append(f"| predict s/case {label} ({i['cases']} cases) | {_fmt(x['medseg']['s_per_case'], digits=2)} | "
                         f"{_fmt(x['nnunet']['s_per_case'], digits=2)} | "
                         f"{_ratio(x['nnunet']['s_per_case']['median'], x['medseg']['s_per_case']['median'])} faster | "
                         f"{'≥ 3× (vs nnU-Net with mirroring)' if key == 'mirroring' else ''} |")
            lines.append(f"| Dice of those predictions {label} | {x['medseg']['scores']['mean_fg_dice']:.4f} | "
                         f"{x['nnunet']['scores']['mean_fg_dice']:.4f} | "
                         f"{x['medseg']['scores']['mean_fg_dice'] - x['nnunet']['scores']['mean_fg_dice']:+.4f} | |")
        fs = i["mirroring"]["medseg"]["forward_share"]
        fs0 = i["no_mirroring"]["medseg"]["forward_share"]
        lines.append(f"| medseg predict end-to-end / pure forward time | {fs['ratio']:.2f}× (mirroring), "
                     f"{fs0['ratio']:.2f}× (none) | | | ≤ 1.3× |")
        fast = i["no_mirroring"]["medseg"]["s_per_case"]["median"]
        d_fast = i["no_mirroring"]["medseg"]["scores"]["mean_fg_dice"] - i["mirroring"]["nnunet"]["scores"]["mean_fg_dice"]
        slow = i["mirroring"]["nnunet"]["s_per_case"]["median"]
        lines.append(f"| medseg without mirroring vs nnU-Net default (mirroring) | {fast:.2f} s | {slow:.2f} s | "
                     f"{_ratio(slow, fast)} faster, Dice {d_fast:+.4f} "
                     "| ≥ 3× at Dice within 0.005 |")
    h = results.get("hd95")
    if h:
        lines.append(_hd95_row(h, f"{h['pairs']} masks ({h['cases']} cases)", "≥ 5×, identical"))
        if "large" in h:
            lines.append(_hd95_row(h["large"], f"{h['large']['pairs']} mask(s) of a large volume "
                                               f"({Path(h['large']['folder']).parent.name})", ""))
    if p and "phases_s" in p.get("medseg", {}):
        phases = "; ".join(f"{t}: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in p[t]["phases_s"].items())
                           for t in ("medseg", "medseg_warm") if "phases_s" in p.get(t, {}))
        lines += ["", f"medseg plan phases (median, inside the process; the rest of the wall time is Python start-up "
                      f"and imports): {phases}."]
    if a:
        lines += ["", "Training at the equal budget (each tool's own plan):", "",
                  "| tool | batch | patch | features | epochs × iterations | training s | per class Dice / HD95 mm |",
                  "|---|---|---|---|---|---|---|"]
        for tool in ("medseg", "nnunet"):
            x = a[tool]
            per_class = "; ".join(f"{k} {v['dice']:.3f} / {v['hd95']:.2f}" for k, v in x["scores"].items()
                                  if isinstance(v, dict) and v.get("dice") is not None and v.get("hd95") is not None)
            lines.append(f"| {tool} | {x['batch_size']} | {'×'.join(map(str, x['patch_size']))} | "
                         f"{','.join(map(str, x['features'] or []))} | {x['epochs']} ep, {x['iterations']} it | "
                         f"{x['training_s']:.0f} | {per_class} |")
    lines += ["", END]
    return "\n".join(lines)


def write_docs(results: dict, command: str) -> None:
    out = ROOT / "docs" / "benchmarks" / "side_by_side"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text()
    block = report(results, command)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text += "\n## Side by side with nnU-Net v2 (generated by `benchmarks/side_by_side.py`)\n\n" + block + "\n"
    doc.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", default=str(ROOT.parent / "shared" / "data" / "hippocampus"))
    parser.add_argument("--work", default="/tmp/side_by_side")
    parser.add_argument("--nnunet-venv", default=str(ROOT / "bench" / "nnunet-venv"))
    parser.add_argument("--dataset-id", type=int, default=4)
    parser.add_argument("--parts", default="plan,throughput,accuracy,inference,hd95")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-min", type=float, default=30.0)
    parser.add_argument("--batch", type=int, default=2, help="batch size of the equal throughput setting")
    parser.add_argument("--iters", type=int, default=20, help="measured training iterations per throughput run")
    parser.add_argument("--warmup", type=int, default=3, help="nnU-Net warm-up iterations (medseg: one epoch)")
    parser.add_argument("--nnunet-iterations", type=int, default=50,
                        help="nnU-Net iterations per epoch in the budget run (its default 250 exceeds the budget)")
    parser.add_argument("--cases", type=int, default=10, help="held-out cases predicted per inference run")
    parser.add_argument("--hd95-large", default=str(ROOT.parent / "shared" / "data" / "spleen-ct" / "labelsTr"),
                        help="a folder of large label maps also timed in the hd95 part ('' to skip)")
    parser.add_argument("--redo", action="store_true", help="run parts already in side_by_side.json again")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/")
    args = parser.parse_args()
    bench = Bench(args)
    command = "python benchmarks/side_by_side.py " + " ".join(sys.argv[1:])
    for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
        if part in bench.results and not args.redo:
            say(f"{part}: already measured (--redo to run again)")
            continue
        fn = getattr(bench, f"part_{part}", None)
        if fn is None:
            raise SystemExit(f"unknown part {part!r}")
        bench.results[part] = fn()
        bench.results.setdefault("commands", {})[part] = command
        bench.save()
        say(f"{part}: {json.dumps(bench.results[part])[:400]}")
    if not args.no_docs:
        write_docs(bench.results, command)
    print(report(bench.results, command))


if __name__ == "__main__":
    main()
