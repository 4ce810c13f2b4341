"""Aperture photometry, the line fits and the seeing correction against analytic values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
from conftest import integrated_gaussians

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


def test_flat_aperture_at_pixel_centres_keeps_what_the_exact_aperture_keeps():
    """``photometry.FLAT`` (every pixel whose centre is within the aperture, once) against the
    exact aperture (photutils' overlaps), on Moffat stars of 3 px at 16 places within a pixel,
    in an aperture of 3 FWHM + 1 px: each within 0.1 % of the enclosed energy less the
    annulus' wing light (which pixel centres fall inside moves a few pixels of the edge,
    where a star holds little light: 0.015 % at most), and their mean within 0.02 %."""
    geometry = photometry.aperture_geometry(3.0, aperture_fwhm=3, aperture_add=1, gap=2, bg_delta=10)
    places = (np.arange(16) + 0.5) / 16
    fractions = np.array([[fx, fy] for fx in places[::4] for fy in places[::4]])
    flat, exact = [], []
    for fx, fy in fractions:
        image, _ = _moffat_image(80, 40 + fx, 39 + fy, 10.0, 3.0)
        x, y = np.array([40 + fx]), np.array([39 + fy])
        flat.append(photometry.measure_stars(image, x, y, geometry, photometry.FLAT).flux[0, 0])
        exact.append(photometry.measure_stars(image, x, y, geometry).flux[0, 0])
    kept = 10.0 * photometry.kept_share(geometry, MoffatPSF.from_fwhm(3.0, 3.0))
    assert np.allclose(exact, kept, rtol=2e-3)
    assert np.allclose(flat, kept, rtol=1e-3)
    assert np.mean(flat) == pytest.approx(kept, rel=2e-4)


@pytest.mark.parametrize("distance", [0.0, 6.3, 12.6, 16.1, 22.7, 33.9])
def test_a_neighbours_light_in_the_aperture_and_annulus_is_what_photutils_counts(distance):
    """A star of unit flux ``distance`` px from the measured one (a Moffat of 4 px and index
    2.5, drawn on a grid of quarter pixels, so that the pixels' sampling of its core does not
    count): photutils' exact aperture sum less its annulus mean over the aperture's area is
    what :func:`photometry.neighbour_shares` says, inside the aperture, across its edge, in
    the annulus and beyond it."""
    from photutils.aperture import ApertureStats, CircularAnnulus, CircularAperture, aperture_photometry

    geometry = photometry.ApertureGeometry(12.5, 15.5, 28.0)
    psf = MoffatPSF.from_fwhm(4.0, 2.5)
    fine = 4  # grid points per pixel
    size = 161 * fine
    yy, xx = (np.mgrid[:size, :size].astype(float) + 0.5) / fine
    centre = 161 / 2 + 0.3
    image = psf((xx - centre - distance) ** 2 + (yy - centre) ** 2) / fine**2
    at = (centre * fine - 0.5, centre * fine - 0.5)
    aperture = CircularAperture(at, geometry.radius * fine)
    annulus = CircularAnnulus(at, geometry.annulus_inner * fine, geometry.annulus_outer * fine)
    held = float(aperture_photometry(image, aperture, method="exact")["aperture_sum"][0])
    mean = float(ApertureStats(image, annulus).mean)
    expected = held - math.pi * (geometry.radius * fine) ** 2 * mean
    (counted,) = photometry.neighbour_shares(geometry, psf, [distance])
    assert counted == pytest.approx(expected, rel=0.02, abs=3e-4), (counted, expected)
    if distance == 0.0:
        assert counted == pytest.approx(photometry.kept_share(geometry, psf), abs=1e-4)


def test_neighbours_light_counts_each_other_star_by_its_flux_and_distance():
    """Three catalogue stars: each of the two within reach counts the other's light by their
    flux ratio and :func:`photometry.neighbour_shares` at their distance, not its own, for
    each frame's profile; a far star, however bright, counts for neither; the stars asked for
    come in any order."""
    geometry = photometry.ApertureGeometry(10.5, 13.5, 24.0)
    psf = MoffatPSF.from_fwhm(3.0, 3.0)
    flux = np.array([1000.0, 2000.0, 1e6])
    x, y = np.array([100.0, 114.3, 900.0]), np.array([100.0, 100.0, 900.0])
    broad = MoffatPSF.from_fwhm(4.0, 3.0)
    shares = photometry.neighbours_light(geometry, (psf, broad), flux, x, y, np.array([1, 0]))
    assert shares.shape == (2, 2)
    for row, profile in zip(shares, (psf, broad)):
        (at,) = photometry.neighbour_shares(geometry, profile, [14.3])
        own = photometry.kept_share(geometry, profile)
        assert row == pytest.approx([1000 * at / (2000 * own), 2000 * at / (1000 * own)], rel=1e-9)
    (at,) = photometry.neighbour_shares(geometry, psf, [14.3])
    assert at < -0.05  # in the annulus: the annulus mean takes more than the aperture holds


def test_neighbour_shares_kept_per_profile_are_each_profiles_own():
    """:func:`photometry.neighbour_shares` keeps its tables per profile, aperture and reach:
    a profile that differs from another in one thing only (the aperture, the width, the index
    at the same width, the shape, the pixel integration, distances farther out) gets its own
    table, in either order, whose share at distance 0 is :func:`photometry.kept_share` of
    that profile (computed without the tables); a table asked for again is the same; the
    kept tables cannot be written to."""
    base = {"geometry": photometry.ApertureGeometry(7.0, 10.0, 18.0), "alpha": 1.2, "beta": 3.0}
    # Distances beyond the reach of every case here, so that only ``distances`` moves it.
    base |= {"shear": (0.0, 0.0), "integrated": False, "distances": np.linspace(0.0, 90.0, 57)}
    changes = {
        "geometry": photometry.ApertureGeometry(5.0, 8.0, 16.0),
        "alpha": 1.6,
        "beta": 4.0,
        "shear": (0.2, -0.1),
        "integrated": True,
        "distances": np.linspace(0.0, 120.0, 57),
    }

    def profile(case):
        return MoffatPSF(case["alpha"], case["beta"], pixel_integrated=case["integrated"], shear=case["shear"])

    def shares(case):
        return photometry.neighbour_shares(case["geometry"], profile(case), case["distances"])

    photometry._neighbour_share_table.cache_clear()
    expected_base = shares(base)
    for key, value in changes.items():
        case = base | {key: value}
        for first, second in ((base, case), (case, base)):
            photometry._neighbour_share_table.cache_clear()
            shares(first)
            got = shares(second)
            assert got[0] == pytest.approx(photometry.kept_share(second["geometry"], profile(second)), abs=1e-4), key
            assert np.array_equal(got, expected_base) == (second is base), key
            np.testing.assert_array_equal(shares(second), got)
    grid, counted = photometry._neighbour_share_table(base["geometry"], 1.2, 3.0, (0.0, 0.0), False, 91.0)
    with pytest.raises(ValueError):
        grid[0] = 1.0
    with pytest.raises(ValueError):
        counted[0] = 1.0


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


def _two_frames_with_hot_pixels(hot: float):
    """Undersampled stars (1.2 px) on a grid in a reference and a target at half its
    transmission, the target captured half a pixel off and registered back by a cubic
    spline; a hot pixel of ``hot`` in a star's aperture or annulus, two in the reference
    and two in the target (before its registration, which spreads each over 2 x 2 pixels and
    rings beyond); a sharp neighbour in star 4's annulus in both frames."""
    rng = np.random.default_rng(3)
    grid = np.arange(30, 240, 40)
    x = (grid[None, :] + rng.uniform(-0.5, 0.5, (grid.size, grid.size))).ravel()
    y = (grid[:, None] + rng.uniform(-0.5, 0.5, (grid.size, grid.size))).ravel()
    shape, sigma, fwhm = (260, 260), 0.0015, 1.2
    reference = integrated_gaussians(shape, x, y, fwhm, 1.0) + 0.05 + rng.normal(0, sigma, shape)
    captured = integrated_gaussians(shape, x + 0.5, y + 0.5, fwhm, 0.5) + 0.04 + rng.normal(0, sigma, shape)
    reference += integrated_gaussians(shape, [x[4] + 8.2], [y[4] + 2.9], fwhm, 0.04)
    captured += integrated_gaussians(shape, [x[4] + 8.7], [y[4] + 3.4], fwhm, 0.02)
    spoiled = {0: (2, 2), 1: (8, -3), 2: (-3, 3), 3: (-7, -5)}  # star: its hot pixel's offset (px)
    for star, (dx, dy) in spoiled.items():
        image, shift = (reference, 0) if star < 2 else (captured, 1)
        image[int(round(y[star])) + dy + shift, int(round(x[star])) + dx + shift] += hot
    target = scipy.ndimage.shift(captured, (-0.5, -0.5), order=3, mode="nearest")
    return reference[None], target[None], x, y, fwhm, list(spoiled)


@pytest.mark.parametrize("weighted", [False, True], ids=["aperture", "psf-weights"])
def test_a_hot_pixel_near_a_star_in_either_frame_is_left_out_of_both(weighted):
    """A hot pixel of 200 sigmas near a star in either frame (:func:`_two_frames_with_hot_pixels`)
    is found and left out of both frames: every star's flux ratio is then what it is on the
    same frames without hot pixels, within its error, and the stars without one are measured
    to the bit as before; left in, in the plain aperture, each spoils its star's ratio by
    several errors."""
    transmission = 0.5
    reference, target, x, y, fwhm, spoiled = _two_frames_with_hot_pixels(0.3)
    clean_reference, clean_target, *_ = _two_frames_with_hot_pixels(0.0)
    geometry = photometry.aperture_geometry(fwhm, aperture_fwhm=3.0, aperture_add=1.0, gap=1.0, bg_delta=5.0)
    weight = MoffatPSF.from_fwhm(2.0, 3.0) if weighted else None

    def ratios(ref_image, tgt_image, masked: bool):
        ref_cut = photometry.cut_out(ref_image, x, y, geometry, keep_mosaic=not weighted)
        tgt_cut = photometry.cut_out(tgt_image, x, y, geometry, keep_mosaic=not weighted)
        core = photometry.DEFECT_CORE_FWHM * fwhm
        ref_mask, tgt_mask = photometry.shared_defects(ref_cut, x, y, tgt_cut, x, y, core) if masked else (None, None)
        ref = photometry.measure_stars(ref_image, x, y, geometry, weight, cutouts=ref_cut, excluded=ref_mask)
        tgt = photometry.measure_stars(tgt_image, x, y, geometry, weight, cutouts=tgt_cut, excluded=tgt_mask)
        ratio = tgt.flux[0] / ref.flux[0]
        error = ratio * np.hypot(tgt.flux_error[0] / tgt.flux[0], ref.flux_error[0] / ref.flux[0])
        marked = np.zeros(x.size, bool) if ref_mask is None else ref_mask.any(axis=(1, 2))
        return ratio, error, marked

    clean, error, _ = ratios(clean_reference, clean_target, masked=False)
    cleaned, _, marked = ratios(reference, target, masked=True)
    spoilt, _, _ = ratios(reference, target, masked=False)
    assert set(spoiled) <= set(np.nonzero(marked)[0].tolist())
    # Left out, the hot pixels take a little sky (and the far wings) with them.
    assert np.all(np.abs(cleaned - clean) < 2 * error), np.round((cleaned - clean) / error, 1)
    np.testing.assert_array_equal(cleaned[~marked], spoilt[~marked])
    if not weighted:
        # Left in, each moves its star's ratio by several of the errors the clean frames
        # state (3.2-20 here; in the annulus it also inflates the star's own stated error).
        # PSF weights of 2 px give these pixels, 3-9 px out, too little weight for that.
        missed = (spoilt[spoiled] - clean[spoiled]) / error[spoiled]
        assert np.all(np.abs(missed) > 3), np.round(missed, 1)
        # The plain aperture keeps all of an undersampled star's light: the ratio is the
        # transmission itself.
        deviation = (cleaned - transmission) / error
        assert np.all(np.abs(deviation) < 4) and np.sqrt(np.mean(deviation**2)) < 1.6, np.round(deviation, 1)


def test_annulus_without_excluded_pixels_equals_the_annulus_made_again():
    """The annulus statistics less some pixels (from the sums, reading only those pixels)
    equal those made again from stamps where the pixels are no data."""
    rng = np.random.default_rng(5)
    channels, n, side = 3, 40, 41
    stamps = (0.05 + rng.normal(0, 0.002, (channels, n, side, side))).astype(np.float32)
    stamps[:, 3, :5] = 0  # no data in one star's corner
    fx, fy = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n)
    geometry = photometry.ApertureGeometry(6.0, 8.0, 19.5)
    mean, std, count = photometry.annulus_statistics(stamps, fx, fy, geometry)
    cut = photometry.Cutouts(geometry, stamps, fx, fy, np.ones(n, bool), mean, std, count, 1.0)
    excluded = rng.random((n, side, side)) < 0.03
    excluded[::2] = False
    made = photometry._without(cut, excluded, geometry)
    zeroed = stamps.copy()
    zeroed[:, excluded] = 0
    mean2, std2, count2 = photometry.annulus_statistics(zeroed, fx, fy, geometry)
    np.testing.assert_allclose(made.background, mean2, rtol=1e-9)
    np.testing.assert_allclose(made.background_std, std2, rtol=1e-6)
    np.testing.assert_array_equal(made.counted, count2)
    assert not np.allclose(made.background_std[:, 1::2], std[:, 1::2], rtol=1e-9)
