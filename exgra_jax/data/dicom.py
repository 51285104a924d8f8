"""DICOM (pydicom) -> the uint8 RGB picture, by the rules below and those of
`medical_image` (intensity rule, window order, presets).

For the chosen frame (`frame`; default the middle one, n // 2):
1. Modality values: the Modality LUT Sequence if present, else
   RescaleSlope * stored + RescaleIntercept (per-frame or shared functional groups of
   enhanced multi-frame files first, then the top-level attributes; default 1 and 0).
2. The window (grey images): the file's own is the first WindowCenter / WindowWidth
   (per-frame, shared, top level) with its VOILUTFunction (LINEAR, LINEAR_EXACT, SIGMOID).
3. MONOCHROME1 (white is low) is inverted after windowing: 255 - grey.
4. Colour files: RGB and YBR are read as RGB (pydicom converts YBR); PALETTE COLOR goes
   through its lookup tables. Samples deeper than 8 bits are scaled by their bit depth
   (x * 255 / (2**bits - 1), rounded half up), not stretched, to keep the colours.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from exgra_jax.data.medical_image import (
    FileWindow,
    MedicalImageOptions,
    apply_center_width,
    grey_to_rgb,
    pick_index,
    scale_to_uint8,
)


def _frame_item(ds, frame: int, sequence: str, macro: str):
    """The item of functional-group macro `macro` for `frame` (per-frame, then shared)."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame),
                          ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        inner = items[index].get(macro) if items is not None and len(items) > index else None
        if inner and sequence in inner[0]:
            return inner[0]
    return None


def _modality_values(ds, stored: np.ndarray, frame: int) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(stored, ds), np.float64)
    item = _frame_item(ds, frame, "RescaleSlope", "PixelValueTransformationSequence") or ds
    slope = float(item.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(item.get("RescaleIntercept", 0.0) or 0.0)
    return stored.astype(np.float64) * slope + intercept


def _first(value) -> float:
    """The first of a possibly multi-valued DICOM number (pydicom's MultiValue)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0]
    return float(value)


def _file_window(ds, frame: int) -> FileWindow | None:
    item = _frame_item(ds, frame, "WindowCenter", "FrameVOILUTSequence")
    item = item if item is not None else ds
    if "WindowCenter" not in item or "WindowWidth" not in item:
        return None
    function = str(item.get("VOILUTFunction", "LINEAR") or "LINEAR")
    center, width = _first(item.WindowCenter), _first(item.WindowWidth)
    if width <= 0 or (function.upper() == "LINEAR" and width < 1):
        return None  # not a valid window: fall back to the percentiles
    return lambda values: apply_center_width(values, center, width, function)


def _scale_by_bits(values: np.ndarray, bits: int) -> np.ndarray:
    return scale_to_uint8(values, 0.0, float(2**bits - 1))


def decode_dicom(src, options: MedicalImageOptions) -> np.ndarray:
    """A DICOM path or bytes -> uint8 [H, W, 3] by the rules in the module docstring."""
    import pydicom
    from pydicom.pixels import apply_color_lut, pixel_array

    try:
        ds = pydicom.dcmread(io.BytesIO(src) if isinstance(src, bytes) else src, force=True)
    except (pydicom.errors.InvalidDicomError, EOFError, KeyError, TypeError) as e:
        raise ValueError(f"not a readable DICOM file: {e}") from e
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ValueError("the DICOM file has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    frame = pick_index(options.frame, frames, "DICOM frame")
    try:
        stored = pixel_array(ds, index=frame if frames > 1 else None)
    except (RuntimeError, NotImplementedError, AttributeError, KeyError) as e:
        raise ValueError(f"cannot decode the DICOM pixel data: {e}") from e
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        rgb = np.asarray(apply_color_lut(stored, ds))
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return _scale_by_bits(rgb, bits)
    if stored.ndim == 3:  # RGB / YBR (converted to RGB by pydicom)
        bits = int(ds.get("BitsStored", 8) or 8)
        return stored.astype(np.uint8) if bits <= 8 else _scale_by_bits(stored, bits)
    values = _modality_values(ds, stored, frame)
    rgb = grey_to_rgb(values, options, _file_window(ds, frame))
    return 255 - rgb if photometric == "MONOCHROME1" else rgb
