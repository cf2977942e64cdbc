"""Where the voxels of an array lie in the world: :class:`Geometry` and the LPS ↔ RAS convention.

medseg's world coordinates are NIfTI's RAS+; DICOM and ITK (SimpleITK) use LPS+, which differs by
negating x and y (:data:`LPS_TO_RAS`). The image readers (``medseg.io.image``) and the DICOM reader
(``medseg.io.dicom``) both build their geometries from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import nibabel as nib

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # 4x4: an LPS+ affine → the RAS+ affine of the same grid


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of an array lie in the world.

    ``shape`` is the spatial shape ``(X, Y, Z)``, ``spacing`` the voxel size in mm per array axis,
    ``affine`` the 4x4 voxel-index → RAS+ world matrix. ``header`` keeps the source NIfTI header so
    that outputs written next to a NIfTI input carry the same header (qform/sform codes included).
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    header: nib.Nifti1Header | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "spacing": [float(s) for s in self.spacing],
            "affine": np.asarray(self.affine, dtype=float).tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(tuple(d["shape"]), tuple(d["spacing"]), np.asarray(d["affine"], dtype=float))

    def matches(self, other: Geometry, tol: float = 1e-3) -> str | None:
        """None when both describe the same voxel grid (within ``tol``), else what differs."""
        if tuple(self.shape) != tuple(other.shape):
            return f"shape {tuple(other.shape)} != {tuple(self.shape)}"
        if not np.allclose(self.spacing, other.spacing, rtol=tol, atol=tol):
            return f"spacing {_fmt(other.spacing)} != {_fmt(self.spacing)}"
        if not np.allclose(self.affine, other.affine, rtol=tol, atol=max(tol, 1e-2)):
            return "origin/direction differ"
        return None


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
