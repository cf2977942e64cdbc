"""A trained model behind `medseg serve`, fed by a real Orthanc: the hippocampus crop series of
Study1/Study2 go PACS → node → DICOM SEG → PACS, and each SEG is compared voxel by voxel with
`medseg predict`'s NIfTI for the same series.

    python benchmarks/pacs_roundtrip.py MODEL_DIR [--studies DIR ...] [--out OUT_JSON]

Needs /usr/sbin/Orthanc (apt-get install orthanc). MODEL_DIR: a trained work directory (its
model.json is followed when present).
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from medseg.inference.predictor import predict_folder
from medseg.io.dicom import find_series
from medseg.io.dicom_seg import read_dicom_seg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(base: str, path: str, data: bytes | None = None):
    req = urllib.request.Request(base + path, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=120) as r:
        body = r.read()
    return json.loads(body) if body[:1] in (b"{", b"[") else body


def wait(pred, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "hippocampus-mr"
    ap.add_argument("--studies", type=Path, nargs="+", default=[root / "Study1", root / "Study2"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pacs_"))
    web, dicom, node = free_port(), free_port(), free_port()
    (tmp / "orthanc.json").write_text(json.dumps({
        "Name": "Bench", "StorageDirectory": str(tmp / "db"), "IndexDirectory": str(tmp / "db"),
        "HttpPort": web, "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomAet": "ORTHANC",
        "DicomPort": dicom, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
        "DicomModalities": {"medseg": ["MEDSEG", "127.0.0.1", node]}}))
    orthanc = subprocess.Popen(["/usr/sbin/Orthanc", str(tmp / "orthanc.json")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{web}"
    (tmp / "node.json").write_text(json.dumps({
        "ae_title": "MEDSEG", "host": "127.0.0.1", "port": node, "allowed_calling_aets": ["ORTHANC"],
        "destination": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom},
        "model_dir": str(args.model_dir.resolve()), "spool_dir": str(tmp / "spool"), "idle_timeout_s": 2}))
    serve = subprocess.Popen([sys.executable, "-m", "medseg", "serve", str(tmp / "node.json")],
                             stdout=open(tmp / "node.log", "wb"), stderr=subprocess.STDOUT)
    results = []
    try:
        wait(lambda: _up(base), 30, "Orthanc")
        wait(lambda: b"listening" in (tmp / "node.log").read_bytes(), 120, "medseg serve")
        ids = []
        for study in args.studies:
            sids = {http(base, "/instances", p.read_bytes())["ParentSeries"] for p in sorted(study.rglob("*"))
                    if p.is_file()}
            ids += sorted(sids)
        t0 = time.time()
        http(base, "/modalities/medseg/store", json.dumps({"Resources": ids, "Synchronous": True}).encode())
        for study in args.studies:
            (series,) = [s for s in find_series(study) if s.is_image]
            seg = wait(lambda s=series: _seg_of(base, s.series_uid), 600, f"the SEG of {study.name}")
            wall = time.time() - t0
            seg.save_as(tmp / "seg.dcm")
            predict_folder(study, tmp / "nifti", args.model_dir, overwrite=True)
            ref = np.asanyarray(nib.load(tmp / "nifti" / f"{series.series_uid}.nii.gz").dataobj)
            mask = read_dicom_seg(tmp / "seg.dcm", series)
            results.append({"study": study.name, "series_slices": len(series.slices),
                            "seg_references_series": seg.ReferencedSeriesSequence[0].SeriesInstanceUID
                            == series.series_uid, "voxels_differing": int((mask != ref).sum()),
                            "foreground_voxels": int((ref > 0).sum()), "seconds_until_seg_in_pacs": round(wall, 1)})
            print(results[-1])
    finally:
        serve.terminate()
        serve.wait(30)
        orthanc.terminate()
        orthanc.wait(30)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def _up(base):
    try:
        return http(base, "/system")
    except OSError:
        return None


def _seg_of(base, series_uid):
    for sid in http(base, "/series"):
        info = http(base, f"/series/{sid}")
        if info["MainDicomTags"].get("Modality") == "SEG":
            for iid in info["Instances"]:
                ds = pydicom.dcmread(io.BytesIO(http(base, f"/instances/{iid}/file")))
                if ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid:
                    return ds
    return None


if __name__ == "__main__":
    main()
