"""Model archives: what prediction needs from a trained work directory, in one zip file to share.

``export_model`` packs ``plans.json``, ``fingerprint.json``, ``model.json`` (when it describes
exactly what is packed), the final checkpoint of each chosen configuration and fold (and of a
cascade's previous stage), and ``manifest.json``: the medseg version, the configurations and folds,
and the SHA-256 and size of every other file. ``import_model`` unpacks an archive into a new work
directory, refusing (one line, nothing written) an entry with an absolute path, a ``..`` component,
a link or other non-regular file, a file the manifest does not list or whose hash differs, and a
checkpoint that does not load with ``torch.load(weights_only=True)``. ``cached_import`` gives
``predict -m model.zip`` a work directory under ``$MEDSEG_HOME/models`` keyed by the archive's hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from medseg import __version__
from medseg.errors import CheckpointError, MedsegError
from medseg.networks.checkpoint import load_checkpoint
from medseg.plans.schema import ChosenModel, Plans
from medseg.utils import atomic_path, file_sha256
from medseg.workdir import Fold, WorkDir, medseg_home

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ARCHIVE_VERSION = 1
MAX_MEMBER_BYTES = 8 << 30  # a member larger than this (as declared by the manifest) is refused


def _stages(plans: Plans, key: str) -> list[str]:
    """``key`` and the previous stages a cascade runs first."""
    out = [key]
    while plans.config(out[-1]).previous_stage:
        out.append(plans.config(plans.config(out[-1]).previous_stage).key)
    return out


def export_model(workdir: Path | WorkDir, output: Path, configs: list[str] | None = None,
                 folds: list[Fold] | None = None) -> dict:
    """Pack ``workdir``'s model into the zip ``output`` (written atomically); the manifest.

    ``configs``/``folds``: as given, else ``model.json``'s members and folds, else every trained
    configuration with all its finished folds. A cascade's previous stage goes in with all its
    finished folds."""
    work = WorkDir.of(workdir)
    plans = Plans.load(work.plans)
    chosen = ChosenModel.load(work.model) if work.model.exists() else None
    if configs:
        keys = [plans.config(c).key for c in configs]
    elif chosen is not None:
        keys = list(chosen.members)
    else:
        keys = [k for k in plans.configurations if work.trained_folds(k)]
    if not keys:
        raise CheckpointError(f"{work}: no trained configuration to export")
    packed: dict[str, list[Fold]] = {}
    for key in keys:
        wanted = (folds if folds is not None
                  else list(chosen.folds.get(key, [])) if chosen is not None and not configs
                  else work.trained_folds(key))
        for stage in _stages(plans, key):
            stage_folds = wanted if stage == key else work.trained_folds(stage)
            for fold in stage_folds:
                if not work.run(stage, fold).final.exists():
                    raise CheckpointError(f"{work.run(stage, fold).final}: not trained; train fold {fold} of {stage} "
                                          "first or leave it out (--folds)")
            packed.setdefault(stage, [])
            packed[stage] += [f for f in stage_folds if f not in packed[stage]]
        if not packed[key]:
            raise CheckpointError(f"{work}: {key} has no finished fold to export")
    def name(path: Path) -> str:  # the member name: the file's place in the work directory
        return path.relative_to(work.root).as_posix()

    files = {name(work.plans): work.plans}
    if work.fingerprint.exists():
        files[name(work.fingerprint)] = work.fingerprint
    if chosen is not None and all(chosen.folds.get(m) and set(chosen.folds[m]) <= set(packed.get(m, []))
                                  for m in chosen.members):
        files[name(work.model)] = work.model
    elif chosen is not None:
        log.info("%s describes other configurations or folds than those exported; it is left out", work.model)
    for key, key_folds in packed.items():
        for fold in key_folds:
            run = work.run(key, fold)
            files[name(run.final)] = run.final
    manifest = {"archive_version": ARCHIVE_VERSION, "medseg_version": __version__,
                "dataset": plans.dataset_name, "configs": {k: [str(f) for f in v] for k, v in packed.items()},
                "files": {name: {"sha256": file_sha256(path), "size": path.stat().st_size}
                          for name, path in files.items()}}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MANIFEST, json.dumps(manifest, indent=1))
        for name, path in files.items():
            zf.write(path, name)
    log.info("exported %s (%s) to %s", ", ".join(f"{k} folds {v}" for k, v in manifest["configs"].items()),
             f"{len(files)} files", output)
    return manifest


def _safe_name(name: str, archive: Path) -> PurePosixPath:
    path = PurePosixPath(name)
    if name.startswith("/") or "\\" in name or (path.parts and ":" in path.parts[0]):
        raise MedsegError(f"{archive}: entry {name!r} has an absolute path; refused")
    if any(part == ".." for part in path.parts):
        raise MedsegError(f"{archive}: entry {name!r} leads outside the archive ('..'); refused")
    return path


def _check_entries(zf: zipfile.ZipFile, archive: Path) -> dict:
    """The manifest, once every entry's name and type is safe and the entries are exactly the manifest's."""
    infos = zf.infolist()
    for info in infos:
        _safe_name(info.filename, archive)
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no type recorded (a plain file)
        if info.is_dir():
            raise MedsegError(f"{archive}: entry {info.filename!r} is a folder entry; archives hold files only")
        if kind and kind != stat.S_IFREG:
            raise MedsegError(f"{archive}: entry {info.filename!r} is a link or special file; refused")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise MedsegError(f"{archive}: an entry name appears twice; refused")
    if MANIFEST not in names:
        raise MedsegError(f"{archive}: no {MANIFEST}; not a medseg model archive")
    try:
        manifest = json.loads(zf.read(MANIFEST))
        listed = manifest["files"]
        if not isinstance(listed, dict):
            raise TypeError("files is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise MedsegError(f"{archive}: unreadable {MANIFEST} ({exc})") from None
    if manifest.get("archive_version") != ARCHIVE_VERSION:
        raise MedsegError(f"{archive}: archive version {manifest.get('archive_version')!r}; this medseg reads "
                          f"version {ARCHIVE_VERSION}")
    extra = sorted(set(names) - set(listed) - {MANIFEST})
    if extra:
        raise MedsegError(f"{archive}: entry {extra[0]!r} is not in the manifest; refused")
    missing = sorted(set(listed) - set(names))
    if missing:
        raise MedsegError(f"{archive}: {missing[0]!r} is listed in the manifest but missing")
    for info in infos:
        if info.filename != MANIFEST:
            size = listed[info.filename].get("size")
            if info.file_size != size or info.file_size > MAX_MEMBER_BYTES:
                raise MedsegError(f"{archive}: entry {info.filename!r} is {info.file_size} bytes, the manifest says "
                                  f"{size}; refused")
    plans_name = WorkDir(".").plans.name
    if plans_name not in listed:
        raise MedsegError(f"{archive}: no {plans_name}; not a medseg model archive")
    return manifest


def import_model(archive: Path, output: Path) -> Path:
    """Unpack ``archive`` into the new work directory ``output`` (checked as in the module docstring;
    written into a temporary folder beside it, renamed when complete). Returns ``output``."""
    archive, output = Path(archive), Path(output)
    if output.exists() and any(output.iterdir()):
        raise MedsegError(f"{output}: exists and is not empty; import into a new folder")
    if not zipfile.is_zipfile(archive):
        raise MedsegError(f"{archive}: not a zip archive")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            manifest = _check_entries(zf, archive)
            for name, entry in manifest["files"].items():
                target = tmp.joinpath(*_safe_name(name, archive).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with zf.open(name) as src, target.open("wb") as dst:
                    written = 0
                    while block := src.read(1 << 20):
                        written += len(block)
                        if written > entry["size"]:
                            raise MedsegError(f"{archive}: entry {name!r} is larger than the manifest says; refused")
                        digest.update(block)
                        dst.write(block)
                if digest.hexdigest() != entry.get("sha256"):
                    raise MedsegError(f"{archive}: entry {name!r} does not match its SHA-256 in the manifest; refused")
            (tmp / MANIFEST).write_bytes(zf.read(MANIFEST))
        for name in manifest["files"]:
            if name.endswith(".pt"):  # weights only: a pickle that runs code is refused here
                try:
                    load_checkpoint(tmp / name)
                except CheckpointError:
                    raise MedsegError(f"{archive}: entry {name!r} is not a plain-weights checkpoint "
                                      "(torch.load(weights_only=True) refuses it); refused") from None
        unpacked = WorkDir(tmp)
        Plans.load(unpacked.plans)
        if unpacked.model.exists():
            ChosenModel.load(unpacked.model)
        if output.exists():
            output.rmdir()
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("imported %s into %s (%s)", archive, output,
             ", ".join(f"{k} folds {v}" for k, v in manifest.get("configs", {}).items()))
    return output


def cached_import(archive: Path) -> Path:
    """The work directory of ``archive`` under ``$MEDSEG_HOME/models/`` (imported on first use)."""
    digest = file_sha256(archive)[:16]
    target = medseg_home() / "models" / digest
    if WorkDir(target).plans.exists():
        return target
    return import_model(archive, target)

