"""The streaming run and the speed shortcuts, each against a direct computation or known truth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
from astropy.io import fits
from scipy.interpolate import RectBivariateSpline

from nsg_gpu import apply as apply_module
from nsg_gpu import executors
from nsg_gpu import samples as samples_module
from nsg_gpu import scale as scale_module
from nsg_gpu.apply import apply_gradient
from nsg_gpu.executors import InProcessExecutor, ProcessExecutor, default_compute_threads, idle_cores
from nsg_gpu.io import read_frame
from nsg_gpu.noise import B3_LAYER1_FRACTION, ksigma_noise, wavelet_layer_rows
from nsg_gpu.pipeline import normalize_frame
from nsg_gpu.progress import RunProgress, format_seconds
from nsg_gpu.reference import prepare_reference
from nsg_gpu.results import STAGES
from nsg_gpu.run import normalize
from nsg_gpu.samples import MAX_BLACK_PIXEL_FRACTION, SampleSet, bin_medians, bin_samples, make_grid, median_stride
from nsg_gpu.spline import _tps_kernel, evaluate_surfaces, fit_surface_spline, fit_surface_splines
from nsg_gpu.synthetic import block_residual, write_synthetic_set

SMALL = dict(width=700, height=500, n_stars=900)


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> list[Path]:
    """Six small synthetic frames."""
    return write_synthetic_set(tmp_path_factory.mktemp("stream"), n_frames=6, seed=31, **SMALL)


# -- bin medians --------------------------------------------------------------------------------
def _direct_bin_medians(data, grid, white_level):
    """Median per bin by a loop over bins, and validity from opening the whole frame."""
    s = grid.size
    channels = data.shape[0]
    medians = np.full((channels, grid.n_rows, grid.n_cols), np.nan)
    crop = data[:, grid.y0 : grid.y0 + grid.n_rows * s, grid.x0 : grid.x0 + grid.n_cols * s]
    regions = ndi.binary_opening(crop == 0, structure=np.ones((1, 3, 3), bool))
    valid = np.ones((grid.n_rows, grid.n_cols), bool)
    for r in range(grid.n_rows):
        for c in range(grid.n_cols):
            block = crop[:, r * s : (r + 1) * s, c * s : (c + 1) * s]
            zeros = regions[:, r * s : (r + 1) * s, c * s : (c + 1) * s].reshape(channels, -1).sum(axis=1)
            valid[r, c] = np.all(zeros < MAX_BLACK_PIXEL_FRACTION * s * s)
            for ch in range(channels):
                values = block[ch][(block[ch] > 0) & (block[ch] < white_level)]
                if values.size:
                    medians[ch, r, c] = np.median(values)
    return medians, valid


def test_bin_medians_equal_a_direct_loop_with_borders_holes_and_saturation():
    """Full-resolution medians and the black-pixel rule equal a loop over bins exactly."""
    rng = np.random.default_rng(41)
    data = (0.1 + rng.normal(0, 0.01, (3, 130, 170))).astype(np.float32)
    data[:, :, :23] = 0  # a registration border through a column of bins
    data[:, 100:, 150:] = 0  # a no-data corner
    data[1, 40:43, 60:63] = 0  # a small hole in one channel
    data[:, 5:45:4, 80:120:5] = 0  # scattered zeros: ignored
    data[0, 60:70, 90:100] = 1.0  # saturated
    data[2, 20:30, 30:50] = 0.0  # a bin mostly empty in one channel
    grid = make_grid(130, 170, 16)
    medians, valid = bin_medians(data, grid, 1.0, stride=1)
    expected, expected_valid = _direct_bin_medians(data, grid, 1.0)
    np.testing.assert_array_equal(valid, expected_valid)
    assert not valid.all() and valid.any()
    np.testing.assert_array_equal(np.isnan(medians), np.isnan(expected))
    np.testing.assert_allclose(medians, expected, rtol=1e-6, equal_nan=True)


def test_subsampled_bin_medians_stay_within_their_noise():
    """Medians from every 3rd pixel of 114-px bins: within 5 standard errors of the full ones."""
    sigma = 0.002
    rng = np.random.default_rng(42)
    yy, xx = np.mgrid[0:456, 0:570]
    data = (0.1 + 1e-5 * xx + 2e-5 * yy + rng.normal(0, sigma, yy.shape)).astype(np.float32)[None]
    grid = make_grid(456, 570, 114)
    stride = median_stride(114)
    assert stride == 3
    sub, valid = bin_medians(data, grid, 1.0)
    full, _ = bin_medians(data, grid, 1.0, stride=1)
    n = (114 // stride) ** 2
    assert valid.all()
    assert np.max(np.abs(sub - full)) < 5 * 1.2533 * sigma / np.sqrt(n)
    assert median_stride(37) == 1  # bins of small frames are used whole


# -- spline -------------------------------------------------------------------------------------
def test_separable_interpolation_equals_fitpack_bicubic():
    """Two matrix products give FITPACK's interpolating bicubic spline of the coarse grid."""
    rng = np.random.default_rng(43)
    x, y = rng.uniform(0, 900, 200), rng.uniform(0, 650, 200)
    z = np.sin(x / 170) + np.cos(y / 120) + rng.normal(0, 0.02, 200)
    spline = fit_surface_spline(x, y, z, smoothness=-2)
    height, width, step = 650, 900, 32
    ny, nx = int(np.ceil((height - 1) / step)) + 1, int(np.ceil((width - 1) / step)) + 1
    gy, gx = np.linspace(0, height - 1, ny), np.linspace(0, width - 1, nx)
    coarse = spline(*np.meshgrid(gx, gy))
    fitpack = RectBivariateSpline(gy, gx, coarse, kx=3, ky=3, s=0)(np.arange(height), np.arange(width))
    ours = spline.evaluate_image(height, width, step=step)
    assert ours.dtype == np.float32 and ours.shape == (height, width)
    np.testing.assert_allclose(ours, fitpack, atol=2e-6 * np.abs(fitpack).max())


@pytest.mark.parametrize("smoothness", [-4.0, -2.0, 0.0, 2.0])
def test_projected_cholesky_solve_equals_the_bordered_lu_solve(smoothness):
    """The spline system by Cholesky on the null space of the affine part against LU of the
    whole bordered system, on a bin grid with gaps, merged-sample weights and three channels."""
    from nsg_gpu import spline as spline_module

    rng = np.random.default_rng(46)
    gx, gy = np.meshgrid(np.arange(40), np.arange(27))
    keep = rng.random(gx.size) < 0.8
    x, y = (gx.ravel()[keep] + 0.5) * 50.0, (gy.ravel()[keep] + 0.5) * 50.0
    values = np.stack([np.sin(x / 300) * k + y / 1e3 for k in (1.0, -0.5, 2.0)]) + rng.normal(0, 0.01, (3, x.size))
    weights = rng.integers(1, 5, x.size).astype(float)
    fast = fit_surface_splines(x, y, values, weights=weights, smoothness=smoothness)
    centre, scale = fast[0].centre, fast[0].scale
    u, v = (x - centre[0]) / scale, (y - centre[1]) / scale
    du, dv = u[:, None] - u[None, :], v[:, None] - v[None, :]
    kernel = _tps_kernel(du * du + dv * dv) + np.diag(10.0**smoothness / weights)
    P = np.column_stack([np.ones(x.size), u, v])
    direct = spline_module._solve_bordered(kernel, P, values.T)
    for c in range(3):
        coefficients, affine = direct[: x.size, c], direct[x.size :, c]
        np.testing.assert_allclose(fast[c].coefficients, coefficients, rtol=0, atol=1e-9 * np.abs(coefficients).max())
        np.testing.assert_allclose(fast[c].affine, affine, rtol=0, atol=1e-9 * np.abs(affine).max())
        assert np.abs(P.T @ fast[c].coefficients).max() < 1e-12 * np.abs(coefficients).max()


def test_interpolation_by_row_bands_equals_the_dense_product():
    """The second product by bands of rows over the nodes their weights reach against the
    dense separable product (float32 rounding apart)."""
    from nsg_gpu.spline import _row_bands, interpolation_weights

    rng = np.random.default_rng(47)
    x, y = rng.uniform(0, 1200, 300), rng.uniform(0, 1100, 300)
    spline = fit_surface_spline(x, y, np.sin(x / 170) + np.cos(y / 120) + rng.normal(0, 0.02, 300), smoothness=-2)
    height, width, step = 1100, 1200, 19
    gy, wy = interpolation_weights(height, step)
    assert len(_row_bands(wy)) > 3 and _row_bands(wy)[1][2] > 0
    gx, wx = interpolation_weights(width, step)
    coarse = spline(*np.meshgrid(gx, gy)).astype(np.float32)
    dense = wy.astype(np.float64) @ coarse @ wx.T.astype(np.float64)
    ours = spline.evaluate_image(height, width, step=step)
    np.testing.assert_allclose(ours, dense, rtol=0, atol=2e-6 * np.abs(dense).max())


def test_one_factorization_for_all_channels_equals_separate_fits():
    """Shared nodes: the joint fit and evaluation equal one fit per channel."""
    rng = np.random.default_rng(44)
    x, y = rng.uniform(0, 500, 150), rng.uniform(0, 400, 150)
    values = np.stack([np.sin(x / 90) * k + y / 400 for k in (1.0, 0.5, -2.0)]) + rng.normal(0, 0.01, (3, 150))
    weights = rng.integers(1, 5, 150).astype(float)
    joint = fit_surface_splines(x, y, values, weights=weights, smoothness=-2)
    images = evaluate_surfaces(joint, 400, 500, step=16)
    for c in range(3):
        alone = fit_surface_spline(x, y, values[c], weights=weights, smoothness=-2)
        np.testing.assert_allclose(joint[c].coefficients, alone.coefficients, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(images[c], alone.evaluate_image(400, 500, step=16), rtol=1e-6, atol=1e-6)


def test_exact_evaluation_equals_the_kernel_sum():
    """The in-place distance expansion gives the kernel sum written out directly, nodes included."""
    rng = np.random.default_rng(45)
    x, y = rng.uniform(0, 300, 80), rng.uniform(0, 200, 80)
    spline = fit_surface_spline(x, y, np.cos(x / 50) * np.sin(y / 40), smoothness=-3)
    qx = np.concatenate([x, rng.uniform(-20, 320, 500)])
    qy = np.concatenate([y, rng.uniform(-20, 220, 500)])
    u, v = (qx - spline.centre[0]) / spline.scale, (qy - spline.centre[1]) / spline.scale
    direct = np.array(
        [
            spline.affine @ [1, a, b]
            + np.sum(spline.coefficients * _tps_kernel((spline.nodes[:, 0] - a) ** 2 + (spline.nodes[:, 1] - b) ** 2))
            for a, b in zip(u, v)
        ]
    )
    np.testing.assert_allclose(spline(qx, qy), direct, rtol=1e-10, atol=1e-10)


def test_half_bin_coarse_grid_of_a_large_frame_stays_exact():
    """Bins of 114 px (a 26 MP frame) and the coarse grid at half a bin: within 0.01 sigma
    of exact evaluation at random pixels, for a sky gradient of 10 sigma with 3 % noise."""
    height, width, size = 2280, 3420, 114
    grid = make_grid(height, width, size)
    gx, gy = np.meshgrid(grid.centre_x, grid.centre_y)
    u, v = gx / width - 0.4, gy / height - 0.6
    sky = 3 * u - 2 * v + 4 * u * u + 2 * u * v + 6 * np.exp(-(u * u + v * v) / 0.1)  # plane, curvature, dome
    sky *= 10 / np.ptp(sky)  # in sigma units
    rng = np.random.default_rng(47)
    spline = fit_surface_spline(gx.ravel(), gy.ravel(), sky.ravel() + rng.normal(0, 0.03, gx.size), smoothness=-2)
    image = spline.evaluate_image(height, width, step=size // 2)
    ys, xs = rng.integers(0, height, 5000), rng.integers(0, width, 5000)
    exact = spline(xs.astype(float), ys.astype(float))
    assert np.max(np.abs(image[ys, xs] - exact)) < 0.01


def _bin_lattice_spline(merge: bool, channels: int = 1):
    """A spline on the bins of a 2280 x 3420 frame (114 px, a tenth of them missing), or on
    its super-samples of two bins, and the lattice of the bins' centres at half a bin."""
    height, width, size = 2280, 3420, 114
    grid = make_grid(height, width, size)
    gx, gy = np.meshgrid(grid.centre_x, grid.centre_y)
    rng = np.random.default_rng(48)
    keep = rng.random(gx.size) > 0.1
    u, v = gx.ravel()[keep] / width - 0.4, gy.ravel()[keep] / height - 0.6
    sky = np.stack(
        [k * (3 * u - 2 * v + 4 * u * u) + 6 * np.exp(-(u * u + v * v) / 0.1) for k in range(1, channels + 1)]
    )
    samples = SampleSet(gx.ravel()[keep], gy.ravel()[keep], sky + rng.normal(0, 0.03, sky.shape), np.ones(keep.sum()))
    if merge:
        samples = bin_samples(samples, grid, int(0.6 * keep.sum()))
        assert len(samples) < keep.sum()
    splines = fit_surface_splines(samples.x, samples.y, samples.values, weights=samples.weight, smoothness=-2)
    return splines, (height, width), (float(grid.centre_x[0]), float(grid.centre_y[0]), size / 2)


@pytest.mark.parametrize("merge", [False, True], ids=["bins", "super-samples-of-two"])
def test_lattice_convolution_equals_the_kernel_sum(merge):
    """Nodes on the lattice of bin centres at half a bin: the coarse grid's values by one FFT
    convolution equal the direct kernel sum at every grid point, for three channels."""
    from nsg_gpu.spline import _evaluate, _evaluate_on_lattice, lattice_weights

    splines, (height, width), (x0, y0, spacing) = _bin_lattice_spline(merge, channels=3)
    gy, _ = lattice_weights(height, y0, spacing)
    gx, _ = lattice_weights(width, x0, spacing)
    assert gx[0] <= 0 < width - 1 <= gx[-1] and gy[0] <= 0 < height - 1 <= gy[-1]
    np.testing.assert_allclose(np.diff(gx), spacing, rtol=1e-12)
    fast = _evaluate_on_lattice(splines, gx, gy, spacing)
    direct = _evaluate(splines, *np.meshgrid(gx, gy))
    assert fast.shape == direct.shape == (3, gy.size, gx.size)
    np.testing.assert_allclose(fast, direct, rtol=0, atol=1e-10 * np.abs(direct).max())


def test_nodes_off_the_lattice_are_summed_directly():
    """A node off the lattice (a super-sample of three bins, say): no convolution, and the
    image is the direct evaluation's on the same grid."""
    from nsg_gpu.spline import _evaluate_on_lattice, lattice_weights

    splines, (height, width), (x0, y0, spacing) = _bin_lattice_spline(False)
    moved = fit_surface_splines(
        np.append(splines[0].nodes[:, 0] * splines[0].scale + splines[0].centre[0], 100.3),
        np.append(splines[0].nodes[:, 1] * splines[0].scale + splines[0].centre[1], 100.0),
        np.append(np.zeros(splines[0].coefficients.size), 1.0)[None],
    )
    gy, wy = lattice_weights(height, y0, spacing)
    gx, wx = lattice_weights(width, x0, spacing)
    assert _evaluate_on_lattice(moved, gx, gy, spacing) is None
    image = evaluate_surfaces(moved, height, width, lattice=(x0, y0, spacing))[0]
    coarse = moved[0](*np.meshgrid(gx, gy)).astype(np.float32)
    dense = wy.astype(np.float64) @ coarse @ wx.T.astype(np.float64)
    np.testing.assert_allclose(image, dense, rtol=0, atol=2e-6 * np.abs(dense).max())


@pytest.mark.parametrize("merge", [False, True], ids=["bins", "super-samples-of-two"])
def test_lattice_grid_of_a_large_frame_stays_exact(merge):
    """The gradient's coarse grid on the bins' lattice: within 0.01 sigma of exact evaluation
    at random pixels for a sky of 10 sigma with 3 % noise, as the half-bin grid."""
    splines, (height, width), lattice = _bin_lattice_spline(merge)
    image = evaluate_surfaces(splines, height, width, lattice=lattice)[0]
    rng = np.random.default_rng(49)
    ys, xs = rng.integers(0, height, 5000), rng.integers(0, width, 5000)
    exact = splines[0](xs.astype(float), ys.astype(float))
    assert np.ptp(exact) > 5
    assert np.max(np.abs(image[ys, xs] - exact)) < 0.01


# -- noise --------------------------------------------------------------------------------------
def _direct_ksigma(image, max_pixels):
    """The whole-image computation: smooth everything, erode everything, then keep rows."""
    h, w = image.shape
    stride = max(1, int(np.ceil(h * w / max_pixels)))
    kernel = np.array([1, 4, 6, 4, 1], np.float32) / 16
    smooth = ndi.convolve1d(ndi.convolve1d(image, kernel, axis=1, mode="reflect"), kernel, axis=0, mode="reflect")
    layer = (image - smooth)[::stride]
    valid = ndi.binary_erosion(image > 0, structure=np.ones((5, 5), bool), border_value=0)[::stride]
    values = layer[valid]
    sigma, centre = float(values.std()), 0.0
    for _ in range(10):
        kept = values[np.abs(values - centre) < 3 * sigma]
        new_sigma, centre = float(kept.std()), float(kept.mean())
        if abs(new_sigma - sigma) <= 1e-6 * sigma:
            sigma = new_sigma
            break
        sigma = new_sigma
    return sigma / B3_LAYER1_FRACTION


@pytest.mark.parametrize("max_pixels", [pytest.param(10**9, id="every-row"), pytest.param(40_000, id="every-7th-row")])
def test_row_subsampled_noise_equals_whole_image_smoothing(max_pixels):
    """Layer and mask computed on the kept rows alone: the same noise as the whole-image way."""
    rng = np.random.default_rng(46)
    yy, xx = np.mgrid[0:403, 0:611]
    image = (0.1 + 0.05 * np.sin(xx / 40) * np.cos(yy / 30) + rng.normal(0, 0.003, yy.shape)).astype(np.float32)
    image[:, :37] = 0
    image[390:, :] = 0
    image[200:203, 300:305] = 0
    image[::11, ::13] = 0
    assert ksigma_noise(image, max_pixels=max_pixels) == pytest.approx(_direct_ksigma(image, max_pixels), rel=1e-5)


# -- the host apply ------------------------------------------------------------------------------
def _holey_frame(shape, seed):
    rng = np.random.default_rng(seed)
    data = (0.05 + rng.random(shape)).astype(np.float32)
    data[..., :, :3] = 0  # a registration border
    data[..., 5:8, 4:9] = 0  # a hole
    data[..., ::11, ::13] = 0  # scattered zeros
    return data


@pytest.mark.parametrize("truncate", [pytest.param(True, id="truncated"), pytest.param(False, id="not-truncated")])
@pytest.mark.parametrize("shape", [pytest.param((1, 203, 611), id="mono"), pytest.param((3, 61, 50), id="colour")])
def test_blocked_apply_equals_whole_array_arithmetic(shape, truncate):
    """The row-blocked, in-place apply gives the bits and maximum of whole-array NumPy."""
    data = _holey_frame(shape, 47)
    gradient = (np.random.default_rng(48).random(shape) * 0.4).astype(np.float32)
    scale = np.float32([1.13, 0.87, 1.41][: shape[0]])
    expected = np.multiply(scale[:, None, None], data, dtype=np.float32)
    expected -= gradient
    expected[data == 0] = 0
    high = float(expected.max())
    if truncate:
        np.clip(expected, 0, 1.0, out=expected)
    out, got_high, layer, valid = apply_gradient(data, scale, gradient, white_level=1.0, truncate=truncate)
    assert out.dtype == np.float32 and layer is None and valid is None
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))
    assert got_high == high
    # Written into the gradient's own buffer: the same bits, and the gradient is the output.
    model = gradient.copy()
    out, got_high, _, _ = apply_gradient(
        data, scale, model, white_level=1.0, truncate=truncate, overwrite_gradient=True
    )
    assert out is model
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))
    assert got_high == high


@pytest.mark.parametrize(
    ("height", "width", "stride"),
    [
        pytest.param(403, 611, 7, id="every-7th-row"),
        pytest.param(130, 171, 1, id="every-row"),
        pytest.param(131, 7, 3, id="narrow"),
        pytest.param(9, 5, 2, id="tiny"),
        pytest.param(4, 4, 1, id="under-the-window"),
    ],
)
def test_host_wavelet_layer_equals_scipy_to_the_bit(height, width, stride):
    """The host layer of the apply step equals :func:`wavelet_layer_rows` (SciPy) bit for bit."""
    image = _holey_frame((height, width), 49)
    expected, expected_valid = wavelet_layer_rows(image, stride)
    layer, valid = apply_module._layer_rows_host(image, stride)
    np.testing.assert_array_equal(valid, expected_valid)
    np.testing.assert_array_equal(layer.view(np.uint32), expected.view(np.uint32))


def test_detect_noise_from_a_row_subsample_gives_the_same_scale(frames, monkeypatch):
    """The detect step's noise from a subsample of rows: within 2 % of every row's, and the
    same stars found, but for a star on the 5 sigma that finds it (one of 129 here), and the
    same scale to 1e-5 as with every row."""
    reference = prepare_reference(read_frame(frames[0]))
    target = read_frame(frames[1])
    image = target.data[0]
    full = ksigma_noise(image, max_pixels=10**9)
    assert ksigma_noise(image, max_pixels=40_000) == pytest.approx(full, rel=0.02)
    monkeypatch.setattr(scale_module, "DETECT_NOISE_PIXELS", 10**9)
    direct = scale_module.measure_scale(reference, target)
    monkeypatch.setattr(scale_module, "DETECT_NOISE_PIXELS", 40_000)
    subsampled = scale_module.measure_scale(reference, target)
    assert abs(subsampled.pairs - direct.pairs) <= max(1, direct.pairs // 100)
    np.testing.assert_allclose(subsampled.scale, direct.scale, rtol=1e-5)


@pytest.mark.slow
# -- accuracy with the shortcuts forced on test-sized frames -------------------------------------
def test_subsampled_medians_keep_the_accuracy_bounds(mono_set, monkeypatch):
    """Bins of the mono set subsampled 2x2 (they are used whole at this size): scale within
    3.5 % of the truth and residual within 0.1 sigma of the perfect normalization, as the
    accuracy tests require."""
    monkeypatch.setattr(samples_module, "MEDIAN_PIXELS", 300)
    s = mono_set
    reference = prepare_reference(read_frame(s.paths[0]))
    assert median_stride(reference.grid.size) == 2
    noise = s.field.pixel_noise(0)
    truth_ref = s.field.noise_free(0)
    for k in (1, 3):
        result = normalize_frame(reference, read_frame(s.paths[k]))
        truth = s.field.frames[k].scale(s.field.reference)
        assert abs(result.scale[0] / truth[0] - 1) < 0.035
        data_in = s.input(k)
        covered = np.all(data_in != 0, axis=0)
        ours = block_residual(result.data, truth_ref, covered) / noise
        best = block_residual(s.field.perfect_normalization(k, data_in), truth_ref, covered) / noise
        assert np.all(ours <= best + 0.1), (k, ours, best)


# -- the streaming run --------------------------------------------------------------------------
def _outputs(run) -> list:
    return [(Path(f.path).name, f.status, f.error is None, f.scale, f.weight) for f in run.frames]


def test_streamed_run_equals_frame_after_frame(frames, tmp_path):
    """Read-ahead and write-behind change nothing: same rows in the same order, same pixels,
    and every stage timed."""
    bad = tmp_path / "broken.fits"
    bad.write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    inputs = [frames[0], frames[1], bad, *frames[2:]]
    streamed = normalize(
        inputs, reference=frames[0], output_dir=tmp_path / "a", executor=InProcessExecutor(read_ahead=1, write_behind=1)
    )
    serial = normalize(
        inputs, reference=frames[0], output_dir=tmp_path / "b", executor=InProcessExecutor(threads=False)
    )
    assert _outputs(streamed) == _outputs(serial)
    assert [f.status for f in streamed.frames] == ["reference", "ok", "failed", "ok", "ok", "ok", "ok"]
    for a, b in zip(streamed.frames, serial.frames):
        if a.status == "ok":
            np.testing.assert_array_equal(fits.getdata(a.output), fits.getdata(b.output))
            assert set(a.timings) == set(STAGES) and all(v >= 0 for v in a.timings.values())
            assert a.seconds == pytest.approx(sum(a.timings.values()))
    assert list(streamed.frames[2].timings) == ["read"]
    rows = json.loads((tmp_path / "a" / "results.json").read_text())
    assert [r["file"] for r in rows["frames"]] == [f.path for f in serial.frames]


def test_stop_on_error_writes_nothing_after_the_failure(frames, tmp_path):
    """With read-ahead the frames after the failed one are neither reported nor written."""
    bad = tmp_path / "broken.fits"
    bad.write_bytes(b"not a fits file at all")
    inputs = [frames[0], frames[1], bad, *frames[2:]]
    run = normalize(inputs, reference=frames[0], output_dir=tmp_path / "o", stop_on_error=True)
    assert [f.status for f in run.frames] == ["reference", "ok", "failed"]
    assert run.not_tried == len(frames) - 2  # said in the summary
    written = sorted(p.name for p in (tmp_path / "o").glob("*.fits"))
    assert written == sorted([f"{frames[0].stem}_nsg.fits", f"{frames[1].stem}_nsg.fits"])


def test_consumer_that_stops_early_ends_the_threads(frames, tmp_path):
    """Leaving the result loop after one frame stops the reader and writer."""
    import threading

    from nsg_gpu.run import plan_run

    plan = plan_run(frames, reference=frames[0], output_dir=tmp_path)
    reference = prepare_reference(read_frame(frames[0]))
    results = InProcessExecutor(read_ahead=1, write_behind=1).run(reference, plan.jobs())
    first = next(results)
    assert first.status == "ok"
    results.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("nsg-")]


# -- progress -----------------------------------------------------------------------------------
class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_rate_and_eta_follow_the_recent_frames():
    """A slow start (the reference) is forgotten once the window moves past it."""
    clock = _Clock()
    progress = RunProgress(100, window=5, clock=clock)
    assert progress.frames_per_minute is None and progress.eta_seconds is None
    clock.now = 60.0  # the reference and set-up: one minute
    progress.update(1)
    assert progress.frames_per_minute is None
    for done in range(2, 12):
        clock.now += 6.0  # then a frame every 6 s
        progress.update(done)
    assert progress.frames_per_minute == pytest.approx(10.0)
    assert progress.eta_seconds == pytest.approx(89 * 6.0)
    assert "11/100 frames, 10.0 frames/min, ETA 8 min 54 s" == progress.summary()
    clock.now += 30.0  # one slow frame moves the estimate by far less than 89 x 5
    progress.update(12)
    assert 6.0 * 88 < progress.eta_seconds < 13.0 * 88
    for done in range(13, 63):  # 50 outputs kept from an earlier run: done at once, no work
        progress.update(done, kept=True)
    assert 6.0 * 38 < progress.eta_seconds < 13.0 * 38  # 38 frames left, at the working rate
    progress.update(100)
    assert progress.eta_seconds == 0.0
    assert format_seconds(7620) == "2 h 07 min"


@pytest.mark.parametrize(
    ("cores", "idle", "gpu", "threads"),
    [
        pytest.param(1, 1.0, False, 1, id="one-core"),
        pytest.param(2, 2.0, False, 2, id="two-quiet-cores"),
        pytest.param(2, 1.6, False, 2, id="two-cores-mostly-idle"),
        pytest.param(2, 0.9, False, 1, id="two-cores-one-busy"),
        pytest.param(2, -3.0, False, 1, id="overloaded"),
        pytest.param(3, 3.0, False, 2, id="three-cores-gil-bound"),
        pytest.param(16, 4.0, False, 2, id="sixteen-cores-gil-bound"),
        pytest.param(16, 16.0, True, 1, id="gpu"),
    ],
)
def test_compute_threads_never_oversubscribe_the_cores(cores, idle, gpu, threads):
    """A compute thread per core that the machine leaves idle, no more than two (the GIL), one
    on a GPU."""
    assert default_compute_threads(gpu=gpu, cores=cores, idle=idle) == threads


def test_one_frame_or_one_core_takes_one_thread_without_measuring(monkeypatch):
    """A run of one frame, or on one core, gets one compute thread without the 0.1 s that
    measuring the idle cores takes; two frames on two quiet cores still get two."""
    measured = []

    def idle(interval=0.1):
        measured.append(interval)
        return 2.0

    monkeypatch.setattr(executors, "idle_cores", idle)
    assert default_compute_threads(cores=2, frames=1) == 1
    assert default_compute_threads(cores=1, frames=5) == 1
    assert measured == []
    assert default_compute_threads(cores=2, frames=2) == 2
    assert default_compute_threads(cores=2, frames=None) == 2
    assert measured == [0.1, 0.1]


def test_idle_cores_see_a_busy_core():
    """A process spinning on one core takes it from the idle cores."""
    cpus = os.cpu_count() or 1
    assert 0 <= idle_cores() <= cpus + 1e-9
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert idle_cores(0.3) <= cpus - 0.5
    finally:
        spinner.kill()
        spinner.wait()


def test_processes_stop_after_a_failure_and_report_in_order(frames, tmp_path):
    """Worker processes report in job order, and nothing after the first failed frame."""
    broken = tmp_path / "broken.fits"
    broken.write_bytes(b"not a FITS file")
    inputs = [frames[0], frames[1], broken, frames[2], frames[3]]
    run = normalize(
        inputs,
        reference=frames[0],
        output_dir=tmp_path / "out",
        executor=ProcessExecutor(processes=2),
        stop_on_error=True,
    )
    assert [Path(f.path).name for f in run.frames] == [frames[0].name, frames[1].name, "broken.fits"]
    assert [f.status for f in run.frames] == ["reference", "ok", "failed"]
