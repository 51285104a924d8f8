"""Image decoding and CLIP preprocessing: NHWC float32, the same pixels as transformers'
CLIPImageProcessor.

Decoding (`load_image`) turns every input into the RGB picture it shows:
- 16- and 32-bit grey images (PIL modes I;16, I;16B, I;16L, I, F: CT/MR exports) are scaled
  by their own intensity range: min..max -> 0..255 by the rule of
  `medical_image.scale_to_uint8` (t = (x - min) / (max - min), grey = floor(255 t + 0.5);
  a constant image is all 0; non-finite values are 0 and left out of the range).
- Palette images (P, PA) through their palette; CMYK by R = (255 - C)(255 - K) / 255 (and G,
  B from M, Y), rounded half up; LA as grey.
- Transparency (RGBA, LA, PA, P/L/RGB with a transparent colour) is composited over the
  background, by default the mean colour the preprocessor pads with:
  out = floor((c a + b (255 - a)) / 255 + 0.5) per channel, for alpha a in 0..255.
- DICOM (.dcm, or DICM at byte 128) and NIfTI (.nii, .nii.gz, or the NIfTI magic) follow
  the rules of `dicom.py`, `nifti.py` and `medical_image.py`, set by `MedicalImageOptions`.
- Paths are joined with `image_root` through `resolve_image_path`, which refuses names
  that leave that folder unless allowed.

Preprocessing (CLIP ViT defaults): optional pad-to-square with the mean colour (LLaVA's
`image_aspect_ratio='pad'`), resize the shortest side to `image_size` with PIL bicubic,
center crop to `image_size` x `image_size`, rescale to [0, 1], normalize with the CLIP
mean/std. The resize runs on the PIL image directly (CLIPImageProcessor's PIL backend does
the same resize after a numpy round trip), so the uint8 pixels match it exactly.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from exgra_jax.data.dicom import decode_dicom
from exgra_jax.data.medical_image import (
    HEADER_BYTES,
    MedicalImageOptions,
    percentile_range,
    scale_to_uint8,
    sniff_format,
)
from exgra_jax.data.nifti import decode_nifti

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SigLIP towers are trained on pixels scaled to [-1, 1].
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def normalization(vision_type: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the vision tower was trained with: 'clip' or 'siglip'."""
    if vision_type not in ("clip", "siglip"):
        raise ValueError(f"vision_type must be 'clip' or 'siglip', got {vision_type!r}")
    return (CLIP_MEAN, CLIP_STD) if vision_type == "clip" else (SIGLIP_MEAN, SIGLIP_STD)

ASPECT_MODES = ("crop", "pad")

MEDICAL_DECODERS = {"dicom": decode_dicom, "nifti": decode_nifti}  # sniff_format's kinds

# PIL modes holding more than 8 bits of grey (scaled by the image's own range).
DEEP_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageDecodeError(ValueError):
    """An image that cannot be read or decoded (missing file, corrupt bytes, bad array)."""


class ImagePathError(ImageDecodeError):
    """An image name that leads outside the image folder (absolute, '..' or a symlink)."""


@dataclass(frozen=True)
class ImageConfig:
    image_size: int = 224
    aspect: str = "pad"  # "pad": LLaVA pad-to-square first; "crop": plain CLIP
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    medical: MedicalImageOptions = field(default_factory=MedicalImageOptions)  # DICOM/NIfTI

    def __post_init__(self):
        if self.aspect not in ASPECT_MODES:
            raise ValueError(f"image aspect must be one of {ASPECT_MODES}, got {self.aspect!r}")
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """The mean colour in 0..255: pad-to-square fill and background for transparency."""
        return tuple(int(m * 255) for m in self.mean)


def resolve_image_path(root: str | None, name: str, allow_outside: bool = False) -> str:
    """`name` joined with the image folder `root`, refused if it leads outside `root`.

    Absolute names, '..' escapes and symlinks pointing out of `root` (compared after
    `os.path.realpath`) raise ImagePathError unless `allow_outside`. Without a folder
    (`root` empty or None) there is nothing to confine to and `name` is returned as is.
    """
    name = os.fspath(name)
    if not root:
        return name
    path = os.path.join(root, name)
    if allow_outside:
        return path
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.isabs(name) or os.path.commonpath([real_root, real]) != real_root:
        raise ImagePathError(
            f"image path {name!r} leads outside the image folder {root!r} (absolute paths, "
            "'..' and symlinks out of the folder are refused; set "
            "data.allow_outside_image_folder=True to allow them)"
        )
    return path


def composite(rgb: np.ndarray, alpha: np.ndarray, background) -> np.ndarray:
    """uint8 [H, W, 3] over a background colour by uint8 alpha [H, W] (rule above)."""
    a = alpha.astype(np.float64)[..., None]
    bg = np.asarray(background, np.float64)
    return np.floor((rgb * a + bg * (255.0 - a)) / 255.0 + 0.5).astype(np.uint8)


def _grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def to_rgb(pil: Image.Image, background=(0, 0, 0)) -> Image.Image:
    """Any PIL image -> the RGB picture it shows (rules in the module docstring)."""
    mode = pil.mode
    if mode in DEEP_GREY_MODES:
        values = np.asarray(pil).astype(np.float64)
        return Image.fromarray(_grey_rgb(scale_to_uint8(values, *percentile_range(values))))
    if mode == "CMYK":
        cmyk = np.asarray(pil).astype(np.float64)
        rgb = (255.0 - cmyk[..., :3]) * (255.0 - cmyk[..., 3:]) / 255.0
        return Image.fromarray(np.floor(rgb + 0.5).astype(np.uint8))
    if (mode in ("P", "L", "RGB") and "transparency" in pil.info) or mode in ("PA", "RGBa"):
        pil, mode = pil.convert("RGBA"), "RGBA"
    if mode == "La":
        pil, mode = pil.convert("LA"), "LA"
    if mode == "LA":
        grey_alpha = np.asarray(pil)
        rgb = composite(_grey_rgb(grey_alpha[..., 0]), grey_alpha[..., 1], background)
        return Image.fromarray(rgb)
    if mode == "RGBA":
        rgba = np.asarray(pil)
        return Image.fromarray(composite(rgba[..., :3], rgba[..., 3], background))
    return pil if mode == "RGB" else pil.convert("RGB")


def _describe(image) -> str:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<{len(image)} bytes>"
    return repr(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else "<array>"


def _open(image, image_root, medical, allow_outside) -> Image.Image:
    """Path / bytes / uint8 array / PIL -> a decoded (loaded) PIL image in any mode."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or image.size == 0:
            raise ImageDecodeError(
                f"image array must be non-empty uint8 HW or HWC, got {image.dtype} {image.shape}"
            )
        return Image.fromarray(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        kind = sniff_format(data[:HEADER_BYTES])
        if kind is not None:
            return Image.fromarray(MEDICAL_DECODERS[kind](data, medical))
        pil = Image.open(io.BytesIO(data))
    elif isinstance(image, (str, os.PathLike)):
        path = resolve_image_path(image_root, image, allow_outside)
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER_BYTES)
        except FileNotFoundError as e:
            raise ImageDecodeError(f"image file not found: {path}") from e
        kind = sniff_format(head, path)
        if kind is not None:
            return Image.fromarray(MEDICAL_DECODERS[kind](path, medical))
        pil = Image.open(path)
    else:
        raise ImageDecodeError(f"unsupported image value of type {type(image).__name__}")
    pil.load()  # decode now so that truncated files fail here, not later
    return pil


def load_image(image, image_root: str | None = None, *, background=None,
               medical: MedicalImageOptions | None = None,
               allow_outside: bool = False) -> Image.Image:
    """Decodes a path, encoded bytes, a uint8 HWC array or a PIL image into an RGB PIL image.

    `background` (default: the CLIP mean colour the preprocessor pads with) is what
    transparent pixels show; `medical` sets the DICOM/NIfTI windowing; a path is joined
    with `image_root` by `resolve_image_path(image_root, image, allow_outside)`.
    Anything unreadable raises ImageDecodeError naming the image.
    """
    background = ImageConfig().pad_color if background is None else background
    try:
        pil = _open(image, image_root, medical or MedicalImageOptions(), allow_outside)
        return to_rgb(pil, background)
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError as e:  # its message shows a file object's address
        raise ImageDecodeError(f"cannot decode image {_describe(image)}: not a format PIL "
                               "reads, nor DICOM or NIfTI") from e
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"cannot decode image {_describe(image)}: {e}") from e


def expand_to_square(pil: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pads the short side symmetrically (extra pixel after) to a square of colour `fill`."""
    width, height = pil.size
    if width == height:
        return pil
    side = max(width, height)
    square = Image.new(pil.mode, (side, side), fill)
    square.paste(pil, ((side - width) // 2, (side - height) // 2))
    return square


def resize_shortest_side(pil: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the short side is `size`; the long side is truncated, as in HF."""
    width, height = pil.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) == (width, height):
        return pil
    return pil.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def center_crop(array_hwc: np.ndarray, size: int) -> np.ndarray:
    """Center crop; images smaller than `size` are zero padded around the center first."""
    height, width = array_hwc.shape[:2]
    if height < size or width < size:
        new_h, new_w = max(height, size), max(width, size)
        padded = np.zeros((new_h, new_w, array_hwc.shape[2]), array_hwc.dtype)
        top_pad, left_pad = -(-(new_h - height) // 2), -(-(new_w - width) // 2)
        padded[top_pad : top_pad + height, left_pad : left_pad + width] = array_hwc
        array_hwc, height, width = padded, new_h, new_w
    top, left = (height - size) // 2, (width - size) // 2
    return array_hwc[top : top + size, left : left + size]


class ImagePreprocessor:
    """Callable: image (path | bytes | uint8 array | PIL) -> float32 [S, S, 3] normalized.

    Decodes with `load_image` (transparency over the pad colour, DICOM/NIfTI by
    `config.medical`, paths confined to `image_root` unless `allow_outside`).
    """

    def __init__(self, config: ImageConfig, image_root: str | None = None,
                 allow_outside: bool = False):
        self.config = config
        self.image_root = image_root
        self.allow_outside = allow_outside
        mean = np.asarray(config.mean, np.float32)
        std = np.asarray(config.std, np.float32)
        # (x / 255 - mean) / std == x * scale + offset: one fused multiply-add per pixel.
        self._scale = (1.0 / (255.0 * std)).astype(np.float32)
        self._offset = (-mean / std).astype(np.float32)
        self._fill = config.pad_color

    def __call__(self, image) -> np.ndarray:
        pil = load_image(image, self.image_root, background=self._fill,
                         medical=self.config.medical, allow_outside=self.allow_outside)
        if self.config.aspect == "pad":
            pil = expand_to_square(pil, self._fill)
        pil = resize_shortest_side(pil, self.config.image_size)
        pixels = center_crop(np.asarray(pil), self.config.image_size)
        out = np.multiply(pixels, self._scale, dtype=np.float32)  # no float64 temporaries
        out += self._offset
        return out

    def blank(self) -> np.ndarray:
        """The pixel values for an example without an image (zeros, as LLaVA uses)."""
        size = self.config.image_size
        return np.zeros((size, size, 3), np.float32)
