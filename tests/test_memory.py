"""The planner's memory model against measured peaks of real training steps, for every variant, in
float32 and under autocast."""

import pytest
import torch

from medseg.networks.unet import estimate_costs
from medseg.planning.memory import cpu_peak_bytes, estimate_training_bytes, measure_training_peak
from medseg.planning.planner import VARIANTS
from medseg.plans.schema import Architecture
from medseg.plans.topology import pooling_plan

# none of these sizes were used to fit the model's constants (docs/architecture.md). Batch >= 2 as in
# every plan: at batch 1 PyTorch's CPU convolution with <= 16 channels falls back to an im2col path
# whose buffer (27x the input) the model does not cover.
SIZES = {"3d": [(12, (40, 40, 40), 2), (20, (32, 40, 24), 2)], "2d": [(16, (128, 96), 4), (32, (96, 64), 2)]}


def _arch(variant: str, base: int, patch) -> Architecture:
    strides, kernels = pooling_plan([1.0] * len(patch), patch)
    return Architecture(features=[min(base * 2**i, 320) for i in range(len(strides))], kernel_sizes=kernels,
                        strides=strides, blocks=VARIANTS[variant])


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dim", ["3d", "2d"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_memory_model_is_within_25_percent_of_the_measured_peak(variant, dim, amp):
    """float32 (a CPU plan's training) and under bf16 autocast, which stores activations in 2 bytes as
    CUDA's fp16 AMP does (the model's AMP case; measured 0.88-1.07 of the peak)."""
    torch.set_num_threads(1)
    for base, patch, batch in SIZES[dim]:
        r = measure_training_peak(_arch(variant, base, patch), 2, 3, patch=patch, batch=batch, amp=amp)
        ratio = r["estimate_bytes"] / r["peak_bytes"]
        assert 0.75 <= ratio <= 1.25, f"{variant} {patch} x{batch}: model {r['estimate_bytes'] / 1e6:.0f} MB, " \
                                      f"measured {r['peak_bytes'] / 1e6:.0f} MB"


def test_amp_model_stores_activations_at_half_the_bytes_but_keeps_float32_weights():
    arch = _arch("plain", 16, (32, 32, 32))
    fp32, amp = (estimate_costs(arch, (32, 32, 32), 2, 2, 3, amp=a) for a in (False, True))
    assert amp.activation_bytes == fp32.activation_bytes / 2
    assert amp.weight_state_bytes == fp32.weight_state_bytes
    assert amp.training_bytes < fp32.training_bytes
    assert estimate_training_bytes(arch, (32, 32, 32), 2, 2, 3, amp=torch.float16) == amp.training_bytes
    assert estimate_training_bytes(arch, (32, 32, 32), 2, 2, 3) == fp32.training_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_memory_model_is_within_25_percent_of_the_measured_cuda_peak_under_amp(variant):
    """On the last CUDA device (counters of the device the step runs on), fp16 autocast as training."""
    device = f"cuda:{torch.cuda.device_count() - 1}"
    for dim in ("3d", "2d"):
        for base, patch, batch in SIZES[dim]:
            r = measure_training_peak(_arch(variant, base, patch), 2, 3, patch=patch, batch=batch, device=device)
            assert r["amp"] == "float16"
            ratio = r["estimate_bytes"] / r["peak_bytes"]
            assert 0.75 <= ratio <= 1.25, f"{variant} {patch} x{batch} on {device}: model " \
                                          f"{r['estimate_bytes'] / 1e6:.0f} MB, measured {r['peak_bytes'] / 1e6:.0f} MB"


def test_cpu_peak_counts_live_tensors_not_freed_ones():
    def work():
        a = torch.empty(1_000_000, dtype=torch.float32)  # 4 MB
        b = torch.empty(2_000_000, dtype=torch.float32)  # 8 MB, alive with a
        del a, b
        c = torch.empty(500_000, dtype=torch.float32)  # 2 MB after both are gone
        return c

    peak = cpu_peak_bytes(work)
    assert 12e6 <= peak < 12.5e6
