"""Training memory: the planner's model and a measurement to check it against.

The model (:func:`estimate_training_bytes`) is what the planner sizes patch and batch with: the
activations every block keeps for backward (each block's ``cost()``), the largest block's backward
workspace (``workspace_units``), and weights, gradients and optimiser momentum.
:func:`measure_training_peak` runs real training steps and reports the peak of live tensor bytes:
``torch.cuda.max_memory_allocated`` of the step's device on CUDA; on a CPU the allocation and free
events that ``torch.profiler`` records (``profile_memory=True``), summed in time order, on top of
the bytes already held by weights and optimiser state. Both model and measurement come in float32
and in the precision of AMP training (forward under autocast, :func:`training_autocast`): a CUDA
plan is sized, and a CUDA step measured, under fp16 autocast; a CPU step can be measured under bf16
autocast (2 bytes an element too) to check the AMP model where there is no GPU.

Not covered: at batch 1, PyTorch's CPU convolution with up to 16 channels takes an im2col path
whose column buffer is 27x its input; plans never train at batch 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from medseg.networks.unet import build_network, estimate_costs
from medseg.plans.schema import Architecture, Configuration
from medseg.training.losses import DeepSupervisionLoss
from medseg.training.precision import training_autocast


def estimate_training_bytes(arch: Architecture, patch: Sequence[int], batch: int, in_channels: int,
                            num_classes: int, *, amp: torch.dtype | None = None) -> float:
    """The planner's estimate of one training step's peak tensor bytes (float32, or forward under
    autocast in ``amp``), see :class:`~medseg.networks.unet.CostEstimate`."""
    return estimate_costs(arch, patch, batch, in_channels, num_classes, amp=amp is not None).training_bytes


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of live CPU tensor bytes allocated while ``fn`` runs, above what was live before it."""

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type().name == "CPU"]
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def synthetic_training_step(arch: Architecture, patch: Sequence[int], batch: int, in_channels: int,
                            num_classes: int, device: str = "cpu", *, torch_optimizer: bool = True,
                            amp: torch.dtype | None = None):
    """A real training step (forward, deep-supervision loss, backward, SGD with Nesterov momentum) of
    the network ``arch`` builds, on fixed random data. Returns ``(net, optimiser, step)``; the planner
    times ``step`` and :func:`measure_training_peak` measures its memory.

    ``amp``: forward and loss under ``torch.autocast`` in that dtype, ``backward()`` outside it, as the
    training loop runs a CUDA step (:func:`training_autocast`). No loss scaling: it multiplies one
    scalar and unscales the gradients in place, so it changes no tensor's size.

    ``torch_optimizer=False`` updates the weights with :class:`ForeachNesterovSGD` (the same kernels,
    no ``torch.optim``): what the planner times, so that a planning run does not pay the import of
    ``torch._dynamo`` that constructing a ``torch.optim`` optimiser triggers (1.2–1.5 s on 2 cores)."""
    net = build_network(arch, in_channels, num_classes).to(device)
    if torch_optimizer:
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    else:
        opt = ForeachNesterovSGD(net.parameters(), lr=1e-3, momentum=0.99)
    loss_fn = DeepSupervisionLoss()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_channels, *patch, generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch, 1, *patch), generator=gen).to(device)
    device_type = torch.device(device).type

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()

    return net, opt, step


class ForeachNesterovSGD:
    """SGD with Nesterov momentum (no dampening, no weight decay) as ``torch.optim.SGD`` computes it
    on its default multi-tensor path: ``buf = m * buf + g`` (``buf = g`` at the first step),
    ``g += m * buf``, ``p -= lr * g``, each one ``torch._foreach_*`` kernel over all parameters."""

    def __init__(self, params, lr: float, momentum: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum = lr, momentum
        self.buffers: dict[torch.Tensor, torch.Tensor] = {}  # momentum per parameter that had a gradient

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        params = [p for p in self.params if p.grad is not None]  # as torch.optim: no gradient, no update
        grads = [p.grad for p in params]
        if all(p in self.buffers for p in params):
            buffers = [self.buffers[p] for p in params]
            torch._foreach_mul_(buffers, self.momentum)
            torch._foreach_add_(buffers, grads)
        else:
            buffers = [self.buffers.setdefault(p, g.detach().clone()) for p, g in zip(params, grads, strict=True)]
        torch._foreach_add_(grads, buffers, alpha=self.momentum)
        torch._foreach_add_(params, grads, alpha=-self.lr)


def saved_for_backward_bytes(fn: Callable[[], object], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs (a saved-tensor
    hook), leaving out those of ``exclude`` (e.g. the parameters). Returns the count; ``fn``'s
    result is dropped."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    return sum(v for k, v in seen.items() if k not in skip)


AS_TRAINING = "training"  # measure_training_peak's default: the precision training uses on that device


def measure_training_peak(config: Configuration | Architecture, in_channels: int, num_classes: int, *,
                          patch: Sequence[int] | None = None, batch: int | None = None,
                          device: str = "cpu", amp: torch.dtype | None | str = AS_TRAINING) -> dict:
    """Run two real training steps and measure the second one's peak tensor memory, including the
    weights and optimiser state it holds. Returns ``peak_bytes``, ``estimate_bytes`` (the planner's
    model, for the same precision) and ``parameters``.

    ``amp``: the autocast dtype of forward and loss; by default the one training uses on ``device``
    (:func:`training_autocast`: float16 on CUDA, none on a CPU); ``torch.bfloat16`` measures a CPU
    step under bf16 autocast, ``None`` a float32 step. On CUDA the counters are those of the device
    the step runs on (``cuda:N``; plain ``cuda`` is the current device, where tensors go)."""
    arch = config.architecture if isinstance(config, Configuration) else config
    patch = list(patch or config.patch_size)  # type: ignore[union-attr]
    batch = batch or config.batch_size  # type: ignore[union-attr]
    amp = training_autocast(device) if isinstance(amp, str) else amp
    net, opt, step = synthetic_training_step(arch, patch, batch, in_channels, num_classes, device, amp=amp)
    step()  # creates the momentum buffers
    opt.zero_grad(set_to_none=True)
    held = sum(p.numel() * p.element_size() for p in net.parameters())
    held += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base + held
    else:
        peak = cpu_peak_bytes(step) + held
    estimate = estimate_training_bytes(arch, patch, batch, in_channels, num_classes, amp=amp)
    return {"peak_bytes": int(peak), "estimate_bytes": estimate, "parameters": sum(p.numel() for p in net.parameters()),
            "patch": patch, "batch": batch, "amp": None if amp is None else str(amp).removeprefix("torch.")}
