"""Aperture photometry, the line fits and the seeing correction against analytic values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nsg_gpu import photometry, scalefit
from nsg_gpu.psf import MoffatPSF


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
    m, b = scalefit.l1_line(x, y)
    assert m == pytest.approx(2.5, rel=1e-3) and b == pytest.approx(3, abs=0.2)


def test_fit_scale_recovers_scale_with_outliers_and_errors():
    rng = np.random.default_rng(1)
    x = rng.uniform(1, 50, 300)
    error = 0.01 * x + 0.05
    y = 1.7 * x + rng.normal(0, error)
    y[:6] *= 3
    fit = scalefit.fit_scale(x, y, target_error=error / 1.7, reference_error=error, tolerance=1.5, outlier_removal=2)
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


def test_annulus_statistics_equal_photutils_aperture_stats():
    """All annuli at once: photutils' ApertureStats mean, std and area, star by star."""
    from photutils.aperture import ApertureStats, CircularAnnulus

    rng = np.random.default_rng(50)
    channels, n = 2, 120  # more stars than one group (annulus_statistics works in groups)
    geometry = photometry.ApertureGeometry(radius=4.5, annulus_inner=7.0, annulus_outer=11.5)
    half = 13
    side = 2 * half + 1
    stamps = (0.1 + rng.random((channels, n, side, side))).astype(np.float32)
    stamps[:, :5, :, :9] = 0  # stars at a registration border
    stamps[1, 5:10, ::3, ::4] = 0  # scattered holes in one channel
    stamps[:, 10] = 0  # a star with no data at all
    fx, fy = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n)
    fx[11], fy[11] = 0.0, 0.0  # on a pixel centre: radii hit pixel centres exactly
    mean, std, count = photometry.annulus_statistics(stamps, fx, fy, geometry)
    no_data = np.any(stamps == 0, axis=0)
    for i in range(n):
        annulus = CircularAnnulus(
            (half + fx[i], half + fy[i]), r_in=geometry.annulus_inner, r_out=geometry.annulus_outer
        )
        for c in range(channels):
            stats = ApertureStats(stamps[c, i].astype(np.float64), annulus, mask=no_data[i])
            area = float(getattr(stats.center_aper_area, "value", stats.center_aper_area))
            if i == 10:  # photutils says NaN, we say 0: both fail the "enough annulus" test
                assert np.isnan(mean[c, i]) and np.isnan(stats.mean) and count[c, i] == 0
                continue
            assert count[c, i] == area
            assert mean[c, i] == pytest.approx(float(stats.mean), rel=1e-12)
            assert std[c, i] == pytest.approx(float(stats.std), rel=1e-10)


@pytest.mark.parametrize("n", [pytest.param(1, id="one"), pytest.param(1500, id="even"), pytest.param(1501, id="odd")])
def test_fast_median_equals_numpy_median_to_the_bit(n):
    """The line fits' median is ``np.median``, bit for bit, ties and NaN included."""
    rng = np.random.default_rng(53)
    values = rng.normal(0, 1, n)
    assert scalefit.median(values) == np.median(values)
    ties = np.round(values, 1)
    assert scalefit.median(ties) == np.median(ties)
    values[n // 2] = np.nan
    assert np.isnan(scalefit.median(values))
