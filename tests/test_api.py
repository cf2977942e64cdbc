"""The Python API the way a notebook calls it: ``import medseg``, ``load_model`` once, ``predict``
on nibabel, SimpleITK and array inputs (same kind and geometry back, the labels of ``medseg
predict``), and the README's example run as written."""

from __future__ import annotations

import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from helpers import REPO_ROOT

import medseg
from medseg.errors import MedsegError
from medseg.inference.predictor import predict_folder


def test_import_medseg_is_fast_and_exports_exactly_the_api():
    code = "import sys, medseg; print(sorted(m for m in sys.modules if m.startswith(('torch', 'medseg.'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert out.stdout.strip() == "[]"  # nothing heavy until an API function is used
    assert set(medseg.__all__) == {"Model", "__version__", "evaluate", "export_model", "import_model",
                                   "load_model", "plan", "train"}
    assert all(getattr(medseg, name) for name in medseg.__all__)


def test_predict_returns_the_inputs_kind_and_geometry_and_the_clis_labels(tiny_model, tmp_path):
    image_path = tiny_model.parent / "ds" / "imagesTr" / "case_000.nii.gz"
    (reference,) = predict_folder(image_path, tmp_path / "cli", tiny_model, tta=False)
    expected = np.asarray(nib.load(reference).dataobj)
    model = medseg.load_model(tiny_model, device="cpu")
    assert model.labels == {0: "background", 1: "a", 2: "b"}

    img = nib.load(image_path)
    seg = model.predict(img, tta=False)
    assert isinstance(seg, nib.Nifti1Image) and np.allclose(seg.affine, img.affine)
    assert np.array_equal(np.asarray(seg.dataobj), expected)

    itk = sitk.ReadImage(str(image_path))
    seg_itk = model.predict(itk, tta=False)
    assert isinstance(seg_itk, sitk.Image)
    assert seg_itk.GetSize() == itk.GetSize() and np.allclose(seg_itk.GetSpacing(), itk.GetSpacing())
    assert np.allclose(seg_itk.GetOrigin(), itk.GetOrigin()) and np.allclose(seg_itk.GetDirection(), itk.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(seg_itk).transpose(2, 1, 0), expected)

    labels = model.predict(np.asarray(img.dataobj), affine=img.affine, tta=False)
    assert isinstance(labels, np.ndarray) and np.array_equal(labels, expected)
    with pytest.raises(MedsegError, match="needs its spacing"):
        model.predict(np.zeros((8, 8, 8)))
    with pytest.raises(MedsegError, match="nibabel image, a SimpleITK image or a NumPy array"):
        model.predict("case.nii.gz")


def test_the_readme_example_runs_as_written(tiny_model):
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"<!-- api-example[^>]*-->\s*```python\n(.*?)```", readme, re.S)
    assert block, "README.md has no api-example block"
    namespace = {"WORK": str(tiny_model), "IMAGE": str(tiny_model.parent / "ds" / "imagesTr" / "case_000.nii.gz")}
    exec(compile(block.group(1), "README.md:api-example", "exec"), namespace)  # noqa: S102 - our own README
    assert isinstance(namespace["seg"], nib.Nifti1Image) and isinstance(namespace["seg_itk"], sitk.Image)


def test_statistics_and_previews_at_predict_time(tiny_model, tmp_path):
    import json

    image_path = tiny_model.parent / "ds" / "imagesTr" / "case_000.nii.gz"
    out = tmp_path / "out"
    (written,) = predict_folder(image_path, out, tiny_model, tta=False, statistics=True, preview=True)
    seg = np.asarray(nib.load(written).dataobj)
    image = np.asarray(nib.load(image_path).dataobj)
    stats = json.loads((out / "predict_statistics.json").read_text())
    (case,) = stats["cases"]
    assert case["case"] == "case_000" and [r["structure"] for r in case["structures"]] == ["a", "b"]
    for row in case["structures"]:
        mask = seg == row["label"]
        assert row["voxels"] == int(mask.sum()) and row["volume_ml"] == pytest.approx(mask.sum() / 1000.0)
        if mask.any():
            assert row["mean_MRI"] == pytest.approx(float(image[mask].mean()), rel=1e-5)
    assert (out / "predict_statistics.csv").read_text().splitlines()[0].startswith("case,label,structure,voxels")
    png = (out / "case_000_preview.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
