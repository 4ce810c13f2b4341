"""Inputs shared by the kernel tests, emulated (test_kernels.py) and on the GPU (test_gpu.py).

Small, seeded, with odd sizes, image borders, no-data regions and saturated pixels, so that
every branch of every kernel is taken while the host emulation stays fast.
"""

from __future__ import annotations

import numpy as np
from assertions import assert_close

from nsg_gpu.samples import make_grid
from nsg_gpu.spline import fit_surface_spline
from nsg_gpu.stars import matched_filter

__all__ = [
    "SHAPES",
    "star_image",
    "sample_frame",
    "spline_case",
    "apply_case",
    "stack_case",
    "assert_same",
]

#: Odd and awkward image sizes (height, width): a 1-px wide strip, primes, a width of 4k+1.
SHAPES = [(1, 9), (7, 5), (37, 53), (64, 33)]


def star_image(shape, *, seed: int, zero_block: bool = True) -> np.ndarray:
    """Sky with Gaussian stars and noise, float32; a corner without data when ``zero_block``."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    image = 0.1 + rng.normal(0, 0.002, shape)
    for _ in range(max(1, h * w // 150)):
        x, y, flux = rng.uniform(-2, w + 2), rng.uniform(-2, h + 2), rng.uniform(0.01, 0.5)
        image += flux * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / 1.3**2)
    if zero_block:
        image[: h // 4, : w // 3] = 0
    return image.astype(np.float32)


def matched_case(shape, *, seed: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """An image and its matched-filter image (NumPy twin)."""
    image = star_image(shape, seed=seed)
    residual = np.where(image > 0, image - 0.1, 0).astype(np.float32)
    return image, matched_filter(residual, sigma)


def sample_frame(channels: int, shape, *, seed: int, white_level: float = 1.0) -> np.ndarray:
    """A frame for the bin medians: quantized values (ties), zeros scattered and in a
    registration border that crosses bins, saturated pixels, a bin's worth of nothing."""
    rng = np.random.default_rng(seed)
    h, w = shape
    frame = np.round(rng.uniform(0.05, 0.3, (channels, h, w)) * 200) / 200  # many equal values
    frame[rng.uniform(size=frame.shape) < 0.03] = 0  # scattered zeros
    frame[rng.uniform(size=frame.shape) < 0.02] = white_level  # saturated
    frame[rng.uniform(size=frame.shape) < 0.01] = 1.5 * white_level  # above the white level
    frame[:, : h // 2, : w // 3] = 0  # border region, not aligned with the bins
    frame[:, h // 2 :, -3:] = 0  # a thin strip, partly in the last bin column
    frame[0, -5:, :4] = white_level  # saturated patch, no usable pixel in a corner bin
    frame[-1, 3, 3:6] = 0  # a short zero run: not a region (the opening removes it)
    return frame.astype(np.float32)


def grid_for(shape, size: int):
    return make_grid(shape[0], shape[1], size)


def spline_case(*, seed: int, n_nodes: int, shape, smoothness: float = -2.0):
    """A spline fitted to a smooth surface plus noise at random nodes, some on pixel centres."""
    rng = np.random.default_rng(seed)
    h, w = shape
    x = rng.uniform(0, w - 1, n_nodes)
    y = rng.uniform(0, h - 1, n_nodes)
    x[: n_nodes // 4] = np.round(x[: n_nodes // 4])  # nodes exactly on pixels: r = 0 there
    y[: n_nodes // 4] = np.round(y[: n_nodes // 4])
    z = 2.0 + 0.8 * np.sin(x / w * 3) * np.cos(y / h * 2) + 0.002 * x + rng.normal(0, 0.05, n_nodes)
    return fit_surface_spline(x, y, z, smoothness=smoothness)


def apply_case(channels: int, shape, *, seed: int):
    """A target with a no-data border, a gradient and per-channel scales."""
    rng = np.random.default_rng(seed)
    h, w = shape
    data = rng.uniform(0.02, 0.9, (channels, h, w)).astype(np.float32)
    data[:, :, : w // 4] = 0
    data[:, rng.uniform(size=(h, w)) < 0.02] = 0
    yy, xx = np.mgrid[0:h, 0:w]
    gradient = np.stack([0.05 * (c + 1) * (xx / w - yy / h) + 0.01 for c in range(channels)]).astype(np.float32)
    scale = rng.uniform(0.8, 1.6, channels)
    return data, gradient, scale


def stack_case(n_frames: int, n_pixels: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples of ``n_pixels`` pixels in ``n_frames`` frames, and the frames' weights: sky with
    noise of a different level per frame, no data (0) in a border and scattered, NaN, outliers
    high (trails, hot pixels) and low, saturated values tied across frames, exact ties, pixels
    covered by 0, 1 and 2 frames, and two-frame pixels far apart."""
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(0.002, 0.004, n_frames)
    values = (0.1 + rng.normal(0, 1, (n_frames, n_pixels)) * sigma[:, None]).astype(np.float32)
    values[rng.uniform(size=values.shape) < 0.08] = 0  # scattered no data
    values[: n_frames // 3, : n_pixels // 7] = 0  # a registration border
    values[rng.uniform(size=values.shape) < 0.03] += np.float32(0.05)  # hot pixels, trails
    values[rng.uniform(size=values.shape) < 0.02] -= np.float32(0.03)  # dark outliers
    values[rng.uniform(size=values.shape) < 0.01] = np.nan  # no data too
    values[:, 5:9] = 1.0  # saturated in every frame: all tied
    values[:, 9:13] = np.round(values[:, 9:13], 2)  # many exact ties
    values[:, 13] = 0  # no frame
    values[1:, 14] = 0  # one frame
    values[2:, 15] = 0  # two frames...
    values[:2, 15] = [0.1, 0.25][:n_frames]  # ... far apart: percentile clipping would reject both
    weights = rng.uniform(0.3, 2.0, n_frames)
    return values, weights


def stack_maps(n_pixels: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The peak and the noise per pixel for noise clipping: a peak from none to many times the
    noise, and a noise of 0 with no peak where the pixel's scale is 0 (no clipping)."""
    rng = np.random.default_rng(seed + 500)
    peak = (rng.choice([0.0, 0.003, 0.02], n_pixels) * rng.uniform(0.5, 1.0, n_pixels)).astype(np.float32)
    noise = rng.uniform(0.001, 0.005, n_pixels).astype(np.float32)
    noise[::29] = 0
    peak[::29] = 0
    return peak, noise


def assert_same(actual, expected, *, what: str = "") -> None:
    """A kernel's result equals its twin's: dtype and shape first, then values, exactly."""
    assert np.asarray(actual).dtype == np.asarray(expected).dtype, f"{what}: dtype differs"
    assert_close(actual, expected, "kernel", what=what)
