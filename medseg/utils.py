"""Small shared helpers: atomic writes, registry lookups with suggestions, seeding, devices."""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from medseg.errors import MedsegError

_UMASK = os.umask(0)
os.umask(_UMASK)

# the name of the label that marks unannotated voxels (nnU-Net v2's convention), in dataset.json
IGNORE_LABEL_NAME = "ignore"


@contextmanager
def atomic_path(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """A temporary file next to ``path`` (same suffixes, so writers that choose the format by
    extension work) that replaces ``path`` only when the block completes; removed on failure.
    ``durable``: the file's data and then the rename are flushed to disk (``fsync`` of the file and
    of its folder) before returning, so the file survives a power loss once this returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix="".join(path.suffixes), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        if durable:
            _fsync(tmp, os.O_WRONLY)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent, os.O_RDONLY)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path: str | Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = False) -> None:
    """Write ``data`` to ``path`` so that the file appears only when complete (temp file + rename);
    ``durable`` as in :func:`atomic_path`."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)


def atomic_save_npy(path: str | Path, array) -> None:
    """``numpy.save`` of ``array`` to ``path``, atomically."""
    import numpy as np  # deferred: 0.2 s CPU that `medseg --help` and `medseg check` would pay (utils loads first)

    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if type(o).__module__ == "numpy" and hasattr(o, "tolist"):  # numpy scalars and arrays, without importing numpy
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_json_model(cls, path: str | Path, *, missing: str = "file not found", schema_version: int | None = None,
                    error: type[MedsegError] = MedsegError):
    """Read ``path`` into the pydantic model ``cls``; any problem (missing file, invalid JSON, wrong
    ``schema_version``, a field that does not validate) becomes one ``error`` line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if schema_version is not None and raw.get("schema_version") != schema_version:
        raise error(f"{path}: schema_version {raw.get('schema_version')} is not supported "
                    f"(this medseg reads {schema_version})")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise error(f"{path}: {where + ': ' if where else ''}{err['msg']}") from exc


def look_up(name: str, options: Iterable[str], what: str) -> str:
    """Return ``name`` if it is one of ``options``; else raise with a 'did you mean' hint."""
    options = list(options)
    if name in options:
        return name
    close = difflib.get_close_matches(name, options, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise MedsegError(f"unknown {what} {name!r}{hint} Available: {', '.join(options)}")


def resolve_device(device: str | None, *, what: str = "--device") -> str:
    """'cuda' when available unless told otherwise; 'cpu' else (``cpu`` without importing torch).
    ``device``: None or ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N below the number of CUDA devices).
    ``what`` names the setting in the one-line MedsegError (``--device``, or a config file's field)."""
    if device == "cpu":
        return device
    if device not in (None, "auto") and re.fullmatch(r"cuda(:\d+)?", device) is None:
        raise MedsegError(f"{what} {device}: expected cpu, cuda or cuda:N (or auto)")
    import torch  # deferred: ~2 s on 2 cores, which `--device cpu` and torch-free commands never pay

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise MedsegError(f"{what} {device}: CUDA is not available on this machine")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise MedsegError(f"{what} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 hex digest of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
