"""``medseg serve``: a DICOM node next to a PACS.

Storage SCP (pynetdicom) → spool on disk → per series, once complete, ``predict`` → DICOM SEG →
C-STORE to the destination AE (or STOW-RS to a DICOMweb endpoint).

The spool is the source of truth, so a ``kill -9`` at any point loses nothing and processes every
series once:

- ``incoming/<series>/<sop>.dcm``: each instance is written (temp file, fsync, rename:
  :func:`medseg.utils.atomic_write_bytes` with ``durable``) *before* the C-STORE is acknowledged.
  ``<series>`` and ``<sop>`` are the Series and SOP Instance UIDs, accepted only when they follow
  the DICOM UID grammar (:func:`valid_uid`: digits and dots, so never ``/``, ``..`` or empty);
  anything else is refused (C-STORE status 0x0117 / 0xA900) and nothing is written.
  ``incoming/<series>/.released`` marks that an association that sent to the series has ended; a
  series is complete when no association that carried it is still open, one of them was released
  (or aborted: then ``aborted_timeout_s``) and nothing arrived for ``idle_timeout_s``.
- ``processing/<series>/``: the series is moved here (one rename) when a worker takes it. The SEG is
  written once to ``processing/<series>/out/`` and then sent; on restart, series left here are
  finished from where they stopped: an existing SEG is sent again with the same SOP Instance UID
  (a PACS stores an instance once), never computed anew.
- ``done/<series>/`` (or ``failed/<series>/`` with ``error.txt``): moved there after delivery and
  deleted ``retention_days`` later (0: at once).

Logs name series by a short hash of their UID and never print UIDs, patient names, IDs,
descriptions or dates: error messages of a series are logged with every UID hashed and every
quoted text (descriptions) and date blanked (:func:`redact`); the whole message is in
``failed/<series>/error.txt``, next to the data it describes. What pydicom, pynetdicom and highdicom
log is kept free of identifiers too (:func:`guard_library_logs`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import ssl
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import pydicom
from pydantic import BaseModel, ConfigDict, Field
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification

from medseg.errors import MedsegError
from medseg.inference.predictor import LoadedModel, PredictOptions, predict_folder
from medseg.io.transfer_syntaxes import DECODABLE_TRANSFER_SYNTAXES
from medseg.utils import atomic_write_bytes, load_json_model, resolve_device
from medseg.workdir import WorkDir

log = logging.getLogger(__name__)


class Destination(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ae_title: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    stow_url: str | None = None  # DICOMweb STOW-RS endpoint, e.g. http://pacs:8042/dicom-web/studies


class TLSConfig(BaseModel):
    """DICOM TLS for incoming associations (PS3.15 B.1): the node's certificate chain and key (PEM);
    with ``ca_file``, senders must present a certificate that it signed (mutual TLS)."""

    model_config = ConfigDict(extra="forbid")

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise MedsegError(f"{self.cert_file}: cannot load the TLS certificate and key {self.key_file} ({exc})") from exc
        if self.ca_file is not None:
            try:
                context.load_verify_locations(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise MedsegError(f"{self.ca_file}: cannot load the TLS CA certificates ({exc})") from exc
            context.verify_mode = ssl.CERT_REQUIRED
        return context


class NodeConfig(BaseModel):
    """The one configuration file of ``medseg serve`` (JSON)."""

    model_config = ConfigDict(extra="forbid")

    ae_title: str = "MEDSEG"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aets: list[str] = Field(min_length=1)
    destination: Destination
    model_dir: Path
    spool_dir: Path
    series: str | None = None  # series selector, as `medseg predict --series`
    idle_timeout_s: float = 5.0
    aborted_timeout_s: float = 120.0  # a series whose sender aborted waits this long for a resend
    retention_days: float = Field(7.0, ge=0)  # done/ and failed/ series are deleted this long after; 0: at once
    tls: TLSConfig | None = None  # DICOM TLS for incoming associations; None: plain TCP
    concurrency: int = 1
    device: str = "cpu"  # as `medseg predict --device`: cpu, cuda, cuda:N or auto (checked on load)
    tta: bool | None = None  # mirroring; None: as model.json decided on cross-validation (else on)
    output: Literal["dicom-seg"] = "dicom-seg"

    @classmethod
    def load(cls, path: Path) -> NodeConfig:
        config = load_json_model(cls, path, missing="configuration file not found")
        d = config.destination
        if not d.stow_url and not (d.ae_title and d.port):
            raise MedsegError(f"{path}: destination needs ae_title + port (C-STORE) or stow_url (STOW-RS)")
        plans = WorkDir(config.model_dir).plans
        if not plans.exists():
            raise MedsegError(f"{config.model_dir}: not a trained work directory (no {plans.name})")
        config.device = resolve_device(config.device, what=f"{path}: device")
        if config.tls is not None:
            config.tls.server_context()  # a bad certificate, key or CA file is an error now, not at start
        return config


def tag(uid: str) -> str:
    """What logs call a series: a short hash of its UID."""
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def valid_uid(value: object) -> bool:
    """Whether ``value`` is a DICOM UID (PS3.5 9.1): components of digits separated by ``.``, no
    leading zero in a multi-digit component, 1 to 64 characters. Such a string is safe as a file
    name: it is never empty, absolute, ``.``/``..`` or holds a separator."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID.fullmatch(value) is not None


_UID_TOKEN = re.compile(r"(?<![\w.])\d+(?:\.\d+){2,}(?!\w|\.\d)")
_QUOTED = re.compile(r"\"[^\"\n]*\"|'[^'\n]*'")
_DATE = re.compile(r"(?<!\d)(?:19|20)\d{6}(?!\d)")


def redact(text: str, limit: int = 300) -> str:
    """``text`` (an error message) fit for a log: every UID but the standard's own (``1.2.840.10008.*``:
    SOP classes, transfer syntaxes) replaced by its :func:`tag`, quoted text (series and study
    descriptions, file names) by ``"…"``, DICOM dates (YYYYMMDD) by ``<date>``; first line only,
    at most ``limit`` characters."""
    line = text.splitlines()[0] if text else ""
    line = _QUOTED.sub('"…"', line)
    line = _UID_TOKEN.sub(lambda m: m.group() if m.group().startswith("1.2.840.10008.") else f"#{tag(m.group())}",
                          line)
    line = _DATE.sub("<date>", line)
    return line if len(line) <= limit else line[: limit - 1] + "…"


class _Redact(logging.Filter):
    """Rewrites a library's log record with :func:`redact` (pydicom quotes invalid values, e.g. dates)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage(), limit=1000), None
        return True


def guard_library_logs() -> None:
    """Keep identifiers out of what pydicom, pynetdicom and highdicom log while a node runs:
    pynetdicom's per-message handlers (every SOP Instance UID) off, highdicom's INFO lines (the UID of
    each source image) off unless its logger's level was set explicitly, and every record of these
    libraries :func:`redact`-ed."""
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    if logging.getLogger("highdicom").level == logging.NOTSET:
        logging.getLogger("highdicom").setLevel(logging.WARNING)
    names = ["pydicom", "pynetdicom", "highdicom"] + [
        n for n in list(logging.Logger.manager.loggerDict) if n.startswith(("pydicom.", "pynetdicom.", "highdicom."))]
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Redact) for f in logger.filters):
            logger.addFilter(_Redact())


class DeliveryError(MedsegError):
    """Sending a SEG failed; its message holds only configuration values and status codes."""


# C-STORE failure statuses for an instance whose UIDs could become unsafe file names:
INVALID_SOP_INSTANCE = 0x0117  # PS3.7 C.5.x "Invalid SOP Instance": the UID violates the construction rules
DATASET_MISMATCH = 0xA900  # PS3.4 B.2.3 "Data Set does not match SOP Class": Type 1 Series Instance UID bad
OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3 "Refused: Out of Resources": could not be written to the spool


def storage_ae(ae_title: str, allowed_calling_aets: list[str]) -> AE:
    """The node's pynetdicom ``AE``: Storage SCP for every storage SOP class in the transfer syntaxes
    medseg decodes (:data:`medseg.io.transfer_syntaxes.DECODABLE_TRANSFER_SYNTAXES`, so nothing is
    acknowledged that prediction then cannot read) and Verification (C-ECHO), for the calling AE
    titles given only."""
    ae = AE(ae_title=ae_title)
    ae.require_calling_aet = list(allowed_calling_aets)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, list(DECODABLE_TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification)
    ae.maximum_associations = 32
    ae.network_timeout = ae.dimse_timeout = ae.acse_timeout = 120
    return ae


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for d in ("incoming", "processing", "done", "failed"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def store(self, series_uid: str, sop_uid: str, data: bytes) -> None:
        if not (valid_uid(series_uid) and valid_uid(sop_uid)):  # the receiver checked; this guards the spool
            raise ValueError("not a DICOM UID")
        folder = self.root / "incoming" / series_uid
        with self.lock:
            folder.mkdir(exist_ok=True)
            (folder / ".released").unlink(missing_ok=True)
            (folder / ".aborted").unlink(missing_ok=True)
        atomic_write_bytes(folder / f"{sop_uid}.dcm", data, durable=True)

    def released(self, series_uids: set[str], marker: str = ".released") -> None:
        for uid in series_uids:
            folder = self.root / "incoming" / uid
            if folder.is_dir():
                atomic_write_bytes(folder / marker, b"", durable=True)

    def ready(self, idle_s: float, aborted_s: float, open_series: set[str] = frozenset()) -> list[str]:
        """Series whose association was released and that were idle for ``idle_s`` since the newest
        instance arrived (``aborted_s`` when the sender aborted instead: it may send them again),
        except those that an association still open has carried (``open_series``): that sender may
        only be pausing."""
        now = time.time()
        out = []
        with self.lock:
            for folder in sorted((self.root / "incoming").iterdir()):
                if folder.name in open_series:
                    continue
                files = [f for f in folder.iterdir() if f.suffix == ".dcm" and not f.name.startswith(".")]
                if not files:
                    continue
                idle = now - max(f.stat().st_mtime for f in files)
                if ((folder / ".released").exists() and idle >= idle_s) or (
                        (folder / ".aborted").exists() and idle >= aborted_s):
                    out.append(folder.name)
        return out

    def take(self, uid: str) -> Path:
        """Move a complete series to ``processing/``. Instances that arrived after an earlier round of
        the same series was taken make a new round; the instances of that earlier round still in
        ``done/`` or ``failed/`` join it, so its SEG covers every instance received."""
        with self.lock:
            dst = self.root / "processing" / uid
            if dst.exists():  # new instances of a series being processed: keep them for the next round
                raise FileExistsError(uid)
            os.replace(self.root / "incoming" / uid, dst)
        for state in ("done", "failed"):
            earlier = self.root / state / uid
            for f in sorted(earlier.glob("*.dcm")) if earlier.is_dir() else []:
                if not (dst / f.name).exists():
                    shutil.copy2(f, dst / f.name)
        return dst

    def finish(self, folder: Path, state: str) -> Path:
        dst = self.root / state / folder.name
        for old in (self.root / s / folder.name for s in ("done", "failed")):
            if old.exists():  # an earlier round of the series: its instances are in this one
                shutil.rmtree(old)
        os.replace(folder, dst)
        os.utime(dst)  # retention counts from here
        return dst

    def purge(self, retention_s: float, now: float | None = None) -> int:
        """Delete series in ``done/`` and ``failed/`` finished at least ``retention_s`` ago (the
        folder's mtime, set by :meth:`finish`); returns how many."""
        now = time.time() if now is None else now
        n = 0
        for state in ("done", "failed"):
            for folder in sorted((self.root / state).iterdir()):
                try:
                    if now - folder.stat().st_mtime >= retention_s:
                        shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
                        n += 1
                except FileNotFoundError:
                    pass
        return n


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.device = resolve_device(config.device, what="node device")  # a config built in code is checked too
        self.config = config
        self.spool = Spool(config.spool_dir)
        self.pool = ThreadPoolExecutor(max(1, config.concurrency))
        self.busy: set[str] = set()
        self.stop_event = threading.Event()
        self.server = None
        self._assoc_series: dict[int, set[str]] = {}  # open association → the series it carried
        self._recv_lock = threading.Lock()  # _assoc_series, and choosing series in poll
        self._next_purge = 0.0
        self._model = None  # the LoadedModel, loaded on the first series and kept
        self._model_lock = threading.Lock()

    # ------------------------------------------------------------------ receiving

    def _on_store(self, event) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            series_uid, sop_uid = ds.get("SeriesInstanceUID"), ds.get("SOPInstanceUID")
        except Exception as exc:  # a data set pydicom cannot decode
            log.warning("refused an instance from %s: undecodable data set (%s)", event.assoc.requestor.ae_title,
                        type(exc).__name__)
            return DATASET_MISMATCH
        sop_uid = None if sop_uid is None else str(sop_uid)
        series_uid = None if series_uid is None else str(series_uid)
        if not valid_uid(sop_uid):
            log.warning("refused an instance from %s: its SOP Instance UID is not a DICOM UID",
                        event.assoc.requestor.ae_title)
            return INVALID_SOP_INSTANCE
        if not valid_uid(series_uid):
            log.warning("refused instance %s from %s: its Series Instance UID is not a DICOM UID", tag(sop_uid),
                        event.assoc.requestor.ae_title)
            return DATASET_MISMATCH
        with self._recv_lock:  # before the file appears: poll must not take the series under this sender
            self._assoc_series.setdefault(id(event.assoc), set()).add(series_uid)
        try:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            self.spool.store(series_uid, sop_uid, buf.getvalue())
        except Exception as exc:  # refuse the instance rather than acknowledge what is not on disk
            log.error("could not spool an instance of series %s (%s)", tag(series_uid), type(exc).__name__)
            return OUT_OF_RESOURCES
        return 0x0000

    def _on_end(self, event) -> None:
        with self._recv_lock:
            uids = self._assoc_series.pop(id(event.assoc), set())
        aborted = event.event == evt.EVT_ABORTED
        self.spool.released(uids, ".aborted" if aborted else ".released")
        if uids:
            log.info("association from %s %s: %d series", event.assoc.requestor.ae_title,
                     "aborted" if aborted else "released", len(uids))

    def _on_echo(self, event) -> int:
        return 0x0000

    def start(self) -> None:
        guard_library_logs()
        ae = storage_ae(self.config.ae_title, self.config.allowed_calling_aets)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_RELEASED, self._on_end), (evt.EVT_ABORTED, self._on_end)]
        tls = self.config.tls.server_context() if self.config.tls is not None else None
        self.server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers,
                                      ssl_context=tls)
        self._recover()
        log.info("medseg node %s listening on %s:%d (%s)", self.config.ae_title, self.config.host, self.config.port,
                 "TLS" + (", client certificates required" if self.config.tls.ca_file else "") if tls else "plain TCP")

    def _recover(self) -> None:
        """Series a killed run left in processing/ are finished first (their SEG reused if written)."""
        for folder in sorted((self.spool.root / "processing").iterdir()):
            log.info("resuming series %s left by an earlier run", tag(folder.name))
            self.busy.add(folder.name)
            self.pool.submit(self._process, folder)
        for folder in (self.spool.root / "incoming").iterdir():  # a kill may have come before the release
            if not (folder / ".released").exists() and not (folder / ".aborted").exists():
                self.spool.released({folder.name})

    # ------------------------------------------------------------------ processing

    def poll(self) -> None:
        with self._recv_lock:  # a series chosen here is not being received now (see _on_store)
            open_series = set().union(*self._assoc_series.values())
            for uid in self.spool.ready(self.config.idle_timeout_s, self.config.aborted_timeout_s, open_series):
                if uid in self.busy:
                    continue
                try:
                    folder = self.spool.take(uid)
                except FileExistsError:
                    continue
                self.busy.add(uid)
                self.pool.submit(self._process, folder)
        if time.time() >= self._next_purge:  # a directory scan: once a minute is enough
            self._next_purge = time.time() + 60.0
            if n := self.spool.purge(self.config.retention_days * 86400.0):
                log.info("retention: deleted %d series finished over %g days ago", n, self.config.retention_days)

    def _process(self, folder: Path) -> None:
        uid = folder.name
        try:
            out = folder / "out"
            segs = sorted(out.glob("*.dcm")) if out.exists() else []
            if not segs:
                segs = self._predict(folder)
            for seg in segs:
                self._send(seg)
            done = self.spool.finish(folder, "done")
            log.info("series %s: %d SEG(s) delivered", tag(uid), len(segs))
            if self.config.retention_days == 0:
                shutil.rmtree(done, ignore_errors=True)
        except Exception as exc:  # one bad series must not stop the node
            # a DICOM error names files, UIDs and the series description: logged redacted (error.txt has it all)
            message = str(exc) if isinstance(exc, DeliveryError) else redact(str(exc))
            log.error("series %s failed: %s%s", tag(uid), type(exc).__name__, f": {message}" if message else "")
            try:
                (folder / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
                self.spool.finish(folder, "failed")
            except OSError:
                pass
        finally:
            self.busy.discard(uid)

    def _predict(self, folder: Path) -> list[Path]:
        work = folder / "work"
        if work.exists():
            shutil.rmtree(work)
        options = PredictOptions(output_format="dicom-seg", series=self.config.series, tta=self.config.tta,
                                 overwrite=True)
        written = predict_folder(folder, work, self._loaded_model(), options)
        out = folder / "out"
        os.replace(work, out)  # one rename: the SEGs exist completely or not at all
        return [out / p.name for p in written]

    def _loaded_model(self) -> LoadedModel:
        """The model, read from ``model_dir`` once (threads share it: inference only reads it)."""
        with self._model_lock:
            if self._model is None:
                self._model = LoadedModel.load(self.config.model_dir, device=self.device)
                log.info("model loaded from %s: %s", self.config.model_dir, "+".join(self._model.members))
            return self._model

    def _send(self, path: Path) -> None:
        d = self.config.destination
        if d.stow_url:
            boundary = uuid.uuid4().hex
            body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes()
                    + f"\r\n--{boundary}--\r\n".encode())
            req = urllib.request.Request(d.stow_url, data=body, method="POST", headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": "application/dicom+json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    status, answer = resp.status, resp.read()
            except OSError as exc:  # HTTPError (4xx/5xx: 409 = nothing stored) and network errors
                raise DeliveryError(f"STOW-RS to {d.stow_url} failed: {exc}") from exc
            failed = _stow_failures(answer)
            # 202: "stored some, failed or warned on others" (PS3.18 10.5.3); with one instance per
            # request that is this SEG, so it counts as not delivered (and the series as failed)
            if status != 200 or failed:
                raise DeliveryError(f"STOW-RS to {d.stow_url} answered HTTP {status}: the SEG was not stored"
                                    + (f" (FailureReason {', '.join(failed)})" if failed else ""))
            return
        ds = pydicom.dcmread(path)
        ae = AE(ae_title=self.config.ae_title)
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title)
        if not assoc.is_established:
            raise DeliveryError(f"cannot associate with {d.ae_title}@{d.host}:{d.port}")
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        if not status or status.Status != 0x0000:
            raise DeliveryError(f"C-STORE to {d.ae_title} failed (status {getattr(status, 'Status', 'none')})")

    def serve_forever(self, poll_s: float = 0.5) -> None:
        self.start()
        try:
            while not self.stop_event.wait(poll_s):
                self.poll()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
        self.pool.shutdown(wait=True)


def _stow_failures(answer: bytes) -> list[str]:
    """FailureReason codes (hex) of the FailedSOPSequence (0008,1198) of a STOW-RS answer in DICOM
    JSON; one ``"?"`` for an entry without a reason; none when the answer holds no such sequence."""
    try:
        doc = json.loads(answer) if answer.strip() else {}
    except ValueError:
        return []
    failed = (doc.get("00081198") or {}).get("Value") or [] if isinstance(doc, dict) else []
    out = []
    for item in failed:
        reason = ((item or {}).get("00081197") or {}).get("Value") or ["?"]
        out.append(f"0x{reason[0]:04X}" if isinstance(reason[0], int) else str(reason[0]))
    return out
