"""Image readers and writers (``medseg.io.image``): geometry always travels with the array.

Oracles: nibabel and SimpleITK themselves. Arrays are ``(C, X, Y, Z)`` in the file's voxel order;
the affine is voxel index → RAS+ world, so an ITK (LPS+) point maps to it with x and y negated.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from helpers import listing, truncate_file, write_nifti

from medseg.errors import DatasetError
from medseg.io.image import Geometry, read_image, write_image

SPACING = (0.7, 0.8, 2.5)
ORIGIN = (10.5, -20.25, 30.0)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


DIRECTION = _rotation(0.3, -0.2, 0.5)


def _oblique_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = DIRECTION @ np.diag(SPACING)
    affine[:3, 3] = ORIGIN
    return affine


def _itk_image(rng: np.random.Generator) -> sitk.Image:
    zyx = rng.integers(-1000, 1000, (6, 7, 8)).astype(np.int16)  # X=8, Y=7, Z=6
    img = sitk.GetImageFromArray(zyx)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(tuple(DIRECTION.ravel()))
    return img


# --- NIfTI ------------------------------------------------------------------------------------------


def test_nifti_round_trip_keeps_shape_affine_zooms_dtype_and_codes(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 500, (9, 8, 7)).astype(np.int16)
    src = nib.Nifti1Image(data, _oblique_affine())
    src.set_data_dtype(np.int16)
    src.set_qform(_oblique_affine(), code=1)
    src.set_sform(_oblique_affine(), code=2)
    nib.save(src, str(tmp_path / "in.nii.gz"))

    array, geometry = read_image(tmp_path / "in.nii.gz")
    assert array.shape == (1, 9, 8, 7)
    assert array.dtype == np.int16
    assert geometry.shape == (9, 8, 7)
    assert geometry.spacing == pytest.approx(SPACING)
    assert np.allclose(geometry.affine, _oblique_affine(), atol=1e-5)

    write_image(tmp_path / "out.nii.gz", array, geometry)
    out = nib.load(str(tmp_path / "out.nii.gz"))
    assert out.shape == (9, 8, 7)
    assert out.get_data_dtype() == np.int16
    assert np.array_equal(np.asanyarray(out.dataobj), data)
    assert np.allclose(out.affine, _oblique_affine(), atol=1e-5)
    assert np.allclose(out.header.get_zooms(), SPACING, atol=1e-6)
    assert int(out.header["qform_code"]) == 1
    assert int(out.header["sform_code"]) == 2
    assert np.allclose(out.get_qform(), _oblique_affine(), atol=1e-5)


def test_label_written_with_a_scaled_images_geometry_is_not_rescaled(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    src = nib.Nifti1Image(data, np.eye(4))
    src.header.set_slope_inter(2.0, 10.0)
    nib.save(src, str(tmp_path / "scaled.nii.gz"))
    image, geometry = read_image(tmp_path / "scaled.nii.gz")
    assert image[0, 0, 0, 1] == pytest.approx(12.0)  # the reader applies the scaling
    label = (np.arange(4 * 5 * 6) % 3).reshape(4, 5, 6).astype(np.uint8)
    write_image(tmp_path / "label.nii.gz", label, geometry)
    back, _ = read_image(tmp_path / "label.nii.gz")
    assert np.array_equal(back[0], label)


def test_write_image_casts_to_the_requested_dtype(tmp_path: Path) -> None:
    geometry = Geometry((3, 4, 5), (1.0, 1.0, 1.0), np.eye(4))
    write_image(tmp_path / "x.nii.gz", np.full((3, 4, 5), 2.0), geometry, dtype=np.uint8)
    array, _ = read_image(tmp_path / "x.nii.gz")
    assert array.dtype == np.uint8
    assert (array == 2).all()


def test_4d_nifti_is_read_channels_first(tmp_path: Path) -> None:
    data = np.random.default_rng(1).normal(size=(5, 6, 7, 3)).astype(np.float32)
    write_nifti(tmp_path / "multi.nii.gz", data, spacing=(1.0, 2.0, 3.0))
    array, geometry = read_image(tmp_path / "multi.nii.gz")
    assert array.shape == (3, 5, 6, 7)
    assert geometry.shape == (5, 6, 7)
    assert geometry.spacing == pytest.approx((1.0, 2.0, 3.0))
    for c in range(3):
        assert np.array_equal(array[c], data[..., c])
    write_image(tmp_path / "back.nii.gz", array, geometry)
    assert np.array_equal(np.asanyarray(nib.load(str(tmp_path / "back.nii.gz")).dataobj), data)


def test_2d_nifti_gets_a_singleton_z_axis(tmp_path: Path) -> None:
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "flat.nii.gz"))
    array, geometry = read_image(tmp_path / "flat.nii.gz")
    assert array.shape == (1, 3, 4, 1)
    assert geometry.shape == (3, 4, 1)


# --- NRRD / MHA (SimpleITK, LPS+) ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_round_trip_keeps_spacing_origin_direction_and_voxels(tmp_path: Path, suffix: str) -> None:
    src = _itk_image(np.random.default_rng(2))
    sitk.WriteImage(src, str(tmp_path / f"in{suffix}"))
    array, geometry = read_image(tmp_path / f"in{suffix}")
    assert array.shape == (1, 8, 7, 6)
    assert np.array_equal(array[0], sitk.GetArrayFromImage(src).transpose(2, 1, 0))
    assert geometry.spacing == pytest.approx(SPACING)

    write_image(tmp_path / f"out{suffix}", array, geometry)
    out = sitk.ReadImage(str(tmp_path / f"out{suffix}"))
    assert out.GetSize() == src.GetSize()
    assert np.allclose(out.GetSpacing(), SPACING, atol=1e-6)
    assert np.allclose(out.GetOrigin(), ORIGIN, atol=1e-6)
    assert np.allclose(out.GetDirection(), DIRECTION.ravel(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(src))


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_geometry_maps_voxels_to_the_same_world_points_in_ras(tmp_path: Path, suffix: str) -> None:
    src = _itk_image(np.random.default_rng(3))
    sitk.WriteImage(src, str(tmp_path / f"in{suffix}"))
    _, geometry = read_image(tmp_path / f"in{suffix}")
    for index in [(0, 0, 0), (7, 0, 0), (0, 6, 0), (0, 0, 5), (3, 4, 2)]:
        lps = np.array(src.TransformIndexToPhysicalPoint(index))
        ras = geometry.affine @ np.array([*index, 1.0])
        assert np.allclose(ras[:3], lps * [-1, -1, 1], atol=1e-6)


def test_itk_image_written_as_nifti_keeps_its_world_geometry(tmp_path: Path) -> None:
    sitk.WriteImage(_itk_image(np.random.default_rng(4)), str(tmp_path / "in.nrrd"))
    array, geometry = read_image(tmp_path / "in.nrrd")
    write_image(tmp_path / "out.nii.gz", array, geometry)
    back, back_geometry = read_image(tmp_path / "out.nii.gz")
    assert np.array_equal(back, array)
    assert back_geometry.matches(geometry, tol=1e-5) is None


def test_nifti_written_as_nrrd_keeps_its_world_geometry(tmp_path: Path) -> None:
    data = np.random.default_rng(5).normal(size=(9, 8, 7)).astype(np.float32)
    write_nifti(tmp_path / "in.nii.gz", data, affine=_oblique_affine())
    array, geometry = read_image(tmp_path / "in.nii.gz")
    write_image(tmp_path / "out.nrrd", array, geometry)
    back, back_geometry = read_image(tmp_path / "out.nrrd")
    assert np.array_equal(back, array)
    assert np.allclose(back_geometry.affine, geometry.affine, atol=1e-5)


# --- errors and atomic writes --------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_truncated_file_is_a_dataset_error_naming_the_file(tmp_path: Path, suffix: str) -> None:
    data = np.random.default_rng(6).normal(size=(32, 32, 32)).astype(np.float32)
    path = tmp_path / f"broken{suffix}"
    write_image(path, data, Geometry((32, 32, 32), (1.0, 1.0, 1.0), np.eye(4)))
    truncate_file(path, 0.5)
    with pytest.raises(DatasetError, match="truncated or corrupt") as exc:
        read_image(path)
    assert str(path) in str(exc.value)


def test_missing_file_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="file not found") as exc:
        read_image(tmp_path / "nope.nii.gz")
    assert str(tmp_path / "nope.nii.gz") in str(exc.value)


def test_unsupported_suffix_is_a_dataset_error_listing_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(DatasetError, match=r"\.nii\.gz.*\.nrrd"):
        read_image(tmp_path / "image.png")
    with pytest.raises(DatasetError, match="unsupported output type"):
        write_image(tmp_path / "out.png", np.zeros((2, 2, 2)), Geometry((2, 2, 2), (1.0,) * 3, np.eye(4)))


def test_write_image_creates_parent_folders_and_leaves_no_temp_files(tmp_path: Path) -> None:
    geometry = Geometry((3, 4, 5), (1.0, 1.0, 1.0), np.eye(4))
    for name in ("a/b/c/out.nii.gz", "a/b/c/out.nrrd", "a/b/c/out.mha"):
        write_image(tmp_path / name, np.ones((3, 4, 5), dtype=np.float32), geometry)
    assert listing(tmp_path) == ["a", "a/b", "a/b/c", "a/b/c/out.mha", "a/b/c/out.nii.gz", "a/b/c/out.nrrd"]


def test_written_file_permissions_follow_the_umask(tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    write_image(tmp_path / "out.nii.gz", np.ones((2, 2, 2)), Geometry((2, 2, 2), (1.0,) * 3, np.eye(4)))
    assert (tmp_path / "out.nii.gz").stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_leaves_neither_output_nor_temp_file(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_image(tmp_path / "out.nii.gz", np.ones((2, 2, 2)), Geometry((2, 2, 2), (1.0,) * 3, np.eye(4)))
    assert listing(tmp_path) == []


def test_shape_mismatch_with_geometry_is_a_dataset_error_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not match geometry") as exc:
        write_image(tmp_path / "out.nii.gz", np.ones((2, 2, 3)), Geometry((2, 2, 2), (1.0,) * 3, np.eye(4)))
    assert str(tmp_path / "out.nii.gz") in str(exc.value)
    assert listing(tmp_path) == []
