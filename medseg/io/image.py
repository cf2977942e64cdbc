"""Image readers and writers. Geometry always travels with the array.

Array convention everywhere in medseg: spatial axes in the file's voxel index order (i, j, k),
as nibabel returns them; images are channel-first ``(C, X, Y, Z)``, label maps ``(X, Y, Z)``.
World coordinates follow NIfTI (RAS+); SimpleITK files (LPS+) are converted on read and write
(:class:`~medseg.io.geometry.Geometry`, :data:`~medseg.io.geometry.LPS_TO_RAS`).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from medseg.errors import DatasetError
from medseg.io.geometry import LPS_TO_RAS, Geometry
from medseg.utils import atomic_path

if TYPE_CHECKING:
    import SimpleITK as sitk

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
# formats whose header names a separate data file (SimpleITK writes `<name>.zraw` / `<name>.raw.gz`)
DETACHED_SUFFIXES = {".mhd": re.compile(rb"^ElementDataFile\s*=\s*(.+?)\s*$", re.M),
                     ".nhdr": re.compile(rb"^data file:\s*(.+?)\s*$", re.M)}


def image_suffix(path: str | Path) -> str:
    """The file's image suffix (``.nii.gz``, ``.nrrd`` …) or ``""`` when it is not an image we read."""
    name = str(path).lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def data_file(path: str | Path) -> Path | None:
    """The separate data file an ``.mhd``/``.nhdr`` header names (None: another format, or a header
    that names none, holds its data itself or cannot be read)."""
    path = Path(path)
    pattern = DETACHED_SUFFIXES.get(image_suffix(path))
    if pattern is None:
        return None
    try:
        with open(path, "rb") as f:
            header = f.read(64 * 1024)
    except OSError:
        return None
    match = pattern.search(header)
    if match is None or match.group(1) in (b"LOCAL", b"LIST"):
        return None
    return path.parent / os.fsdecode(match.group(1))


def read_image(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read any supported image as ``(C, X, Y, Z)`` in its stored dtype plus its geometry.

    A 4D NIfTI (or a vector-valued ITK image) gives C > 1; a 2D image gets a singleton Z axis. A
    folder is read as the one DICOM image series it holds (:func:`medseg.io.dicom.read_series`).
    Raises :class:`DatasetError` naming the file on anything unreadable.
    """
    path = Path(path)
    suffix = image_suffix(path)
    if path.is_dir() and not suffix:  # a dataset case as a folder holding one DICOM series
        from medseg.io.dicom import read_series_folder  # deferred: pydicom, SimpleITK (DICOM only)

        return read_series_folder(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        if suffix in NIFTI_SUFFIXES:
            return _read_nifti(path)
        if suffix in ITK_SUFFIXES:
            return _read_itk(path)
    except DatasetError:
        raise
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError, RuntimeError,
            nib.filebasedimages.ImageFileError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DatasetError(f"{path}: cannot read image ({reason}); the file may be truncated or corrupt") from exc
    raise DatasetError(f"{path}: unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")


def _read_nifti(path: Path) -> tuple[np.ndarray, Geometry]:
    """The header is checked (size, spacing, direction) before any voxel is read; the spacing is
    the affine's (sform, else qform), which must agree with the header's pixdim."""
    img = nib.load(str(path))
    header = img.header
    shape = tuple(int(s) for s in header.get_data_shape())
    if len(shape) > 4:
        raise DatasetError(f"{path}: {len(shape)}D image; expected 2D, 3D or 4D (channels last)")
    spatial = (shape + (1, 1))[:3]
    _check_declared_size(path, spatial, shape[3] if len(shape) == 4 else 1, np.dtype(header.get_data_dtype()))
    affine = np.asarray(img.affine, dtype=float)
    spacing = _check_affine(path, affine)
    pixdim = _raw_pixdim(path)[1:1 + min(3, len(shape))]  # as stored: nibabel's header has them made positive
    if any(v < 0 for v in pixdim):
        raise DatasetError(f"{path}: header pixdim {tuple(pixdim)} holds a negative spacing; NIfTI voxel sizes "
                           "are positive (flips belong in the affine)")
    zooms = [abs(float(z)) for z in header.get_zooms()[:3]] + [1.0] * (3 - min(3, len(shape)))
    if not np.allclose(zooms[:3], spacing, rtol=1e-3, atol=1e-5):
        source = "sform" if int(header["sform_code"]) > 0 else "qform"
        raise DatasetError(f"{path}: header pixdim spacing {_fmt_mm(zooms)} disagrees with the {source} affine's "
                           f"{_fmt_mm(spacing)}; fix the header so that both say the same")
    data = np.asanyarray(img.dataobj)
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim == 3:
        data = data[None]
    elif data.ndim == 4:
        data = np.moveaxis(data, -1, 0)
    geometry = Geometry(tuple(int(s) for s in data.shape[1:]), spacing, affine, header.copy())
    return np.ascontiguousarray(data), geometry


def _raw_pixdim(path: Path) -> tuple[float, ...]:
    """``pixdim[0..7]`` as the NIfTI-1 file stores them (empty for other headers)."""
    with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as f:
        raw = f.read(108)
    for endian in "<>":
        if len(raw) == 108 and struct.unpack(endian + "i", raw[:4])[0] == 348:
            return struct.unpack(endian + "8f", raw[76:108])
    return ()


def _read_itk(path: Path) -> tuple[np.ndarray, Geometry]:
    import SimpleITK as sitk  # deferred: NRRD/MHA only

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()  # the header only: size, spacing and type before any voxel is read
        size = tuple(int(s) for s in reader.GetSize())
        channels = int(reader.GetNumberOfComponents()) * max(1, int(np.prod(size[3:])))
        _check_declared_size(path, (size + (1, 1))[:3], channels, np.dtype(np.float32))
        spacing = np.asarray(reader.GetSpacing(), dtype=float)
        if not np.isfinite(spacing).all() or (spacing <= 1e-6).any():
            raise DatasetError(f"{path}: voxel spacing {_fmt_mm(spacing)} has a zero, negative or undefined axis")
        image = reader.Execute()
    except RuntimeError as exc:  # ITK's own words are on its "ITK ERROR" line, not the first
        itk = [ln.split("): ", 1)[-1] for ln in str(exc).splitlines() if ln.startswith("ITK ERROR")]
        reason = itk[0] if itk else (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DatasetError(f"{path}: cannot read image ({reason}); the file may be truncated or corrupt") from exc
    array, geometry = from_sitk(image, path)
    _check_affine(path, np.asarray(geometry.affine, dtype=float))
    return array, geometry


MAX_SPACING_MM = 1000.0  # a voxel wider than a metre is a header error, not an image


def memory_limit_bytes() -> int:
    """The largest image (as float32, all channels) medseg agrees to read: half this machine's RAM."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2
    except (ValueError, OSError, AttributeError):  # no sysconf: assume 16 GB
        return 8 << 30


def _check_declared_size(path: Path, spatial: tuple[int, ...], channels: int, dtype: np.dtype) -> None:
    """Refuse zero-size axes and images whose float32 copy would not fit :func:`memory_limit_bytes`."""
    if 0 in spatial or channels == 0:
        raise DatasetError(f"{path}: header declares a zero-size dimension (shape {spatial}, {channels} "
                           "channel(s)); the image holds no voxels")
    need = int(np.prod(spatial, dtype=np.float64) * channels * max(4, dtype.itemsize))
    if need > memory_limit_bytes():
        raise DatasetError(f"{path}: header declares shape {spatial} x {channels} channel(s), "
                           f"{need / 2**30:.3g} GB as float32, more than the memory budget of "
                           f"{memory_limit_bytes() / 2**30:.3g} GB (half this machine's RAM); crop or downsample it")


def _check_affine(path: Path, affine: np.ndarray) -> tuple[float, float, float]:
    """The voxel spacing (mm, the affine's column norms) after checking that the affine is finite,
    the spacing positive and plausible and the direction cosines orthonormal."""
    if not np.isfinite(affine).all():
        raise DatasetError(f"{path}: the affine holds NaN/Inf; the header's geometry is broken")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if (spacing <= 1e-6).any():
        raise DatasetError(f"{path}: voxel spacing {_fmt_mm(spacing)} has a zero axis (singular affine)")
    if (spacing > MAX_SPACING_MM).any():
        raise DatasetError(f"{path}: voxel spacing {_fmt_mm(spacing)} is implausible (over {MAX_SPACING_MM:g} mm); "
                           "the header's units or values are wrong")
    direction = affine[:3, :3] / spacing
    deviation = float(np.abs(direction.T @ direction - np.eye(3)).max())
    if deviation > 1e-3:
        raise DatasetError(f"{path}: direction cosines are not orthonormal (the axes are sheared by up to "
                           f"{deviation:.3g}); medseg needs a rotation, fix the affine")
    return tuple(float(s) for s in spacing)


def _fmt_mm(values) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ") mm"


def from_sitk(img: sitk.Image, path: Path | str) -> tuple[np.ndarray, Geometry]:
    """A SimpleITK image (LPS) → ``(C, X, Y, Z)`` array + RAS :class:`Geometry`; ``path`` names it in errors."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)  # (Z, Y, X[, C])
    dim = img.GetDimension()
    if img.GetNumberOfComponentsPerPixel() > 1:
        arr = np.moveaxis(arr, -1, 0)
    else:
        arr = arr[None]
    arr = np.moveaxis(arr, range(1, 1 + dim), range(dim, 0, -1))  # → (C, X, Y[, Z])
    spacing = np.array(img.GetSpacing(), dtype=float)
    origin = np.array(img.GetOrigin(), dtype=float)
    direction = np.array(img.GetDirection(), dtype=float).reshape(dim, dim)
    if dim == 2:
        arr = arr[..., None]
        spacing, origin = np.append(spacing, 1.0), np.append(origin, 0.0)
        d3 = np.eye(3)
        d3[:2, :2] = direction
        direction = d3
    elif dim != 3:
        raise DatasetError(f"{path}: {dim}D image; expected 2D or 3D")
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(spacing)
    lps[:3, 3] = origin
    geometry = Geometry(tuple(int(s) for s in arr.shape[1:]), tuple(float(s) for s in spacing), LPS_TO_RAS @ lps)
    return np.ascontiguousarray(arr), geometry


def write_image(path: str | Path, array: np.ndarray, geometry: Geometry, dtype: np.dtype | type | None = None) -> None:
    """Write ``array`` ((X, Y, Z) or (C, X, Y, Z)) atomically with the given geometry.

    NIfTI outputs reuse the source header when there is one, so shape, affine, qform/sform and
    zooms equal the input's. The file appears only when complete (temp file + rename); an
    ``.mhd``/``.nhdr`` header appears only after its data file is complete (see :func:`_write_detached`).
    """
    path = Path(path)
    suffix = image_suffix(path)
    if not suffix:
        raise DatasetError(f"{path}: unsupported output type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if tuple(array.shape[-3:]) != tuple(geometry.shape):
        raise DatasetError(f"{path}: array shape {array.shape} does not match geometry {geometry.shape}")
    if suffix in DETACHED_SUFFIXES:
        _write_detached(path, array, geometry)
        return
    with atomic_path(path) as tmp:
        if suffix in NIFTI_SUFFIXES:
            data = np.moveaxis(array, 0, -1) if array.ndim == 4 else array
            header = geometry.header.copy() if geometry.header is not None else None
            img = nib.Nifti1Image(data, geometry.affine, header=header)
            img.set_data_dtype(data.dtype)
            if header is not None:
                img.header["scl_slope"], img.header["scl_inter"] = np.nan, np.nan
                img.set_qform(geometry.affine, code=int(header["qform_code"]) or 1)
                img.set_sform(geometry.affine, code=int(header["sform_code"]) or 1)
            nib.save(img, str(tmp))
        else:
            import SimpleITK as sitk

            sitk.WriteImage(_to_sitk(array, geometry), str(tmp), useCompression=True)


def _write_detached(path: Path, array: np.ndarray, geometry: Geometry) -> None:
    """An ``.mhd``/``.nhdr`` header and its data file, written under their final names in a temporary
    folder beside ``path`` (so the header names the data file by its final name), then moved: the data
    file first, the header last, so a header that exists always names complete data."""
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp_", dir=path.parent))
    try:
        sitk.WriteImage(_to_sitk(array, geometry), str(tmp / path.name), useCompression=True)
        data = data_file(tmp / path.name)
        written = sorted(p.name for p in tmp.iterdir())
        if data is None or data.parent != tmp or sorted([path.name, data.name]) != written:
            raise DatasetError(f"{path}: SimpleITK wrote {written} with header data file {data}; expected the header "
                               "and one data file beside it")
        os.replace(data, path.parent / data.name)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    vector = array.ndim == 4
    arr = np.moveaxis(array, 0, -1) if vector else array  # (X, Y, Z[, C])
    arr = np.ascontiguousarray(np.moveaxis(arr, [0, 1, 2], [2, 1, 0]))  # (Z, Y, X[, C])
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr, isVector=vector)
    lps = np.linalg.inv(LPS_TO_RAS) @ np.asarray(geometry.affine, dtype=float)
    spacing = np.asarray(geometry.spacing, dtype=float)
    img.SetSpacing(tuple(spacing.tolist()))
    img.SetOrigin(tuple(lps[:3, 3].tolist()))
    img.SetDirection(tuple((lps[:3, :3] / spacing).ravel().tolist()))
    return img
