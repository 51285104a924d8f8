"""NIfTI (nibabel) -> the uint8 RGB picture, by the rules below and those of
`medical_image` (intensity rule, window order, presets).

The volume is reoriented to the closest canonical RAS+ axes; dimensions beyond three take
index 0 (the first volume). The slice is `slice_index` (default the middle, n // 2) along
`axis` (default -1: axial; 0 sagittal, 1 coronal). Values include scl_slope / scl_inter.
The file's own window is the header's cal_min..cal_max when cal_max > cal_min. The 2-D
slice s[u, v] is shown with rows along v from high to low and columns along u:
picture = s.T[::-1] (axial: the patient's anterior at the top and right on the right,
the neurological convention).
"""

from __future__ import annotations

import gzip

import numpy as np

from exgra_jax.data.medical_image import (
    NIFTI_SUFFIXES,
    MedicalImageOptions,
    grey_to_rgb,
    pick_index,
    scale_to_uint8,
)


def _nifti_image(src):
    import nibabel as nib

    if isinstance(src, str) and src.lower().endswith(NIFTI_SUFFIXES):
        return nib.load(src)
    if isinstance(src, str):
        with open(src, "rb") as f:
            src = f.read()
    if src[:2] == b"\x1f\x8b":
        src = gzip.decompress(src)
    header_size = int.from_bytes(src[:4], "little")
    if header_size not in (348, 540):
        header_size = int.from_bytes(src[:4], "big")
    image_class = nib.Nifti2Image if header_size == 540 else nib.Nifti1Image
    return image_class.from_bytes(src)


def decode_nifti(src, options: MedicalImageOptions) -> np.ndarray:
    """A NIfTI path or bytes -> uint8 [H, W, 3] by the rules in the module docstring."""
    import nibabel as nib

    try:
        image = nib.as_closest_canonical(_nifti_image(src))
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError,
            EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"not a readable NIfTI file: {e}") from e
    shape = image.shape
    if len(shape) < 2 or any(n == 0 for n in shape):
        raise ValueError(f"NIfTI data of shape {shape} holds no 2-D image")
    if image.get_data_dtype().fields is not None or image.get_data_dtype().kind == "c":
        raise ValueError(f"NIfTI data type {image.get_data_dtype()} (RGB or complex) is not "
                         "supported; convert it to a scalar volume")
    index: list = [slice(None)] * min(len(shape), 3) + [0] * (len(shape) - 3)
    if len(shape) >= 3:
        axis = options.axis % 3
        index[axis] = pick_index(options.slice_index, shape[axis], "NIfTI slice",
                                 f" along axis {axis}")
    plane = np.asarray(image.dataobj[tuple(index)], np.float64)  # scl_slope/inter applied
    cal_min, cal_max = (float(image.header[k]) for k in ("cal_min", "cal_max"))

    def file_window(values):
        return scale_to_uint8(values, cal_min, cal_max)

    return grey_to_rgb(plane.T[::-1], options, file_window if cal_max > cal_min else None)
