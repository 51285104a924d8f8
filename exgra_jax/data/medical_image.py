"""Shared rules of medical image decoding (DICOM in `dicom.py`, NIfTI in `nifti.py`):
options, CT window presets, the intensity rule, windows, and format detection.

Intensity rule (the one place values become grey levels). A range lo..hi maps a value x
to t = (x - lo) / (hi - lo) clipped to [0, 1], and the grey level is floor(255 t + 0.5).
When hi == lo, values above lo are 255 and the rest 0 (so a constant image is all 0).
Non-finite values are 0 and are left out when a range is taken from the data.

Window of a grey image, the first that applies:
  a. `channel_windows`: three windows, one per R, G, B channel;
  b. `window`: a named preset (table below), or "C,W" / (C, W) centre and width;
  c. the file's own window (DICOM WindowCenter/Width, NIfTI cal_min..cal_max), unless
     `use_file_window` is False;
  d. the `percentiles` (default 0 and 100: min..max) of the image's values.
A centre/width window is DICOM's LINEAR function (PS3.3 C.11.2.1.2.1): the range
lo = C - 0.5 - (W - 1) / 2 .. hi = C - 0.5 + (W - 1) / 2 of the intensity rule;
LINEAR_EXACT uses lo = C - W / 2 .. hi = C + W / 2; SIGMOID is
floor(255 / (1 + exp(-4 (x - C) / W)) + 0.5). One window fills all three channels.

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
from collections.abc import Callable
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


FileWindow = Callable[[np.ndarray], np.ndarray]  # values -> uint8 by the file's own window


def grey_to_rgb(values: np.ndarray, options: MedicalImageOptions,
                file_window: FileWindow | None = None) -> np.ndarray:
    """Values [H, W] -> uint8 [H, W, 3] by the window order of the module docstring."""
    windows = options.windows()
    if windows is not None:
        channels = [apply_center_width(values, c, w) for c, w in windows]
    elif options.use_file_window and file_window is not None:
        channels = [file_window(values)]
    else:
        channels = [scale_to_uint8(values, *percentile_range(values, options.percentiles))]
    if len(channels) == 1:
        channels = channels * 3
    return np.stack(channels, axis=-1)


def pick_index(index: int | None, count: int, what: str, where: str = "") -> int:
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
