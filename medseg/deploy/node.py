"""``medseg serve``: a DICOM node next to a PACS.

Storage SCP (pynetdicom) → spool on disk → per series, once complete, ``predict`` → DICOM SEG →
C-STORE to the destination AE (or STOW-RS to a DICOMweb endpoint).

The spool is the source of truth, so a ``kill -9`` at any point loses nothing and processes every
series once:

- ``incoming/<series>/<sop>.dcm``: each instance is written (temp file, fsync, rename:
  :func:`medseg.utils.atomic_write_bytes` with ``durable``) *before* the C-STORE is acknowledged.
  ``incoming/<series>/.released`` marks that an association that sent to the series has ended; a
  series is complete when it is released and nothing arrived for ``idle_timeout_s``.
- ``processing/<series>/``: the series is moved here (one rename) when a worker takes it. The SEG is
  written once to ``processing/<series>/out/`` and then sent; on restart, series left here are
  finished from where they stopped: an existing SEG is sent again with the same SOP Instance UID
  (a PACS stores an instance once), never computed anew.
- ``done/<series>/`` (or ``failed/<series>/`` with ``error.txt``): moved there after delivery.

Logs name series by a short hash of their UID and never print patient names or IDs.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
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
        return config


def tag(uid: str) -> str:
    """What logs call a series: a short hash of its UID."""
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


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

    def ready(self, idle_s: float, aborted_s: float) -> list[str]:
        """Series whose association was released and that were idle for ``idle_s`` since the newest
        instance arrived (``aborted_s`` when the sender aborted instead: it may send them again)."""
        now = time.time()
        out = []
        with self.lock:
            for folder in sorted((self.root / "incoming").iterdir()):
                files = [f for f in folder.iterdir() if f.suffix == ".dcm" and not f.name.startswith(".")]
                if not files:
                    continue
                idle = now - max(f.stat().st_mtime for f in files)
                if ((folder / ".released").exists() and idle >= idle_s) or (
                        (folder / ".aborted").exists() and idle >= aborted_s):
                    out.append(folder.name)
        return out

    def take(self, uid: str) -> Path:
        with self.lock:
            dst = self.root / "processing" / uid
            if dst.exists():  # new instances of a series being processed: keep them for the next round
                raise FileExistsError(uid)
            os.replace(self.root / "incoming" / uid, dst)
        return dst

    def finish(self, folder: Path, state: str) -> None:
        dst = self.root / state / folder.name
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(folder, dst)


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.device = resolve_device(config.device, what="node device")  # a config built in code is checked too
        self.config = config
        self.spool = Spool(config.spool_dir)
        self.pool = ThreadPoolExecutor(max(1, config.concurrency))
        self.busy: set[str] = set()
        self.stop_event = threading.Event()
        self.server = None
        self._assoc_series: dict[int, set[str]] = {}
        self._model = None  # the LoadedModel, loaded on the first series and kept
        self._model_lock = threading.Lock()

    # ------------------------------------------------------------------ receiving

    def _on_store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        series_uid, sop_uid = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        try:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            self.spool.store(series_uid, sop_uid, buf.getvalue())
        except Exception:  # refuse the instance rather than acknowledge what is not on disk
            log.exception("could not spool an instance of series %s", tag(series_uid))
            return 0xA700
        self._assoc_series.setdefault(id(event.assoc), set()).add(series_uid)
        return 0x0000

    def _on_end(self, event) -> None:
        uids = self._assoc_series.pop(id(event.assoc), set())
        aborted = event.event == evt.EVT_ABORTED
        self.spool.released(uids, ".aborted" if aborted else ".released")
        if uids:
            log.info("association from %s %s: %d series", event.assoc.requestor.ae_title,
                     "aborted" if aborted else "released", len(uids))

    def _on_echo(self, event) -> int:
        return 0x0000

    def start(self) -> None:
        ae = storage_ae(self.config.ae_title, self.config.allowed_calling_aets)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_RELEASED, self._on_end), (evt.EVT_ABORTED, self._on_end)]
        self.server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)
        self._recover()
        log.info("medseg node %s listening on %s:%d", self.config.ae_title, self.config.host, self.config.port)

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
        for uid in self.spool.ready(self.config.idle_timeout_s, self.config.aborted_timeout_s):
            if uid in self.busy:
                continue
            try:
                folder = self.spool.take(uid)
            except FileExistsError:
                continue
            self.busy.add(uid)
            self.pool.submit(self._process, folder)

    def _process(self, folder: Path) -> None:
        uid = folder.name
        try:
            out = folder / "out"
            segs = sorted(out.glob("*.dcm")) if out.exists() else []
            if not segs:
                segs = self._predict(folder)
            for seg in segs:
                self._send(seg)
            self.spool.finish(folder, "done")
            log.info("series %s: %d SEG(s) delivered", tag(uid), len(segs))
        except Exception as exc:  # one bad series must not stop the node
            log.error("series %s failed: %s", tag(uid), str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
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
            with urllib.request.urlopen(req, timeout=60) as resp:
                if resp.status not in (200, 202):
                    raise MedsegError(f"STOW-RS to {d.stow_url} answered HTTP {resp.status}")
            return
        ds = pydicom.dcmread(path)
        ae = AE(ae_title=self.config.ae_title)
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title)
        if not assoc.is_established:
            raise MedsegError(f"cannot associate with {d.ae_title}@{d.host}:{d.port}")
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        if not status or status.Status != 0x0000:
            raise MedsegError(f"C-STORE to {d.ae_title} failed (status {getattr(status, 'Status', 'none')})")

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
