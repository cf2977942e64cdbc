"""The DICOM node at its edges (issue 16, "Security of the node"): hostile UIDs are refused and write
nothing, no log line carries a study's identifiers, retention purges the spool, DICOM TLS, a series
is not taken while an association that carried it is open, and a STOW-RS 202 is a failure.

Nodes run in this process (``Node.serve_forever`` in a thread) so that ``caplog`` sees every log
record; senders are pynetdicom AEs over real sockets; destinations are a real Orthanc or a real HTTP
server (``http.server``) answering STOW-RS."""

from __future__ import annotations

import json
import logging
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from test_serve import ORTHANC, _free_port, _segs_of, _wait, orthanc  # noqa: F401  (orthanc: a fixture)

from medseg.deploy.node import (
    DATASET_MISMATCH,
    INVALID_SOP_INSTANCE,
    Destination,
    Node,
    NodeConfig,
    Spool,
    TLSConfig,
    redact,
    tag,
    valid_uid,
)

HIPPO = "dicom/hippocampus-mr"


def _files(study: Path) -> list[Path]:
    return sorted(p for p in study.rglob("*") if p.is_file())


def _renamed(study: Path) -> tuple[str, list[pydicom.Dataset]]:
    """The slices of ``study`` as a new series (new study, series and SOP instance UIDs)."""
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for f in _files(study):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(ds)
    return series_uid, out


def _position(ds: pydicom.Dataset) -> float:
    """Where a slice lies along its normal (mm)."""
    import numpy as np

    iop = np.asarray(ds.ImageOrientationPatient, float)
    return float(np.dot(np.asarray(ds.ImagePositionPatient, float), np.cross(iop[:3], iop[3:])))


class Sender:
    """One association from calling AE ``SENDER`` (optionally over TLS)."""

    def __init__(self, port: int, datasets: list[pydicom.Dataset], tls: tuple[ssl.SSLContext, str] | None = None):
        ae = AE(ae_title="SENDER")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for sop_class, syntax in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}):
            ae.add_requested_context(sop_class, syntax)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="MEDSEG", tls_args=tls)

    def store(self, datasets: list[pydicom.Dataset]) -> list[int]:
        return [getattr(self.assoc.send_c_store(ds), "Status", -1) for ds in datasets]

    def release(self) -> None:
        self.assoc.release()


def _send(port: int, datasets: list[pydicom.Dataset], **kw) -> list[int] | None:
    sender = Sender(port, datasets, **kw)
    if not sender.assoc.is_established:
        return None
    statuses = sender.store(datasets)
    sender.release()
    return statuses


@pytest.fixture
def make_node(tmp_path):
    """Start in-process nodes (``NodeConfig`` fields as keywords); all stopped at the end."""
    running = []

    def make(**kw) -> Node:
        fields = dict(ae_title="MEDSEG", host="127.0.0.1", port=_free_port(), allowed_calling_aets=["SENDER"],
                      destination=Destination(stow_url="http://127.0.0.1:9/unused"), model_dir=tmp_path / "no-model",
                      spool_dir=tmp_path / "spool", idle_timeout_s=3600.0, tta=False)
        fields.update(kw)
        node = Node(NodeConfig(**fields))
        thread = threading.Thread(target=node.serve_forever, kwargs={"poll_s": 0.1}, daemon=True)
        thread.start()
        _wait(lambda: node.server is not None, 30, "the node to listen")
        running.append((node, thread))
        return node

    yield make
    for node, thread in running:
        node.stop_event.set()
        thread.join(120)


class StowServer:
    """A real HTTP server for STOW-RS that answers every POST with ``status`` (and, for 202, a DICOM
    JSON body with a FailedSOPSequence, as PS3.18 describes); it counts the requests."""

    def __init__(self, status: int) -> None:
        self.status, self.posts = status, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                outer.posts.append(self.rfile.read(int(self.headers["Content-Length"])))
                body = b"{}" if outer.status == 200 else json.dumps(
                    {"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [0xA700]}}]}}).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/dicom-web/studies"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------- UIDs


def test_uid_grammar():
    for good in ("0", "1.2.840.10008.1.2.1", "1.0.3", "2.25." + "1" * 59, "1." + "9" * 62):
        assert valid_uid(good), good
    for bad in ("", "01.2", "1.02", "1..2", "1.2.", ".1.2", "1.2.a", "1.2 ", " 1.2", "/tmp/x", "../1.2", "1/2",
                "..", ".", "1." + "9" * 63, "1.2.3\\4", None, 1.2):
        assert not valid_uid(bad), bad


def test_hostile_uids_are_refused_and_write_nothing(make_node, shared_data_dir, tmp_path):
    node = make_node()
    spool = tmp_path / "spool"
    source = _files(shared_data_dir / HIPPO / "Study1")[0]
    outside = tmp_path / "outside"
    # an absolute SOP Instance UID must stay within 64 characters for pynetdicom to send it
    short_outside = Path(tempfile.gettempdir()) / f"medseg_hostile_{os.getpid()}"
    hostile = [  # (SeriesInstanceUID, SOPInstanceUID, expected status)
        (str(outside / "abs_series"), generate_uid(), DATASET_MISMATCH),  # an absolute path
        ("../../../outside/up_series", generate_uid(), DATASET_MISMATCH),  # leaves the spool
        ("..", generate_uid(), DATASET_MISMATCH),
        ("1." + "2" * 70, generate_uid(), DATASET_MISMATCH),  # too long
        ("", generate_uid(), DATASET_MISMATCH),  # empty
        (None, generate_uid(), DATASET_MISMATCH),  # missing
        ("1.2.abc", generate_uid(), DATASET_MISMATCH),  # not digits
        ("1.02.3", generate_uid(), DATASET_MISMATCH),  # a leading zero
        (generate_uid(), "../../../outside/up_sop", INVALID_SOP_INSTANCE),
        (generate_uid(), str(short_outside / "a"), INVALID_SOP_INSTANCE),  # absolute (≤ 64, pynetdicom sends it)
        (generate_uid(), "1.2.3/4", INVALID_SOP_INSTANCE),
        (generate_uid(), "1.2.x", INVALID_SOP_INSTANCE),
    ]
    assert len(str(short_outside / "a")) <= 64
    datasets = []
    for series_uid, sop_uid, _ in hostile:
        ds = pydicom.dcmread(source)
        if series_uid is None:
            del ds.SeriesInstanceUID
        else:
            ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        datasets.append(ds)
    good, good_series = pydicom.dcmread(source), generate_uid()
    good.SeriesInstanceUID, good.SOPInstanceUID = good_series, generate_uid()
    good.file_meta.MediaStorageSOPInstanceUID = good.SOPInstanceUID
    before = sorted(str(p) for p in tmp_path.rglob("*") if spool not in p.parents and p != spool)

    statuses = _send(node.config.port, [*datasets, good])
    assert statuses == [expected for *_, expected in hostile] + [0x0000]
    _wait(lambda: (spool / "incoming" / good_series / ".released").exists(), 10, "the release")
    after = sorted(str(p) for p in tmp_path.rglob("*") if spool not in p.parents and p != spool)
    assert after == before and not outside.exists() and not short_outside.exists()  # nothing outside the spool
    spooled = sorted(p.relative_to(spool).as_posix() for p in spool.rglob("*") if p.is_file())
    assert spooled == [f"incoming/{good_series}/.released", f"incoming/{good_series}/{good.SOPInstanceUID}.dcm"]


def test_spool_refuses_what_is_not_a_uid(tmp_path):
    spool = Spool(tmp_path / "spool")
    for series, sop in (("../x", "1.2"), ("1.2", "/etc/passwd"), ("", "1.2")):
        with pytest.raises(ValueError):
            spool.store(series, sop, b"x")
    assert not list((tmp_path / "spool" / "incoming").iterdir()) and sorted(os.listdir(tmp_path)) == ["spool"]


# ---------------------------------------------------------------------------------------- logs


def test_redact_hashes_uids_and_blanks_descriptions_and_dates():
    uid = "1.2.826.0.1.3680043.8.498.10112548596522579645160189153146185462"
    text = (f"/spool/processing/{uid}: MR series 13 \"HippoCrop\" (31 slices, UID {uid}): inconsistent spacing "
            f"between {uid}.dcm and 'x.dcm' on 20200119; transfer syntax 1.2.840.10008.1.2.4.50\nsecond line")
    out = redact(text)
    assert uid not in out and "HippoCrop" not in out and "20200119" not in out and "second line" not in out
    assert f"#{tag(uid)}" in out and "1.2.840.10008.1.2.4.50" in out and "inconsistent spacing" in out


def _identifiers(files: list[Path]) -> set[str]:
    out = set()
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID", "SeriesDescription",
                   "StudyDescription", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
                   "PatientBirthDate", "AccessionNumber", "StudyID", "InstitutionName"):
            if len(str(ds.get(kw, "") or "").strip()) >= 3:  # StudyID "1" cannot be looked for
                out.add(str(ds.get(kw)).strip())
        name = ds.get("PatientName")
        if name:
            out.add(str(name))
            out |= {c for c in (name.family_name, name.given_name) if len(c) > 2}
    return out


@pytest.mark.skipif(not os.path.exists(ORTHANC), reason="Orthanc not installed (.ci/run installs it)")
def test_no_identifier_in_any_log_line(make_node, orthanc, tiny_model, shared_data_dir, tmp_path, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    node = make_node(model_dir=tiny_model, idle_timeout_s=1.0,
                     destination=Destination(ae_title="ORTHANC", host="127.0.0.1", port=orthanc["dicom_port"]))
    spool = tmp_path / "spool"
    good = _files(shared_data_dir / HIPPO / "Study1")  # the real files, UIDs and all
    bad = _files(shared_data_dir / HIPPO / "Study2")
    bad_sent = [f for i, f in enumerate(bad) if i != len(bad) // 2]  # a slice missing: inconsistent spacing
    good_series = str(pydicom.dcmread(good[0], stop_before_pixels=True).SeriesInstanceUID)
    bad_series = str(pydicom.dcmread(bad[0], stop_before_pixels=True).SeriesInstanceUID)
    for files in (good, bad_sent):
        assert _send(node.config.port, [pydicom.dcmread(f) for f in files]) == [0] * len(files)
    _wait(lambda: (spool / "done" / good_series).is_dir() and (spool / "failed" / bad_series).is_dir(), 300,
          "one series delivered and one failed")
    assert len(_segs_of(orthanc, good_series)) == 1
    error = (spool / "failed" / bad_series / "error.txt").read_text()
    assert bad_series in error  # the whole message is on disk, next to the data …

    lines = [f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records]
    text = "\n".join(lines)
    assert f"series {tag(good_series)}: 1 SEG(s) delivered" in text
    assert f"series {tag(bad_series)} failed: DatasetError" in text  # … and the log says what kind
    leaked = {i: [line for line in lines if i in line][:3] for i in _identifiers(good + bad) if i in text}
    assert not leaked, f"identifiers in the log: {leaked}"


# ---------------------------------------------------------------------------------------- retention


def test_retention_purges_done_and_failed_after_the_set_days(tmp_path):
    config = NodeConfig(allowed_calling_aets=["SENDER"], destination=Destination(stow_url="http://127.0.0.1:9/"),
                        model_dir=tmp_path / "m", spool_dir=tmp_path / "spool", retention_days=7)
    node = Node(config)
    spool = tmp_path / "spool"
    now = time.time()
    ages = {"done/1.1": 8, "done/1.2": 6.9, "failed/1.3": 7.5, "failed/1.4": 1, "incoming/1.5": 30}
    for rel, days in ages.items():
        (spool / rel).mkdir(parents=True)
        (spool / rel / "1.2.3.dcm").write_bytes(b"x")
        os.utime(spool / rel, (now - days * 86400, now - days * 86400))
    node.poll()
    left = sorted(f"{p.parent.name}/{p.name}" for d in ("done", "failed", "incoming") for p in (spool / d).iterdir())
    assert left == ["done/1.2", "failed/1.4", "incoming/1.5"]  # incoming/ is never purged
    node.shutdown()


# ---------------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem")], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def _client_context(cert: Path, key: Path | None) -> tuple[ssl.SSLContext, str]:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    if key is not None:
        context.load_cert_chain(cert, key)
    return context, "localhost"


def test_tls_association_stores_and_plain_tcp_is_refused(make_node, certificate, shared_data_dir, tmp_path):
    cert, key = certificate
    node = make_node(tls=TLSConfig(cert_file=cert, key_file=key, ca_file=cert))  # the CA: the same self-signed cert
    series_uid, datasets = _renamed(shared_data_dir / HIPPO / "Study1")
    assert _send(node.config.port, datasets[:2], tls=_client_context(cert, key)) == [0, 0]
    assert len(list((tmp_path / "spool" / "incoming" / series_uid).glob("*.dcm"))) == 2
    assert _send(node.config.port, datasets[2:3]) is None  # plain TCP
    assert _send(node.config.port, datasets[2:3], tls=_client_context(cert, None)) is None  # TLS, no client cert
    assert len(list((tmp_path / "spool" / "incoming" / series_uid).glob("*.dcm"))) == 2


def test_tls_config_with_a_bad_key_is_one_error(certificate, tmp_path):
    from medseg.errors import MedsegError

    cert, _ = certificate
    (tmp_path / "key.pem").write_text("not a key")
    with pytest.raises(MedsegError, match="cannot load the TLS certificate"):
        TLSConfig(cert_file=cert, key_file=tmp_path / "key.pem").server_context()


# ---------------------------------------------------------------------------------------- completeness, STOW-RS


def test_series_is_not_taken_while_an_association_that_carried_it_is_open(make_node, tiny_model, shared_data_dir,
                                                                          tmp_path):
    stow = StowServer(200)
    try:
        node = make_node(model_dir=tiny_model, idle_timeout_s=0.5, destination=Destination(stow_url=stow.url))
        spool = tmp_path / "spool"
        series_uid, datasets = _renamed(shared_data_dir / HIPPO / "Study1")
        datasets.sort(key=_position)  # spatial order: the one held back to the end is an edge slice
        slow = Sender(node.config.port, datasets)  # sends one instance, then pauses
        assert slow.store(datasets[:1]) == [0]
        assert _send(node.config.port, datasets[1:-6]) == [0] * (len(datasets) - 7)  # released
        time.sleep(4 * node.config.idle_timeout_s)  # the slow sender pauses well past idle_timeout_s
        assert (spool / "incoming" / series_uid).is_dir() and not (spool / "processing" / series_uid).exists()
        assert not stow.posts
        assert slow.store(datasets[-6:-1]) == [0] * 5
        slow.release()
        _wait(lambda: (spool / "done" / series_uid).is_dir(), 120, "the series to be delivered")
        assert len(list((spool / "done" / series_uid).glob("*.dcm"))) == len(datasets) - 1 and len(stow.posts) == 1
        # the last instance, late: a new round of the series, with the instances of the first one
        assert _send(node.config.port, datasets[-1:]) == [0]
        _wait(lambda: len(stow.posts) == 2 and (spool / "done" / series_uid).is_dir()
              and not (spool / "processing" / series_uid).exists(), 120, "the second round")
        assert len(list((spool / "done" / series_uid).glob("*.dcm"))) == len(datasets)
    finally:
        stow.close()


def test_stow_rs_202_is_a_failure_and_retention_0_deletes_after_delivery(make_node, tiny_model, shared_data_dir,
                                                                         tmp_path, caplog):
    caplog.set_level(logging.INFO)
    spool = tmp_path / "spool"
    stow = StowServer(202)
    try:
        node = make_node(model_dir=tiny_model, idle_timeout_s=0.5, destination=Destination(stow_url=stow.url),
                         retention_days=0)
        series_uid, datasets = _renamed(shared_data_dir / HIPPO / "Study2")
        assert _send(node.config.port, datasets) == [0] * len(datasets)
        _wait(lambda: (spool / "failed" / series_uid / "error.txt").exists(), 120, "the series to fail")
        assert len(stow.posts) == 1 and b"application/dicom" in stow.posts[0]
        assert "HTTP 202" in (spool / "failed" / series_uid / "error.txt").read_text()
        assert (f"series {tag(series_uid)} failed: DeliveryError: STOW-RS to {stow.url} answered HTTP 202: "
                "the SEG was not stored (FailureReason 0xA700)") in caplog.text
        assert not (spool / "done" / series_uid).exists()

        stow.status = 200  # the same node, a PACS that stores it: delivered, then nothing kept
        series_uid, datasets = _renamed(shared_data_dir / HIPPO / "Study2")
        assert _send(node.config.port, datasets) == [0] * len(datasets)
        _wait(lambda: f"series {tag(series_uid)}: 1 SEG(s) delivered" in caplog.text, 120, "the delivery")
        _wait(lambda: not any((spool / d / series_uid).exists() for d in ("incoming", "processing", "done")), 10,
              "the delivered series to be deleted")
        assert len(stow.posts) == 2
    finally:
        stow.close()
