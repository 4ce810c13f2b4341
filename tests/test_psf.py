"""PSF fitting and PSF-weighted photometry against stars whose profile we set."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from nsg_gpu import photometry
from nsg_gpu import psf as psf_fitting
from nsg_gpu.psf import MoffatPSF


def _render(shape, xs, ys, fluxes, psf: MoffatPSF, sky=0.0) -> np.ndarray:
    """Point-sampled Moffat stars of total flux ``fluxes`` (each stamp normalized to its sum)."""
    image = np.full(shape, sky, np.float64)
    half = int(math.ceil(12 * psf.alpha))
    off = np.arange(-half, half + 1)
    for x0, y0, f in zip(xs, ys, fluxes):
        xi, yi = int(round(x0)), int(round(y0))
        star = psf.shape(psf.r2(off[None, :] + xi - x0, off[:, None] + yi - y0))
        star *= f / star.sum()
        rows = slice(max(yi - half, 0), min(yi + half + 1, shape[0]))
        cols = slice(max(xi - half, 0), min(xi + half + 1, shape[1]))
        image[rows, cols] += star[
            rows.start - (yi - half) : rows.stop - (yi - half), cols.start - (xi - half) : cols.stop - (xi - half)
        ]
    return image


def _grid_stars(rng, n_side=7, spacing=60, margin=50):
    g = margin + spacing * np.arange(n_side)
    xs, ys = np.meshgrid(g, g)
    xs = xs.ravel() + rng.uniform(-0.5, 0.5, xs.size)
    ys = ys.ravel() + rng.uniform(-0.5, 0.5, ys.size)
    return xs, ys, rng.uniform(2.0, 8.0, xs.size)


def _nebula(shape, rng, amplitude):
    """Smooth structure on a 10-30 px scale, like the synthetic frames' nebula texture."""
    import scipy.ndimage

    texture = scipy.ndimage.gaussian_filter(rng.normal(0, 1, shape), 8)
    return amplitude * (1 + texture / texture.std())


def test_moffat_profile_has_unit_flux_and_its_fwhm():
    psf = MoffatPSF.from_fwhm(3.4, 2.7)
    assert psf.fwhm == pytest.approx(3.4)
    assert psf.shape((psf.fwhm / 2) ** 2) == pytest.approx(0.5)
    r = np.linspace(0, 400 * psf.alpha, 2_000_001)
    assert np.trapezoid(2 * math.pi * r * psf(r * r), r) == pytest.approx(1.0, rel=1e-4)


def test_fit_psf_recovers_fwhm_and_index_under_noise_and_gradient():
    rng = np.random.default_rng(3)
    truth = MoffatPSF.from_fwhm(3.6, 2.7)
    shape = (470, 470)
    xs, ys, fluxes = _grid_stars(rng)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    sky = 0.05 + 2e-5 * xx - 1e-5 * yy
    image = _render(shape, xs, ys, fluxes, truth) + sky + rng.normal(0, 1e-3, shape)
    image[100, 100] = 0.9  # a hot pixel in a wing: clipped, not fitted
    stamps = psf_fitting.cut_stamps(image, np.round(xs, 0), np.round(ys, 0), 15)
    fitted, used, model = psf_fitting.fit_psf(stamps, fwhm=3.0, sigma=1e-3, beta=3.5)
    assert used.all() and fitted.stars == xs.size
    assert fitted.fwhm == pytest.approx(truth.fwhm, rel=0.01)
    assert fitted.beta == pytest.approx(truth.beta, abs=0.08)
    # The star model carries each star's light: its sum is the star's flux within the stamp.
    inside = 1 - (1 + (15 / truth.alpha) ** 2) ** (1 - truth.beta)
    assert np.median(model.sum(axis=1) / fluxes) == pytest.approx(inside, rel=0.01)


def _drawn_out(psf: MoffatPSF, ellipticity: float, angle: float) -> MoffatPSF:
    """``psf`` drawn out to ``1 - b/a = ellipticity`` along ``angle`` (degrees from x)."""
    g = -math.log(1 - ellipticity)
    # The shear's phase is twice the narrow axis's angle, a quarter turn from the major one.
    phase = 2 * math.radians(angle - 90)
    return replace(psf, shear=(g * math.cos(phase), g * math.sin(phase)))


def test_drawn_out_moffat_keeps_its_flux_and_has_the_axes_set():
    """A drawn-out Moffat sums to 1 over the plane, its half-maximum contour's axes are
    ``1 / sqrt(1 - e)`` and ``sqrt(1 - e)`` times the round one's along and across the angle
    set, and it reads back its ellipticity and angle."""
    round_psf = MoffatPSF.from_fwhm(3.0, 3.0)
    psf = _drawn_out(round_psf, 0.3, 35.0)
    assert psf.ellipticity == pytest.approx(0.3) and psf.elongation_angle == pytest.approx(35.0)
    m11, m12, m22 = psf.quadratic()
    assert m11 * m22 - m12 * m12 == pytest.approx(1.0)
    h = 0.05
    axis = np.arange(-60, 60 + h / 2, h)
    x, y = np.meshgrid(axis, axis)
    assert float(np.sum(psf(psf.r2(x, y)))) * h * h == pytest.approx(1 - (1 + (60 / psf.alpha) ** 2) ** -2, rel=1e-3)
    half = round_psf.fwhm / 2
    for angle, stretch in ((35.0, 1 / math.sqrt(0.7)), (125.0, math.sqrt(0.7))):
        t = math.radians(angle)
        r = half * stretch
        assert psf.shape(psf.r2(r * math.cos(t), r * math.sin(t))) == pytest.approx(0.5, rel=1e-9)


def test_fit_psf_measures_the_stars_elongation():
    """Stars drawn out by 0.25 along 60 degrees under noise and a gradient: the fit reads the
    ellipticity within 0.01, the angle within 2 degrees, the FWHM (the axes' geometric mean)
    and index as for round stars; round stars read less than 0.01."""
    rng = np.random.default_rng(4)
    shape = (470, 470)
    xs, ys, fluxes = _grid_stars(rng)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    sky = 0.05 + 2e-5 * xx - 1e-5 * yy
    round_truth = MoffatPSF.from_fwhm(3.6, 2.7)
    for truth in (_drawn_out(round_truth, 0.25, 60.0), round_truth):
        image = _render(shape, xs, ys, fluxes, truth) + sky + rng.normal(0, 1e-3, shape)
        stamps = psf_fitting.cut_stamps(image, np.round(xs, 0), np.round(ys, 0), 15)
        fitted, used, _ = psf_fitting.fit_psf(stamps, fwhm=3.0, sigma=1e-3, beta=3.5)
        assert used.all()
        assert fitted.fwhm == pytest.approx(truth.fwhm, rel=0.01)
        assert fitted.beta == pytest.approx(truth.beta, abs=0.08)
        if truth.round:
            assert fitted.ellipticity < 0.01
        else:
            assert fitted.ellipticity == pytest.approx(0.25, abs=0.01)
            assert fitted.elongation_angle == pytest.approx(60.0, abs=2.0)


@pytest.mark.parametrize("integrated", [False, True], ids=["sampled", "integrated"])
@pytest.mark.parametrize("ellipticity", [0.2, 0.4])
def test_drawn_out_kept_share_is_the_integral_over_the_plane(integrated, ellipticity):
    """What round weights (and the plain aperture) keep of a drawn-out star, and the annulus
    takes off, against sums over a grid of 0.02 px; the round star's share differs."""
    psf = _drawn_out(
        MoffatPSF.from_fwhm(1.8 if integrated else 3.0, 3.0, pixel_integrated=integrated), ellipticity, 33.0
    )
    weight = MoffatPSF.from_fwhm(3.0, 3.0)
    geometry = photometry.aperture_geometry(3.0, aperture_fwhm=2.0, aperture_add=1.0, gap=4, bg_delta=10)
    h = 0.02
    axis = np.arange(-geometry.annulus_outer - 1, geometry.annulus_outer + 1 + h / 2, h)
    x, y = np.meshgrid(axis, axis)
    light = psf_fitting.pixel_mean(psf, x, y, nodes=6) if integrated else psf(psf.r2(x, y))
    r2 = x * x + y * y
    ring = (r2 < geometry.annulus_outer**2) & (r2 >= geometry.annulus_inner**2)
    annulus = light[ring].mean()
    w = photometry._weight_profile(weight, r2, geometry.radius)
    inside = r2 <= geometry.radius**2
    weighted = float(np.sum(w * (light - annulus))) * h * h
    plain = float(np.sum(inside * (light - annulus))) * h * h
    assert photometry.kept_share(geometry, psf, weight) == pytest.approx(weighted, rel=1e-6)
    assert photometry.kept_share(geometry, psf) == pytest.approx(plain, rel=5e-5)
    round_share = photometry.kept_share(geometry, replace(psf, shear=(0.0, 0.0)), weight)
    assert abs(round_share / weighted - 1) > 0.004


def test_fit_covariance_is_the_scatter_over_noise_draws():
    """The covariance a fit states for its ``(log alpha, beta)`` against the scatter of the
    fitted values over 40 noise draws of the same faint stars (signal-to-noise 10-40): the
    standard errors within a third of the scatter, and the two as correlated as the fits are.
    The seeing correction's share of NSGSERR is propagated from this covariance."""
    truth = MoffatPSF.from_fwhm(3.2, 3.0)
    shape = (470, 470)
    xs, ys, fluxes = _grid_stars(np.random.default_rng(5))
    clean = _render(shape, xs, ys, 0.05 * fluxes, truth) + 0.05
    fitted = []
    for seed in range(40):
        image = clean + np.random.default_rng(100 + seed).normal(0, 1e-3, shape)
        stamps = psf_fitting.cut_stamps(image, np.round(xs), np.round(ys), 15)
        fit = psf_fitting.fit_psf(stamps, fwhm=3.0, sigma=1e-3, beta=3.5, curved=True)[0]
        fitted.append((math.log(fit.alpha), fit.beta, *fit.covariance))
    log_alpha, beta, var_log_alpha, cov, var_beta = np.array(fitted).T
    for values, variance in ((log_alpha, var_log_alpha), (beta, var_beta)):
        assert 0.75 < np.std(values, ddof=1) / math.sqrt(np.mean(variance)) < 1.33
    stated = np.mean(cov / np.sqrt(var_log_alpha * var_beta))
    assert abs(stated - np.corrcoef(log_alpha, beta)[0, 1]) < 0.05
    # The beta these faint stars give is unbiased within its stated error of the mean.
    assert abs(np.mean(beta) - truth.beta) < 3 * math.sqrt(np.mean(var_beta) / beta.size)


def test_fit_psf_skips_stamps_with_no_data():
    rng = np.random.default_rng(4)
    truth = MoffatPSF.from_fwhm(3.0, 3.0)
    xs, ys, fluxes = _grid_stars(rng, n_side=4)
    image = _render((300, 300), xs, ys, fluxes, truth, sky=0.05) + rng.normal(0, 1e-3, (300, 300))
    image[:, :60] = 0  # a registration border across the first column of stars
    stamps = psf_fitting.cut_stamps(image, xs, ys, 12)
    fitted, used, _ = psf_fitting.fit_psf(stamps, fwhm=3.0, sigma=1e-3)
    assert used.sum() == 12 and not used[::4].any()
    assert fitted.fwhm == pytest.approx(3.0, rel=0.02)


def _pair(seed, reference_psf, target_psf, transmission, *, faint=400, noise=1e-3):
    """A reference and a target of the same stars, sky and nebula; the target is dimmer by
    ``transmission`` and has its own sky level."""
    rng = np.random.default_rng(seed)
    shape = (470, 470)
    xs, ys, fluxes = _grid_stars(rng)
    # Faint neighbours (1-4 % of a bright star) and a textured nebula: the same sky in both.
    n_faint = faint
    fx, fy = rng.uniform(0, shape[1], n_faint), rng.uniform(0, shape[0], n_faint)
    ff = rng.uniform(0.03, 0.12, n_faint)
    nebula = _nebula(shape, rng, 3e-3)
    frames = []
    for psf, t, sky in ((reference_psf, 1.0, 0.05), (target_psf, transmission, 0.07)):
        stars = _render(shape, np.r_[xs, fx], np.r_[ys, fy], np.r_[fluxes, ff], psf)
        frames.append(t * (stars + nebula) + sky + rng.normal(0, noise, shape))
    return frames, xs, ys


def test_target_fit_against_the_reference_gets_the_psf_difference():
    reference_psf, target_psf = MoffatPSF.from_fwhm(2.8, 3.1), MoffatPSF.from_fwhm(4.2, 2.9)
    (reference, target), xs, ys = _pair(5, reference_psf, target_psf, 0.6)
    radius = 17
    r_stamps = psf_fitting.cut_stamps(reference, xs, ys, radius)
    t_stamps = psf_fitting.cut_stamps(target, xs, ys, radius)
    assert psf_fitting.stamp_ratio(t_stamps, r_stamps) == pytest.approx(0.6, rel=0.02)
    fitted_r, used, star = psf_fitting.fit_psf(r_stamps, fwhm=2.8, sigma=1e-3, curved=True)
    fitted_t = psf_fitting.fit_target_psf(
        t_stamps, r_stamps, star, used, s0=0.6, fwhm=4.0, sigma=1e-3, reference_sigma=1e-3
    )
    assert fitted_t.beta - fitted_r.beta == pytest.approx(target_psf.beta - reference_psf.beta, abs=0.04)
    assert fitted_t.fwhm / fitted_r.fwhm == pytest.approx(target_psf.fwhm / reference_psf.fwhm, rel=0.005)
    # What the scale needs: the PSF-weighted seeing correction from the fitted PSFs.
    geometry = photometry.aperture_geometry(fitted_t.fwhm, aperture_fwhm=3, aperture_add=1, gap=1.2, bg_delta=5)
    true = photometry.seeing_correction(geometry, reference_psf=reference_psf, target_psf=target_psf, weight=target_psf)
    fitted = photometry.seeing_correction(geometry, reference_psf=fitted_r, target_psf=fitted_t, weight=fitted_t)
    assert fitted == pytest.approx(true, rel=0.003)


def test_weighted_flux_is_the_kept_share_of_the_star():
    """Pixel sums of the weighted aperture against the radial integral of kept_share."""
    psf = MoffatPSF.from_fwhm(3.5, 2.8)
    weight = MoffatPSF.from_fwhm(4.0, 3.0)
    image = _render((200, 200), [100.3], [99.6], [10.0], psf, sky=0.05)[None]
    geometry = photometry.aperture_geometry(4.0, aperture_fwhm=3, aperture_add=1, gap=1.2, bg_delta=5)
    m = photometry.measure_stars(image, np.array([100.3]), np.array([99.6]), geometry, weight)
    assert m.ok[0]
    assert m.flux[0, 0] / 10.0 == pytest.approx(photometry.kept_share(geometry, psf, weight), rel=1e-3)
    plain = photometry.measure_stars(image, np.array([100.3]), np.array([99.6]), geometry)
    assert plain.flux[0, 0] / 10.0 == pytest.approx(photometry.kept_share(geometry, psf), rel=2e-3)


def test_psf_weighted_ratio_with_correction_is_the_true_ratio():
    """Same stars at FWHM 2.8 and at FWHM 4.2 with 0.6 of the flux, over a shared nebula.

    Little noise and no faint neighbours: this checks the correction, not the statistics
    (which the accuracy tests on full synthetic frames do)."""
    reference_psf, target_psf = MoffatPSF.from_fwhm(2.8, 3.1), MoffatPSF.from_fwhm(4.2, 2.9)
    (reference, target), xs, ys = _pair(6, reference_psf, target_psf, 0.6, faint=0, noise=1e-5)
    geometry = photometry.aperture_geometry(4.2, aperture_fwhm=3, aperture_add=1, gap=1.2, bg_delta=5)
    r = photometry.measure_stars(reference[None], xs, ys, geometry, target_psf)
    t = photometry.measure_stars(target[None], xs, ys, geometry, target_psf)
    ok = r.ok & t.ok
    raw = np.sum(r.flux[0, ok]) / np.sum(t.flux[0, ok])
    kappa = photometry.seeing_correction(
        geometry, reference_psf=reference_psf, target_psf=target_psf, weight=target_psf
    )
    assert abs(raw * 0.6 - 1) > 0.2  # the weighted ratio alone is far off
    assert raw * kappa == pytest.approx(1 / 0.6, rel=2e-3)


def _fit_inputs(curved):
    rng = np.random.default_rng(8)
    truth = MoffatPSF.from_fwhm(3.4, 2.8)
    xs, ys, fluxes = _grid_stars(rng, n_side=5)
    image = _render((400, 400), xs, ys, fluxes, truth, sky=0.05) + rng.normal(0, 1e-3, (400, 400))
    image[:40, :] = 0  # no data over part of the first row of stamps
    stamps = psf_fitting.cut_stamps(image, xs, ys, 14)
    weight = np.where(stamps.data == 0, 0.0, rng.uniform(0.5, 2.0, stamps.data.shape) * 1e6)
    return stamps, psf_fitting._background_terms(stamps, curved), weight


@pytest.mark.parametrize("integrated", [False, True], ids=["sampled", "integrated"])
@pytest.mark.parametrize("curved", [False, True])
def test_block_solve_is_the_direct_least_squares(curved, integrated):
    """The fit's per-star solve by blocks (background part formed once per weights) against
    the normal equations of the whole design matrix, for the profile sampled at the pixel
    centres and integrated over the pixels."""
    stamps, background, weight = _fit_inputs(curved)
    models = psf_fitting._StarModels(stamps, background, stamps.data, weight)
    for trial in (
        MoffatPSF.from_fwhm(3.0, 2.5, pixel_integrated=integrated),
        MoffatPSF.from_fwhm(4.1, 3.6, pixel_integrated=integrated),
    ):
        design = psf_fitting._design(trial, stamps, background)
        coef, model = psf_fitting._solve(design, stamps.data, weight)
        fast_coef, fast_model = models.solve(trial)
        np.testing.assert_allclose(models.profile(trial), design[:, :3], rtol=1e-14, atol=0)
        np.testing.assert_allclose(fast_coef, coef, rtol=1e-9, atol=1e-9 * np.abs(coef).max())
        np.testing.assert_allclose(fast_model, model, rtol=0, atol=1e-10 * np.abs(model).max())


class _DirectModels(psf_fitting._StarModels):
    """The fit's linear models by the whole design matrix: the specification."""

    def solve(self, psf):
        return psf_fitting._solve(psf_fitting._design(psf, self.stamps, self.background), self.data, self.weight)


@pytest.mark.parametrize("integrated", [False, True], ids=["sampled", "integrated"])
@pytest.mark.parametrize("curved", [False, True])
def test_fit_psf_by_blocks_equals_the_direct_fit(monkeypatch, curved, integrated):
    stamps, _, _ = _fit_inputs(curved)
    options = dict(fwhm=3.0, sigma=1e-3, gain_inv=1e-3, curved=curved, pixel_integrated=integrated)
    fast = psf_fitting.fit_psf(stamps, **options)
    monkeypatch.setattr(psf_fitting, "_StarModels", _DirectModels)
    direct = psf_fitting.fit_psf(stamps, **options)
    assert fast[0].alpha == pytest.approx(direct[0].alpha, rel=1e-9)
    assert fast[0].beta == pytest.approx(direct[0].beta, rel=1e-9)
    assert fast[0].stars == direct[0].stars and fast[0].pixel_integrated == integrated
    np.testing.assert_array_equal(fast[1], direct[1])
    np.testing.assert_allclose(fast[2], direct[2], rtol=0, atol=1e-9 * np.abs(direct[2]).max())


def test_remembered_solutions_follow_the_positions():
    """A Moffat solved again at the same positions is the one solved before; moved stars
    are solved afresh, as the direct solve does."""
    stamps, background, weight = _fit_inputs(False)
    stamps.dx, stamps.dy = stamps.dx.copy(), stamps.dy.copy()
    models = psf_fitting._StarModels(stamps, background, stamps.data, weight)
    trial = MoffatPSF.from_fwhm(3.2, 2.9)
    first = models.solve(trial)
    assert models.solve(trial)[1] is first[1]
    stamps.dx = np.clip(stamps.dx + 0.1, -0.75, 0.75)
    moved = models.solve(trial)
    direct = psf_fitting._solve(psf_fitting._design(trial, stamps, background), stamps.data, weight)
    assert moved[1] is not first[1]
    np.testing.assert_allclose(moved[1], direct[1], rtol=0, atol=1e-10 * np.abs(direct[1]).max())
    np.testing.assert_allclose(models.profile(trial), psf_fitting._design(trial, stamps, background)[:, :3], rtol=1e-14)
    # The same alpha and beta integrated over the pixels is another model, not the one kept.
    integrated = MoffatPSF(trial.alpha, trial.beta, pixel_integrated=True)
    profile = models.profile(integrated)
    assert not np.allclose(profile, models.profile(trial))
    np.testing.assert_allclose(profile, psf_fitting._design(integrated, stamps, background)[:, :3], rtol=1e-14)


# -- undersampled stars: the Moffat integrated over each pixel ---------------------------------


def _pixel_integral(function, x, y):
    """Mean of ``function(u, v)`` over the unit square centred at ``(x, y)``, by SciPy's
    adaptive quadrature."""
    from scipy import integrate

    value, _ = integrate.dblquad(lambda v, u: function(u, v), x - 0.5, x + 0.5, y - 0.5, y + 0.5, epsabs=1e-13)
    return value


@pytest.mark.parametrize("fwhm, beta", [pytest.param(0.8, 2.5, id="0.8px"), pytest.param(1.3, 3.5, id="1.3px")])
def test_pixel_mean_is_the_integral_over_the_pixel(fwhm, beta):
    psf = MoffatPSF.from_fwhm(fwhm, beta)
    x = np.array([0.0, 0.3, -0.7, 1.2, 2.6, 4.1])
    y = np.array([0.0, -0.2, 0.45, 1.9, -0.4, 3.3])
    exact = np.array([_pixel_integral(lambda u, v: psf(u * u + v * v), a, b) for a, b in zip(x, y)])
    np.testing.assert_allclose(psf_fitting.pixel_mean(psf, x, y), exact, rtol=0, atol=1e-6 * psf(0.0))
    # Sampling at the centre is far off for such stars: what the integration is for.
    assert np.max(np.abs(psf(x * x + y * y) - exact)) > 0.2 * psf(0.0)


@pytest.mark.parametrize("fwhm, beta", [pytest.param(0.8, 2.5, id="0.8px"), pytest.param(1.6, 3.2, id="1.6px")])
def test_fit_profile_columns_are_the_integrals_over_the_pixels(fwhm, beta):
    """The fit's integrated design columns (profile and its derivatives by the star's x and
    y, on the core's and the wings' node rules) against SciPy's quadrature of the same
    functions over each pixel."""
    psf = MoffatPSF.from_fwhm(fwhm, beta, pixel_integrated=True)
    stamps = psf_fitting.cut_stamps(np.ones((40, 40)), np.array([20.3]), np.array([19.8]), 8)
    design = psf_fitting._design(psf, stamps, psf_fitting._background_terms(stamps, False))
    a2 = psf.alpha * psf.alpha

    def shape(u, v):
        return (1 + (u * u + v * v) / a2) ** -psf.beta

    def slope(u, v):
        return 2 * psf.beta / a2 * (1 + (u * u + v * v) / a2) ** (-psf.beta - 1)

    rng = np.random.default_rng(12)
    for i in rng.choice(stamps.px.size, 25, replace=False):
        x, y = stamps.px[i] - stamps.dx[0], stamps.py[i] - stamps.dy[0]
        expected = [
            _pixel_integral(shape, x, y),
            _pixel_integral(lambda u, v: slope(u, v) * u, x, y),
            _pixel_integral(lambda u, v: slope(u, v) * v, x, y),
        ]
        np.testing.assert_allclose(design[0, :3, i], expected, rtol=0, atol=2e-4, err_msg=f"pixel {x:+.1f}, {y:+.1f}")


def _undersampled_stars(fwhm, beta, seed=21):
    """Unsaturated isolated stars of a pixel-integrated synthetic frame (no registration, no
    hot pixels), their positions and the frame."""
    from nsg_gpu.synthetic import SyntheticField

    field = SyntheticField(
        width=900,
        height=900,
        n_stars=700,
        fwhms=[fwhm],
        beta_range=(beta, beta),
        pixel_integrated=True,
        n_frames=1,
        borders=False,
        hot_pixel_fraction=0.0,
        trail_frame=None,
        seed=seed,
    )
    image = field.render(0)[0].astype(np.float64)
    x, y, flux = field.star_x, field.star_y, field.star_flux[:, 0]
    distance = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
    np.fill_diagonal(distance, np.inf)
    crowded = np.any((distance < 16) & (flux[None] > 0.01 * flux[:, None]), axis=1)
    inside = (x > 20) & (x < 880) & (y > 20) & (y < 880)
    peak = image[np.clip(np.rint(y), 0, 899).astype(int), np.clip(np.rint(x), 0, 899).astype(int)]
    keep = ~crowded & inside & (flux > 0.3) & (peak < 0.9)
    order = np.argsort(-flux[keep])[:60]
    return image, x[keep][order], y[keep][order]


@pytest.mark.parametrize(
    "fwhm, beta",
    [pytest.param(1.3, 2.6, id="1.3px"), pytest.param(1.6, 3.6, id="1.6px"), pytest.param(2.0, 3.0, id="2.0px")],
)
def test_integrated_fit_recovers_undersampled_psf(fwhm, beta):
    """Stars the synthetic generator integrates over each pixel (sub-pixel midpoint grid):
    the integrated fit gets the PSF before the pixels, where a fit sampling the Moffat at the
    pixel centres comes out 8-18 % too broad."""
    image, x, y = _undersampled_stars(fwhm, beta)
    assert x.size >= 30
    stamps = psf_fitting.cut_stamps(image, x, y, psf_fitting.stamp_radius(fwhm + 0.5))
    noise, gain_inv = psf_fitting.stamp_noise(stamps)
    fits = {
        integrated: psf_fitting.fit_psf(
            stamps, fwhm=fwhm + 0.3, sigma=noise, gain_inv=gain_inv, curved=True, pixel_integrated=integrated
        )[0]
        for integrated in (False, True)
    }
    truth = MoffatPSF.from_fwhm(fwhm, beta)
    assert fits[True].pixel_integrated and not fits[False].pixel_integrated
    assert fits[True].fwhm == pytest.approx(truth.fwhm, rel=0.01)
    assert fits[True].beta == pytest.approx(truth.beta, abs=0.1)
    assert fits[False].fwhm / truth.fwhm - 1 > 0.06


def test_undersampled_kept_share_is_the_measured_share():
    """PSF-weighted fluxes of pixel-integrated stars at random sub-pixel positions, averaged,
    against kept_share of the integrated PSF; the share of a sampled PSF differs by 7 %."""
    rng = np.random.default_rng(9)
    psf = MoffatPSF.from_fwhm(1.3, 2.7, pixel_integrated=True)
    weight = MoffatPSF.from_fwhm(1.6, 3.0)
    n_side, spacing = 20, 40
    xs = 30 + spacing * np.tile(np.arange(n_side), n_side) + rng.uniform(-0.5, 0.5, n_side * n_side)
    ys = 30 + spacing * np.repeat(np.arange(n_side), n_side) + rng.uniform(-0.5, 0.5, n_side * n_side)
    image = np.full((860, 860), 0.05)
    off = np.arange(-20, 21)
    for x0, y0 in zip(xs, ys):
        xi, yi = int(round(x0)), int(round(y0))
        image[yi - 20 : yi + 21, xi - 20 : xi + 21] += psf_fitting.pixel_mean(
            psf, off[None, :] + xi - x0, off[:, None] + yi - y0
        )
    geometry = photometry.aperture_geometry(1.6, aperture_fwhm=3, aperture_add=1, gap=1.2, bg_delta=5)
    measured = photometry.measure_stars(image[None], xs, ys, geometry, weight)
    assert measured.ok.all()
    mean, error = measured.flux[0].mean(), measured.flux[0].std() / math.sqrt(xs.size)
    assert photometry.kept_share(geometry, psf, weight) == pytest.approx(mean, abs=3 * error)
    sampled = MoffatPSF(psf.alpha, psf.beta)
    assert abs(photometry.kept_share(geometry, sampled, weight) / mean - 1) > 0.05


@pytest.mark.parametrize("radius", [4.0, 8.0])
def test_integrated_light_outside_a_radius(radius):
    """The pixels' light beyond ``radius`` (kept_share's aperture and annulus) against a
    polar quadrature of the pixel-integrated profile."""
    from scipy import integrate

    psf = MoffatPSF.from_fwhm(1.3, 3.0, pixel_integrated=True)
    rho = np.linspace(0.0, radius, 2001)
    theta = (np.arange(32) + 0.5) * (math.pi / 64)
    light = psf_fitting.pixel_mean(psf, rho[:, None] * np.cos(theta), rho[:, None] * np.sin(theta), nodes=10)
    outside = 1 - integrate.simpson(2 * math.pi * rho * light.mean(axis=1), x=rho)
    assert photometry._moffat_outside(radius, psf) == pytest.approx(outside, rel=0.003)
    assert abs(photometry._moffat_outside(radius, MoffatPSF(psf.alpha, psf.beta)) / outside - 1) > 0.01


def _field_stars(seed, base: MoffatPSF, widening: float, noise=1e-3, transmission=1.0, sky=0.05):
    """8 x 8 stars on 600 x 600 px whose FWHM grows by ``1 + widening * r^2`` to the corners
    (``r = 1`` there), each rendered with its own Moffat; the per-star factors, and the frame."""
    rng = np.random.default_rng(seed)
    shape = (600, 600)
    g = 55 + 70 * np.arange(8)
    xs, ys = (a.ravel() + rng.uniform(-0.5, 0.5, 64) for a in np.meshgrid(g, g))
    fluxes = rng.uniform(3.0, 8.0, xs.size)
    r2 = ((xs - 299.5) ** 2 + (ys - 299.5) ** 2) / (2 * 299.5**2)
    factor = 1 + widening * r2
    image = np.full(shape, sky)
    for x0, y0, f, k in zip(xs, ys, fluxes, factor):
        image += _render(shape, [x0], [y0], [transmission * f], base.at(k))
    return image + rng.normal(0, noise, shape), xs, ys, factor


def test_field_model_follows_a_psf_widening_to_the_corners():
    """Stars 60 % broader in the corners: the reference's fit finds a field model whose factor
    across the field is the truth's to 2 %, and the index within 0.08 (one Moffat for the
    whole frame reads the mixture of widths as an index 0.2 too low)."""
    truth = MoffatPSF.from_fwhm(2.8, 3.2)
    image, xs, ys, factor = _field_stars(2, truth, 0.6)
    fitted = psf_fitting.fit_reference_psf(image[None], xs, ys, fwhm=3.5, radius=18)
    psf = fitted.psf
    assert psf.field is not None
    relative = psf.factor(xs, ys) * psf.alpha / truth.alpha
    assert np.allclose(relative, factor, rtol=0.02), np.max(np.abs(relative / factor - 1))
    assert psf.beta == pytest.approx(truth.beta, abs=0.08)
    one, _, _ = psf_fitting.fit_psf(psf_fitting.cut_stamps(image, xs, ys, 18), fwhm=3.5, sigma=1e-3, curved=True)
    assert one.field is None and truth.beta - one.beta > 0.15


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_uniform_psf_gets_no_field_model(seed):
    image, xs, ys, _ = _field_stars(seed, MoffatPSF.from_fwhm(3.0, 2.9), 0.0)
    fitted = psf_fitting.fit_reference_psf(image[None], xs, ys, fwhm=3.0, radius=15)
    assert fitted.psf.field is None
    assert fitted.psf.fwhm == pytest.approx(3.0, rel=0.01)


def test_field_dependent_seeing_correction_is_the_true_ratio():
    """Reference and target with the same optics (60 % broader in the corners) and different
    seeing: the target's own field model, and per-star corrections from both, give the flux
    ratio of every star to 0.5 % (the corrections themselves differ by 4 % across the
    field)."""
    reference_psf, target_psf = MoffatPSF.from_fwhm(2.6, 3.2), MoffatPSF.from_fwhm(3.4, 2.9)
    reference, xs, ys, _ = _field_stars(6, reference_psf, 0.6, noise=5e-4)
    target, _, _, _ = _field_stars(6, target_psf, 0.6, noise=5e-4, transmission=0.7, sky=0.07)
    radius = 20
    fitted_r = psf_fitting.fit_reference_psf(reference[None], xs, ys, fwhm=3.2, radius=radius)
    assert fitted_r.psf.field is not None
    stamps = fitted_r.stamps
    t_stamps = psf_fitting.cut_stamps(target, stamps.xi + stamps.dx, stamps.yi + stamps.dy, radius)
    fitted_t = psf_fitting.fit_target_psf(
        t_stamps,
        stamps,
        fitted_r.star_model,
        fitted_r.fitted,
        s0=0.7,
        fwhm=4.0,
        sigma=5e-4,
        reference_sigma=5e-4,
        field=fitted_r.psf.field,
    )
    assert fitted_t.field is not None
    weight = fitted_t.uniform()
    geometry = photometry.aperture_geometry(weight.fwhm, aperture_fwhm=3, aperture_add=1, gap=1.2, bg_delta=5)
    kappa = photometry.seeing_correction(
        geometry, reference_psf=fitted_r.psf, target_psf=fitted_t, weight=weight, x=xs, y=ys
    )
    assert np.ptp(kappa) > 0.03
    r = photometry.measure_stars(reference[None], xs, ys, geometry, weight)
    t = photometry.measure_stars(target[None], xs, ys, geometry, weight)
    ok = r.ok & t.ok
    ratio = t.flux[0, ok] / (r.flux[0, ok] * kappa[ok])
    assert ok.sum() > 50
    assert np.median(ratio) == pytest.approx(0.7, rel=0.005)


def test_per_star_correction_is_the_kept_share_at_each_star():
    field = psf_fitting.FieldModel((1.0, 0.05, -0.02, 0.3, 0.0, 0.25), 300.0, 300.0, 300.0, 0.8, 1.8)
    reference = MoffatPSF.from_fwhm(2.5, 3.0)
    target = MoffatPSF(reference.alpha * 1.3, 2.8, field=field)
    reference = MoffatPSF(reference.alpha, reference.beta, field=field)
    x, y = np.array([0.0, 150.0, 300.0, 520.0, 600.0]), np.array([10.0, 300.0, 300.0, 90.0, 600.0])
    geometry = photometry.aperture_geometry(3.25, aperture_fwhm=3, aperture_add=1, gap=1.2, bg_delta=5)
    weight = target.uniform()
    kappa = photometry.seeing_correction(geometry, reference_psf=reference, target_psf=target, weight=weight, x=x, y=y)
    f = field.factor(x, y)
    direct = [
        photometry.kept_share(geometry, target.at(k), weight) / photometry.kept_share(geometry, reference.at(k), weight)
        for k in f
    ]
    assert np.allclose(kappa, direct, rtol=2e-5)
    assert np.ptp(kappa) > 0.02


def test_blurred_columns_are_the_profile_convolved_with_the_kernel():
    """The fit's profile and derivative columns with a registration kernel equal the sum over
    the kernel's taps of the columns at the shifted offsets."""
    from nsg_gpu.resampling import InterpolationKernel

    kernel = InterpolationKernel(
        (0.0, -0.02, 0.05, 0.12, 0.7, 0.12, 0.05, -0.02, 0.0), (0.0,) * 3 + (0.1, 0.8, 0.1) + (0.0,) * 3
    )
    psf = MoffatPSF.from_fwhm(1.6, 3.0, pixel_integrated=True)
    rng = np.random.default_rng(3)
    stamps = psf_fitting.cut_stamps(rng.normal(0, 1, (80, 80)), np.array([30.2, 50.7]), np.array([40.4, 20.9]), 6)
    models = psf_fitting._StarModels(
        stamps, psf_fitting._background_terms(stamps, False), stamps.data, np.ones_like(stamps.data), blur=kernel
    )
    blurred = models.profile(psf)
    direct = np.zeros_like(blurred)
    for a, hx in zip(range(-4, 5), kernel.x):
        for b, hy in zip(range(-4, 5), kernel.y):
            moved = psf_fitting.PSFStamps(
                stamps.data, stamps.px - a, stamps.py - b, stamps.xi, stamps.yi, stamps.dx, stamps.dy
            )
            direct += hx * hy * psf_fitting._design(psf, moved, np.zeros((0, stamps.px.size)))
    assert np.allclose(blurred, direct, atol=1e-12 * np.abs(direct).max())


def test_sampled_profile_is_convolved_with_the_kernel_over_the_core():
    """A sampled profile (stars of 2.5 px and more) through a registration's kernel: over
    the core (half the stamp's radius) the profile column is the Moffat convolved with the
    kernel's taps, the stars moved by its centroid (where the camera saw them, which the
    kernel takes back); beyond it the Moffat where the registration put them, within 2e-4 of
    the peak of the convolved one; the position columns are the Moffat's own."""
    from nsg_gpu.resampling import InterpolationKernel, interpolation_taps

    kernel = InterpolationKernel(interpolation_taps("cubic spline", 0.3), interpolation_taps("Lanczos-3", 0.45))
    cx, cy = kernel.centre
    psf = MoffatPSF.from_fwhm(2.8, 3.0)
    rng = np.random.default_rng(3)
    stamps = psf_fitting.cut_stamps(rng.normal(0, 1, (90, 90)), np.array([30.2, 55.7]), np.array([40.4, 50.9]), 14)
    models = psf_fitting._StarModels(
        stamps, psf_fitting._background_terms(stamps, False), stamps.data, np.ones_like(stamps.data), blur=kernel
    )
    columns = models.profile(psf)
    half = kernel.half
    convolved = np.zeros(columns.shape[::2])
    for a, hx in zip(range(-half, half + 1), kernel.x):
        for b, hy in zip(range(-half, half + 1), kernel.y):
            u = stamps.px[None] + a - (stamps.dx + cx)[:, None]
            v = stamps.py[None] + b - (stamps.dy + cy)[:, None]
            convolved += hx * hy * psf.shape(u * u + v * v)
    u = stamps.px[None] - stamps.dx[:, None]
    v = stamps.py[None] - stamps.dy[:, None]
    core = (np.abs(stamps.px) <= 7) & (np.abs(stamps.py) <= 7)
    assert np.allclose(columns[:, 0, core], convolved[:, core], rtol=0, atol=1e-12)
    assert np.allclose(columns[:, 0, ~core], psf.shape(u * u + v * v)[:, ~core], rtol=0, atol=1e-12)
    assert np.abs(columns[:, 0] - convolved).max() < 2e-4
    plain = psf_fitting._design(psf, stamps, np.zeros((0, stamps.px.size)))
    assert np.allclose(columns[:, 1:], plain[:, 1:3], rtol=0, atol=1e-12)


def test_blurred_kept_share_is_the_measured_share():
    """A pixel-integrated star of 1.8 px shifted by a cubic spline at (0.3, 0.4) px: the
    weighted aperture keeps, averaged over where the star falls in its pixel, the share
    kept_share gives with the kernel read from a shifted noise frame (the cubic spline at
    that shift), within 0.05 %, and the same with the shift's mirror; with the zero-phase
    kernel of the noise's spectrum it is 0.13 % off, without a kernel 1 %."""
    import scipy.ndimage

    from nsg_gpu.resampling import InterpolationKernel, _zero_phase_taps, interpolation_kernel, noise_correlation

    rng = np.random.default_rng(4)
    noise = scipy.ndimage.shift(rng.normal(0, 1, (800, 800)), (0.3, 0.4), order=3, mode="nearest")
    kernel = interpolation_kernel(noise[None].astype(np.float32))
    psf = MoffatPSF.from_fwhm(1.8, 3.0, pixel_integrated=True)
    weight = MoffatPSF.from_fwhm(2.1, 3.0)
    geometry = photometry.aperture_geometry(2.1, aperture_fwhm=3, aperture_add=1, gap=1.2, bg_delta=5)
    shares = []
    for k in range(16):
        x0, y0 = 40 + (k % 4) / 4 + 0.1, 40 + (k // 4) / 4 + 0.05
        yy, xx = np.mgrid[0:81, 0:81].astype(float)
        star = psf_fitting.pixel_mean(psf, xx - x0, yy - y0)
        star = scipy.ndimage.shift(star, (-0.3, -0.4), order=3, mode="constant")
        m = photometry.measure_stars(star[None] + 0.1, np.array([x0 - 0.4]), np.array([y0 - 0.3]), geometry, weight)
        shares.append(m.flux[0, 0])
    measured = float(np.mean(shares))
    assert kernel.name == "cubic spline" and np.allclose(kernel.centre, (0.4, 0.3), atol=0.02)

    def share(blur):
        return photometry.kept_share(geometry, MoffatPSF(psf.alpha, psf.beta, 0, True, None, blur), weight)

    assert measured == pytest.approx(share(kernel), rel=5e-4)
    assert share(InterpolationKernel(kernel.x[::-1], kernel.y, kernel.name)) == pytest.approx(share(kernel), rel=1e-9)
    rho = noise_correlation(noise[None].astype(np.float32))
    zero_phase = InterpolationKernel(_zero_phase_taps(rho[0]), _zero_phase_taps(rho[1]))
    assert abs(share(zero_phase) / measured - 1) > 8e-4
    assert abs(photometry.kept_share(geometry, psf, weight) / measured - 1) > 0.007


def test_neighbour_mask_takes_the_wings_a_neighbour_outshines_never_the_core():
    """A PSF star of flux 100 in a stamp of 15 px with neighbours of 1 (at 12 px and at 2 px)
    and 100 (at 35 px, outside the stamp): the pixels around the far faint neighbour, where
    its light exceeds a tenth of the star's wing, are left out; the near one, inside the
    star's core, takes nothing; the bright one's wing reaches the stamp's edge on its side."""
    stamps = psf_fitting.cut_stamps(np.ones((101, 101)), np.array([50.0]), np.array([50.0]), 15)
    flux = np.array([100.0, 1.0, 1.0, 100.0])
    x, y = np.array([50.0, 62.0, 52.0, 50.0]), np.array([50.0, 50.0, 50.0, 85.0])
    masked = psf_fitting.neighbour_mask(stamps, flux, x, y, np.array([0]), fwhm=3.0)[0]
    at = {(px, py): m for px, py, m in zip(stamps.px, stamps.py, masked)}
    assert at[(12.0, 0.0)] and at[(11.0, 0.0)] and not at[(0.0, -12.0)] and not at[(-12.0, 0.0)]
    assert not any(m for (px, py), m in at.items() if px * px + py * py <= 9.0)
    assert at[(0.0, 15.0)] and not at[(0.0, -15.0)]
    alone = psf_fitting.neighbour_mask(stamps, flux[:1], x[:1], y[:1], np.array([0]), fwhm=3.0)
    assert not alone.any()
