"""Property: any geometry survives preprocessing and export.

Random spacing, origin, orthonormal direction, shape, axis order (``transpose_forward``), nonzero
box and file format: write the image and label, read them, crop → transpose → normalise → resample
(:func:`medseg.preprocessing.pipeline.preprocess_image` / ``preprocess_label``), then invert
(``export_probabilities``, the export path of prediction) and write the result next to the input
with :func:`medseg.io.image.write_image`. The written header equals the input's (shape, affine,
qform/sform and pixdim for NIfTI; spacing, origin and direction for NRRD) and, when the target
spacing is the image's own, the label map comes back voxel for voxel.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medseg.io.image import read_image, write_image
from medseg.plans.schema import Configuration, Normalization
from medseg.preprocessing.pipeline import export_probabilities, preprocess_image, preprocess_label

SETTINGS = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def geometries(draw):
    """(shape, affine, transpose_forward, box, suffix, target factor per axis or None)."""
    shape = tuple(draw(st.integers(4, 9)) for _ in range(3))
    spacing = np.array([draw(st.floats(0.3, 5.0)) for _ in range(3)])
    origin = np.array([draw(st.floats(-300.0, 300.0)) for _ in range(3)])
    q, r = np.linalg.qr(np.array([[draw(st.floats(-1.0, 1.0)) for _ in range(3)] for _ in range(3)])
                        + 2.0 * np.eye(3))
    direction = q * np.sign(np.diag(r))  # orthonormal (a rotation or a reflection)
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = origin
    order = draw(st.permutations([0, 1, 2]))
    box = []
    for s in shape:
        start = draw(st.integers(0, s - 2))
        box.append((start, draw(st.integers(start + 2, s))))
    suffix = draw(st.sampled_from([".nii.gz", ".nrrd"]))
    factor = draw(st.one_of(st.none(), st.tuples(*[st.sampled_from([0.5, 1.0, 2.0])] * 3)))
    return shape, affine, list(order), box, suffix, factor


def _config(spacing_t: list[float], order: list[int]) -> Configuration:
    """The fields of a configuration that preprocessing and export read (the rest plan training)."""
    return Configuration.model_construct(name="3d_fullres", spacing=spacing_t, transpose_forward=order,
                                         normalization=[Normalization(scheme="zscore", use_mask=True)])


def _header_fields(path: Path) -> dict:
    header = nib.load(str(path)).header
    return {key: np.asarray(header[key]).tolist() for key in
            ("dim", "pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
             "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z")}


@SETTINGS
@given(geometries(), st.integers(0, 2**31 - 1))
def test_preprocess_then_export_gives_back_the_header_and_the_label_map(geometry, seed) -> None:
    shape, affine, order, box, suffix, factor = geometry
    rng = np.random.default_rng(seed)
    inside = tuple(slice(a, b) for a, b in box)
    image = np.zeros(shape, np.float32)
    image[inside] = rng.uniform(1.0, 100.0, size=image[inside].shape)
    label = np.zeros(shape, np.uint8)
    label[inside] = rng.integers(0, 3, size=label[inside].shape)
    with tempfile.TemporaryDirectory(prefix="h16d_geo_") as tmp:
        img_path, lab_path, out_path = (Path(tmp) / f"{n}{suffix}" for n in ("image", "label", "export"))
        if suffix == ".nii.gz":
            for path, array in ((img_path, image), (lab_path, label)):
                img = nib.Nifti1Image(array, affine)
                img.set_qform(affine, code=1)
                img.set_sform(affine, code=2)
                nib.save(img, str(path))
        else:
            from medseg.io.geometry import Geometry

            geo = Geometry(shape, tuple(np.linalg.norm(affine[:3, :3], axis=0)), affine)
            write_image(img_path, image, geo)
            write_image(lab_path, label, geo)
        data, geo_in = read_image(img_path)
        seg_in, _ = read_image(lab_path)
        np.testing.assert_allclose(geo_in.affine, affine, atol=1e-4)
        spacing_t = [geo_in.spacing[t] for t in order]
        target = spacing_t if factor is None else [s * f for s, f in zip(spacing_t, factor, strict=True)]
        config = _config(target, order)

        _, props = preprocess_image(data, geo_in, config)
        seg = preprocess_label(seg_in[0], props, config, [0, 1, 2])
        probs = (seg[None] == np.arange(3).reshape(3, 1, 1, 1)).astype(np.float32)
        exported = export_probabilities(probs, props, config)
        write_image(out_path, exported, props.geometry)

        back, geo_out = read_image(out_path)
        assert back.shape[1:] == shape
        assert geo_out.matches(geo_in, tol=1e-6) is None
        if suffix == ".nii.gz":  # the very header of the input
            np.testing.assert_array_equal(geo_out.affine, geo_in.affine)
            written, source = _header_fields(out_path), _header_fields(lab_path)
            # write_image re-derives the qform (quaternion, pixdim) from the float32 sform it reads back:
            # equal to one float32 step (1e-16 in a quaternion, 1 ulp in pixdim); all else is identical
            np.testing.assert_allclose([written.pop(k) for k in ("quatern_b", "quatern_c", "quatern_d")],
                                       [source.pop(k) for k in ("quatern_b", "quatern_c", "quatern_d")], atol=1e-7)
            np.testing.assert_allclose(written.pop("pixdim"), source.pop("pixdim"), rtol=3e-7, atol=0)
            assert written == source
        else:
            np.testing.assert_allclose(geo_out.affine, geo_in.affine, rtol=0, atol=1e-9)
        assert set(np.unique(back)) <= {0, 1, 2}
        assert not back[0][~_mask(shape, box)].any(), "nothing outside the nonzero box"
        if factor is None:
            np.testing.assert_array_equal(back[0], label)


def _mask(shape: tuple[int, ...], box: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in box)] = True
    return mask
