"""What a stage's output was made from, as a digest: the files it read (name, size, modification
time) and the settings that shaped it. A stage compares the digest it would record with the one its
output records and redoes the output when they differ (:mod:`medseg.preprocessing.pipeline` per case,
:mod:`medseg.workflow` for the fingerprint).

Files are identified by size and modification time (nanoseconds), not content: it costs a ``stat``
per file instead of reading the dataset, and a copy that does not keep times only redoes work. An edit
that keeps both size and mtime (``touch -r``) is not seen.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from medseg.io.dataset import Case, Dataset
from medseg.io.image import data_file


def _name(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _stat(path: Path, root: Path) -> list:
    try:
        st = path.stat()
    except OSError:
        return [_name(path, root), None, None]  # the reader says what is wrong with it
    return [_name(path, root), st.st_size, st.st_mtime_ns]


def files_signature(paths: Iterable[Path], root: Path) -> list[list]:
    """``[name relative to root, size, mtime_ns]`` of each file: every file under a folder (a DICOM
    series), and the data file an ``.mhd``/``.nhdr`` header names."""
    out = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            out.extend(_stat(Path(d) / f, root) for d, _, files in sorted(os.walk(path)) for f in sorted(files))
            continue
        out.append(_stat(path, root))
        detached = data_file(path)
        if detached is not None:
            out.append(_stat(detached, root))
    return out


def case_signature(case: Case, root: Path) -> list[list]:
    """The files of one case: its images (channel order), then its label."""
    return files_signature([*case.images, *([case.label] if case.label is not None else [])], root)


def digest(obj) -> str:
    """sha256 of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dataset_digest(ds: Dataset, **settings) -> str:
    """The digest of a dataset as a whole (layout, channels, labels, every case's files) and of the
    reading stage's ``settings`` (JSON values: its version, seed …)."""
    return digest({"settings": settings, "layout": ds.layout, "channels": ds.channel_names,
                   "labels": {str(k): v for k, v in sorted(ds.labels.items())},
                   "cases": [[c.case_id, case_signature(c, ds.root)] for c in ds.cases]})
