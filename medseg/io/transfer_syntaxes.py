"""The DICOM transfer syntaxes (and multi-frame SOP classes) medseg reads: the one list that the series checks
(:func:`medseg.io.dicom.check_series`) and the DICOM node (``medseg serve``, which accepts exactly
these) share. Named by pydicom's UID constants.

Pixels are decoded by SimpleITK's GDCM: uncompressed (including deflated and the retired big
endian), JPEG (baseline, extended, lossless processes 14 and 14 SV1), JPEG-LS and JPEG 2000
(single-component part 1) and RLE. Anything else (MPEG, HTJ2K, JPEG 2000 part 2 multi-component,
JPIP …) needs a decoder GDCM does not have.
"""

from __future__ import annotations

from pydicom import uid

DECODABLE_TRANSFER_SYNTAXES: tuple[uid.UID, ...] = (
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
)

# Multi-frame image objects read as one volume (one file per series, frames placed by the
# functional groups): Enhanced and Legacy Converted Enhanced MR and CT Image Storage.
ENHANCED_VOLUME_SOP_CLASSES: tuple[uid.UID, ...] = (
    uid.EnhancedMRImageStorage,
    uid.EnhancedCTImageStorage,
    uid.LegacyConvertedEnhancedMRImageStorage,
    uid.LegacyConvertedEnhancedCTImageStorage,
)
