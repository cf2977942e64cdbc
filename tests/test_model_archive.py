"""Model archives (``medseg export-model`` / ``import-model`` / ``predict -m model.zip``): what
prediction needs in one zip, unpacked only when every entry is safe and matches the manifest."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import run_medseg

from medseg.errors import MedsegError
from medseg.inference.archive import MANIFEST, export_model, import_model
from medseg.inference.predictor import predict_folder


def _labels(path):
    return np.asarray(nib.load(path).dataobj)


def test_an_exported_model_predicts_as_its_work_directory(tiny_model, tmp_path):
    manifest = export_model(tiny_model, tmp_path / "model.zip")
    assert manifest["configs"] == {"3d_fullres": ["0"]}
    with zipfile.ZipFile(tmp_path / "model.zip") as zf:
        names = set(zf.namelist())
    assert names == {MANIFEST, "plans.json", "fingerprint.json", "runs/3d_fullres/fold_0/checkpoint_final.pt"}
    imported = import_model(tmp_path / "model.zip", tmp_path / "imported")
    image = tiny_model.parent / "ds" / "imagesTr" / "case_000.nii.gz"
    (a,) = predict_folder(image, tmp_path / "a", tiny_model, config_name="3d_fullres", tta=False)
    (b,) = predict_folder(image, tmp_path / "b", imported, config_name="3d_fullres", tta=False)
    assert np.array_equal(_labels(a), _labels(b))
    # predict -m model.zip: imported once under $MEDSEG_HOME/models
    env_home = tmp_path / "home"
    os.environ["MEDSEG_HOME"] = str(env_home)
    try:
        result = run_medseg("predict", "-i", image, "-o", tmp_path / "c", "-m", tmp_path / "model.zip", "--no-tta")
    finally:
        del os.environ["MEDSEG_HOME"]
    assert result.returncode == 0, result.stderr
    assert np.array_equal(_labels(a), _labels(tmp_path / "c" / "case_000.nii.gz"))
    assert len(list((env_home / "models").iterdir())) == 1
    # unknown folds are refused before anything is written
    with pytest.raises(MedsegError, match="fold 3 of 3d_fullres"):
        export_model(tiny_model, tmp_path / "other.zip", folds=[3])
    assert not (tmp_path / "other.zip").exists()


def _rewrite(src, dst, *, extra=(), drop=(), replace=None, manifest_update=None):
    """A copy of archive ``src`` with ``extra`` (ZipInfo or name, bytes) entries added, ``drop`` left
    out, ``replace`` {name: bytes} swapped in (manifest hash updated when ``manifest_update``)."""
    with zipfile.ZipFile(src) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    manifest = json.loads(entries.pop(MANIFEST))
    for name, data in (replace or {}).items():
        entries[name] = data
        if manifest_update:
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    with zipfile.ZipFile(dst, "w") as zf:
        zf.writestr(MANIFEST, json.dumps(manifest))
        for name, data in entries.items():
            if name not in drop:
                zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
    return dst


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _link(name):
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def test_hostile_archives_are_refused_in_one_line_and_write_nothing(tiny_model, tmp_path):
    good = tmp_path / "good.zip"
    export_model(tiny_model, good)
    ckpt = "runs/3d_fullres/fold_0/checkpoint_final.pt"
    marker = tmp_path / "pwned"
    evil = io.BytesIO()
    torch.save({"model": _Evil(marker)}, evil)
    cases = {
        "absolute": (dict(extra=[("/tmp/evil.txt", b"x")]), "absolute path"),
        "dotdot": (dict(extra=[("runs/../../evil.txt", b"x")]), r"leads outside the archive"),
        "link": (dict(extra=[(_link("runs/link"), b"/etc/passwd")]), "link or special file"),
        "unlisted": (dict(extra=[("notes.txt", b"hello")]), "not in the manifest"),
        "missing": (dict(drop=[ckpt]), "listed in the manifest but missing"),
        "tampered": (dict(replace={ckpt: b"0" * 100}), "manifest says|SHA-256"),
        "pickle": (dict(replace={ckpt: evil.getvalue()}, manifest_update=True), "not a plain-weights checkpoint"),
    }
    for name, (change, message) in cases.items():
        archive = _rewrite(good, tmp_path / f"{name}.zip", **change)
        out = tmp_path / f"out_{name}"
        with pytest.raises(MedsegError, match=message) as info:
            import_model(archive, out)
        assert "\n" not in str(info.value) and str(archive) in str(info.value), name
        assert not out.exists(), name
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".out_{name}")], name
    assert not marker.exists()  # the pickle's code never ran
    (tmp_path / "not_a_zip.zip").write_text("hello")
    with pytest.raises(MedsegError, match="not a zip archive"):
        import_model(tmp_path / "not_a_zip.zip", tmp_path / "out")
    # the CLI: one line, exit 2
    result = run_medseg("import-model", tmp_path / "dotdot.zip", "-o", tmp_path / "out_cli")
    assert result.returncode == 2 and "leads outside the archive" in result.stderr.strip().splitlines()[-1]
