"""Training step time of medseg's U-Net eager vs ``torch.compile`` (inductor) on this machine.

    .venv/bin/python benchmarks/compile_step.py [--features 32,64,128,256] [--patch 40,56,40] [--batch 2]

The network is built from the given architecture (default: the equal setting of
``benchmarks/side_by_side.py``, nnU-Net's 3d_fullres for hippocampus), the step is forward,
deep-supervision loss, backward and Nesterov SGD on fixed random data. Each mode runs in its own
process (compilation caches must not help the eager run or the other way round); prints the first
step (compilation included) and the median of ``--steps`` steps after two warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def run(mode: str, features: list[int], patch: list[int], batch: int, steps: int) -> dict:
    import torch

    from medseg.networks.unet import build_network
    from medseg.plans.schema import Architecture
    from medseg.training.losses import DeepSupervisionLoss

    stages = len(features)
    arch = Architecture(features=features, kernel_sizes=[[3, 3, 3]] * stages,
                        strides=[[1, 1, 1]] + [[2, 2, 2]] * (stages - 1))
    net = build_network(arch, 1, 3)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    loss_fn = DeepSupervisionLoss()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, *patch, generator=gen)
    y = torch.randint(0, 3, (batch, 1, *patch), generator=gen)
    forward = torch.compile(net) if mode == "compile" else net

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(forward(x), y).backward()
        opt.step()
        return time.perf_counter() - t

    first = step()
    step(), step()
    times = [step() for _ in range(steps)]
    return {"mode": mode, "first_step_s": first, "median_step_s": statistics.median(times),
            "min_step_s": min(times), "max_step_s": max(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default="32,64,128,256")
    parser.add_argument("--patch", default="40,56,40")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--mode", choices=["eager", "compile"], help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    features, patch = [int(v) for v in args.features.split(",")], [int(v) for v in args.patch.split(",")]
    if args.mode:
        print(json.dumps(run(args.mode, features, patch, args.batch, args.steps)))
        return
    results = {}
    for mode in ("eager", "compile"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], check=True,
                             capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:8s} first step {r['first_step_s']:.2f} s, median step {r['median_step_s']:.3f} s "
              f"({r['min_step_s']:.3f}-{r['max_step_s']:.3f})", flush=True)
    ratio = results["eager"]["median_step_s"] / results["compile"]["median_step_s"]
    print(f"compiled / eager speed: {ratio:.2f}x")


if __name__ == "__main__":
    main()
