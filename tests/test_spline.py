"""The thin-plate smoothing spline against SciPy's RBF and analytic surfaces."""

from __future__ import annotations

import numpy as np
import pytest
from assertions import assert_close
from scipy.interpolate import RBFInterpolator

from nsg_gpu.samples import make_grid
from nsg_gpu.spline import fit_surface_spline
from nsg_gpu.synthetic import SyntheticField


def test_spline_reproduces_plane_and_matches_scipy_rbf():
    rng = np.random.default_rng(2)
    x, y = rng.uniform(0, 1000, 300), rng.uniform(0, 700, 300)
    plane = 0.002 * x - 0.001 * y + 3
    spline = fit_surface_spline(x, y, plane, smoothness=-2)
    gx, gy = np.meshgrid(np.linspace(0, 1000, 7), np.linspace(0, 700, 5))
    assert_close(spline(gx, gy), 0.002 * gx - 0.001 * gy + 3, "spline_plane")
    z = np.sin(x / 200) + np.cos(y / 150) + rng.normal(0, 0.05, 300)
    weights = rng.integers(1, 4, 300).astype(float)
    spline = fit_surface_spline(x, y, z, weights=weights, smoothness=-2)
    centre, scale = spline.centre, spline.scale
    nodes = np.column_stack([(x - centre[0]) / scale, (y - centre[1]) / scale])
    reference = RBFInterpolator(nodes, z, kernel="thin_plate_spline", smoothing=1e-2 / weights, degree=1)
    query = np.column_stack([(gx.ravel() - centre[0]) / scale, (gy.ravel() - centre[1]) / scale])
    assert_close(spline(gx.ravel(), gy.ravel()), reference(query), "spline_rbf")
    plane_fit = fit_surface_spline(x, y, z, smoothness=4)
    assert plane_fit.coefficients.size == 0


def test_coarse_evaluation_within_one_percent_of_noise():
    """The CPU's coarse grid plus bicubic interpolation against exact evaluation."""
    noise = 1.0
    rng = np.random.default_rng(3)
    field = SyntheticField(width=600, height=400, n_frames=2, seed=3, noise_sigma=noise / 10.0, max_gradient_sigma=10)
    grid = make_grid(400, 600, 20)
    gx, gy = np.meshgrid(grid.centre_x, grid.centre_y)
    truth = field.sky(1)[0] / (noise / 10.0)  # gradient of about 10 sigma, in sigma units
    z = truth[gy.astype(int), gx.astype(int)].ravel() + rng.normal(0, 0.03, gx.size)
    spline = fit_surface_spline(gx.ravel(), gy.ravel(), z, smoothness=-2)
    exact = spline.evaluate_image(400, 600, step=1)
    coarse = spline.evaluate_image(400, 600, step=10)
    assert np.max(np.abs(coarse - exact)) < 0.01 * noise


def test_duplicate_spline_nodes_are_merged():
    x = np.array([0.0, 100, 0, 100, 50, 50])
    y = np.array([0.0, 0, 100, 100, 50, 50])
    spline = fit_surface_spline(x, y, 1 + 0.01 * x, smoothness=-2)
    assert spline.coefficients.size == 5
    assert spline(np.array([25.0]), np.array([75.0]))[0] == pytest.approx(1.25, abs=1e-9)


def test_degenerate_spline_inputs_raise():
    with pytest.raises(ValueError, match="at least 3"):
        fit_surface_spline([1, 2], [1, 2], [0, 0])
    with pytest.raises(ValueError, match="one line"):
        fit_surface_spline([1, 2, 3, 4], [1, 2, 3, 4], [0, 1, 0, 1])


def test_lattice_convolution_is_scipys_fftconvolve_to_the_bit():
    """The lattice evaluation's convolution gives ``scipy.signal.fftconvolve(mode="valid")``'s
    bits (the same FFTs) on tables with sparse coefficients, axes of length one included."""
    import scipy.signal

    from nsg_gpu.spline import _valid_convolution

    rng = np.random.default_rng(5)
    for ny, nx in [(1, 1), (1, 9), (7, 1), (2, 2), (13, 40), (64, 37), (96, 129)]:
        table = rng.normal(size=(2 * ny - 1, 2 * nx - 1)) * 10.0 ** rng.integers(-3, 4)
        placed = np.where(rng.random((ny, nx)) < 0.3, rng.normal(size=(ny, nx)), 0.0)
        expected = scipy.signal.fftconvolve(table, placed, mode="valid")
        got = _valid_convolution(table, placed)
        assert got.shape == expected.shape and np.array_equal(got, expected), (ny, nx)
