"""The GPU check: medseg's CUDA path in one prepared run (≤ 8 minutes on one GPU).

    bash benchmarks/gpu_check.sh RESULTS_DIR [--device cpu] [--tiny]

Writes ``RESULTS_DIR/gpu_check.json`` (rewritten after every section, so a run stopped by its time
limit still leaves what it measured) and a short log on stdout. Sections, each recorded with a
``status`` (passed / failed / skipped with a ``reason``) and its figures; a failing section does
not stop the others, and the exit code is 1 when any failed:

1. ``variants``: every registered network variant trains a few steps with AMP (fp16 autocast +
   GradScaler on CUDA; fp32 on a CPU) on a synthetic batch: losses finite, weights changed.
2. ``resume``: ``train_fold`` on a tiny work directory planned from the bundled demo data, 2
   epochs uninterrupted vs 1 epoch + ``resume=True`` to 2: bit-identical weights on a CPU; on CUDA
   (cuDNN deterministic) the difference within the nondeterminism of two uninterrupted runs.
3. ``ddp``: ``medseg train … --nproc N`` (nccl) when more than one GPU is visible.
4. ``memory``: the planner's training-memory estimate vs the measured peak for three patch sizes
   (judged on CUDA: within ±25%; on a CPU the figures only).
5. ``predict``: the demo's test cases predicted on the device vs on the CPU with section 2's model
   (≤ 0.1% of voxels differ), and on CUDA stitched on the GPU vs on the CPU.
6. ``throughput``: training samples/s at nnU-Net's default hippocampus plan (batch 7, patch
   40×56×40, features 32–256) on a synthetic batch on the device.

Imports only what the GPU machine has (torch, numpy …) plus nibabel, monai, batchgenerators and
pydantic: no SimpleITK, pydicom or highdicom (``tests/test_gpu_check.py`` runs ``--device cpu
--tiny`` with those three made unimportable).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 8 * 60  # the slot; sections that would start after SECTION_CUTOFF_S are skipped
SECTION_CUTOFF_S = 7 * 60
MEMORY_TOLERANCE = 0.25  # |measured / estimate - 1| allowed on CUDA
PREDICT_MAX_DIFF = 1e-3  # fraction of voxels whose label may differ between devices
# Resume on CUDA: cuDNN is made deterministic, but atomics (e.g. the backward of interpolation or
# of strided transposed convolutions) may still reorder sums; the resumed run passes when its
# weights are as close to the uninterrupted run as a second uninterrupted run is (x RESUME_FACTOR),
# or within RESUME_ABS_TOL when both are exact.
RESUME_FACTOR = 4.0
RESUME_ABS_TOL = 1e-6


class Skip(Exception):
    """A section that does not apply here; its message is the reason."""


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- helpers


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(device: str):
    """Training's precision on ``device`` (:func:`medseg.training.precision.training_autocast`):
    fp16 autocast on CUDA, fp32 on a CPU."""
    from medseg.training.precision import training_autocast

    dtype = training_autocast(device)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def _architecture(features: list[int], patch: list[int], blocks=None):
    """The planner's topology for ``patch`` at 1 mm isotropic spacing with ``features`` per stage."""
    from medseg.plans.schema import Architecture, Blocks
    from medseg.plans.topology import pooling_plan

    strides, kernels = pooling_plan([1.0] * len(patch), patch, max_stages=len(features))
    return Architecture(features=features[:len(strides)], kernel_sizes=kernels, strides=strides,
                        blocks=blocks or Blocks())


def _train_steps(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, device: str,
                 loss_fn) -> dict:
    """``steps`` SGD steps on one batch as ``train_fold`` takes them (autocast, scaler, clipping)."""
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cuda", enabled=device.startswith("cuda"))
    losses, skipped = [], 0
    net.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = loss_fn(net(x), y)
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        scaler.step(opt)
        scaler.update()
        if scaler.is_enabled() and scaler.get_scale() < scale:
            skipped += 1  # inf/nan gradients at this scale: the step was skipped, the scale halved
        losses.append(float(loss.item()))
    return {"losses": losses, "skipped_steps": skipped,
            "final_scale": scaler.get_scale() if scaler.is_enabled() else None}


# ---------------------------------------------------------------- 1. variants


def section_variants(ctx: dict) -> dict:
    from medseg.networks.unet import build_network
    from medseg.networks.variants import VARIANTS
    from medseg.training.losses import DeepSupervisionLoss

    device, tiny = ctx["device"], ctx["tiny"]
    features, patch, batch, steps = ([4, 8, 16], [16, 16, 16], 2, 2) if tiny else ([16, 32, 64, 128], [32, 32, 32], 2, 6)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, *patch, generator=gen).to(device)
    y = torch.randint(0, 3, (batch, 1, *patch), generator=gen).to(device)
    out: dict = {"amp": "fp16 autocast + GradScaler" if device.startswith("cuda") else "fp32 (CPU)",
                 "patch": patch, "batch": batch, "features": features, "steps": steps, "variants": {}}
    failed = []
    for name, variant in VARIANTS.items():
        t = time.perf_counter()
        try:
            torch.manual_seed(0)
            net = build_network(_architecture(features, patch, variant.blocks), 1, 3).to(device)
            before = [p.detach().clone() for p in net.parameters()]
            r = _train_steps(net, x, y, steps, device, DeepSupervisionLoss())
            _sync(device)
            change = max(float((p.detach() - b).abs().max()) for p, b in zip(net.parameters(), before, strict=True))
            finite_w = all(bool(torch.isfinite(p).all()) for p in net.parameters())
            ok = all(np.isfinite(r["losses"])) and change > 0 and finite_w
            out["variants"][name] = {**r, "max_weight_change": change, "weights_finite": finite_w, "passed": ok,
                                     "seconds": round(time.perf_counter() - t, 2)}
        except Exception as exc:  # one variant's failure is recorded, the others still run
            ok = False
            out["variants"][name] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        log(f"  {name:<12} {'ok' if ok else 'FAILED'}  {out['variants'][name]}")
        if not ok:
            failed.append(name)
    if failed:
        raise AssertionError(f"variants failed: {', '.join(failed)}")
    return out


# ---------------------------------------------------------------- 2. resume


def _planned_workdir(root: Path, tiny: bool, device: str) -> Path:
    """The bundled demo data planned (3d_fullres) and preprocessed into ``root``, shrunk to a
    check's size: NIfTI only, so nibabel reads it."""
    from medseg import workflow
    from medseg.demo import DEMO_DATASET
    from medseg.plans.schema import Plans

    workflow.plan(DEMO_DATASET, root, configs=["3d_fullres"], num_workers=1, throughput=1e12, preprocess=False,
                  device="cpu", timing_cache=root.parent / "timing.json")
    plans = Plans.load(root / "plans.json")
    c = plans.configurations["3d_fullres"]
    if tiny:
        c.patch_size, c.batch_size, features = [16, 16, 16], 2, [4, 8, 16]
        c.training.iterations_per_epoch, c.training.val_iterations = 3, 2
    else:
        c.patch_size, c.batch_size, features = [40, 56, 40], 4, [16, 32, 64, 128]
        c.training.iterations_per_epoch, c.training.val_iterations = 10, 3
    arch = _architecture(features, c.patch_size, c.architecture.blocks)
    c.architecture.features, c.architecture.strides = arch.features, arch.strides
    c.architecture.kernel_sizes = arch.kernel_sizes
    c.training.time_budget_min = None
    plans.save(root / "plans.json")
    workflow.preprocess(root, num_workers=1)
    return root


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from medseg.networks.checkpoint import load_checkpoint

    return load_checkpoint(run / "checkpoint_latest.pt")["model"]


def _max_abs_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        raise AssertionError(f"checkpoints hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


def section_resume(ctx: dict) -> dict:
    from medseg.training.loop import train_fold

    device, tiny, tmp = ctx["device"], ctx["tiny"], ctx["tmp"]
    cuda = device.startswith("cuda")
    t = time.perf_counter()
    base = _planned_workdir(tmp / "planned", tiny, device)
    plan_s = time.perf_counter() - t
    dirs = {k: tmp / k for k in ("uninterrupted", "resumed", "control")}
    for d in dirs.values():
        shutil.copytree(base, d)
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)  # as tests/test_training.py: one thread sums in one order
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    workers = 0 if tiny else None
    try:
        t = time.perf_counter()
        run_a = train_fold(dirs["uninterrupted"], "3d_fullres", 0, epochs=2, device=device, num_workers=workers)
        train_s = time.perf_counter() - t
        train_fold(dirs["resumed"], "3d_fullres", 0, epochs=1, device=device, num_workers=workers)
        run_b = train_fold(dirs["resumed"], "3d_fullres", 0, epochs=2, resume=True, device=device,
                           num_workers=workers)
        control = None
        if cuda:
            run_c = train_fold(dirs["control"], "3d_fullres", 0, epochs=2, device=device, num_workers=workers)
            control = _max_abs_diff(_weights(run_a), _weights(run_c))
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    ctx["model_workdir"] = dirs["uninterrupted"]
    wa, wb = _weights(run_a), _weights(run_b)
    diff = _max_abs_diff(wa, wb)
    identical = all(torch.equal(wa[k], wb[k]) for k in wa)
    out = {"plan_preprocess_s": round(plan_s, 1), "train_2_epochs_s": round(train_s, 1),
           "max_abs_diff_resumed": diff, "bit_identical": identical, "max_abs_diff_control": control,
           "max_abs_weight": max(float(v.abs().max()) for v in wa.values() if v.numel())}
    if cuda:
        tol = max(RESUME_FACTOR * control, RESUME_ABS_TOL)
        out["tolerance"] = tol
        out["rule"] = (f"max |resumed - uninterrupted| <= max({RESUME_FACTOR} x max |control - uninterrupted|, "
                       f"{RESUME_ABS_TOL}); cuDNN deterministic")
        if diff > tol:
            raise AssertionError(f"resumed weights differ by {diff:.3g} > tolerance {tol:.3g}: {out}")
    else:
        out["rule"] = "bit-identical on a CPU (1 thread)"
        if not identical:
            raise AssertionError(f"resumed weights differ from the uninterrupted run by {diff:.3g} on a CPU")
    return out


# ---------------------------------------------------------------- 3. DDP


def section_ddp(ctx: dict) -> dict:
    device = ctx["device"]
    n = torch.cuda.device_count() if device.startswith("cuda") else 0
    if n < 2:
        raise Skip(f"{n} GPU" if device.startswith("cuda") else "CPU run: DDP with nccl needs 2+ GPUs")
    if ctx.get("model_workdir") is None:
        raise AssertionError("needs section 2's planned work directory (section 2 failed)")
    work = ctx["tmp"] / "ddp"
    shutil.copytree(ctx["tmp"] / "planned", work)
    cmd = [sys.executable, "-m", "medseg", "train", str(work), "-c", "3d_fullres", "-f", "0", "--nproc", str(n),
           "--epochs", "1", "--iterations-per-epoch", "4", "--device", "cuda", "--no-validation"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    out = {"gpus": n, "command": " ".join(cmd[1:]), "rc": proc.returncode, "seconds": round(time.perf_counter() - t, 1),
           "output_tail": (proc.stdout + proc.stderr)[-1500:]}
    final = next(work.glob("runs/3d_fullres/fold_0/checkpoint_final.pt"), None)
    out["final_checkpoint"] = final is not None
    if proc.returncode != 0 or final is None:
        raise AssertionError(f"medseg train --nproc {n} failed (rc {proc.returncode}): {out['output_tail'][-600:]}")
    return out


# ---------------------------------------------------------------- 4. memory


def section_memory(ctx: dict) -> dict:
    from medseg.planning.memory import measure_training_peak

    device, tiny = ctx["device"], ctx["tiny"]
    cuda = device.startswith("cuda")
    if tiny:
        features, batch, patches = [4, 8, 16], 2, [[16, 16, 16], [24, 24, 24], [32, 32, 32]]
    else:
        features, batch, patches = [32, 64, 128, 256, 320], 2, [[40, 56, 40], [64, 64, 64], [96, 96, 96]]
    rows, bad = [], []
    if cuda:
        torch.backends.cudnn.benchmark = True  # as training sets it: cuDNN's chosen kernels and workspaces
    for patch in patches:
        arch = _architecture(features, patch)
        # measured as training runs the step on the device (fp16 autocast on CUDA); the estimate it
        # reports is the planner's model for that same precision
        if cuda:
            torch.cuda.empty_cache()
        t = time.perf_counter()
        m = measure_training_peak(arch, 1, 3, patch=patch, batch=batch, device=device)
        est = float(m["estimate_bytes"])
        ratio = m["peak_bytes"] / est
        row = {"patch": patch, "batch": batch, "features": arch.features, "measured_bytes": int(m["peak_bytes"]),
               "estimate_bytes": est, "measured_over_estimate": round(ratio, 4), "amp": m["amp"],
               "seconds": round(time.perf_counter() - t, 2)}
        rows.append(row)
        log(f"  patch {patch}: measured {m['peak_bytes'] / 2**20:.1f} MiB, estimate {est / 2**20:.1f} MiB "
            f"(x{ratio:.3f})")
        if abs(ratio - 1) > MEMORY_TOLERANCE:
            bad.append(row)
    out = {"rows": rows, "judged": cuda, "tolerance": MEMORY_TOLERANCE}
    if not cuda:
        out["note"] = "a CPU run records the figures only (the ±25% rule is for CUDA's allocator)"
    elif bad:
        raise AssertionError(f"estimate off by more than {MEMORY_TOLERANCE:.0%} for patches "
                             f"{[r['patch'] for r in bad]}: {rows}")
    return out


# ---------------------------------------------------------------- 5. predict


def _labels(folder: Path) -> dict[str, np.ndarray]:
    import nibabel as nib

    return {f.name: np.asanyarray(nib.load(f).dataobj) for f in sorted(folder.glob("*.nii.gz"))}


def _compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, int]:
    if a.keys() != b.keys() or not a:
        raise AssertionError(f"different cases predicted: {sorted(a)} vs {sorted(b)}")
    differ = sum(int((a[k] != b[k]).sum()) for k in a)
    return differ / sum(v.size for v in a.values()), differ


def section_predict(ctx: dict) -> dict:
    from medseg.demo import DEMO_DATASET
    from medseg.inference.predictor import predict_folder

    device, tmp = ctx["device"], ctx["tmp"]
    work = ctx.get("model_workdir")
    if work is None:
        raise AssertionError("needs section 2's trained model (section 2 failed)")
    images = DEMO_DATASET / "imagesTs"
    timings, outputs = {}, {}
    runs = [("cpu", "cpu", "auto"), ("device", device, "auto")]
    if device.startswith("cuda"):
        runs.append(("device_stitched_on_cpu", device, "cpu"))
    for name, dev, stitch in runs:
        t = time.perf_counter()
        predict_folder(images, tmp / f"pred_{name}", work, config_name="3d_fullres", folds=[0], device=dev,
                       stitch_device=stitch, tta=not ctx["tiny"])  # 8 mirrorings cost 8x: not on CI's CPU
        timings[name] = round(time.perf_counter() - t, 2)
        outputs[name] = _labels(tmp / f"pred_{name}")
    frac, n = _compare(outputs["cpu"], outputs["device"])
    foreground = {k: int(sum((v > 0).sum() for v in o.values())) for k, o in outputs.items()}
    out = {"cases": len(outputs["cpu"]), "mirroring": not ctx["tiny"], "seconds": timings,
           "fraction_differing": frac, "voxels_differing": n, "max_fraction": PREDICT_MAX_DIFF,
           "foreground_voxels": foreground}
    if not device.startswith("cuda"):
        out["note"] = "CPU-only run: CPU vs CPU (checks the predict path, not a device)"
    else:
        from medseg.inference.sliding_window import choose_stitch_device

        frac_s, _ = _compare(outputs["device"], outputs["device_stitched_on_cpu"])
        out["fraction_differing_stitched_on_cpu"] = frac_s
        out["rule_for_a_case"] = str(choose_stitch_device(device, 1, 3, (40, 56, 40)))
        if frac_s > PREDICT_MAX_DIFF:
            raise AssertionError(f"stitching on the CPU changed {frac_s:.3%} of the voxels")
    if frac > PREDICT_MAX_DIFF:
        raise AssertionError(f"{frac:.3%} of the voxels differ between {device} and cpu (max {PREDICT_MAX_DIFF:.1%})")
    if max(out["foreground_voxels"].values()) == 0:
        out["note_foreground"] = "the model predicts background only (a short training); the comparison is weak"
    return out


# ---------------------------------------------------------------- 6. throughput


def section_throughput(ctx: dict) -> dict:
    from medseg.networks.unet import build_network
    from medseg.training.losses import DeepSupervisionLoss

    device, tiny = ctx["device"], ctx["tiny"]
    cuda = device.startswith("cuda")
    if tiny:
        features, patch, batch, warm, steps = [4, 8, 16], [16, 16, 16], 2, 1, 2
    else:
        features, patch, batch = [32, 64, 128, 256], [40, 56, 40], 7
        warm, steps = (5, 40) if cuda else (1, 3)
    arch = _architecture(features, patch)
    torch.manual_seed(0)
    net = build_network(arch, 1, 3).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, *patch, generator=gen).to(device)
    y = torch.randint(0, 3, (batch, 1, *patch), generator=gen).to(device)
    loss_fn = DeepSupervisionLoss()
    _train_steps(net, x, y, warm, device, loss_fn)
    _sync(device)
    t = time.perf_counter()
    r = _train_steps(net, x, y, steps, device, loss_fn)
    _sync(device)
    seconds = time.perf_counter() - t
    if not all(np.isfinite(r["losses"])):
        raise AssertionError(f"non-finite losses: {r['losses']}")
    out = {"plan": "tiny (not nnU-Net's)" if tiny else "nnU-Net 3d_fullres hippocampus (Task04)",
           "patch": patch, "batch": batch, "features": arch.features, "strides": arch.strides,
           "amp": "fp16" if cuda else "fp32", "warmup_steps": warm, "steps": steps,
           "step_s": seconds / steps, "samples_per_s": steps * batch / seconds,
           "data": "one synthetic batch on the device (no loading or augmentation)"}
    if cuda:
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    log(f"  {out['samples_per_s']:.1f} samples/s ({out['step_s'] * 1000:.0f} ms/step)")
    return out


# ---------------------------------------------------------------- the run


SECTIONS: list[tuple[str, Callable[[dict], dict]]] = [
    ("variants", section_variants), ("resume", section_resume), ("ddp", section_ddp),
    ("memory", section_memory), ("predict", section_predict), ("throughput", section_throughput),
]


def environment(device: str) -> dict:
    import medseg

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": device, "cpu_threads": torch.get_num_threads(), "host_cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "medseg": str(Path(medseg.__file__).parent)}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, gpus_visible=torch.cuda.device_count(),
                   cudnn=torch.backends.cudnn.version())
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="folder for gpu_check.json")
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default: CUDA when available)")
    parser.add_argument("--tiny", action="store_true", help="tiny patches and few steps (CI on a CPU)")
    parser.add_argument("--only", help="comma-separated sections to run (default: all)")
    args = parser.parse_args(argv)

    from medseg.errors import MedsegError
    from medseg.utils import resolve_device

    try:
        device = resolve_device(args.device)
    except MedsegError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    args.results.mkdir(parents=True, exist_ok=True)
    report_path = args.results / "gpu_check.json"
    t0 = time.perf_counter()
    report = {"command": " ".join(["benchmarks/gpu_check.sh", *sys.argv[1:]]), "tiny": args.tiny,
              "environment": environment(device), "sections": {}}
    log(f"gpu_check: device {device}{' (tiny)' if args.tiny else ''}, torch {torch.__version__}"
        + (f", {report['environment']['gpu']}" if device.startswith("cuda") else ""))
    only = set(args.only.split(",")) if args.only else None
    with tempfile.TemporaryDirectory(prefix="medseg_gpu_check_") as tmp:
        ctx = {"device": device, "tiny": args.tiny, "tmp": Path(tmp)}
        for name, fn in SECTIONS:
            if only is not None and name not in only:
                continue
            start = time.perf_counter()
            if start - t0 > SECTION_CUTOFF_S:
                rec = {"status": "skipped", "reason": f"time: {start - t0:.0f} s spent of the {TIME_LIMIT_S} s slot"}
            else:
                log(f"[{name}]")
                try:
                    rec = {"status": "passed", **fn(ctx)}
                except Skip as exc:
                    rec = {"status": "skipped", "reason": str(exc)}
                except Exception as exc:  # recorded; the other sections still run
                    rec = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000],
                           "traceback": traceback.format_exc()[-3000:]}
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            rec["seconds"] = round(time.perf_counter() - start, 2)
            report["sections"][name] = rec
            detail = rec.get("reason") or rec.get("error", "")
            log(f"[{name}] {rec['status']} in {rec['seconds']:.1f} s" + (f": {detail}" if detail else ""))
            report["total_s"] = round(time.perf_counter() - t0, 1)
            tmp_path = report_path.with_suffix(".json.tmp")
            tmp_path.write_text(json.dumps(report, indent=2, default=str))
            os.replace(tmp_path, report_path)
    failed = [k for k, v in report["sections"].items() if v["status"] == "failed"]
    log(f"gpu_check: {len(report['sections']) - len(failed)} of {len(report['sections'])} sections passed or "
        f"skipped in {report['total_s']:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else "")
        + f" -> {report_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
