"""Large volumes: the lean prediction path gives the labels of the straightforward one, and its peak
memory stays within a bound set by classes × voxels.

The reference computations here are the ones the predictor made before: ``torch.softmax`` of the
stitched pass, ``torch.flip`` and ``+`` over mirrorings and models, ``np.stack`` of the resampled
channels, ``np.argmax`` of the full array, ``np.mean`` over an ensemble's members.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import make_msd_dataset

from medseg.fingerprint import compute_fingerprint
from medseg.inference.predictor import CasePrediction, Stage, ensemble, predict_case
from medseg.inference.sliding_window import (
    _windowed,
    add_flipped_,
    mirror_sets,
    predict_logits_tta,
    predict_volume,
    qc_score_slabs,
    softmax_,
)
from medseg.inference.uncertainty import qc_score
from medseg.io.dataset import load_dataset
from medseg.io.geometry import Geometry
from medseg.planning.planner import plan_dataset
from medseg.preprocessing.pipeline import export_probabilities, export_probability_maps, preprocess_image
from medseg.preprocessing.resampling import (
    _resize_channel,
    resample_probabilities,
    resample_probabilities_argmax,
)


class _Net(torch.nn.Module):
    """A small fixed conv net (C → K logits) whose output varies across the volume."""

    def __init__(self, c: int, k: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.a = torch.nn.Conv3d(c, 4, 3, padding=1)
        self.b = torch.nn.Conv3d(4, k, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * 3.0


def _reference_tta(predictor, x, patch, mirror_axes, step=0.5):
    total = None
    for axes in mirror_sets(mirror_axes):
        dims = [a + 2 for a in axes]
        xi = torch.flip(x, dims) if dims else x
        p = torch.softmax(_windowed(predictor, xi, patch, step, 2, x.device).float(), dim=1)
        p = torch.flip(p, dims) if dims else p
        total = p if total is None else total + p
    return total / len(mirror_sets(mirror_axes))


@pytest.mark.parametrize("shape", [(3, 37, 61, 53), (2, 16, 16, 16), (4, 9, 1, 7)])
def test_softmax_in_place_is_torch_softmax(shape):
    t = torch.randn(1, *shape) * 6
    ref = torch.softmax(t, dim=1)
    out = softmax_(t.clone())
    assert torch.equal(out, ref)


def test_add_flipped_is_plain_sum(monkeypatch):
    import medseg.inference.sliding_window as sw

    monkeypatch.setattr(sw, "SLAB_VOXELS", 50)  # many slabs
    a, b = torch.randn(1, 3, 11, 5, 7), torch.randn(1, 3, 11, 5, 7)
    for dims in ([2], [3], [2, 4], [2, 3, 4], []):
        assert torch.equal(add_flipped_(a.clone(), b, dims), a + (torch.flip(b, dims) if dims else b))


@torch.inference_mode()
def test_tta_and_models_bit_identical_to_reference(monkeypatch):
    import medseg.inference.sliding_window as sw

    monkeypatch.setattr(sw, "SLAB_VOXELS", 300)
    data = np.random.default_rng(0).normal(size=(1, 19, 23, 21)).astype(np.float32)
    x = torch.from_numpy(data)[None]
    nets = [_Net(1, 3, s).eval() for s in (0, 1)]
    patch = (12, 12, 12)
    got = predict_logits_tta(nets[0], x, patch, mirror_axes=(0, 1, 2))
    assert torch.equal(got, _reference_tta(nets[0], x, patch, (0, 1, 2)))
    scores, plain = [], []
    vol = predict_volume(nets, data, patch, mirror_axes=(0, 2), qc_scores=scores, unmirrored=plain)
    refs = [_reference_tta(n, x, patch, (0, 2)) for n in nets]
    assert np.array_equal(vol, ((refs[0] + refs[1]) / 2)[0].numpy())
    plains = [_reference_tta(n, x, patch, ()) for n in nets]
    assert np.array_equal(plain[0], ((plains[0] + plains[1]) / 2)[0].numpy())
    assert scores == pytest.approx([qc_score(r[0].numpy()) for r in refs], rel=1e-6)
    # one model, no mirroring, the pass kept too: still the reference, and the kept pass untouched
    plain = []
    vol = predict_volume(nets[:1], data, patch, unmirrored=plain)
    assert np.array_equal(vol, plains[0][0].numpy()) and np.array_equal(plain[0], plains[0][0].numpy())


def test_qc_score_slabs_matches_qc_score(monkeypatch):
    import medseg.inference.sliding_window as sw

    monkeypatch.setattr(sw, "SLAB_VOXELS", 64)
    logits = torch.randn(3, 13, 8, 9) * 2
    probs = torch.softmax(logits, 0).numpy()
    assert qc_score_slabs(probs) == pytest.approx(qc_score(probs), rel=1e-6)
    empty = np.zeros_like(probs)
    empty[0] = 1.0
    assert qc_score_slabs(empty) == qc_score(empty) == 1.0


@pytest.mark.parametrize("anisotropic", [False, True])
def test_argmax_resampling_equals_stacked_argmax(anisotropic):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 9, 14, 11)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(0)
    probs[:, 0, 0, :3] = 0.25  # exact ties: the first class wins, as with np.argmax
    for shape in [(17, 23, 11), (9, 30, 8), (9, 14, 11)]:
        ref = np.argmax(resample_probabilities(probs, shape, anisotropic), axis=0)
        stacked = np.stack([_resize_channel(p, shape, 1, anisotropic) for p in probs])
        assert np.array_equal(resample_probabilities(probs, shape, anisotropic), stacked)
        assert np.array_equal(resample_probabilities_argmax(probs, shape, anisotropic), ref)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("large")
    ds = load_dataset(make_msd_dataset(root / "ds", n_cases=2, shape=(20, 24, 16)))
    plans = plan_dataset(compute_fingerprint(ds), device="cuda", memory_gb=8, configs=["3d_fullres"])
    return plans.config("3d_fullres"), plans.num_classes


def _image(shape, spacing, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(100, 20, size=(1, *shape)).astype(np.float32)
    img[:, :2] = 0  # a border the crop removes
    affine = np.diag([*spacing, 1.0])
    return img, Geometry(tuple(shape), tuple(float(s) for s in spacing), affine)


def test_predict_case_labels_only_equals_probability_argmax(config):
    config, k = config
    config = config.model_copy(update={"patch_size": [12, 12, 12]})
    stage = Stage(config, [_Net(1, k, 3)], k)
    spacing_in = [s * f for s, f in zip(config.spacing, (1.3, 0.8, 1.1), strict=True)]
    spacing_in = [spacing_in[config.transpose_backward[i]] for i in range(3)]
    image, geometry = _image((23, 19, 17), spacing_in)
    full = predict_case(stage, image, geometry, tta=True)
    lean = predict_case(stage, image, geometry, tta=True, probabilities=False)
    assert lean.probabilities is None
    ref = full.probabilities.argmax(axis=0).astype(np.uint8)
    assert np.array_equal(full.segmentation, ref)
    assert np.array_equal(lean.segmentation, ref)
    assert lean.qc_scores == full.qc_scores
    # the probability maps: channel by channel, the same values as the stacked export
    data, props = preprocess_image(image, geometry, config)
    probs = predict_volume(stage.models, data, config.patch_size)
    stacked = resample_probabilities(probs, props.shape_cropped_transposed, props.anisotropic(config))
    ref_maps = np.zeros((k, *geometry.shape), np.float32)
    ref_maps[0] = 1.0
    ref_maps[(slice(None), *(slice(a, b) for a, b in props.bbox))] = stacked.transpose(
        [0] + [t + 1 for t in config.transpose_backward])
    assert np.array_equal(export_probability_maps(probs, props, config), ref_maps)
    assert np.array_equal(export_probabilities(probs, props, config), ref_maps.argmax(0))


def test_ensemble_is_np_mean():
    rng = np.random.default_rng(2)
    members = [CasePrediction(rng.random((3, 5, 6, 7), dtype=np.float32), [0.1 * i]) for i in range(3)]
    out = ensemble(members)
    assert np.array_equal(out.probabilities, np.mean([m.probabilities for m in members], axis=0))
    assert out.qc_scores == [0.0, 0.1, 0.2]


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, torch
    sys.path.insert(0, {tests!r})
    from test_large_volume_memory import _Net, _image
    from medseg.inference.predictor import Stage, predict_case
    from medseg.plans.schema import Configuration

    torch.set_num_threads(1)
    config = Configuration.model_validate_json({config!r})
    k, shape = {k}, {shape}
    stage = Stage(config, [_Net(1, k, 0)], k)
    spacing = [config.spacing[config.transpose_backward[i]] for i in range(3)]
    predict_case(stage, *_image((16, 16, 16), spacing), tta=False, probabilities=False)  # warm up
    image, geometry = _image(shape, spacing)

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    base = status("VmRSS:")
    seg = predict_case(stage, image, geometry, tta=False, probabilities=False).segmentation
    print(json.dumps({{"base": base, "peak": status("VmHWM:"), "fg": int((seg > 0).sum())}}))
""")


def test_peak_memory_of_labels_only_prediction_is_bounded(config, tmp_path):
    """Peak RSS above the baseline while predicting a 128³ volume (one model, no mirroring, labels
    only) with K = 16 classes: below 1.5 float32 copies of (K, *voxels) + 16 bytes per voxel
    (preprocessed input, MONAI's count map, labels, masks) + 48 MB of allocator slack and windows,
    136 B/voxel in all. The lean path holds one copy (measured ~98 B/voxel); the path before held
    several plus an int64 index array (measured ~206 B/voxel), far above the bound."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("/proc/self/clear_refs not writable: cannot reset the peak RSS")
    config, _ = config
    config = config.model_copy(update={"patch_size": [48, 48, 48]})
    k, shape = 16, (128, 128, 128)
    script = _MEMORY_SCRIPT.format(tests=str(__import__("pathlib").Path(__file__).parent),
                                   config=config.model_dump_json(), k=k, shape=shape)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    voxels = int(np.prod(shape))
    bound = int(1.5 * 4 * k * voxels) + 16 * voxels + 48 * 2**20
    extra = r["peak"] - r["base"]
    assert extra < bound, f"peak {extra / 2**20:.0f} MB above baseline, bound {bound / 2**20:.0f} MB"
