"""Reversible vs plain U-Net memory on the CPU (measured, not modelled).

1. Equal patch and batch: peak tensor memory of a real training step (medseg.planning.memory.measure_training_peak)
   and the bytes autograd keeps for backward at the end of the forward pass (saved-tensor hook).
2. The largest cubic patch whose measured training step fits a fixed budget.

Usage: python benchmarks/reversible_memory.py OUT_DIR [--budget-mb 512]
Writes OUT_DIR/reversible_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from medseg.networks.unet import build_network, estimate_costs
from medseg.planning.memory import measure_training_peak, saved_for_backward_bytes
from medseg.planning.planner import VARIANTS
from medseg.plans.schema import Architecture
from medseg.plans.topology import pooling_plan


def arch(variant: str, base: int, patch) -> Architecture:
    strides, kernels = pooling_plan([1.0] * len(patch), patch)
    return Architecture(features=[min(base * 2**i, 320) for i in range(len(strides))], kernel_sizes=kernels,
                        strides=strides, blocks=VARIANTS[variant])


def kept_for_backward(a: Architecture, patch, batch: int) -> int:
    net = build_network(a, 1, 3)
    x = torch.randn(batch, 1, *patch)
    return saved_for_backward_bytes(lambda: net(x), exclude=list(net.parameters()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--budget-mb", type=float, default=512.0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    equal = []
    for base, patch, batch in [(24, (40, 56, 40), 2), (16, (64, 64, 64), 2)]:
        row = {"base": base, "patch": list(patch), "batch": batch}
        for v in ("plain", "reversible"):
            a = arch(v, base, patch)
            m = measure_training_peak(a, 1, 3, patch=patch, batch=batch)
            row[v] = {"peak_mb": m["peak_bytes"] / 1e6, "model_mb": m["estimate_bytes"] / 1e6,
                      "saved_for_backward_mb": kept_for_backward(a, patch, batch) / 1e6,
                      "weights_momentum_mb": 8 * m["parameters"] / 1e6}
            print(base, patch, v, row[v], flush=True)
        equal.append(row)
    budget = args.budget_mb * 1e6
    largest = {}
    for v in ("plain", "reversible"):
        side, fits = 32, None
        # start one step below the model's answer, then measure upwards until a step does not fit
        while estimate_costs(arch(v, 16, (side + 16,) * 3), (side + 16,) * 3, 2, 1, 3).training_bytes <= budget:
            side += 16
        side = max(32, side - 16)
        while True:
            m = measure_training_peak(arch(v, 16, (side,) * 3), 1, 3, patch=(side,) * 3, batch=2)
            print(v, side, m["peak_bytes"] / 1e6, flush=True)
            if m["peak_bytes"] > budget:
                break
            fits = {"side": side, "peak_mb": m["peak_bytes"] / 1e6}
            side += 16
        largest[v] = fits
    result = {"equal_patch": equal, "budget_mb": args.budget_mb, "largest_cube_width16_batch2": largest}
    (args.out / "reversible_memory.json").write_text(json.dumps(result, indent=1))
    lines = ["| base width, patch, batch | variant | measured peak MB | model MB | kept for backward MB |",
             "|---|---|---|---|---|"]
    for row in equal:
        for v in ("plain", "reversible"):
            r = row[v]
            lines.append(f"| {row['base']}, {row['patch']}, {row['batch']} | {v} | {r['peak_mb']:.0f} | "
                         f"{r['model_mb']:.0f} | {r['saved_for_backward_mb']:.0f} |")
        p, r = row["plain"], row["reversible"]
        lines.append(f"| | reversible / plain | {r['peak_mb'] / p['peak_mb']:.2f} | | "
                     f"{r['saved_for_backward_mb'] / p['saved_for_backward_mb']:.2f} |")
    lines += ["", f"Largest cubic patch whose measured training step (width 16, batch 2) fits {args.budget_mb:.0f} MB:", ""]
    for v, f in largest.items():
        lines.append(f"- {v}: {f['side']}³ ({f['peak_mb']:.0f} MB)" if f else f"- {v}: none")
    if largest.get("plain") and largest.get("reversible"):
        ratio = (largest["reversible"]["side"] / largest["plain"]["side"]) ** 3
        lines.append(f"- reversible / plain voxels: {ratio:.2f}x")
    (args.out / "reversible_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
