"""Faster CPU backends for the network's forward pass: the trained fold network exported to ONNX
and run by ONNX Runtime (float32, or int8 after static post-training quantization calibrated on
the fold's preprocessed training cases) or by OpenVINO.

A backend network is a predictor callable like the torch module it replaces —
``Tensor(N, C, *patch) → Tensor(N, K, *patch)`` float32 on the CPU, plus a no-op ``eval()`` — so
:func:`~medseg.inference.sliding_window.predict_volume` runs it unchanged (windows of exactly the
patch size; the batch axis is dynamic because the last sliding-window batch and the probe window
are smaller). The exported models are cached in the fold's run directory
(:meth:`~medseg.workdir.RunDir.backend_model`), next to a stamp of the checkpoint they were made
from (its size and mtime): a new checkpoint makes them again.

The packages are optional (``pip install 'medseg[cpu-fast]'``) and imported only when a backend
other than ``torch`` is asked for. docs/benchmarks.md has the measurements behind the list.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from medseg.errors import MedsegError
from medseg.plans.schema import Configuration
from medseg.utils import atomic_path, atomic_write_json
from medseg.workdir import RunDir, WorkDir

log = logging.getLogger(__name__)

# name → (the packages it needs, what it is)
BACKENDS: dict[str, tuple[tuple[str, ...], str]] = {
    "torch": ((), "PyTorch (the default)"),
    "onnxruntime": (("onnxruntime", "onnx"), "ONNX Runtime, float32"),
    "onnxruntime-int8": (("onnxruntime", "onnx"), "ONNX Runtime, int8 static quantization (QDQ)"),
    "openvino": (("openvino", "onnx"), "OpenVINO, float32"),
    "openvino-int8": (("openvino", "onnxruntime", "onnx"), "OpenVINO running the int8 QDQ model"),
}
OPSET = 17
CALIBRATION_WINDOWS = 32  # windows of the patch size from the fold's training cases
STAMP_VERSION = 3  # bump when the export or the quantization changes


def check_backend(name: str) -> str:
    """``name`` if it is a known backend, else a one-line error listing them."""
    if name not in BACKENDS:
        raise MedsegError(f"backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def available(name: str) -> bool:
    """Whether every package that backend ``name`` needs is installed."""
    try:
        require(name)
    except MedsegError:
        return False
    return True


def require(name: str) -> None:
    """A one-line error when a package that backend ``name`` needs is missing."""
    import importlib.util

    for package in BACKENDS[check_backend(name)][0]:
        if importlib.util.find_spec(package) is None:
            raise MedsegError(f"backend {name!r} needs {package}, which is not installed: "
                              "pip install 'medseg[cpu-fast]'")


class _Session:
    """Shared by the runtimes: a no-op ``eval()`` and no attention maps."""

    name = ""

    def eval(self) -> _Session:
        return self

    def attention_maps(self) -> list[torch.Tensor]:
        raise MedsegError(f"backend {self.name!r} cannot return attention maps; predict with --backend torch")


class OnnxRuntimeNet(_Session):
    """An ONNX Runtime session over an exported network, with ``threads`` intra-op threads."""

    def __init__(self, path: Path, threads: int, name: str = "onnxruntime") -> None:
        import onnxruntime as ort  # optional dependency, imported only when asked for

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.name = name
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input: np.ascontiguousarray(x.detach().cpu().numpy(), np.float32)})[0]
        return torch.from_numpy(out)


class OpenVinoNet(_Session):
    """An OpenVINO model compiled for the CPU (float32 precision unless the model is quantized)."""

    def __init__(self, path: Path, threads: int, name: str = "openvino") -> None:
        import openvino as ov  # optional dependency, imported only when asked for

        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32"}
        self.name = name
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.request.infer([np.ascontiguousarray(x.detach().cpu().numpy(), np.float32)])
        return torch.from_numpy(np.array(self.request.get_output_tensor(0).data, copy=True))


def _stamp(checkpoint: Path, config: Configuration, in_channels: int, **extra) -> dict:
    st = checkpoint.stat()
    return {"version": STAMP_VERSION, "checkpoint": checkpoint.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "patch": list(config.patch_size), "channels": in_channels, **extra}


def _fresh(path: Path, stamp_path: Path, stamp: dict) -> bool:
    if not path.exists() or not stamp_path.exists():
        return False
    try:
        return json.loads(stamp_path.read_text()) == stamp
    except ValueError:
        return False


def export_onnx(net: torch.nn.Module, path: Path, in_channels: int, patch: list[int]) -> Path:
    """The network (eval mode, float32, CPU) as ONNX with input (N, C, *patch), N dynamic."""
    net = net.float().cpu().eval()
    dummy = torch.zeros((2, in_channels, *patch))
    with atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(net, (dummy,), str(tmp), dynamo=False, opset_version=OPSET, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def calibration_windows(work: WorkDir, config: Configuration, fold, n: int = CALIBRATION_WINDOWS,
                        seed: int = 0) -> list[np.ndarray]:
    """``n`` preprocessed windows (1, C, *patch) of the fold's training cases (every preprocessed case
    when there are no splits, or for the model trained on all cases): half centred on a random
    foreground voxel, half anywhere; zero-padded where a case is smaller than the patch. A 2D patch
    takes slices along axis 0."""
    folder = work.preprocessed(config.data_config)
    cases = sorted(p.name.removesuffix("_seg.npy") for p in folder.glob("*_seg.npy"))
    if isinstance(fold, int) and work.splits.exists():
        splits = json.loads(work.splits.read_text())
        if fold < len(splits):
            cases = [c for c in cases if c in set(splits[fold]["train"])]
    if not cases:
        raise MedsegError(f"{folder}: no preprocessed training cases to calibrate the int8 quantization on; "
                          "run `medseg plan` (with preprocessing) for this work directory")
    rng = np.random.default_rng(seed)
    patch = list(config.patch_size)
    out = []
    for i in range(n):
        case = cases[i % len(cases)]
        image = np.load(folder / f"{case}.npy", mmap_mode="r")
        seg = np.load(folder / f"{case}_seg.npy", mmap_mode="r")
        if len(patch) == 2:
            z = int(rng.integers(image.shape[1]))
            image, seg = image[:, z], seg[:, z]
        fg = np.argwhere(np.asarray(seg[0]) > 0) if i % 2 == 0 else np.empty((0, len(patch)))
        centre = fg[rng.integers(len(fg))] if len(fg) else [rng.integers(s) for s in image.shape[1:]]
        lo = [int(min(max(c - p // 2, 0), max(s - p, 0))) for c, p, s in zip(centre, patch, image.shape[1:], strict=True)]
        crop = np.asarray(image[(slice(None), *(slice(a, a + p) for a, p in zip(lo, patch, strict=True)))], np.float32)
        window = np.zeros((1, image.shape[0], *patch), np.float32)
        window[(0, slice(None), *(slice(0, s) for s in crop.shape[1:]))] = crop
        out.append(window)
    return out


def quantize_int8(fp32: Path, path: Path, windows: list[np.ndarray]) -> Path:
    """Static int8 quantization (QDQ, per-channel int8 weights, uint8 activations, MinMax calibration
    on ``windows``) of an exported float32 model."""
    from onnxruntime.quantization import (  # optional dependency, imported only when asked for
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items: Iterator[np.ndarray] = iter(windows)

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {"input": item}

    import onnx  # optional dependency, imported only when asked for

    # the convolutions only (instance norms stay float), and not the output head: the logits keep
    # float precision, which decides the argmax where classes are close
    heads = [n.name for n in onnx.load(str(fp32)).graph.node if n.name.startswith("/heads.")]
    with atomic_path(path.with_name(path.stem + "_pre.onnx")) as pre, atomic_path(path) as tmp:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "ConvTranspose"], nodes_to_exclude=heads)
    path.with_name(path.stem + "_pre.onnx").unlink(missing_ok=True)
    return path


def backend_file(run: RunDir, work: WorkDir, net: torch.nn.Module, config: Configuration, in_channels: int,
                 backend: str, checkpoint: str = "final") -> Path:
    """The cached ONNX file that ``backend`` runs for ``run``'s ``checkpoint``, exported (and quantized)
    first when missing or made from another checkpoint."""
    ckpt = run.checkpoint(checkpoint)
    fp32, fp32_stamp = run.backend_model("fp32", checkpoint), run.backend_model("fp32", checkpoint, ".json")
    stamp = _stamp(ckpt, config, in_channels, opset=OPSET)
    if not _fresh(fp32, fp32_stamp, stamp):
        log.info("exporting %s to ONNX: %s", ckpt, fp32)
        export_onnx(net, fp32, in_channels, list(config.patch_size))
        atomic_write_json(fp32_stamp, stamp)
    if not backend.endswith("-int8"):
        return fp32
    int8, int8_stamp = run.backend_model("int8", checkpoint), run.backend_model("int8", checkpoint, ".json")
    stamp = {**stamp, "calibration_windows": CALIBRATION_WINDOWS}
    if not _fresh(int8, int8_stamp, stamp):
        log.info("quantizing %s to int8 on %d training windows: %s", fp32, CALIBRATION_WINDOWS, int8)
        quantize_int8(fp32, int8, calibration_windows(work, config, run.fold))
        atomic_write_json(int8_stamp, stamp)
    return int8


def backend_network(net: torch.nn.Module, backend: str, *, run: RunDir, work: WorkDir, config: Configuration,
                    in_channels: int, checkpoint: str = "final", device: str = "cpu", threads: int | None = None):
    """``net`` itself for ``torch``, else a predictor running it with ``backend`` on the CPU with
    ``threads`` intra-op threads (default: torch's thread count)."""
    if check_backend(backend) == "torch":
        return net
    if not device.startswith("cpu"):
        raise MedsegError(f"backend {backend!r} runs on the CPU; use --device cpu or --backend torch on {device}")
    require(backend)
    path = backend_file(run, work, net, config, in_channels, backend, checkpoint)
    threads = threads or torch.get_num_threads()
    runtime = OnnxRuntimeNet if backend.startswith("onnxruntime") else OpenVinoNet
    return runtime(path, threads, backend)
