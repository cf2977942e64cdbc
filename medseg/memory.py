"""Training memory: the planner's model and a measurement to check it against.

The model (:func:`estimate_training_bytes`) is what the planner sizes patch and batch with: the
activations every block keeps for backward (each block's ``cost()``), the largest block's backward
workspace (``workspace_units``), and weights, gradients and optimiser momentum.
:func:`measure_training_peak` runs real training steps and reports the peak of live tensor bytes:
``torch.cuda.max_memory_allocated`` on CUDA; on a CPU the allocation and free events that
``torch.profiler`` records (``profile_memory=True``), summed in time order, on top of the bytes
already held by weights and optimiser state.

Not covered: at batch 1, PyTorch's CPU convolution with up to 16 channels takes an im2col path
whose column buffer is 27x its input; plans never train at batch 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from medseg.networks.unet import build_network, estimate_costs
from medseg.plans.schema import Architecture, Configuration


def estimate_training_bytes(arch: Architecture, patch: Sequence[int], batch: int, in_channels: int,
                            num_classes: int) -> float:
    """The planner's estimate of one training step's peak tensor bytes (float32), see
    :class:`~medseg.networks.unet.CostEstimate`."""
    return estimate_costs(arch, patch, batch, in_channels, num_classes).training_bytes


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of live CPU tensor bytes allocated while ``fn`` runs, above what was live before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type().name == "CPU"]
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_training_peak(config: Configuration | Architecture, in_channels: int, num_classes: int, *,
                          patch: Sequence[int] | None = None, batch: int | None = None,
                          device: str = "cpu") -> dict:
    """Run two real training steps (forward, deep-supervision loss, backward, SGD with momentum) and
    measure the second one's peak tensor memory, including the weights and optimiser state it holds.
    Returns ``peak_bytes``, ``estimate_bytes`` (the planner's model) and ``parameters``."""
    from medseg.training.losses import DeepSupervisionLoss

    arch = config.architecture if isinstance(config, Configuration) else config
    patch = list(patch or config.patch_size)  # type: ignore[union-attr]
    batch = batch or config.batch_size  # type: ignore[union-attr]
    torch.manual_seed(0)
    net = build_network(arch, in_channels, num_classes).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    loss_fn = DeepSupervisionLoss()
    x = torch.randn(batch, in_channels, *patch, device=device)
    y = torch.randint(0, num_classes, (batch, 1, *patch), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    step()  # creates the momentum buffers
    opt.zero_grad(set_to_none=True)
    held = sum(p.numel() * p.element_size() for p in net.parameters())
    held += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    data = x.numel() * x.element_size() + y.numel() * y.element_size()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base + held
    else:
        peak = cpu_peak_bytes(step) + held
    total = estimate_training_bytes(arch, patch, batch, in_channels, num_classes)
    params = sum(p.numel() for p in net.parameters())
    return {"peak_bytes": int(peak), "estimate_bytes": float(total), "parameters": int(params),
            "input_bytes": int(data), "patch": patch, "batch": batch}
