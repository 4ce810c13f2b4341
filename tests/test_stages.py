"""Each stage against analytic values or an independent reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.io import fits
from scipy.interpolate import RBFInterpolator

from nsg_gpu import photometry
from nsg_gpu.backend import NUMPY, get_backend, select_backend
from nsg_gpu.errors import BackendUnavailableError, FrameReadError, FrameShapeError, OutputError
from nsg_gpu.io import output_path, read_frame, set_nsg_keywords, write_frame
from nsg_gpu.noise import ksigma_noise, weight_from_noise
from nsg_gpu.params import Parameters, auto_sample_size, degrees_per_pixel, resolve_parameters
from nsg_gpu.psf import MoffatPSF
from nsg_gpu.samples import SampleSet, bin_medians, bin_samples, make_grid, star_rejection
from nsg_gpu.spline import fit_surface_spline
from nsg_gpu.stars import detect_stars
from nsg_gpu.synthetic import SyntheticField


# -- params -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pixel", "focal", "width", "height", "size", "gap", "bg_delta"),
    [
        pytest.param(6.0, 1000, 4096, 4096, 91, 1, 6, id="6um-1000mm"),
        pytest.param(3.76, 500, 6248, 4176, 114, 1, 5, id="3.76um-500mm"),
        pytest.param(3.76, 2000, 6248, 4176, 114, 5, 19, id="3.76um-2000mm"),
        pytest.param(2.4, 250, 3008, 3008, 67, 1, 5, id="2.4um-250mm"),
    ],
)
def test_auto_rules_match_nsg_worked_examples(pixel, focal, width, height, size, gap, bg_delta):
    """The worked examples of the algorithm reference (section 8)."""
    a = degrees_per_pixel(pixel, focal)
    assert auto_sample_size(width, height, pixel, a) == size
    resolved = resolve_parameters(
        Parameters(),
        width=width,
        height=height,
        header_focal_length_mm=focal,
        header_pixel_size_um=pixel,
        reference_max=1.0,
        max_star_flux=100.0,
        n_reference_stars=1000,
    )
    assert resolved.aperture_gap == gap
    assert resolved.aperture_bg_delta == bg_delta
    assert resolved.linear_range == 0.7
    assert resolved.sample_size == size


def test_parameters_reject_nonsense():
    with pytest.raises(ValueError, match="star_flux_tolerance"):
        Parameters(star_flux_tolerance=0.5)


# -- backend ------------------------------------------------------------------------------------
def test_backend_inferred_from_arrays_and_cupy_refused_without_gpu():
    assert get_backend(np.zeros(3)) is NUMPY
    assert select_backend("numpy") is NUMPY
    from nsg_gpu.backend import cupy_status

    if not cupy_status()[0]:
        with pytest.raises(BackendUnavailableError, match="not usable"):
            select_backend("cupy")
        assert select_backend("auto") is NUMPY


# -- io -----------------------------------------------------------------------------------------
def test_integer_frames_are_scaled_and_nonfinite_is_no_data(tmp_path):
    raw = np.array([[0, 1000], [65535, 30000]], dtype=np.float64)
    hdu = fits.PrimaryHDU((raw - 32768).astype(np.int16))
    hdu.header["BZERO"] = 32768
    hdu.header["BSCALE"] = 1
    hdu.writeto(tmp_path / "u16.fits")
    frame = read_frame(tmp_path / "u16.fits")
    assert frame.data.dtype == np.float32 and frame.data.shape == (1, 2, 2)
    np.testing.assert_array_equal(frame.data[0], raw)
    assert frame.white_level == 65535
    fits.PrimaryHDU(np.array([[np.nan, 0.5], [np.inf, 0.2]], np.float32)).writeto(tmp_path / "nan.fits")
    np.testing.assert_array_equal(read_frame(tmp_path / "nan.fits").data[0], np.array([[0, 0.5], [0, 0.2]], np.float32))


def test_read_errors_name_the_file(tmp_path):
    bad = tmp_path / "garbage.fits"
    bad.write_bytes(b"this is not a FITS file at all" * 100)
    with pytest.raises(FrameReadError, match="garbage.fits"):
        read_frame(bad)
    fits.PrimaryHDU(np.zeros((2, 3, 4), np.float32)).writeto(tmp_path / "cube.fits")
    with pytest.raises(FrameShapeError, match="3 planes"):
        read_frame(tmp_path / "cube.fits")
    with pytest.raises(FrameReadError, match="no such file"):
        read_frame(tmp_path / "missing.fits")


def test_write_is_atomic_and_keeps_header(tmp_path):
    header = fits.Header()
    header["CTYPE1"] = "RA---TAN"
    header["NSGS0"] = 9.0
    header.add_history("NSG.old: 1")
    header.add_history("calibrated")
    header = set_nsg_keywords(
        header, reference_name="ref.fits", transmission=[0.5], snr=[0.8], weight=0.64, high=1.2, history=["x: 1"]
    )
    path = write_frame(tmp_path / "out.fits", np.ones((1, 4, 5), np.float32), header)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.fits"]
    with fits.open(path) as hdul:
        h = hdul[0].header
        assert h["NSGS0"] == 0.5 and h["NWEIGHT"] == pytest.approx(0.64) and h["CTYPE1"] == "RA---TAN"
        assert "NSGS1" not in h
        assert [str(v) for v in h["HISTORY"]] == ["calibrated", "NSG.x: 1"]
    assert output_path("/a/light_1.fits.gz", "/o").name == "light_1_nsg.fits"


def test_write_failure_leaves_nothing(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(OutputError):
        write_frame(blocked / "out.fits", np.ones((1, 2, 2), np.float32), fits.Header())


# -- stars --------------------------------------------------------------------------------------
def test_detection_finds_true_stars_and_fwhm():
    field = SyntheticField(width=800, height=600, n_frames=2, n_stars=600, seed=5, fwhms=[3.0, 4.2], borders=False)
    truth_xy = np.column_stack([field.star_x, field.star_y])
    for k in (0, 1):
        catalog = detect_stars(field.render(k))
        bright = catalog.take(np.arange(min(60, len(catalog))))
        distance = np.min(
            np.hypot(*(bright.x[:, None] - truth_xy[None, :, 0], bright.y[:, None] - truth_xy[None, :, 1])), axis=1
        )
        assert np.median(distance) < 0.3
        assert catalog.fwhm == pytest.approx(field.frames[k].fwhm, rel=0.15)


# -- photometry ---------------------------------------------------------------------------------
def _moffat_image(size, x0, y0, flux, fwhm, beta=3.0, sky=0.05):
    yy, xx = np.mgrid[0:size, 0:size]
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    profile = (1 + ((xx - x0) ** 2 + (yy - y0) ** 2) / alpha**2) ** (-beta)
    return (sky + flux * profile / profile.sum())[None].astype(np.float64), alpha


def test_aperture_flux_matches_moffat_enclosed_energy():
    """Aperture sum minus the annulus mean: the enclosed energy less the wing light in the annulus."""
    image, alpha = _moffat_image(200, 100.3, 99.6, 10.0, 4.0)
    geometry = photometry.aperture_geometry(4.0, aperture_fwhm=1.5, aperture_add=1, gap=2, bg_delta=10)
    m = photometry.measure_stars(image, np.array([100.3]), np.array([99.6]), geometry)

    def outside(r):
        return (1 + (r / alpha) ** 2) ** (1 - 3.0)

    r, inner, outer = geometry.radius, geometry.annulus_inner, geometry.annulus_outer
    wing = 10.0 * (outside(inner) - outside(outer)) / (math.pi * (outer**2 - inner**2))
    expected = 10.0 * (1 - outside(r)) - wing * math.pi * r**2
    assert m.ok[0]
    assert m.flux[0, 0] == pytest.approx(expected, rel=2e-3)
    assert m.background[0, 0] == pytest.approx(0.05 + wing, abs=1e-4)


def test_l1_line_ignores_outliers():
    rng = np.random.default_rng(0)
    x = rng.uniform(1, 100, 200)
    y = 2.5 * x + 3 + rng.normal(0, 0.01, 200)
    y[:20] += 400
    m, b = photometry.l1_line(x, y)
    assert m == pytest.approx(2.5, rel=1e-3) and b == pytest.approx(3, abs=0.2)


def test_fit_scale_recovers_scale_with_outliers_and_errors():
    rng = np.random.default_rng(1)
    x = rng.uniform(1, 50, 300)
    error = 0.01 * x + 0.05
    y = 1.7 * x + rng.normal(0, error)
    y[:6] *= 3
    fit = photometry.fit_scale(x, y, target_error=error / 1.7, reference_error=error, tolerance=1.5, outlier_removal=2)
    assert fit.scale == pytest.approx(1.7, rel=2e-3)
    assert not fit.used[:6].any()


def test_seeing_correction_recovers_flux_ratio():
    """A star at FWHM 2.8 and the same star at FWHM 4.2 and half the flux: ratio 2 after correction."""
    xs = np.array([60.2, 180.7, 300.4, 60.5, 180.1, 300.9])
    ys = np.array([60.3, 60.8, 60.1, 180.6, 180.2, 180.5])
    fluxes = np.array([20, 15, 12, 10, 8, 6.0])

    def frame(fwhm, scale):
        image = np.full((1, 240, 360), 0.05)
        for x0, y0, f in zip(xs, ys, fluxes):
            star, _ = _moffat_image(240, x0, y0, f * scale, fwhm, sky=0.0)
            image[:, :, :240] += star[:, :, :240] if x0 < 240 else 0
        return image

    reference, target = frame(2.8, 1.0), frame(4.2, 0.5)
    keep = xs < 240
    geometry = photometry.aperture_geometry(4.2, aperture_fwhm=1.5, aperture_add=1, gap=2, bg_delta=8)
    r = photometry.measure_stars(reference, xs[keep], ys[keep], geometry)
    t = photometry.measure_stars(target, xs[keep], ys[keep], geometry)
    raw = np.median(r.flux[0] / t.flux[0])
    kappa = photometry.seeing_correction(
        geometry, reference_psf=MoffatPSF.from_fwhm(2.8, 3.0), target_psf=MoffatPSF.from_fwhm(4.2, 3.0)
    )
    assert abs(raw / 2 - 1) > 0.01  # the uncorrected ratio is off by the seeing
    assert raw * kappa == pytest.approx(2.0, rel=2e-3)


# -- samples ------------------------------------------------------------------------------------
def test_bin_medians_ignore_zeros_and_saturation_and_flag_black_bins():
    grid = make_grid(45, 64, 10)
    assert (grid.x0, grid.y0, grid.n_cols, grid.n_rows) == (2, 3, 6, 4)
    data = np.full((1, 45, 64), 0.2, np.float32)
    data[0, 3:13, 2:12] = np.linspace(0.1, 0.3, 100).reshape(10, 10)
    data[0, 3, 2] = 1.0  # saturated: ignored
    data[0, 13:16, 12:15] = 0.0  # a 3x3 no-data region (9 %): bin invalid
    data[0, 3:13, 12:22][::3, ::3] = 0.0  # scattered zeros (clipped pixels): ignored, bin valid
    medians, valid = bin_medians(data, grid, white_level=1.0)
    assert medians[0, 0, 0] == pytest.approx(np.median(np.linspace(0.1, 0.3, 100)[1:]), rel=1e-5)
    assert not valid[1, 1] and valid[0, 0] and valid[0, 1]
    assert medians[0, 0, 1] == pytest.approx(0.2)


def test_star_rejection_and_binning():
    grid = make_grid(200, 200, 20)
    rejected = star_rejection(grid, [100.0], [100.0], [15.0])
    assert rejected[5, 5] and rejected[5, 0] is not True and not rejected[0, 0]
    n = 100
    samples = SampleSet(np.repeat(grid.centre_x, 10), np.tile(grid.centre_y, 10), np.ones((1, n)), np.ones(n))
    binned = bin_samples(samples, grid, max_samples=30)
    assert len(binned) <= 30 and binned.weight.sum() == n


# -- spline -------------------------------------------------------------------------------------
def test_spline_reproduces_plane_and_matches_scipy_rbf():
    rng = np.random.default_rng(2)
    x, y = rng.uniform(0, 1000, 300), rng.uniform(0, 700, 300)
    plane = 0.002 * x - 0.001 * y + 3
    spline = fit_surface_spline(x, y, plane, smoothness=-2)
    gx, gy = np.meshgrid(np.linspace(0, 1000, 7), np.linspace(0, 700, 5))
    np.testing.assert_allclose(spline(gx, gy), 0.002 * gx - 0.001 * gy + 3, atol=1e-9)
    z = np.sin(x / 200) + np.cos(y / 150) + rng.normal(0, 0.05, 300)
    weights = rng.integers(1, 4, 300).astype(float)
    spline = fit_surface_spline(x, y, z, weights=weights, smoothness=-2)
    centre, scale = spline.centre, spline.scale
    nodes = np.column_stack([(x - centre[0]) / scale, (y - centre[1]) / scale])
    reference = RBFInterpolator(nodes, z, kernel="thin_plate_spline", smoothing=1e-2 / weights, degree=1)
    query = np.column_stack([(gx.ravel() - centre[0]) / scale, (gy.ravel() - centre[1]) / scale])
    np.testing.assert_allclose(spline(gx.ravel(), gy.ravel()), reference(query), atol=1e-8)
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


# -- noise --------------------------------------------------------------------------------------
def test_ksigma_noise_of_white_noise_and_weight():
    rng = np.random.default_rng(4)
    image = (0.1 + rng.normal(0, 0.002, (500, 600))).astype(np.float32)
    image[:, :50] = 0
    assert ksigma_noise(image) == pytest.approx(0.002, rel=0.03)
    snr, weight = weight_from_noise([0.002], [0.004], [0.5])
    assert snr[0] == pytest.approx(1.0) and weight == pytest.approx(1.0)
