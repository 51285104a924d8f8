"""Image sources of a chat request, within limits: ``data:`` URLs, local files under one
allowed directory, and (only when enabled) http(s) URLs.

The bytes go to ``exgra_jax.data.image.load_image``, the decoder the data pipeline uses, so
every format it reads (PNG, JPEG, ..., DICOM, NIfTI; windowed by ``config.data.medical``)
works here too.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import urllib.error
import urllib.parse
import urllib.request
import warnings

from PIL import Image

from exgra_jax.data.image import ImageDecodeError, load_image
from exgra_jax.data.medical_image import HEADER_BYTES, MedicalImageOptions, sniff_format
from exgra_jax.serve.protocol import ApiError

# Media types a data URL may declare; PIL and load_image find the real format from the bytes.
ALLOWED_MEDIA_TYPES = ("image/", "application/dicom", "application/octet-stream")


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
    image_dir: str | None = None  # local paths allowed only below this directory
    allow_http: bool = False
    http_timeout_s: float = 10.0
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 50_000_000  # decompression-bomb guard (width x height)


def _too_large(what: str, size: int, limit: int) -> ApiError:
    return ApiError(413, f"{what} is too large: {size} > {limit} bytes",
                    code="image_too_large")


def _data_url_bytes(url: str, policy: MediaPolicy) -> bytes:
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep or not header.endswith(";base64"):
        raise ApiError(400, "a data URL must be data:<media type>;base64,<data>",
                       code="invalid_image_url")
    media_type = header[: -len(";base64")].lower()
    if not media_type.startswith(ALLOWED_MEDIA_TYPES):
        raise ApiError(400, f"media type {media_type!r} is not an image",
                       code="invalid_image_format")
    if len(payload) * 3 // 4 > policy.max_image_bytes:  # before decoding it
        raise _too_large("the image", len(payload) * 3 // 4, policy.max_image_bytes)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"the image data URL is not valid base64: {e}",
                       code="invalid_base64") from e


def _file_bytes(path: str, policy: MediaPolicy) -> bytes:
    if not policy.image_dir:
        raise ApiError(403, "local image paths are disabled (start the server with "
                       "--image_dir DIR)", type="permission_error", code="path_not_allowed")
    root = os.path.realpath(policy.image_dir)
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, real]) != root:
        raise ApiError(403, f"the image path {path!r} lies outside the allowed directory",
                       type="permission_error", code="path_not_allowed")
    if not os.path.isfile(real):
        raise ApiError(400, f"no image file {path!r} in the allowed directory",
                       code="image_not_found")
    size = os.path.getsize(real)
    if size > policy.max_image_bytes:
        raise _too_large("the image file", size, policy.max_image_bytes)
    with open(real, "rb") as f:
        return f.read()


def _http_bytes(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_http:
        raise ApiError(403, "fetching images over http(s) is disabled (start the server "
                       "with --allow_http)", type="permission_error", code="http_not_allowed")
    try:
        with urllib.request.urlopen(url, timeout=policy.http_timeout_s) as response:
            data = response.read(policy.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ApiError(400, f"cannot fetch the image {url!r}: {e}",
                       code="image_fetch_failed") from e
    if len(data) > policy.max_image_bytes:
        raise _too_large("the fetched image", len(data), policy.max_image_bytes)
    return data


def image_bytes(url: str, policy: MediaPolicy) -> bytes:
    """The encoded image an ``image_url`` names (data URL, file path or http(s) URL)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if url.startswith("data:"):
        return _data_url_bytes(url, policy)
    if scheme in ("http", "https"):
        return _http_bytes(url, policy)
    if scheme == "file":
        return _file_bytes(urllib.parse.unquote(urllib.parse.urlsplit(url).path), policy)
    if scheme and len(scheme) > 1:  # (a one-letter "scheme" is a Windows drive)
        raise ApiError(400, f"unsupported image URL scheme {scheme!r}",
                       code="invalid_image_url")
    return _file_bytes(url, policy)


def _check_pixels(width: int, height: int, policy: MediaPolicy) -> None:
    if width * height > policy.max_image_pixels:
        raise ApiError(413, f"the image has {width}x{height} pixels, more than the "
                       f"{policy.max_image_pixels} allowed", code="image_too_large")


def decode_image(data: bytes, policy: MediaPolicy,
                 medical: MedicalImageOptions | None = None) -> Image.Image:
    """Encoded bytes -> RGB image (DICOM/NIfTI windowed by ``medical``). The pixel count is
    checked from the header before any pixel is decoded, so a small file claiming a huge
    image is refused cheaply."""
    if sniff_format(data[:HEADER_BYTES]) is None:  # DICOM / NIfTI: checked once decoded
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as header:
                    _check_pixels(*header.size, policy)
        except Image.DecompressionBombError as e:
            raise ApiError(413, f"the image is too large: {e}", code="image_too_large") from e
        except (OSError, ValueError, SyntaxError):
            pass  # not an image PIL reads: load_image says what is wrong
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = load_image(data, medical=medical)
    except (ImageDecodeError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ApiError(400, f"the image cannot be decoded: {e}",
                       code="invalid_image_format") from e
    _check_pixels(*image.size, policy)
    return image
