"""DICOM and NIfTI files -> the uint8 RGB picture the model takes, by documented rules.

Intensity rule (the one place values become grey levels). A range lo..hi maps a value x
to t = (x - lo) / (hi - lo) clipped to [0, 1], and the grey level is floor(255 t + 0.5).
When hi == lo, values above lo are 255 and the rest 0 (so a constant image is all 0).
Non-finite values are 0 and are left out when a range is taken from the data.

DICOM (pydicom), for the chosen frame (`frame`; default the middle one, n // 2):
1. Modality values: the Modality LUT Sequence if present, else
   RescaleSlope * stored + RescaleIntercept (per-frame or shared functional groups of
   enhanced multi-frame files first, then the top-level attributes; default 1 and 0).
2. Window (grey images), the first that applies:
   a. `channel_windows`: three windows, one per R, G, B channel;
   b. `window`: a named preset (table below), or "C,W" / (C, W) centre and width;
   c. the file's first WindowCenter / WindowWidth (per-frame, shared, top level), unless
      `use_file_window` is False, with its VOILUTFunction (LINEAR, LINEAR_EXACT, SIGMOID);
   d. the `percentiles` (default 0 and 100: min..max) of the frame's modality values.
   A centre/width window is DICOM's LINEAR function (PS3.3 C.11.2.1.2.1): the range
   lo = C - 0.5 - (W - 1) / 2 .. hi = C - 0.5 + (W - 1) / 2 of the rule above;
   LINEAR_EXACT uses lo = C - W / 2 .. hi = C + W / 2; SIGMOID is
   floor(255 / (1 + exp(-4 (x - C) / W)) + 0.5).
3. MONOCHROME1 (white is low) is inverted after windowing: 255 - grey.
4. Colour files: RGB and YBR are read as RGB (pydicom converts YBR); PALETTE COLOR goes
   through its lookup tables. Samples deeper than 8 bits are scaled by their bit depth
   (x * 255 / (2**bits - 1), rounded as above), not stretched, to keep the colours.

NIfTI (nibabel): the volume is reoriented to the closest canonical RAS+ axes; extra
dimensions beyond three take index 0 (the first volume). The slice is `slice_index`
(default the middle, n // 2) along `axis` (default -1: axial; 0 sagittal, 1 coronal).
Values include scl_slope / scl_inter. The window is, the first that applies:
`channel_windows`, `window`, the header's cal_min..cal_max when cal_max > cal_min (unless
`use_file_window` is False), the slice's `percentiles`. The 2-D slice s[u, v] is shown
with rows along v from high to low and columns along u: picture = s.T[::-1] (axial: the
patient's anterior at the top and right on the right, the neurological convention).

CT window presets (Hounsfield units; centre C, width W):

    name          C      W
    brain         40     80
    subdural      75    215
    stroke        40     40
    soft_tissue   50    400
    abdomen       50    400
    mediastinum   50    350
    liver         30    150
    lung        -600   1500
    wide        -600   1500
    bone         400   1800
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass

import numpy as np

CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "soft_tissue": (50.0, 400.0),
    "abdomen": (50.0, 400.0),
    "mediastinum": (50.0, 350.0),
    "liver": (30.0, 150.0),
    "lung": (-600.0, 1500.0),
    "wide": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}

# Leading bytes read to recognise a format: DICM sits at 128, the NIfTI-1 magic at 344
# (of the decompressed header for .nii.gz, hence the margin for gzip's own header).
HEADER_BYTES = 4096
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _window_spec(value) -> tuple[float, float] | None:
    """A preset name, "C,W" or (C, W) -> (C, W); "" / None -> None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        name = value.strip().lower()
        if name in CT_WINDOWS:
            return CT_WINDOWS[name]
        parts = name.split(",")
        if len(parts) != 2:
            raise ValueError(f"window {value!r} is neither a preset ({', '.join(CT_WINDOWS)}) "
                             "nor 'centre,width'")
        value = parts
    try:
        center, width = (float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"window {value!r} must be a preset name or (centre, width)") from e
    if width < 1:
        raise ValueError(f"window width must be >= 1, got {width}")
    return center, width


@dataclass(frozen=True)
class MedicalImageOptions:
    """How DICOM / NIfTI values become the RGB picture (rules in the module docstring)."""

    window: str | tuple[float, float] = ""  # preset, "C,W" or (C, W); "": file / percentiles
    channel_windows: tuple = ()  # three windows, one per R, G, B (e.g. brain, subdural, bone)
    use_file_window: bool = True  # DICOM WindowCenter/Width, NIfTI cal_min/cal_max
    percentiles: tuple[float, float] = (0.0, 100.0)  # the fallback range: min..max
    frame: int | None = None  # DICOM multi-frame; None: the middle frame
    slice_index: int | None = None  # NIfTI; None: the middle slice
    axis: int = -1  # NIfTI slice axis after RAS+ reorientation (-1 / 2: axial)

    def __post_init__(self):
        channels = tuple(self.channel_windows or ())
        object.__setattr__(self, "channel_windows", channels)
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        if isinstance(self.window, list):
            object.__setattr__(self, "window", tuple(self.window))
        if channels and len(channels) != 3:
            raise ValueError(f"channel_windows needs 3 windows (R, G, B), got {len(channels)}")
        if _window_spec(self.window) is not None and channels:  # also validates window
            raise ValueError("set either window or channel_windows, not both")
        for spec in channels:
            if _window_spec(spec) is None:
                raise ValueError("each of channel_windows must name a window")
        lo, hi = self.percentiles if len(self.percentiles) == 2 else (-1, -1)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must be (low, high) with 0 <= low < high <= 100, "
                             f"got {self.percentiles}")
        if self.axis not in (-3, -2, -1, 0, 1, 2):
            raise ValueError(f"NIfTI axis must be in -3..2, got {self.axis}")

    def windows(self) -> list[tuple[float, float]] | None:
        """The configured (C, W) per channel (one entry: all channels), or None."""
        if self.channel_windows:
            return [_window_spec(s) for s in self.channel_windows]
        spec = _window_spec(self.window)
        return None if spec is None else [spec]


# ------------------------------------------------------------------------------------------
# Intensity rules


def scale_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The intensity rule: lo..hi -> 0..255, clipped, rounded half up; non-finite -> 0."""
    values = np.asarray(values, np.float64)
    finite = np.isfinite(values)
    if hi > lo:
        t = (np.where(finite, values, lo) - lo) / (hi - lo)
    else:
        t = (values > lo).astype(np.float64)
    grey = np.floor(np.clip(t, 0.0, 1.0) * 255.0 + 0.5)
    return np.where(finite, grey, 0).astype(np.uint8)


def percentile_range(values: np.ndarray, percentiles=(0.0, 100.0)) -> tuple[float, float]:
    """(low, high) percentiles of the finite values; (0, 0) when there are none."""
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(finite, percentiles)
    return float(lo), float(hi)


def apply_center_width(values: np.ndarray, center: float, width: float,
                       function: str = "LINEAR") -> np.ndarray:
    """A DICOM VOI window (LINEAR, LINEAR_EXACT or SIGMOID) -> uint8 grey levels."""
    function = function.upper()
    if function == "SIGMOID":
        values = np.asarray(values, np.float64)
        grey = np.floor(255.0 / (1.0 + np.exp(-4.0 * (values - center) / width)) + 0.5)
        return np.where(np.isfinite(values), grey, 0).astype(np.uint8)
    if function == "LINEAR_EXACT":
        return scale_to_uint8(values, center - width / 2, center + width / 2)
    if width < 1:
        raise ValueError(f"a LINEAR window needs width >= 1, got {width}")
    half = (width - 1) / 2
    return scale_to_uint8(values, center - 0.5 - half, center - 0.5 + half)


def _grey_to_rgb(values: np.ndarray, options: MedicalImageOptions, file_window) -> np.ndarray:
    """Modality values [H, W] -> uint8 [H, W, 3] by the window order of the docstring.

    `file_window` is a callable giving the file's window as ("cw", C, W, function) or
    ("range", lo, hi), or None.
    """
    windows = options.windows()
    if windows is not None:
        channels = [apply_center_width(values, c, w) for c, w in windows]
    else:
        found = file_window() if options.use_file_window else None
        if found is not None and found[0] == "cw":
            channels = [apply_center_width(values, *found[1:])]
        elif found is not None:
            channels = [scale_to_uint8(values, *found[1:])]
        else:
            channels = [scale_to_uint8(values, *percentile_range(values, options.percentiles))]
    if len(channels) == 1:
        channels = channels * 3
    return np.stack(channels, axis=-1)


def _pick(index: int | None, count: int, what: str, where: str = "") -> int:
    """The chosen index (None: the middle; negatives count from the end), range-checked."""
    if index is None:
        return count // 2
    if not -count <= index < count:
        raise ValueError(f"{what} {index} is out of range: there are {count}{where}")
    return index % count


# ------------------------------------------------------------------------------------------
# Format detection


def sniff_format(head: bytes, name: str = "") -> str | None:
    """"dicom", "nifti" or None, from the file name's suffix or the leading bytes."""
    lower = name.lower()
    if lower.endswith(".dcm") or head[128:132] == b"DICM":
        return "dicom"
    if lower.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if head[:2] == b"\x1f\x8b":  # gzip: look at the decompressed header
        try:
            head = gzip.GzipFile(fileobj=io.BytesIO(head)).read(348)
        except (OSError, EOFError):
            return None
    if head[344:348] == b"n+1\x00" or head[4:8] == b"n+2\x00":
        return "nifti"
    return None


# ------------------------------------------------------------------------------------------
# DICOM


def _frame_item(ds, frame: int, sequence: str, macro: str):
    """The item of functional-group macro `macro` for `frame` (per-frame, then shared)."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame),
                          ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        inner = items[index].get(macro) if items is not None and len(items) > index else None
        if inner and sequence in inner[0]:
            return inner[0]
    return None


def _dicom_modality_values(ds, stored: np.ndarray, frame: int) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(stored, ds), np.float64)
    item = _frame_item(ds, frame, "RescaleSlope", "PixelValueTransformationSequence") or ds
    slope = float(item.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(item.get("RescaleIntercept", 0.0) or 0.0)
    return stored.astype(np.float64) * slope + intercept


def _first(value) -> float:
    """The first of a possibly multi-valued DICOM number."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _dicom_file_window(ds, frame: int):
    item = _frame_item(ds, frame, "WindowCenter", "FrameVOILUTSequence")
    item = item if item is not None else ds
    if "WindowCenter" not in item or "WindowWidth" not in item:
        return None
    function = str(item.get("VOILUTFunction", "LINEAR") or "LINEAR")
    width = _first(item.WindowWidth)
    if width <= 0 or (function.upper() == "LINEAR" and width < 1):
        return None
    return ("cw", _first(item.WindowCenter), width, function)


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
    frame = _pick(options.frame, frames, "DICOM frame")
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
    values = _dicom_modality_values(ds, stored, frame)
    rgb = _grey_to_rgb(values, options, lambda: _dicom_file_window(ds, frame))
    return 255 - rgb if photometric == "MONOCHROME1" else rgb


# ------------------------------------------------------------------------------------------
# NIfTI


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
        index[axis] = _pick(options.slice_index, shape[axis], "NIfTI slice", f" along axis {axis}")
    plane = np.asarray(image.dataobj[tuple(index)], np.float64)  # scl_slope/inter applied
    cal_min, cal_max = (float(image.header[k]) for k in ("cal_min", "cal_max"))

    def file_window():
        return ("range", cal_min, cal_max) if cal_max > cal_min else None

    return _grey_to_rgb(plane.T[::-1], options, file_window)


def decode_medical(kind: str, src, options: MedicalImageOptions) -> np.ndarray:
    """`kind` from `sniff_format`; `src` a path or the file's bytes."""
    if kind == "dicom":
        return decode_dicom(src, options)
    if kind == "nifti":
        return decode_nifti(src, options)
    raise ValueError(f"unknown medical image kind {kind!r}")

