"""The CUDA path of inference and device selection, as far as a CPU machine can check it: the
stitch-device rule of the sliding window, ``resolve_device``'s one-line errors, the DICOM node's
device setting. The CUDA-only cases run where CUDA is (``benchmarks/gpu_check.sh`` runs them there)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medseg.errors import MedsegError
from medseg.inference.predictor import predict_folder
from medseg.inference.sliding_window import (
    STITCH_COPIES,
    STITCH_FREE_SHARE,
    choose_stitch_device,
    output_channels,
    predict_logits_tta,
    predict_volume,
    stitched_bytes,
)
from medseg.utils import resolve_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")

# --- the stitch-device rule ------------------------------------------------------------------------


def test_a_cpu_prediction_stitches_on_the_cpu_whatever_its_size():
    assert choose_stitch_device("cpu", 1, 100, (512, 512, 512), free_bytes=0) == torch.device("cpu")


def test_cuda_stitches_on_the_gpu_exactly_while_the_copies_fit_the_free_share():
    # a (1, 3, 10, 10, 10) float32 output is 12,000 bytes; the rule needs STITCH_COPIES of it in
    # STITCH_FREE_SHARE of the free memory
    need = STITCH_COPIES * stitched_bytes(1, 3, (10, 10, 10))
    assert stitched_bytes(1, 3, (10, 10, 10)) == 12_000
    just_enough = int(np.ceil(need / STITCH_FREE_SHARE))
    assert choose_stitch_device("cuda:0", 1, 3, (10, 10, 10), free_bytes=just_enough) == torch.device("cuda:0")
    assert choose_stitch_device("cuda:0", 1, 3, (10, 10, 10), free_bytes=just_enough - 1) == torch.device("cpu")


def test_a_large_ct_with_many_classes_stitches_on_the_cpu_of_an_h200():
    # 104 classes (TotalSegmentator) on a 512x512x600 CT: 65 GB per copy, far beyond 139 GiB / 2
    free = 139 * 2**30
    assert choose_stitch_device("cuda", 1, 104, (512, 512, 600), free_bytes=free) == torch.device("cpu")
    assert choose_stitch_device("cuda", 1, 3, (40, 56, 40), free_bytes=free) == torch.device("cuda")


def test_the_probe_counts_the_predictors_output_channels():
    net = torch.nn.Conv3d(2, 5, 3, padding=1)
    with torch.inference_mode():
        assert output_channels(net, torch.zeros(1, 2, 9, 9, 9), (16, 16, 16)) == 5


def test_stitching_on_the_cpu_explicitly_gives_the_default_cpu_result_bit_for_bit():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 3, padding=1).eval()
    data = np.random.default_rng(0).normal(size=(1, 21, 18, 19)).astype(np.float32)
    default = predict_volume([net], data, (16, 16, 16), mirror_axes=(0, 1))
    explicit = predict_volume([net], data, (16, 16, 16), mirror_axes=(0, 1), stitch_device="cpu")
    assert default.shape == (3, 21, 18, 19)
    assert np.array_equal(default, explicit)


def test_a_bad_stitch_device_is_refused_before_the_model_is_read(tmp_path):
    with pytest.raises(MedsegError, match="--stitch-device gpu: expected cpu, cuda or cuda:N"):
        predict_folder(tmp_path / "in", tmp_path / "out", tmp_path / "no_model", stitch_device="gpu")


@cuda
def test_windows_on_the_gpu_stitched_on_the_cpu_equal_stitching_on_the_gpu():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 3, padding=1).cuda().eval()
    x = torch.randn(1, 1, 37, 29, 41, device="cuda")
    on_gpu = predict_logits_tta(net, x, (16, 16, 16), mirror_axes=(0, 1, 2))
    on_cpu = predict_logits_tta(net, x, (16, 16, 16), mirror_axes=(0, 1, 2), stitch_device="cpu")
    assert on_gpu.device.type == "cuda" and on_cpu.device.type == "cpu"
    np.testing.assert_allclose(on_cpu.numpy(), on_gpu.cpu().numpy(), atol=1e-5)


# --- resolve_device --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "cuda1", "cuda:0:1", "CUDA", "mps"])
def test_malformed_device_names_get_one_line(name):
    with pytest.raises(MedsegError) as exc:
        resolve_device(name)
    assert str(exc.value) == f"--device {name}: expected cpu, cuda or cuda:N (or auto)"


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_on_a_machine_without_it_is_refused(name):
    with pytest.raises(MedsegError) as exc:
        resolve_device(name)
    assert str(exc.value) == f"--device {name}: CUDA is not available on this machine"


def test_auto_and_none_pick_cuda_only_where_it_is():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == resolve_device(None) == expected


@cuda
def test_a_cuda_index_past_the_devices_is_refused():
    n = torch.cuda.device_count()
    assert resolve_device(f"cuda:{n - 1}") == f"cuda:{n - 1}"
    with pytest.raises(MedsegError) as exc:
        resolve_device(f"cuda:{n}")
    assert str(exc.value) == f"--device cuda:{n}: this machine has {n} CUDA device(s)"


# --- the DICOM node's device -----------------------------------------------------------------------


def _node_config(tmp_path, device: str):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "plans.json").write_text("{}")  # NodeConfig.load checks that the work directory has plans
    path = tmp_path / "node.json"
    path.write_text(json.dumps({"allowed_calling_aets": ["PACS"], "destination": {"ae_title": "PACS", "port": 4242},
                                "model_dir": str(model), "spool_dir": str(tmp_path / "spool"), "device": device}))
    return path


def test_the_node_resolves_auto_like_predict(tmp_path):
    from medseg.deploy.node import NodeConfig

    assert NodeConfig.load(_node_config(tmp_path, "auto")).device == resolve_device("auto")


def test_the_node_refuses_a_malformed_device_naming_its_file(tmp_path):
    from medseg.deploy.node import NodeConfig

    path = _node_config(tmp_path, "gpu0")
    with pytest.raises(MedsegError) as exc:
        NodeConfig.load(path)
    assert str(exc.value) == f"{path}: device gpu0: expected cpu, cuda or cuda:N (or auto)"


@no_cuda
def test_the_node_refuses_cuda_where_there_is_none(tmp_path):
    from medseg.deploy.node import NodeConfig

    path = _node_config(tmp_path, "cuda:1")
    with pytest.raises(MedsegError, match=r"device cuda:1: CUDA is not available on this machine"):
        NodeConfig.load(path)


def test_a_node_built_in_code_checks_its_device_before_creating_its_spool(tmp_path):
    from medseg.deploy.node import Destination, Node, NodeConfig

    config = NodeConfig(allowed_calling_aets=["PACS"], destination=Destination(ae_title="PACS", port=4242),
                        model_dir=tmp_path / "model", spool_dir=tmp_path / "spool", device="cuda:x")
    with pytest.raises(MedsegError, match="node device cuda:x: expected cpu, cuda or cuda:N"):
        Node(config)
    assert not (tmp_path / "spool").exists()
