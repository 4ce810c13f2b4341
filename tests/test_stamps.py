"""The one stamp gatherer: positions rounded to the nearest pixel, 0 outside the image."""

from __future__ import annotations

import numpy as np
import pytest

from nsg_gpu import stamps as stamp_module
from nsg_gpu.stamps import channel_peaks, gather_stamps, local_level, stamp_peaks


def test_stamps_are_the_image_around_each_position_and_zero_outside():
    image = np.arange(1, 7 * 9 + 1, dtype=np.float32).reshape(7, 9)
    stamps = gather_stamps(image, np.array([4.4, 0.0, 8.4]), np.array([3.2, 0.4, 6.5]), 1)
    np.testing.assert_array_equal(stamps[0], image[2:5, 3:6])
    corner = np.zeros((3, 3), np.float32)
    corner[1:, 1:] = image[:2, :2]
    np.testing.assert_array_equal(stamps[1], corner)
    assert stamps[2][1, 1] == image[6, 8]  # rint(6.5) rounds to even
    assert np.all(stamps[2][2, :] == 0) and np.all(stamps[2][:, 2] == 0)


def test_colour_stamps_keep_the_channels_and_the_helpers_agree():
    rng = np.random.default_rng(2)
    data = rng.uniform(1, 2, (3, 20, 30)).astype(np.float32)
    x, y = np.array([10.0, 25.0]), np.array([5.0, 15.0])
    stamps = gather_stamps(data, x, y, 2)
    assert stamps.shape == (3, 2, 5, 5)
    for c in range(3):
        np.testing.assert_array_equal(stamps[c], gather_stamps(data[c], x, y, 2))
    np.testing.assert_array_equal(stamp_peaks(data[0], x, y, 2), stamps[0].max(axis=(1, 2)))
    border = np.concatenate([stamps[0, 0, 0], stamps[0, 0, -1], stamps[0, 0, :, 0], stamps[0, 0, :, -1]])
    assert local_level(data[0], x, y, 2)[0] == np.median(border)


def test_channel_peaks_equal_peaks_of_the_brightest_channel_image():
    """Peaks over the channels' stamps equal the peaks of ``data.max(axis=0)``, edges included."""
    rng = np.random.default_rng(51)
    data = rng.random((3, 40, 50)).astype(np.float32)
    x = np.array([0.2, 10.6, 49.4, 25.0, -0.4])
    y = np.array([0.0, 39.3, 20.5, 12.2, 5.0])
    np.testing.assert_array_equal(channel_peaks(data, x, y), stamp_peaks(data.max(axis=0), x, y))
    np.testing.assert_array_equal(channel_peaks(data[:1], x, y), stamp_peaks(data[0], x, y))


@pytest.mark.parametrize("half", [0, 1, 4, 13])
@pytest.mark.parametrize("channels", [None, 3])
def test_window_gather_equals_the_pixel_gather(half, channels):
    """The host path (whole windows inside the image, pixel gather at the edges) gives the
    same stamps, to the bit and in the image's dtype, as the pixel-by-pixel gather."""
    rng = np.random.default_rng(half)
    shape = (120, 150) if channels is None else (channels, 120, 150)
    image = rng.random(shape, dtype=np.float32)
    x, y = rng.uniform(-20, 170, 400), rng.uniform(-20, 140, 400)
    fast = stamp_module.gather_stamps(image, x, y, half)
    direct = stamp_module._gather_pixels(image, np.rint(x).astype(np.int64), np.rint(y).astype(np.int64), half)
    assert fast.dtype == direct.dtype == image.dtype
    np.testing.assert_array_equal(fast, direct)
