"""Image readers and writers. Geometry always travels with the array.

Array convention everywhere in medseg: spatial axes in the file's voxel index order (i, j, k),
as nibabel returns them; images are channel-first ``(C, X, Y, Z)``, label maps ``(X, Y, Z)``.
World coordinates follow NIfTI (RAS+); SimpleITK files (LPS+) are converted on read and write
(:class:`~medseg.io.geometry.Geometry`, :data:`~medseg.io.geometry.LPS_TO_RAS`).
"""

from __future__ import annotations

import gzip
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


def image_suffix(path: str | Path) -> str:
    """The file's image suffix (``.nii.gz``, ``.nrrd`` …) or ``""`` when it is not an image we read."""
    name = str(path).lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


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
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim == 3:
        data = data[None]
    elif data.ndim == 4:
        data = np.moveaxis(data, -1, 0)
    else:
        raise DatasetError(f"{path}: {data.ndim}D image; expected 2D, 3D or 4D (channels last)")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    zooms = zooms + (1.0,) * (3 - len(zooms))
    geometry = Geometry(tuple(int(s) for s in data.shape[1:]), zooms, np.asarray(img.affine, dtype=float),
                        img.header.copy())
    return np.ascontiguousarray(data), geometry


def _read_itk(path: Path) -> tuple[np.ndarray, Geometry]:
    import SimpleITK as sitk  # deferred: NRRD/MHA only

    return from_sitk(sitk.ReadImage(str(path)), path)


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
    zooms equal the input's. The file appears only when complete (temp file + rename).
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
