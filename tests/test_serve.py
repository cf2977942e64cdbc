"""``medseg serve`` against a real Orthanc (started here): C-ECHO, AE title filtering, a study pushed
by Orthanc comes back as DICOM SEG equal to ``medseg predict``'s output, kill -9 recovery, load."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
pytestmark = pytest.mark.skipif(not os.path.exists(ORTHANC), reason="Orthanc not installed (.ci/run installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(base: str, path: str, data: bytes | None = None, method: str | None = None):
    req = urllib.request.Request(base + path, data=data, method=method or ("POST" if data is not None else "GET"))
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = resp.read()
    return json.loads(body) if body[:1] in (b"{", b"[") else body


def _wait(predicate, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    root = tmp_path_factory.mktemp("orthanc")
    http, dicom, node = _free_port(), _free_port(), _free_port()
    config = {"Name": "TestOrthanc", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
              "HttpServerEnabled": True, "HttpPort": http, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "DicomServerEnabled": True, "DicomAet": "ORTHANC", "DicomPort": dicom, "DicomCheckCalledAet": False,
              "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True,
              "DicomModalities": {"medseg": ["MEDSEG", "127.0.0.1", node]}}
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if plugin.exists():  # for the STOW-RS destination
        config["Plugins"] = [str(plugin)]
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
    (root / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{http}"

    def up():
        try:
            return _http(base, "/system")
        except OSError:
            return None

    _wait(up, 30, "Orthanc")
    yield {"base": base, "dicom_port": dicom, "node_port": node, "stow": plugin.exists()}
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


class NodeProcess:
    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "medseg", "serve", str(self.config)],
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        port = json.loads(self.config.read_text())["port"]
        _wait(lambda: _echo(port, "ORTHANC"), 60, "medseg serve to answer C-ECHO")

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _echo(port: int, calling: str) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDSEG")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


@pytest.fixture
def node(orthanc, model, tmp_path):
    config = {"ae_title": "MEDSEG", "host": "127.0.0.1", "port": orthanc["node_port"],
              "allowed_calling_aets": ["ORTHANC", "LOADTEST"],
              "destination": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc["dicom_port"]},
              "model_dir": str(model), "spool_dir": str(tmp_path / "spool"), "idle_timeout_s": 1.0,
              "concurrency": 2, "tta": False}
    (tmp_path / "node.json").write_text(json.dumps(config))
    n = NodeProcess(tmp_path / "node.json", tmp_path / "node.log")
    n.start()
    yield n
    n.stop()


def _segs_of(orthanc, series_uid: str) -> list[pydicom.Dataset]:
    out = []
    for sid in _http(orthanc["base"], "/series"):
        info = _http(orthanc["base"], f"/series/{sid}")
        if info["MainDicomTags"].get("Modality") != "SEG":
            continue
        for iid in info["Instances"]:
            ds = pydicom.dcmread(__import__("io").BytesIO(_http(orthanc["base"], f"/instances/{iid}/file")))
            if ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid:
                out.append(ds)
    return out


def _upload(orthanc, folder: Path) -> str:
    ids = {_http(orthanc["base"], "/instances", p.read_bytes())["ParentSeries"] for p in sorted(folder.rglob("*"))
           if p.is_file()}
    (series_id,) = ids
    return series_id


def test_echo_and_unknown_calling_ae_rejected(node, orthanc):
    assert _echo(orthanc["node_port"], "ORTHANC")
    assert not _echo(orthanc["node_port"], "STRANGER")


def test_orthanc_push_gives_seg_equal_to_predict(node, orthanc, shared_data_dir, model, tmp_path):
    from medseg.inference.predictor import predict_folder
    from medseg.io.dicom import find_series
    from medseg.io.dicom_seg import read_dicom_seg

    studies = [shared_data_dir / "dicom" / "hippocampus-mr" / s for s in ("Study1", "Study2")]
    ids = [_upload(orthanc, s) for s in studies]
    _http(orthanc["base"], "/modalities/medseg/store", json.dumps({"Resources": ids, "Synchronous": True}).encode())
    for study in studies:
        (series,) = [s for s in find_series(study) if s.is_image]
        (seg,) = _wait(lambda s=series: _segs_of(orthanc, s.series_uid), 180, f"the SEG of {study.name}")
        seg.save_as(tmp_path / "seg.dcm")
        predict_folder(study, tmp_path / "nifti", model, tta=False, overwrite=True)
        nifti = nib.load(tmp_path / "nifti" / f"{series.series_uid}.nii.gz")
        assert np.array_equal(read_dicom_seg(tmp_path / "seg.dcm", series), np.asanyarray(nifti.dataobj))
    log = (tmp_path / "node.log").read_text()
    for study in studies:
        patient = pydicom.dcmread(next(p for p in study.rglob("*") if p.is_file()), stop_before_pixels=True)
        assert str(patient.PatientID) not in log and str(patient.PatientName) not in log


def _copies(source: Path, n: int, out: Path) -> list[tuple[str, list[pydicom.Dataset]]]:
    """``n`` new series (new study, series and instance UIDs) made from the slices of ``source``."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    series = []
    for _ in range(n):
        study_uid, series_uid = generate_uid(), generate_uid()
        datasets = []
        for f in files:
            ds = pydicom.dcmread(f)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            datasets.append(ds)
        series.append((series_uid, datasets))
    return series


def _send(port: int, datasets: list[pydicom.Dataset], calling: str = "LOADTEST", attempts: int = 3) -> int:
    """C-STORE every dataset; like a PACS, instances not acknowledged (an aborted association, e.g.
    on a starved machine) are sent again on a new association. Returns how many were acknowledged."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    todo = list(datasets)
    for _ in range(attempts):
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDSEG")
        if not assoc.is_established:
            continue
        left = []
        for ds in todo:
            try:
                status = assoc.send_c_store(ds) if assoc.is_established else None
            except RuntimeError:  # the association went away under us
                status = None
            if not status or status.Status != 0:
                left.append(ds)
        if assoc.is_established:
            assoc.release()
        todo = left
        if not todo:
            break
    return len(datasets) - len(todo)


def test_kill_9_loses_nothing_and_processes_once(node, orthanc, shared_data_dir, tmp_path):
    spool = tmp_path / "spool"
    (uid, datasets), = _copies(shared_data_dir / "dicom" / "hippocampus-mr" / "Study1", 1, tmp_path)
    assert _send(orthanc["node_port"], datasets) == len(datasets)
    node.kill9()  # within the idle timeout: received, acknowledged, not processed yet
    assert len(list((spool / "incoming" / uid).glob("*.dcm"))) == len(datasets)
    node.start()
    _wait(lambda: (spool / "done" / uid).exists(), 120, "the series to be processed after the restart")
    # killed again in the middle of the next series' processing, then restarted
    (uid2, datasets2), = _copies(shared_data_dir / "dicom" / "hippocampus-mr" / "Study1", 1, tmp_path)
    _send(orthanc["node_port"], datasets2)
    _wait(lambda: (spool / "processing" / uid2).exists() or (spool / "done" / uid2).exists(), 60, "processing")
    node.kill9()
    node.start()
    _wait(lambda: (spool / "done" / uid2).exists(), 120, "the interrupted series")
    for u, ds in ((uid, datasets), (uid2, datasets2)):
        segs = _wait(lambda u=u: _segs_of(orthanc, u), 60, "the SEG in Orthanc")
        assert len(segs) == 1  # once, even when the SEG was sent twice
        assert len(list((spool / "done" / u).glob("*.dcm"))) == len(ds)


def test_load_eight_senders(node, orthanc, shared_data_dir, tmp_path):
    senders, per_sender = 8, 3
    work = _copies(shared_data_dir / "dicom" / "hippocampus-mr" / "Study1", senders * per_sender, tmp_path)
    sent = []
    t0 = time.time()

    def run(k):
        for uid, ds in work[k::senders]:
            sent.append((uid, _send(orthanc["node_port"], ds)))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    spool = tmp_path / "spool"
    _wait(lambda: all((spool / "done" / uid).exists() for uid, _ in work), 300, "every series to be processed")
    wall = time.time() - t0
    instances = sum(len(ds) for _, ds in work)
    received = sum(len(list((spool / "done" / uid).glob("*.dcm"))) for uid, _ in work)
    assert sum(n for _, n in sent) == instances and received == instances  # 0 lost
    assert not list((spool / "failed").iterdir())
    for uid, _ in work:
        assert len(_segs_of(orthanc, uid)) == 1
    print(f"load: {senders} senders x {per_sender} series, {instances} instances, lost 0, {wall:.1f} s")
    (Path(os.environ.get("MEDSEG_LOAD_REPORT", tmp_path / "load.json"))).write_text(json.dumps(
        {"senders": senders, "series": len(work), "instances": instances, "lost": 0, "wall_s": wall}))


def test_stow_rs_destination(orthanc, model, shared_data_dir, tmp_path):
    if not orthanc["stow"]:
        pytest.skip("Orthanc's DICOMweb plugin is not installed")
    port = _free_port()
    config = {"ae_title": "MEDSEG", "host": "127.0.0.1", "port": port, "allowed_calling_aets": ["LOADTEST"],
              "destination": {"stow_url": orthanc["base"] + "/dicom-web/studies"}, "model_dir": str(model),
              "spool_dir": str(tmp_path / "spool"), "idle_timeout_s": 0.5, "tta": False}
    (tmp_path / "stow.json").write_text(json.dumps(config))
    n = NodeProcess(tmp_path / "stow.json", tmp_path / "stow.log")
    try:
        n.proc = subprocess.Popen([sys.executable, "-m", "medseg", "serve", str(tmp_path / "stow.json")],
                                  stdout=open(tmp_path / "stow.log", "ab"), stderr=subprocess.STDOUT)
        _wait(lambda: _echo(port, "LOADTEST"), 60, "medseg serve")
        (uid, datasets), = _copies(shared_data_dir / "dicom" / "hippocampus-mr" / "Study2", 1, tmp_path)
        assert _send(port, datasets) == len(datasets)
        (seg,) = _wait(lambda: _segs_of(orthanc, uid), 120, "the SEG stored by STOW-RS")
        assert seg.Modality == "SEG"
    finally:
        n.stop()
