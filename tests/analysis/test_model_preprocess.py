"""Pixel reading (JPEG-baseline OP, multi-frame OPT, B-scan folders), CFP preprocessing, foveal B-scan choice."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from grok_pacs.analysis.imaging import ImageReadError, read_cfp, read_oct_volume
from grok_pacs.analysis.preprocess import foveal_pit, preprocess_cfp, preprocess_oct, select_foveal_bscan
from grok_pacs.model.config import IMAGENET_MEAN, IMAGENET_STD
from tests.helpers.eye_dicom import oct_volume, write_jpeg_cfp, write_oct
from tests.helpers.ophthalmic_dicom import Patient, fundus_pixels


def _unnormalise(chw: np.ndarray) -> np.ndarray:
    mean, std = np.asarray(IMAGENET_MEAN)[:, None, None], np.asarray(IMAGENET_STD)[:, None, None]
    return ((chw * std + mean) * 255).transpose(1, 2, 0)


@pytest.mark.parametrize(
    "pit_frame, pit_col", [(7, 0.5), (2, 0.5), (12, 0.5), (4, 0.25), (10, 0.72), (0, 0.5), (14, 0.4)]
)
def test_foveal_bscan_is_the_pit_frame_even_off_centre(pit_frame, pit_col):
    volume = oct_volume(frames=15, pit_frame=pit_frame, pit_col=pit_col, seed=pit_frame)
    assert select_foveal_bscan(volume) == (pit_frame, "fovea")


def test_foveal_bscan_on_a_large_noisy_volume():
    volume = oct_volume(frames=49, rows=256, cols=384, pit_frame=31, pit_col=0.6, noise=25.0, seed=3)
    assert select_foveal_bscan(volume) == (31, "fovea")


def test_flat_or_unreadable_volumes_fall_back_to_the_central_frame():
    assert select_foveal_bscan(oct_volume(frames=15)) == (7, "central")
    speckle = np.random.default_rng(0).integers(0, 256, (21, 96, 128)).astype(np.uint8)
    assert select_foveal_bscan(speckle) == (10, "central")
    assert select_foveal_bscan(np.zeros((9, 64, 64), np.uint8)) == (4, "central")
    assert select_foveal_bscan(oct_volume(frames=1, pit_frame=0)) == (0, "central")
    with pytest.raises(ValueError, match="frames, rows, cols"):
        select_foveal_bscan(np.zeros((64, 64)))


def test_cfp_is_padded_square_with_its_mean_colour_and_normalised():
    image = np.zeros((100, 200, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 200, 100, 50
    image[:, :100, 0] = 100  # mean red = 150
    x = preprocess_cfp(image)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    rgb = _unnormalise(x)
    np.testing.assert_allclose(rgb[5, 112], [150, 100, 50], atol=1.0)  # padding band = mean colour
    np.testing.assert_allclose(rgb[112, 20], [100, 100, 50], atol=1.0)  # image content kept, aspect intact
    np.testing.assert_allclose(rgb[112, 200], [200, 100, 50], atol=1.0)


def test_oct_bscan_input_is_three_identical_channels():
    x = preprocess_oct(oct_volume(frames=3)[1])
    assert x.shape == (3, 224, 224)
    rgb = _unnormalise(x)
    np.testing.assert_allclose(rgb[..., 0], rgb[..., 1], atol=1e-3)
    float_frame = oct_volume(frames=3)[1].astype(np.float32) * 100.0  # 16-bit-like range is rescaled
    assert np.isfinite(preprocess_oct(float_frame)).all()


def test_jpeg_baseline_op_decodes_to_rgb(tmp_path):
    path = write_jpeg_cfp(tmp_path / "cfp.dcm", Patient(), "R")
    image = read_cfp(path)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    assert np.abs(image.astype(int) - fundus_pixels()).mean() < 6  # lossy, but the same picture


def test_multiframe_opt_and_bscan_folder_read_as_volumes(tmp_path):
    volume = oct_volume(frames=12, pit_frame=3)
    assert np.array_equal(read_oct_volume(write_oct(tmp_path / "oct.dcm", Patient(), "L", volume)), volume)
    folder = tmp_path / "bscans"
    folder.mkdir()
    for i in range(12):  # natural order: 2 before 10
        Image.fromarray(volume[i]).save(folder / f"bscan_{i}.png")
    assert np.array_equal(read_oct_volume(folder), volume)


def test_png_cfp_and_clear_errors(tmp_path):
    Image.fromarray(fundus_pixels()).save(tmp_path / "cfp.png")
    assert np.array_equal(read_cfp(tmp_path / "cfp.png"), fundus_pixels())
    with pytest.raises(ImageReadError, match="does not exist"):
        read_cfp(tmp_path / "absent.dcm")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="broken.png"):
        read_cfp(tmp_path / "broken.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="no B-scan images"):
        read_oct_volume(tmp_path / "empty")


@pytest.mark.parametrize("pit_col", [0.3, 0.5, 0.72])
def test_foveal_pit_is_found_in_the_bscan_used(pit_col):
    volume = oct_volume(frames=15, rows=96, cols=384, pit_frame=7, pit_col=pit_col, seed=1)
    column, row = foveal_pit(volume[7])
    assert column == pytest.approx(pit_col * 384, abs=384 * 0.03)  # within 3 % of the width
    assert row == pytest.approx(96 * 0.3 + 0.2 * 96, abs=4)  # the surface at the pit's bottom
    assert foveal_pit(np.random.default_rng(0).integers(0, 256, (96, 128)).astype(np.uint8)) is None  # speckle
    assert foveal_pit(np.zeros((64, 64), np.uint8)) is None
    assert foveal_pit(oct_volume(frames=3, rows=96, cols=128)[1]) is None  # a flat retina has no pit
