#!/usr/bin/env python
"""Where a CPU training iteration's time goes, with the training loop's own parts.

    .venv/bin/python benchmarks/profile_step.py WORK [--config 3d_fullres] [--features 32,64,128,256]
                                                [--batch 2] [--steps 20] [--workers 1]

WORK: a planned and preprocessed work directory (e.g. ``medseg plan ../shared/data/hippocampus -o
WORK --configs 3d_fullres``). The configuration's network is rebuilt at ``--features`` (default: the
equal setting of ``benchmarks/side_by_side.py``, nnU-Net's 3d_fullres network for hippocampus) and
trained for ``--steps`` iterations exactly as ``medseg.training.loop._train_steps`` does: batches
from the persistent augmentation workers (``BatchSource``, ``--workers`` processes), forward,
deep-supervision loss, backward, gradient clipping, SGD with Nesterov momentum. Per iteration it
times the wait for the next batch and each phase; then ``torch.profiler`` attributes the compute
to operator families. Prints one JSON object (the table in docs/benchmarks.md is made from it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--config", default="3d_fullres")
    ap.add_argument("--features", default="32,64,128,256")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from medseg.networks.unet import build_network
    from medseg.plans.schema import Plans
    from medseg.training.data import BatchSource
    from medseg.training.loop import _to_device
    from medseg.training.losses import DeepSupervisionLoss
    from medseg.training.splits import fold_case_ids
    from medseg.workdir import WorkDir

    work = WorkDir(args.work)
    plans = Plans.load(work.plans)
    config = plans.config(args.config)
    features = [int(f) for f in args.features.split(",")]
    arch = config.architecture.model_copy(update={"features": features[:config.architecture.num_stages]})
    t = config.training
    cases, _ = fold_case_ids(work, plans, config, 0)
    net = build_network(arch, plans.input_channels(config), plans.num_classes)
    opt = torch.optim.SGD(net.parameters(), lr=t.initial_lr, momentum=t.momentum, nesterov=True,
                          weight_decay=t.weight_decay)
    loss_fn = DeepSupervisionLoss()
    phases: dict[str, list[float]] = defaultdict(list)
    with BatchSource(work.preprocessed(config.data_config), cases, config.patch_size, args.batch, augment=True, seed=0,
                     mirror_axes=t.mirror_axes, oversample_foreground=t.oversample_foreground,
                     num_classes=plans.num_classes) as source:
        def iteration(batches, record: bool) -> None:
            t0 = time.perf_counter()
            batch = next(batches)
            x, y = _to_device(batch, "cpu")
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip)
            opt.step()
            loss.item()
            t4 = time.perf_counter()
            if record:
                for name, seconds in (("wait for batch", t1 - t0), ("forward + loss", t2 - t1),
                                      ("backward", t3 - t2), ("clip + SGD", t4 - t3), ("iteration", t4 - t0)):
                    phases[name].append(seconds)

        batches = iter(source.iterate(0, args.steps * 2 + 3, args.workers))
        for _ in range(3):  # warm-up: workers start, allocator and kernels settle
            iteration(batches, False)
        for _ in range(args.steps):
            iteration(batches, True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                iteration(batches, False)
    families: dict[str, float] = defaultdict(float)
    total = 0.0
    for ev in prof.key_averages():
        if ev.key.startswith("aten::") and ev.self_cpu_time_total > 0:
            total += ev.self_cpu_time_total
            name = ev.key.removeprefix("aten::")
            fam = ("convolution backward" if "convolution_backward" in name else
                   "convolution forward" if "conv" in name or "mkldnn" in name else
                   "instance norm" if "norm" in name else
                   "copies / layout" if name in ("copy_", "contiguous", "clone", "cat", "_to_copy", "fill_", "zero_")
                   else "elementwise + activations" if name in ("leaky_relu", "leaky_relu_backward", "add", "add_",
                                                               "mul", "mul_", "div", "div_", "sub", "where",
                                                               "threshold_backward", "sqrt", "lerp_", "addcmul_")
                   else "loss (softmax, CE, Dice)" if any(k in name for k in ("softmax", "nll", "log", "sum", "mean"))
                   else "other")
            families[fam] += ev.self_cpu_time_total
    out = {
        "config": config.key, "patch": config.patch_size, "batch": args.batch, "features": arch.features,
        "workers": args.workers, "threads": torch.get_num_threads(), "steps": args.steps,
        "phases_median_s": {k: round(statistics.median(v), 4) for k, v in phases.items()},
        "phases_share": {k: round(statistics.median(v) / statistics.median(phases["iteration"]), 3)
                         for k, v in phases.items() if k != "iteration"},
        "operator_share": {k: round(v / total, 3) for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
