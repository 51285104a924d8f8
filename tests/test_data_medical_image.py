"""DICOM and NIfTI decoding on the files pydicom and nibabel ship (never downloaded),
against NumPy references of the windowing rules written out here, and pydicom's own VOI
function as a second, independent implementation of the DICOM window."""

import os

import nibabel as nib
import nibabel.testing
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from exgra_jax.data.image import ImageConfig, ImageDecodeError, ImagePreprocessor, load_image
from exgra_jax.data.medical_image import MedicalImageOptions

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _bundled(name):
    # get_testdata_file downloads what is not bundled: only ask for files that are.
    path = get_testdata_file(name, download=False)
    assert path is not None and os.path.isfile(path), name
    return path


def _nifti(name):
    return os.path.join(nibabel.testing.data_path, name)


def _grey(t):
    """Fraction (clipped to 0..1) -> grey level, rounded half up."""
    return np.floor(np.clip(t, 0, 1) * 255 + 0.5).astype(np.uint8)


def _dicom_linear(x, center, width):
    """DICOM PS3.3 C.11.2.1.2.1, LINEAR, output 0..255 (before rounding)."""
    x = np.asarray(x, np.float64)
    inside = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    low, high = x <= center - 0.5 - (width - 1) / 2, x > center - 0.5 + (width - 1) / 2
    return np.where(low, 0.0, np.where(high, 255.0, inside))


def _windowed(x, center, width):
    return np.floor(_dicom_linear(x, center, width) + 0.5).astype(np.uint8)


def _min_max(x):
    x = np.asarray(x, np.float64)
    lo, hi = x.min(), x.max()
    return _grey((x - lo) / (hi - lo))


def _rgb(grey):
    return np.stack([grey] * 3, axis=-1)


def _load(source, **options):
    out = load_image(source, medical=MedicalImageOptions(**options))
    assert out.mode == "RGB"
    return np.asarray(out)


def test_ct_rescale_min_max_presets_and_channel_windows():
    path = _bundled("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds and float(ds.RescaleIntercept) == -1024
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    # No window in the file: the frame's min..max.
    np.testing.assert_array_equal(_load(path), _rgb(_min_max(hu)))
    # Presets (centre, width in HU, as in the module's table).
    for name, (c, w) in {"lung": (-600, 1500), "soft_tissue": (50, 400), "brain": (40, 80),
                         "bone": (400, 1800)}.items():
        np.testing.assert_array_equal(_load(path, window=name), _rgb(_windowed(hu, c, w)), name)
    np.testing.assert_array_equal(_load(path, window="300,1000"), _rgb(_windowed(hu, 300, 1000)))
    # One preset per channel.
    out = _load(path, channel_windows=("brain", "subdural", "bone"))
    expected = np.stack([_windowed(hu, 40, 80), _windowed(hu, 75, 215),
                         _windowed(hu, 400, 1800)], -1)
    np.testing.assert_array_equal(out, expected)
    # Percentiles instead of min..max.
    lo, hi = np.percentile(hu, [2, 98])
    np.testing.assert_array_equal(_load(path, percentiles=(2, 98)),
                                  _rgb(_grey((hu - lo) / (hi - lo))))
    # Bytes (recognised by DICM at offset 128) decode the same as the path.
    with open(path, "rb") as f:
        data = f.read()
    assert data[128:132] == b"DICM"
    np.testing.assert_array_equal(_load(data, window="lung"), _load(path, window="lung"))


def test_mr_uses_the_file_window_like_pydicom():
    from pydicom.pixels import apply_voi_lut

    path = _bundled("MR_small.dcm")
    ds = pydicom.dcmread(path)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600, 1600)
    stored = ds.pixel_array.astype(np.float64)  # no rescale in this file
    out = _load(path)
    np.testing.assert_array_equal(out, _rgb(_windowed(stored, 600, 1600)))
    # pydicom's window maps to the stored value range (signed here); the same picture
    # within rounding.
    assert ds.PixelRepresentation == 1
    y_min, y_max = -(2 ** (ds.BitsStored - 1)), 2 ** (ds.BitsStored - 1) - 1
    ref = (apply_voi_lut(ds.pixel_array, ds) - y_min) * 255 / (y_max - y_min)
    assert np.abs(out[..., 0] - ref).max() <= 1.0
    # use_file_window=False: back to min..max.
    np.testing.assert_array_equal(_load(path, use_file_window=False), _rgb(_min_max(stored)))
    # Several windows in the file: the first.
    multi = _bundled("examples_overlay.dcm")
    ds = pydicom.dcmread(multi)
    assert list(ds.WindowCenter) == [450, 200] and list(ds.WindowWidth) == [790, 443]
    np.testing.assert_array_equal(_load(multi), _rgb(_windowed(ds.pixel_array, 450, 790)))


def test_monochrome1_is_inverted_after_rescale_and_window():
    path = get_testdata_files("**/CR1/6154")[0]  # a CR, bundled with pydicom's DICOMDIR tests
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    np.testing.assert_array_equal(_load(path), _rgb(255 - _windowed(values, c, w)))
    # The bright end of MONOCHROME1 is the low value: the brightest output pixel is where
    # the modality value is smallest.
    out = _load(path)[..., 0]
    assert out.flat[np.argmin(values)] == out.max()


def test_multi_frame_chosen_frame():
    path = _bundled("rtdose.dcm")
    frames = pydicom.dcmread(path).pixel_array.astype(np.float64)
    assert frames.shape[0] == 15
    np.testing.assert_array_equal(_load(path), _rgb(_min_max(frames[7])))  # the middle
    for k in (0, 3, -1):
        np.testing.assert_array_equal(_load(path, frame=k), _rgb(_min_max(frames[k])))
    with pytest.raises(ImageDecodeError, match="frame 15 is out of range"):
        _load(path, frame=15)
    # A colour multi-frame file: the chosen frame's RGB as stored.
    rgb_path = _bundled("SC_rgb_rle_2frame.dcm")
    rgb = pydicom.dcmread(rgb_path).pixel_array
    np.testing.assert_array_equal(_load(rgb_path, frame=1), rgb[1])
    np.testing.assert_array_equal(_load(rgb_path, frame=0), rgb[0])


def test_palette_color_and_deep_rgb():
    from pydicom.pixels import apply_color_lut

    path = _bundled("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    lut16 = apply_color_lut(ds.pixel_array, ds).astype(np.float64)  # 16-bit entries
    np.testing.assert_array_equal(_load(path), _grey(lut16 / 65535))
    path16 = _bundled("SC_rgb_rle_16bit.dcm")
    ds16 = pydicom.dcmread(path16)
    np.testing.assert_array_equal(_load(path16), _grey(ds16.pixel_array / 65535.0))


def test_enhanced_multi_frame_functional_groups(tmp_path):
    """Rescale and window from the shared functional groups (enhanced CT/MR layout)."""
    ds = pydicom.dcmread(_bundled("CT_small.dcm"))
    stored = ds.pixel_array.astype(np.float64)
    del ds.RescaleSlope, ds.RescaleIntercept
    transform, voi, group = Dataset(), Dataset(), Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 2, -2048, "HU"
    voi.WindowCenter, voi.WindowWidth = 40, 400
    group.PixelValueTransformationSequence = Sequence([transform])
    group.FrameVOILUTSequence = Sequence([voi])
    ds.SharedFunctionalGroupsSequence = Sequence([group])
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path)
    np.testing.assert_array_equal(_load(str(path)), _rgb(_windowed(stored * 2 - 2048, 40, 400)))


def _las_to_ras(data, img):
    # The bundled files are stored L-A-S: flipping the first axis gives R-A-S.
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    return data[::-1]


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz",
                                  "example_nifti2.nii.gz", "functional.nii"])
def test_nifti_middle_axial_slice_with_file_or_data_range(name):
    img = nib.load(_nifti(name))
    data = _las_to_ras(img.get_fdata(), img)
    while data.ndim > 3:
        data = data[..., 0]  # the first volume
    plane = data[:, :, data.shape[2] // 2]
    picture = plane.T[::-1]  # rows: anterior at the top; columns: the patient's right
    cal_min, cal_max = float(img.header["cal_min"]), float(img.header["cal_max"])
    if cal_max > cal_min:  # the header's display range
        expected = _grey((picture - cal_min) / (cal_max - cal_min))
    else:
        expected = _min_max(picture)
    np.testing.assert_array_equal(_load(_nifti(name)), _rgb(expected))


def test_nifti_options_axis_slice_window_and_magic(tmp_path):
    img = nib.load(_nifti("anatomical.nii"))
    data = _las_to_ras(img.get_fdata(), img)
    coronal = data[:, 10, :]  # axis 1, slice 10
    np.testing.assert_array_equal(_load(_nifti("anatomical.nii"), axis=1, slice_index=10),
                                  _rgb(_min_max(coronal.T[::-1])))
    sagittal = data[-1, :, :]  # axis 0, the last slice
    out = _load(_nifti("anatomical.nii"), axis=0, slice_index=-1, window="100,150")
    np.testing.assert_array_equal(out, _rgb(_windowed(sagittal.T[::-1], 100, 150)))
    # Without a suffix, as bytes or as a path: recognised by the NIfTI magic (also gzipped).
    for name in ("anatomical.nii", "example4d.nii.gz"):
        with open(_nifti(name), "rb") as f:
            data = f.read()
        (tmp_path / "volume.bin").write_bytes(data)
        expected = _load(_nifti(name))
        np.testing.assert_array_equal(_load(data), expected)
        np.testing.assert_array_equal(_load(str(tmp_path / "volume.bin")), expected)
    with pytest.raises(ImageDecodeError, match="slice 99 .*out of range"):
        _load(_nifti("anatomical.nii"), slice_index=99)


def test_preprocessor_takes_options_and_bad_options_fail_early():
    path = _bundled("CT_small.dcm")
    config = ImageConfig(32, "pad", medical=MedicalImageOptions(window="lung"))
    out = ImagePreprocessor(config)(path)
    ref = ImagePreprocessor(ImageConfig(32, "pad"))(_load(path, window="lung"))
    np.testing.assert_array_equal(out, ref)
    for bad, match in ((dict(window="liverish"), "neither a preset"),
                       (dict(channel_windows=("brain", "bone")), "3 windows"),
                       (dict(window="lung", channel_windows=("a", "b", "c")), "not both"),
                       (dict(percentiles=(50, 10)), "percentiles"),
                       (dict(window="40,0"), "width")):
        with pytest.raises(ValueError, match=match):
            MedicalImageOptions(**bad)
