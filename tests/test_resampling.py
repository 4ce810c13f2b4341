"""The registration's interpolation kernel read from a frame's noise, against kernels we apply."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage

from nsg_gpu.resampling import (
    InterpolationKernel,
    interpolation_kernel,
    interpolation_taps,
    noise_correlation,
    registration_kernel,
)


def _impulse_response(shift: float) -> np.ndarray:
    """What ``scipy.ndimage.shift`` (cubic spline) does to one pixel, along one axis."""
    x = np.zeros(41)
    x[20] = 1
    return scipy.ndimage.shift(x, shift, order=3, mode="constant")


def _true_correlation(shift: float) -> np.ndarray:
    h = _impulse_response(shift)
    a = np.correlate(h, h, "full")
    return a[41:44] / a[40]


@pytest.mark.parametrize("shift", [(0.3, 0.2), (0.5, 0.5), (0.0, 0.4)])
def test_kernel_of_a_cubic_spline_shift(shift):
    """White noise shifted by a cubic spline: the correlations at lags 1-3 within 0.015 of the
    spline's, and the kernel leaves the noise's standard deviation within 2 % of what the
    spline leaves."""
    rng = np.random.default_rng(1)
    noise = 0.1 + rng.normal(0, 0.01, (1000, 1000))
    shifted = scipy.ndimage.shift(noise, shift, order=3, mode="nearest")[None].astype(np.float32)
    rho = noise_correlation(shifted)
    assert np.allclose(rho[0], _true_correlation(shift[1]), atol=0.015), rho
    assert np.allclose(rho[1], _true_correlation(shift[0]), atol=0.015), rho
    kernel = interpolation_kernel(shifted)
    hx, hy = _impulse_response(shift[1]), _impulse_response(shift[0])
    assert kernel.noise_gain() == pytest.approx(np.sqrt(np.sum(hx**2) * np.sum(hy**2)), rel=0.02)
    assert sum(kernel.x) == pytest.approx(1.0) and sum(kernel.y) == pytest.approx(1.0)


def test_no_kernel_where_the_frame_was_not_resampled():
    """Stars, hot pixels, a gradient and a textured nebula on white noise: no kernel; the same
    frame shifted by 0.4 px has one, whose noise gain is the spline's within 3 %."""
    rng = np.random.default_rng(2)
    shape = (900, 1200)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    nebula = scipy.ndimage.gaussian_filter(rng.normal(0, 1, shape), 10)
    image = 0.05 + 3e-5 * xx + 0.02 * nebula / nebula.std()
    stars = np.zeros(shape)
    stars[rng.integers(0, shape[0], 3000), rng.integers(0, shape[1], 3000)] = rng.uniform(0.01, 0.5, 3000)
    image += scipy.ndimage.gaussian_filter(stars, 1.0) + rng.normal(0, 2e-3, shape)
    image[rng.integers(0, shape[0], 200), rng.integers(0, shape[1], 200)] = 1.0
    assert interpolation_kernel(image[None].astype(np.float32)) is None
    shifted = scipy.ndimage.shift(image, (0.0, 0.4), order=3, mode="nearest")
    kernel = interpolation_kernel(shifted[None].astype(np.float32))
    assert kernel is not None
    assert kernel.noise_gain() == pytest.approx(np.sqrt(np.sum(_impulse_response(0.4) ** 2)), rel=0.03)


@pytest.mark.parametrize(
    ("name", "shift"),
    [("cubic spline", (0.3, 0.15)), ("Lanczos-4", (0.45, 0.25)), ("linear", (0.2, 0.35)), ("bicubic", (0.1, 0.4))],
)
def test_the_interpolation_and_its_shift_are_recognised(name, shift):
    """White noise resampled by an interpolation at a sub-pixel shift (x, y): the kernel read
    from it is that interpolation's at the shift within 0.03 px (the noise cannot tell a
    shift from its mirror: the positive one), its taps the interpolation's own."""
    rng = np.random.default_rng(5)
    noise = 0.1 + rng.normal(0, 0.01, (1000, 1000))
    hx, hy = interpolation_taps(name, shift[0]), interpolation_taps(name, shift[1])
    resampled = scipy.ndimage.correlate1d(noise, hx, axis=1, mode="nearest")
    resampled = scipy.ndimage.correlate1d(resampled, hy, axis=0, mode="nearest")
    kernel = interpolation_kernel(resampled[None].astype(np.float32))
    assert kernel.name == name
    assert np.allclose(kernel.centre, shift, atol=0.03), kernel.centre
    assert np.allclose(kernel.x, hx, atol=0.04) and np.allclose(kernel.y, hy, atol=0.04)


def test_cubic_spline_taps_are_scipys_shift():
    """``interpolation_taps('cubic spline', s)`` applied as a correlation is what
    ``scipy.ndimage.shift`` by ``-s`` does (to the taps' cut at 5 px), and its centroid is s."""
    rng = np.random.default_rng(6)
    captured = rng.normal(size=400)
    for s in (0.17, 0.5):
        taps = interpolation_taps("cubic spline", s)
        direct = scipy.ndimage.shift(captured, -s, order=3, mode="nearest")[20:-20]
        via = scipy.ndimage.correlate1d(captured, taps, mode="nearest")[20:-20]
        assert np.max(np.abs(direct - via)) < 4e-3
        assert InterpolationKernel(taps, taps).centre[0] == pytest.approx(s, abs=5e-3)


def test_a_rotated_frame_keeps_the_zero_phase_kernel():
    """Noise rotated by 10 degrees (cubic spline): its shift varies across the frame, and no
    single interpolation at one shift matches it (the nearest misses by 0.03); the zero-phase
    kernel of its spectrum is kept, symmetric and centred."""
    rng = np.random.default_rng(7)
    noise = 0.1 + rng.normal(0, 0.01, (1200, 1200))
    rotated = scipy.ndimage.rotate(noise, 10, order=3, reshape=False, mode="nearest")[200:-200, 200:-200]
    kernel = interpolation_kernel(rotated[None].astype(np.float32))
    assert kernel is not None
    assert kernel.name == "zero-phase" and kernel.symmetric and kernel.centre == (0.0, 0.0)


def _unresolved_sky(rng, shape) -> np.ndarray:
    """White noise and, a fifth of its variance, a random field blurred by a 0.7 px
    Gaussian: a sky whose own pixels correlate by about 0.05 at lag 1, as a crowded field's
    unresolved stars do."""
    smooth = scipy.ndimage.gaussian_filter(rng.normal(0, 1, shape), 0.7)
    smooth *= 0.01 / np.sqrt(5) / smooth.std()
    return 0.1 + smooth + rng.normal(0, 0.01, shape)


@pytest.mark.parametrize("shift", [(0.3, -0.2), (0.0, 0.45)])
def test_a_target_s_kernel_read_against_the_reference_s_noise(shift):
    """A crowded sky's unresolved stars correlate a frame's pixels that no registration
    touched: read alone, the reference and an unshifted target have a kernel. Read against
    the reference's correlations (``registration_kernel``), the unshifted target has none,
    and a target shifted by a cubic spline has the spline at its shift (a shift and its
    mirror read alike)."""
    rng = np.random.default_rng(4)
    shape = (900, 1100)
    reference = _unresolved_sky(rng, shape)[None].astype(np.float32)
    own = noise_correlation(reference)
    assert 0.03 < own[0, 0] < 0.08 and 0.03 < own[1, 0] < 0.08, own
    assert interpolation_kernel(reference) is not None  # the sky read as a kernel
    unshifted = _unresolved_sky(rng, shape)[None].astype(np.float32)
    assert interpolation_kernel(unshifted) is not None
    assert registration_kernel(noise_correlation(unshifted), own) is None
    captured = _unresolved_sky(rng, shape)
    target = scipy.ndimage.shift(captured, shift, order=3, mode="nearest")[None].astype(np.float32)
    kernel = registration_kernel(noise_correlation(target), own)
    assert kernel is not None and kernel.name == "cubic spline", kernel
    assert np.allclose(np.abs(kernel.centre), np.abs(shift[::-1]), atol=0.05), (kernel.centre, shift)
