"""CLIP preprocessing against transformers' CLIPImageProcessor (PIL backend, as LLaVA-Med)."""

import io
import os

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor

from exgra_jax.data.image import (
    CLIP_MEAN,
    ImageConfig,
    ImageDecodeError,
    ImagePathError,
    ImagePreprocessor,
    load_image,
    resolve_image_path,
)

SHAPES = [(300, 400), (224, 224), (500, 180), (100, 150), (37, 301), (999, 1000)]


def _image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _hf(size):
    return CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )


@pytest.mark.parametrize("size", [224, 64])
def test_crop_mode_equals_clip_image_processor(size):
    ref_proc, mine = _hf(size), ImagePreprocessor(ImageConfig(size, "crop"))
    for i, (h, w) in enumerate(SHAPES):
        pixels = _image(h, w, i)
        ref = ref_proc(images=Image.fromarray(pixels), return_tensors="np")["pixel_values"][0]
        out = mine(pixels)
        assert out.shape == (size, size, 3) and out.dtype == np.float32
        assert np.abs(out - ref.transpose(1, 2, 0)).max() <= 1e-2, (h, w)


def test_pad_mode_is_llava_expand_to_square_then_clip():
    size, (h, w) = 64, (40, 90)
    pixels = _image(h, w, 0)
    # Reference: the square canvas in the mean colour, image pasted centered (numpy).
    fill = np.array([int(m * 255) for m in CLIP_MEAN], np.uint8)
    square = np.broadcast_to(fill, (w, w, 3)).copy()
    top = (w - h) // 2
    square[top : top + h] = pixels
    ref = _hf(size)(images=Image.fromarray(square), return_tensors="np")["pixel_values"][0]
    out = ImagePreprocessor(ImageConfig(size, "pad"))(pixels)
    assert np.abs(out - ref.transpose(1, 2, 0)).max() <= 1e-2
    # The padded band is the mean colour, i.e. close to zero after normalization.
    assert np.abs(out[0]).max() < 0.02


def test_inputs_paths_bytes_arrays_agree(tmp_path):
    pixels = _image(50, 70, 3)
    path = tmp_path / "a.png"
    Image.fromarray(pixels).save(path)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    proc = ImagePreprocessor(ImageConfig(32, "pad"), image_root=str(tmp_path))
    a, b, c = proc(pixels), proc("a.png"), proc(buf.getvalue())
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    gray = load_image(pixels[..., 0])
    assert gray.mode == "RGB"


def test_bad_images_raise_decode_error(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    buf = io.BytesIO()
    Image.fromarray(_image(64, 64, 0)).save(buf, format="JPEG")
    for bad in (str(tmp_path / "missing.png"), str(tmp_path / "bad.jpg"),
                buf.getvalue()[: len(buf.getvalue()) // 2], np.zeros((0, 3, 3), np.uint8),
                np.zeros((4, 4, 3), np.float32), 12):
        with pytest.raises(ImageDecodeError):
            load_image(bad)
    with pytest.raises(ValueError):
        ImageConfig(224, "stretch")


# ------------------------------------------------------------------------------------------
# Decoding modes: references written out here in NumPy from the rules of image.py's docstring

PAD = (122, 116, 104)  # int(255 * CLIP_MEAN): the pad colour, the default background


def _range_rule(values):
    """min..max of the finite values -> 0..255, floor(255 t + 0.5); constant -> 0."""
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    lo, hi = values[finite].min(), values[finite].max()
    t = np.zeros_like(values) if hi == lo else (np.where(finite, values, lo) - lo) / (hi - lo)
    grey = np.where(finite, np.floor(255 * t + 0.5), 0).astype(np.uint8)
    return np.stack([grey] * 3, axis=-1)


def _over(rgb, alpha, background):
    a = alpha[..., None].astype(np.float64)
    out = (rgb.astype(np.float64) * a + np.array(background, np.float64) * (255 - a)) / 255
    return np.floor(out + 0.5).astype(np.uint8)


def _rgb(image, **kwargs):
    out = load_image(image, **kwargs)
    assert out.mode == "RGB"
    return np.asarray(out)


def _encoded(pil, fmt):
    buf = io.BytesIO()
    pil.save(buf, format=fmt)
    return buf.getvalue()


def test_16_bit_grey_png_and_big_endian_use_their_own_range(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(900, 3100, (30, 40)).astype(np.uint16)  # a CT export's range
    path = tmp_path / "ct16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I")  # the file really is 16-bit
    np.testing.assert_array_equal(_rgb(str(path)), _range_rule(values))
    big = Image.frombytes("I;16B", (40, 30), values.astype(">u2").tobytes())
    np.testing.assert_array_equal(_rgb(big), _range_rule(values))
    # Not all white (the old behaviour), and the full range is used.
    out = _rgb(str(path))
    assert out.min() == 0 and out.max() == 255


def test_32_bit_int_and_float_grey_tiff():
    rng = np.random.default_rng(1)
    ints = rng.integers(-1024, 3000, (20, 24)).astype(np.int32)
    assert Image.fromarray(ints).mode == "I"
    np.testing.assert_array_equal(_rgb(_encoded(Image.fromarray(ints), "TIFF")),
                                  _range_rule(ints))
    floats = rng.normal(0.3, 2.0, (20, 24)).astype(np.float32)
    floats[3, 4] = np.nan  # not a number: 0, and left out of the range
    pil = Image.fromarray(floats)
    assert pil.mode == "F"
    np.testing.assert_array_equal(_rgb(_encoded(pil, "TIFF")), _range_rule(floats))
    assert (_rgb(pil)[3, 4] == 0).all()
    constant = Image.fromarray(np.full((5, 6), 7.5, np.float32))
    assert (_rgb(constant) == 0).all()


def test_palette_and_palette_alpha():
    rng = np.random.default_rng(2)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (12, 18), dtype=np.uint8)
    pil = Image.frombytes("P", (18, 12), index.tobytes())
    pil.putpalette(palette.tobytes())
    np.testing.assert_array_equal(_rgb(_encoded(pil, "PNG")), palette[index])
    # A transparent palette entry: those pixels show the background.
    pil.info["transparency"] = int(index[0, 0])
    clear = index == index[0, 0]
    expected = palette[index].copy()
    expected[clear] = PAD
    np.testing.assert_array_equal(_rgb(_encoded(pil, "PNG")), expected)
    # PA: palette colour plus an alpha band.
    alpha = rng.integers(0, 256, (12, 18), dtype=np.uint8)
    pa = Image.merge("PA", [Image.frombytes("L", (18, 12), index.tobytes()),
                            Image.fromarray(alpha)])
    pa.putpalette(palette.tobytes())
    np.testing.assert_array_equal(_rgb(pa, background=(0, 40, 250)),
                                  _over(palette[index], alpha, (0, 40, 250)))


def test_la_rgba_and_cmyk():
    rng = np.random.default_rng(3)
    grey, alpha = rng.integers(0, 256, (2, 15, 11), dtype=np.uint8)
    la = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)])
    np.testing.assert_array_equal(_rgb(_encoded(la, "PNG")),
                                  _over(np.stack([grey] * 3, -1), alpha, PAD))
    rgba = rng.integers(0, 256, (15, 11, 4), dtype=np.uint8)
    np.testing.assert_array_equal(_rgb(_encoded(Image.fromarray(rgba, "RGBA"), "PNG"),
                                       background=(255, 0, 10)),
                                  _over(rgba[..., :3], rgba[..., 3], (255, 0, 10)))
    cmyk = rng.integers(0, 256, (15, 11, 4), dtype=np.uint8)
    pil = Image.fromarray(cmyk, "CMYK")
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    expected = np.floor((255 - c) * (255 - k) / 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(_rgb(_encoded(pil, "TIFF")), expected)


def test_preprocessor_composites_transparency_on_its_pad_colour():
    # A fully transparent image becomes the pad colour, i.e. the same as the padding band.
    clear = np.zeros((8, 8, 4), np.uint8)
    clear[..., :3] = 255
    out = ImagePreprocessor(ImageConfig(16, "pad"))(_encoded(Image.fromarray(clear), "PNG"))
    pad = ImagePreprocessor(ImageConfig(16, "pad"))(np.full((8, 8, 3), PAD, np.uint8))
    np.testing.assert_array_equal(out, pad)


def test_non_images_are_refused_naming_the_file(tmp_path):
    for name, data in (("notes.txt", b"not an image at all"), ("scan.dcm", b"\x00" * 300),
                       ("vol.nii", b"\x00" * 400)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageDecodeError, match=name.replace(".", r"\.")):
            load_image(str(tmp_path / name))
    with pytest.raises(ImageDecodeError, match=r"<19 bytes>: not a format PIL reads") as info:
        load_image(b"not an image at all")
    assert " at 0x" not in str(info.value)  # no object address
    with pytest.raises(ImageDecodeError, match="not found: .*gone.png"):
        load_image("gone.png", str(tmp_path))


# ------------------------------------------------------------------------------------------
# Path confinement


def test_image_paths_are_confined_to_the_image_folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(_image(6, 6, 0)).save(root / "sub" / "a.png")
    secret = tmp_path / "secret.png"
    Image.fromarray(_image(6, 6, 1)).save(secret)
    os.symlink(secret, root / "link_out.png")
    os.symlink(root / "sub" / "a.png", root / "link_in.png")
    inside = ("sub/a.png", "sub/../sub/a.png", "./sub/a.png", "link_in.png")
    for name in inside:
        assert os.path.samefile(resolve_image_path(str(root), name), root / "sub" / "a.png")
        load_image(name, str(root))
    escaping = ("../secret.png", "sub/../../secret.png", str(secret), "link_out.png",
                "/etc/passwd", "../../../../etc/passwd")
    for name in escaping:
        with pytest.raises(ImagePathError, match="outside the image folder"):
            resolve_image_path(str(root), name)
        with pytest.raises(ImageDecodeError, match="allow_outside_image_folder"):
            ImagePreprocessor(ImageConfig(8), image_root=str(root))(name)
    # Allowed by the flag; without a folder nothing is confined.
    for name in ("../secret.png", str(secret), "link_out.png"):
        np.testing.assert_array_equal(_rgb(name, image_root=str(root), allow_outside=True),
                                      _image(6, 6, 1))
    assert resolve_image_path(None, "../x.png") == "../x.png"


def test_siglip_towers_get_the_pixels_transformers_gives_them():
    """A SigLIP model's images are scaled to [-1, 1] (mean = std = 0.5), as
    transformers' SiglipImageProcessor prepares them; CLIP models keep CLIP's statistics."""
    import ml_collections
    from transformers import SiglipImageProcessor

    from exgra_jax.eval.answering import image_config
    from exgra_jax.models import config as mc

    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8)
    run = ml_collections.ConfigDict({"data": {"image_aspect": "pad"}})
    siglip = mc.tiny(vision_type="siglip", image_size=32)
    ref = SiglipImageProcessor(size={"height": 32, "width": 32})(
        Image.fromarray(rgb), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = ImagePreprocessor(image_config(run, siglip))(rgb)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    clip = ImagePreprocessor(image_config(run, mc.tiny(image_size=32)))(rgb)
    assert not np.allclose(clip, ref, atol=1e-2)
