"""The synthetic generator's realism against what it claims: pixel-integrated and field-dependent
PSFs, registration at sub-pixel offsets, the noise before registration, scenarios and truth.json."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict

import numpy as np
import pytest
import scipy.ndimage
from astropy.io import fits
from scipy import integrate
from typer.testing import CliRunner

from nsg_gpu.cli import app
from nsg_gpu.noise import ksigma_noise
from nsg_gpu.synthetic import (
    FIELD_STEP,
    SCENARIOS,
    SyntheticField,
    SyntheticSpec,
    _spline_coefficients,
    spline_shift,
    write_synthetic_set,
)


def _moffat(alpha: float, beta: float):
    return lambda y, x: (1 + (x * x + y * y) / alpha**2) ** (-beta)


def _shift_kernel(d: float) -> np.ndarray:
    """The 1-D impulse response of a cubic-spline shift by ``d`` px (with its prefilter)."""
    delta = np.zeros(41)
    delta[20] = 1
    return scipy.ndimage.shift(delta, d, order=3, mode="grid-wrap")


def _bright_isolated(field: SyntheticField, k: int, count: int = 25, margin: int = 20) -> np.ndarray:
    """Indices of bright, unsaturated stars with no other star within 12 px."""
    spec = field.spec
    flux = field.star_flux.mean(axis=1)
    x, y = field.star_x, field.star_y
    inside = (x > margin) & (x < spec.width - margin) & (y > margin) & (y < spec.height - margin)
    distance = np.hypot(x[:, None] - x[None], y[:, None] - y[None]) + np.eye(x.size) * 1e9
    isolated = distance.min(axis=1) > 12
    frame = field.frames[k]
    alpha = frame.fwhm / (2 * math.sqrt(2 ** (1 / frame.beta) - 1))
    peak = flux * max(frame.transmission) * (frame.beta - 1) / (math.pi * alpha**2)
    unsaturated = peak < 0.5
    order = np.argsort(-flux)
    chosen = [i for i in order if inside[i] and isolated[i] and unsaturated[i]]
    return np.array(chosen[:count])


# -- PSFs -----------------------------------------------------------------------------------------
def test_pixel_integrated_stamp_is_the_moffat_integrated_over_each_pixel():
    """An undersampled star (FWHM 1.3 px): each pixel holds the Moffat's integral over it (to
    0.5 % of the peak pixel), unlike the Moffat sampled at pixel centres."""
    fwhm, beta = 1.3, 2.8
    field = SyntheticField(width=64, height=64, n_frames=1, n_stars=1, pixel_integrated=True, fwhm_range=(1.3, 1.3))
    stamps, off = field._stamps(fwhm, beta)
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    moffat = _moffat(alpha, beta)
    total = math.pi * alpha**2 / (beta - 1)
    phase = (3 - 7.5) / 16  # phase index 3 in both axes
    centre = len(off) // 2
    expected = np.empty((5, 5))
    for i, dy in enumerate(range(-2, 3)):
        for j, dx in enumerate(range(-2, 3)):
            y0, x0 = dy - phase - 0.5, dx - phase - 0.5
            expected[i, j] = integrate.dblquad(moffat, x0, x0 + 1, y0, y0 + 1)[0] / total
    got = stamps[3, 3, centre - 2 : centre + 3, centre - 2 : centre + 3]
    assert np.abs(got - expected).max() < 0.005 * expected.max()
    sampled = SyntheticField(width=64, height=64, n_frames=1, n_stars=1)._stamps(fwhm, beta)[0]
    assert (
        np.abs(sampled[3, 3, centre - 2 : centre + 3, centre - 2 : centre + 3] - expected).max() > 0.03 * expected.max()
    )


def test_bayer_cells_make_colour_fluxes_depend_on_where_a_star_falls():
    """Superpixel colour of undersampled stars: the red and blue shares of a star of 0.8 px FWHM
    vary by more than 5 % with its position in the cell, 1 on average; green, from two
    photosites, varies less and has the lower noise."""
    field = SyntheticField(width=64, height=64, n_frames=1, n_stars=1, colour=True, pixel_integrated=True, bayer=True)
    stamps, _ = field._stamps(0.8, 3.0)
    shares = stamps.sum(axis=(3, 4))  # (channel, phase_y, phase_x)
    assert shares.mean(axis=(1, 2)) == pytest.approx([1, 1, 1], abs=0.002)
    assert shares[0].std() > 0.05 and shares[2].std() > 0.05
    assert shares[1].std() < 0.5 * shares[0].std()
    # Red peaks where the star sits on the red photosite (the middle of the cell's top-left
    # quarter, phase -0.25 px), blue where it sits on the blue one.
    assert shares[0, 4, 4] > 1.15 and shares[2, 4, 4] < 0.9
    assert shares[2, 11, 11] > 1.15 and shares[0, 11, 11] < 0.9
    read, gain = field._gain()
    sky = np.asarray(field.frames[0].sky_level)
    assert field.pixel_noise(0) == pytest.approx(np.sqrt((sky / gain + read**2) / [1, 2, 1]), rel=1e-6)


@pytest.mark.parametrize("rotation", [0.0, 2.0], ids=["shifted", "turned"])
def test_bayer_shares_are_the_light_each_channel_caught(rotation):
    """``bayer_shares`` at a star's reference position is the share of its light that each
    channel holds in the frame as captured (summed around its captured place), whatever the
    frame's offset or turn; without cells, 1."""
    spec = dict(width=160, height=120, n_stars=6, colour=True, pixel_integrated=True, fwhms=[0.9, 1.1])
    spec.update(n_frames=2, bayer=True, registration=True, rotation=rotation, hot_pixel_fraction=0, borders=False)
    field = SyntheticField(**spec)
    shares = field.bayer_shares(1, field.star_x, field.star_y)
    light = field.stars(1, captured=True).astype(np.float64)
    matrix, offset = field._to_capture(1)
    cy = matrix[0, 0] * field.star_y + matrix[0, 1] * field.star_x + offset[0]
    cx = matrix[1, 0] * field.star_y + matrix[1, 1] * field.star_x + offset[1]
    apart = np.hypot(field.star_x[:, None] - field.star_x[None], field.star_y[:, None] - field.star_y[None])
    checked = 0
    for i in range(field.star_x.size):
        yi, xi = int(round(cy[i])), int(round(cx[i]))
        if not (12 <= xi < 148 and 12 <= yi < 108) or np.sort(apart[i])[1] < 25:
            continue
        caught = light[:, yi - 10 : yi + 11, xi - 10 : xi + 11].sum(axis=(1, 2)) / field.star_flux[i]
        assert caught == pytest.approx(shares[:, i], rel=2e-3)
        checked += 1
    assert checked >= 2 and np.ptp(shares[0]) > 0.02
    plain = SyntheticField(**{**spec, "bayer": False})
    assert np.all(plain.bayer_shares(1, plain.star_x, plain.star_y) == 1.0)


def test_star_light_is_conserved_whatever_the_psf():
    """Each star's light in the image is its catalogue flux: the truth a scale is checked with."""
    field = SyntheticField(
        width=400,
        height=300,
        n_frames=2,
        n_stars=40,
        seed=3,
        pixel_integrated=True,
        fwhm_field=0.7,
        beta_range=(3.0, 3.3),
    )
    for k in range(2):
        inside = (field.star_x > 150) & (field.star_x < 250) & (field.star_y > 100) & (field.star_y < 200)
        # Only the stars well inside count fully; measure their sum against a frame of them alone.
        alone = SyntheticField(field.spec)
        alone.star_flux = np.where(inside[:, None], field.star_flux, 0)
        assert alone.stars(k).sum() == pytest.approx(field.star_flux[inside].sum(), rel=1e-3)


@pytest.mark.parametrize("pixel_integrated", [False, True])
def test_stars_drawn_out_have_the_shape_set_and_keep_their_light(pixel_integrated):
    """Stars drawn out along one direction (a tracking error, wind): sep's ``1 - b/a`` of the
    noise-free stars is the ellipticity set (a touch under it: its isophotes), their major axis
    lies at the angle drawn, and each star's light is still its catalogue flux."""
    import sep

    ellipticities = [0.0, 0.3, 0.15]
    field = SyntheticField(
        width=400,
        height=300,
        n_frames=3,
        n_stars=40,
        seed=3,
        pixel_integrated=pixel_integrated,
        ellipticities=ellipticities,
        beta_range=(3.0, 3.3),
    )
    inside = (field.star_x > 150) & (field.star_x < 250) & (field.star_y > 100) & (field.star_y < 200)
    alone = SyntheticField(field.spec)
    alone.star_flux = np.where(inside[:, None], field.star_flux, 0)
    for k, ellipticity in enumerate(ellipticities):
        truth = field.frames[k]
        assert truth.ellipticity == ellipticity
        found = sep.extract(np.ascontiguousarray(field.stars(k)[0], dtype=np.float64), 1e-6)
        bright = found[np.argsort(-found["flux"])][:10]
        assert np.median(1 - bright["b"] / bright["a"]) == pytest.approx(ellipticity, abs=0.025)
        if ellipticity:
            turn = (np.degrees(np.median(bright["theta"])) - truth.elongation_angle + 90) % 180 - 90
            assert abs(turn) < 1.0, (np.degrees(bright["theta"]), truth.elongation_angle)
        assert alone.stars(k).sum() == pytest.approx(field.star_flux[inside].sum(), rel=1e-3)


def _fitted_fwhm(image: np.ndarray, x: float, y: float, beta: float, radius: int = 7) -> float:
    """FWHM of a Moffat of index ``beta`` fitted to the noise-free star at ``x, y``."""
    from scipy.optimize import curve_fit

    cy, cx = int(round(y)), int(round(x))
    cut = image[cy - radius : cy + radius + 1, cx - radius : cx + radius + 1].astype(float)
    yy, xx = np.mgrid[cy - radius : cy + radius + 1, cx - radius : cx + radius + 1]

    def model(_, amplitude, x0, y0, fwhm):
        alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
        return (amplitude * (1 + ((xx - x0) ** 2 + (yy - y0) ** 2) / alpha**2) ** (-beta)).ravel()

    params, _ = curve_fit(model, None, cut.ravel(), p0=[cut.max(), x, y, 3.0])
    return float(params[3])


def test_field_dependent_fwhm_grows_towards_the_corners():
    """Stars near a corner are broader than stars near the centre by the stated factor."""
    field = SyntheticField(
        width=900, height=700, n_frames=1, n_stars=300, seed=5, fwhm_field=0.7, fwhms=[2.6], nebula_strength=0
    )
    light = field.stars(0)[0]
    cx, cy = 449.5, 349.5
    r2 = ((field.star_x - cx) ** 2 + (field.star_y - cy) ** 2) / (cx**2 + cy**2)
    index = _bright_isolated(field, 0, count=300)
    centre = [i for i in index if r2[i] < 0.1][:8]
    corner = [i for i in index if r2[i] > 0.7][:8]
    assert len(centre) >= 4 and len(corner) >= 4
    beta = field.frames[0].beta
    measured = np.array([_fitted_fwhm(light, field.star_x[i], field.star_y[i], beta) for i in centre + corner])
    expected = field.fwhm_at(0, field.star_x[centre + corner], field.star_y[centre + corner])
    # Each star's FWHM is its zone's (steps of FIELD_STEP): within half a step of the exact law.
    np.testing.assert_allclose(measured, expected, rtol=0, atol=2.6 * FIELD_STEP / 2 + 0.02)
    assert np.median(measured[len(centre) :]) > 1.3 * np.median(measured[: len(centre)])


# -- registration -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def registered():
    """Mono 600 x 500 frames: an unshifted reference and targets at known sub-pixel offsets."""
    return SyntheticField(
        width=600,
        height=500,
        n_frames=4,
        n_stars=260,
        seed=8,
        registration=True,
        shifts=[[0, 0], [0.5, 0.5], [0.3, -0.2], [0.0, -0.45]],
        trail_frame=None,
        hot_pixel_fraction=0,
        borders=False,
    )


def _centroid_offsets(field: SyntheticField, image: np.ndarray, k: int, at: np.ndarray | None = None) -> np.ndarray:
    """Fitted minus catalogue position (dy, dx) of bright isolated stars in ``image``, each
    looked for at its catalogue position plus ``at[i]`` (dy, dx) where given."""
    from scipy.optimize import curve_fit

    frame = field.frames[k]
    alpha = frame.fwhm / (2 * math.sqrt(2 ** (1 / frame.beta) - 1))
    offsets = []
    for i in _bright_isolated(field, k):
        x, y = field.star_x[i], field.star_y[i]
        if at is not None:
            x, y = x + at[i, 1], y + at[i, 0]
        cy, cx = int(round(y)), int(round(x))
        cut = image[cy - 6 : cy + 7, cx - 6 : cx + 7].astype(float)
        yy, xx = np.mgrid[cy - 6 : cy + 7, cx - 6 : cx + 7]

        def model(_, amplitude, x0, y0, sky, xx=xx, yy=yy):
            return (amplitude * (1 + ((xx - x0) ** 2 + (yy - y0) ** 2) / alpha**2) ** (-frame.beta) + sky).ravel()

        params, _ = curve_fit(model, None, cut.ravel(), p0=[cut.max(), x, y, np.median(cut)])
        offsets.append([params[2] - field.star_y[i], params[1] - field.star_x[i]])
    return np.array(offsets)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_capture_is_offset_and_registration_brings_it_back(registered, k):
    """Stars sit at catalogue + offset in the capture and back on the catalogue once registered."""
    shift = np.array(registered.frames[k].shift)
    captured = _centroid_offsets(registered, registered.capture(k)[0], k)
    assert np.median(captured, axis=0) == pytest.approx(shift, abs=0.04)
    back = _centroid_offsets(registered, registered.render(k)[0], k)
    assert np.abs(np.median(back, axis=0)).max() < 0.04


def test_the_registrations_spline_coefficients_are_scipys_to_the_bit():
    """The generator's spline filter (``_spline_coefficients``, every column at once) gives
    ``scipy.ndimage.spline_filter1d(order=3, mode="nearest")``'s bits, on lines from 2 px to
    1500 (those of 540-565 px among them, whose pole power is subnormal), of pixels of either
    sign and any magnitude, zero over most of the line, or here and there."""
    rng = np.random.default_rng(11)
    for n in [*range(2, 40), 100, 524, 525, 539, 540, 552, 564, 565, 566, 984, 1500]:
        for kind in ("sky", "signed", "zero but its end", "zeros here and there"):
            lines = rng.lognormal(0, 1, (n, 7)) * 10.0 ** rng.uniform(-4, 1)
            if kind == "signed":
                lines *= rng.choice([-1.0, 1.0], lines.shape) * 10.0 ** rng.uniform(-300, 300)
            elif kind == "zero but its end":
                lines[:-5] = 0.0
            elif kind == "zeros here and there":
                lines[rng.random(lines.shape) < 0.3] = 0.0
            expected = scipy.ndimage.spline_filter1d(lines, 3, axis=0, mode="nearest")
            np.testing.assert_array_equal(_spline_coefficients(lines), expected, err_msg=f"{n} {kind}")


def test_the_registrations_spline_shift_is_scipys():
    """The generator's registration shifts axis by axis (``spline_shift``): the values of
    ``scipy.ndimage.shift(order=3, mode="nearest")`` to 1e-12 of the image's scale, edges
    included, for frames from a few pixels to a few hundred and shifts within and beyond its
    pad; float32 (what the frames keep) the same in all but a few pixels in a million; and
    a shift that is not a number, or an image with pixels that are not finite, what SciPy
    gives, without a warning SciPy does not give."""
    rng = np.random.default_rng(12)
    differing = total = 0
    for case in range(120):
        shape = tuple(int(n) for n in rng.integers(3, 160, 2))
        image = rng.lognormal(0, 1, shape) * 10.0 ** rng.uniform(-3, 1)
        shift = rng.uniform(-14, 14, 2) if case % 4 == 0 else rng.uniform(-0.6, 0.6, 2)
        expected = scipy.ndimage.shift(image, shift, order=3, mode="nearest")
        got = spline_shift(image, shift)
        assert got.shape == image.shape and got.dtype == np.float64
        assert np.abs(got - expected).max() <= 1e-12 * np.abs(image).max(), (shape, shift)
        differing += int(np.count_nonzero(got.astype(np.float32) != expected.astype(np.float32)))
        total += image.size
    assert differing <= 5e-6 * total, (differing, total)
    for shift in ((np.nan, 0.2), (0.2, np.nan)):  # as SciPy: no number anywhere
        assert np.isnan(spline_shift(image, shift)).all()
    image = rng.lognormal(0, 1, (40, 50))
    image[5, 7], image[30, 3] = np.inf, np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = spline_shift(image, (0.3, -0.2))
    np.testing.assert_array_equal(got, scipy.ndimage.shift(image, (0.3, -0.2), order=3, mode="nearest"))


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_registration_smooths_the_pixel_noise_by_the_spline_factor(registered, k):
    """The per-pixel noise of a registered target drops by the cubic spline's factor for its
    offset (0.57 at half a pixel in both axes, in the first-layer estimate); the reference is not
    resampled and keeps its noise."""
    dy, dx = registered.frames[k].shift
    # The first-layer estimate's view of the spline: its noise gain at this offset.
    white = np.random.default_rng(k).normal(0, 1, (400, 400))
    moved = scipy.ndimage.shift(white, (-dy, -dx), order=3, mode="mirror")
    expected = ksigma_noise((moved + 10).astype(np.float32)) / ksigma_noise((white + 10).astype(np.float32))
    data = registered.render(k)[0]
    truth = registered.background_noise(k)[0]
    ratio = ksigma_noise(data) / ksigma_noise(registered.capture(k)[0])
    assert ratio == pytest.approx(expected, rel=0.04)
    assert ksigma_noise(registered.capture(k)[0]) == pytest.approx(truth, rel=0.04)
    if k == 1:
        per_axis = [float(np.sum(_shift_kernel(0.5) ** 2))] * 2
        assert math.sqrt(per_axis[0] * per_axis[1]) == pytest.approx(0.756, abs=0.01)
        assert ratio < 0.75


def test_a_turned_capture_is_registered_back_onto_the_reference(registered):
    """``rotation``: targets seen turned (up to 3 degrees) about the frame's centre as well as
    shifted. The ten brightest isolated stars sit where the turn puts them in the capture (up
    to 5 px from the catalogue in this field) and back on the catalogue once registered,
    within their fits' noise; the registration leaves no data where the turned capture does
    not reach (the corners)."""
    field = SyntheticField(**dict(asdict(registered.spec), rotation=3.0, shifts=None))
    k = 1 + int(np.argmax([abs(f.rotation) for f in field.frames[1:]]))
    assert abs(field.frames[k].rotation) > 1 and field.frames[0].rotation == 0.0
    matrix, offset = field._to_capture(k)
    catalogue = np.stack([field.star_y, field.star_x])
    expected = (matrix @ catalogue + offset[:, None] - catalogue).T
    stars = _bright_isolated(field, k)[:10]
    captured = _centroid_offsets(field, field.capture(k)[0], k, at=expected)[:10]
    np.testing.assert_allclose(captured, expected[stars], atol=0.1)
    assert np.abs(expected[stars]).max() > 3
    back = _centroid_offsets(field, field.render(k)[0], k)[:10]
    assert np.abs(back).max() < 0.1
    covered = field.coverage(k)
    assert not (covered[0, 0] and covered[0, -1] and covered[-1, 0] and covered[-1, -1]) and covered[250, 300]
    assert np.all(field.render(k)[0][~covered] == 0)


def test_registration_leaves_the_uncovered_edge_at_zero_and_clamps(registered):
    """A shift of +0.5 px in x leaves the last column uncovered; -0.45 px the first one."""
    frame1, frame3 = registered.render(1)[0], registered.render(3)[0]
    assert np.all(frame1[:, -1] == 0) and np.all(frame1[-1, :] == 0) and np.all(frame1[:-1, :-1] > 0)
    assert np.all(frame3[:, 0] == 0) and np.all(frame3[:, 1:] > 0)
    assert frame1.min() >= 0 and frame1.max() <= 1
    assert registered.frames[0].shift == [0.0, 0.0]


def test_background_noise_is_what_the_capture_holds(registered):
    """The truth of the noise before registration: the capture minus its expected signal, on the
    background, has that standard deviation."""
    for k in (0, 1):
        residual = registered.capture(k)[0] - registered._captured_signal(k)[0]
        faint = registered.stars(k, captured=True)[0] * registered.frames[k].transmission[0] < 1e-4
        assert residual[faint].std() == pytest.approx(registered.background_noise(k)[0], rel=0.01)


@pytest.mark.parametrize("rotation", [0.0, 2.0])
def test_warm_pixels_are_the_sensors_in_every_frame_and_move_with_its_registration(registered, rotation):
    """``warm_pixel_fraction``: the same camera pixels in every frame, each 5-30 sky noises
    above its light (the frames without them differ there and nowhere else); once registered
    they lie where ``warm_pixels`` says (a turned target's too): the registered frame's excess
    over the same frame without them peaks within half a pixel of each place, and holds the
    warm pixel's light."""
    spec = dict(asdict(registered.spec), rotation=rotation)
    warm = SyntheticField(**dict(spec, warm_pixel_fraction=1e-3))
    plain = SyntheticField(**spec)
    n = int(1e-3 * 600 * 500)
    places = []
    for k in range(4):
        excess = (warm.capture(k) - plain.capture(k))[0]
        places.append(np.flatnonzero(excess))
        assert places[-1].size == n
        sigmas = excess.ravel()[places[-1]] / warm.spec.noise_sigma
        assert sigmas.min() >= 5 - 1e-3 and sigmas.max() <= 30 + 1e-3
        assert np.ptp(np.log(sigmas)) > 0.9 * math.log(6)
    assert all(np.array_equal(places[0], p) for p in places[1:])
    for k in (1, 3):
        x, y, light = warm.warm_pixels(k)
        moved = (warm.render(k) - plain.render(k))[0].astype(float)
        inside = (x > 5) & (x < 594) & (y > 5) & (y < 494)
        assert inside.sum() > 0.9 * n
        apart = np.sort(np.hypot(x[:, None] - x[None], y[:, None] - y[None]), axis=1)[:, 1] > 8
        for xi, yi, value in zip(*(v[inside & apart][:40] for v in (x, y, light)), strict=True):
            cx, cy = int(round(xi)), int(round(yi))
            window = moved[cy - 4 : cy + 5, cx - 4 : cx + 5]
            py, px = np.unravel_index(np.argmax(window), window.shape)
            assert abs(cy - 4 + py - yi) <= 0.5 + 1e-9 and abs(cx - 4 + px - xi) <= 0.5 + 1e-9
            assert window.sum() == pytest.approx(value, rel=0.05)
    if rotation:
        assert np.abs(np.subtract(*warm.warm_pixels(1)[:2]) - np.subtract(*warm.warm_pixels(0)[:2])).max() > 3


# -- scenarios and truth.json ---------------------------------------------------------------------
def test_default_scenario_is_the_default_spec():
    assert SyntheticSpec.from_scenario("default") == SyntheticSpec()
    with pytest.raises(ValueError, match="unknown scenario 'nope'"):
        SyntheticSpec.from_scenario("nope")


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in SCENARIOS if n != "default"])
def test_scenarios_register_targets_and_keep_the_reference(name):
    spec = SyntheticSpec.from_scenario(name, n_frames=3)
    field = SyntheticField(spec)
    assert field.frames[0].shift == [0.0, 0.0]
    for frame in field.frames[1:]:
        assert all(abs(v) <= 0.5 for v in frame.shift) and frame.shift != [0.0, 0.0]
        assert spec.beta_range[0] <= frame.beta <= spec.beta_range[1]
        assert spec.fwhm_range[0] <= frame.fwhm <= spec.fwhm_range[1]


def test_undersampled_scenario_is_sparse_undersampled_colour():
    spec = SyntheticSpec.from_scenario("undersampled-sparse-colour")
    assert spec.colour and spec.pixel_integrated and spec.fwhm_range[1] < 2.5
    assert spec.n_stars / (spec.width * spec.height) < 1 / 3000
    crowded = SyntheticSpec.from_scenario("crowded")
    assert crowded.n_stars / (crowded.width * crowded.height) > 1 / 150


def test_nsg_synth_writes_a_scenario_and_its_truth(tmp_path):
    result = CliRunner().invoke(
        app, ["synth", str(tmp_path), "--scenario", "undersampled-sparse-colour", "--frames", "2", "--seed", "2"]
    )
    assert result.exit_code == 0, result.output
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["spec"]["scenario"] == "undersampled-sparse-colour" and truth["spec"]["colour"]
    field = SyntheticField(SyntheticSpec.from_scenario("undersampled-sparse-colour", n_frames=2, seed=2))
    for k, entry in enumerate(truth["frames"]):
        frame = field.frames[k]
        assert entry["transmission"] == pytest.approx(frame.transmission)
        assert entry["shift"] == pytest.approx(frame.shift)
        assert (entry["fwhm"], entry["beta"]) == pytest.approx((frame.fwhm, frame.beta))
        assert entry["background_noise"] == pytest.approx(field.background_noise(k).tolist(), rel=1e-6)
        assert len(entry["pixel_noise"]) == 3
    bad = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), "--scenario", "nope"])
    assert bad.exit_code == 1 and "unknown scenario" in bad.output
    turned = CliRunner().invoke(
        app,
        ["synth", str(tmp_path / "t"), "--scenario", "crowded", "-n", "3", "--width", "300", "--height", "200"]
        + ["--stars", "300", "--rotation", "2"],
    )
    assert turned.exit_code == 0, turned.output
    turns = [f["rotation"] for f in json.loads((tmp_path / "t" / "truth.json").read_text())["frames"]]
    assert turns[0] == 0 and all(0 < abs(t) <= 2 for t in turns[1:]), turns
    drawn = CliRunner().invoke(
        app,
        ["synth", str(tmp_path / "e"), "-n", "3", "--width", "300", "--height", "200", "--stars", "300"]
        + ["--elongation", "0.3"],
    )
    assert drawn.exit_code == 0, drawn.output
    shapes = [f["ellipticity"] for f in json.loads((tmp_path / "e" / "truth.json").read_text())["frames"]]
    assert shapes[0] == 0 and all(0 < e <= 0.3 for e in shapes[1:]), shapes
    warm = CliRunner().invoke(
        app,
        ["synth", str(tmp_path / "w"), "-n", "3", "--width", "300", "--height", "200", "--stars", "300"]
        + ["--elongation", "0.3", "--warm-pixels", "1e-3"],
    )
    assert warm.exit_code == 0, warm.output
    assert json.loads((tmp_path / "w" / "truth.json").read_text())["spec"]["warm_pixel_fraction"] == 1e-3
    first = [fits.getdata(sorted((tmp_path / d).glob("*.fits"))[0]) for d in ("e", "w")]
    assert np.count_nonzero(first[0] != first[1]) == 60  # the reference is not resampled


def test_nsg_synth_upscale_writes_the_frames_as_an_x2_registration_does(tmp_path):
    """``--upscale 2``: every frame, the reference too, on a grid twice as fine, its light and
    its borders where the frame at 1x has them, the pixel size halved; the truth is the
    capture's."""
    args = ["synth", "-n", "3", "--width", "300", "--height", "200", "--stars", "300", "--seed", "4"]
    for folder, more in (("x1", []), ("x2", ["--upscale", "2"])):
        result = CliRunner().invoke(app, [args[0], str(tmp_path / folder), *args[1:], *more])
        assert result.exit_code == 0, result.output
    for name in ("light_000.fits", "light_001.fits"):
        coarse, fine = fits.getdata(tmp_path / "x1" / name), fits.getdata(tmp_path / "x2" / name)
        assert fine.shape == (400, 600)
        # Each coarse pixel is 2 x 2 fine ones: the block means are the coarse frame's light.
        blocks = fine.reshape(200, 2, 300, 2).mean(axis=(1, 3))
        inner, at_1x = blocks[4:-4, 4:-4], coarse[4:-4, 4:-4]
        covered = at_1x > 0
        assert np.corrcoef(inner[covered], at_1x[covered])[0, 1] > 0.95
        assert np.mean(inner[covered]) == pytest.approx(np.mean(at_1x[covered]), rel=1e-3)
        assert np.array_equal(fine[::2, ::2] == 0, coarse == 0)
        assert fits.getheader(tmp_path / "x2" / name)["XPIXSZ"] == fits.getheader(tmp_path / "x1" / name)["XPIXSZ"] / 2
    truths = [json.loads((tmp_path / d / "truth.json").read_text()) for d in ("x1", "x2")]
    assert truths[1]["upscale"] == 2 and "upscale" not in truths[0]
    assert truths[1]["frames"] == truths[0]["frames"]
    bad = CliRunner().invoke(app, [args[0], str(tmp_path / "x5"), *args[1:], "--upscale", "5"])
    assert bad.exit_code == 2


def test_star_colours_follow_a_camera_that_sees_colours_differently():
    """The real-frame tests' colour oracle (tests/independent.py: ``star_colours``) on frames
    whose colour response is known: the undersampled colour scenario (300 stars, for 40-80
    kept) whose frame 1 is seen by a camera 1.3 times as sensitive in red and 1.45 times in
    blue against green (its channels scaled, noise and all). The change of the stars' median
    colours from frame 0 to it is the true one (the channels' transmission ratios times the
    camera's) within 3 combined bootstrap errors plus 1 %, and more than 3 errors from none
    (seeds 1-4: 0.02-1.02 errors off, 5.8-11.7 errors from none)."""
    from independent import star_colours

    field = SyntheticField(SyntheticSpec.from_scenario("undersampled-sparse-colour", n_frames=2, seed=1, n_stars=300))
    camera = np.array([1.3, 1.0, 1.45])
    reference = star_colours(field.render(0).astype(np.float64))
    target = star_colours(field.render(1).astype(np.float64) * camera[:, None, None])
    t = np.asarray(field.frames[1].transmission) / np.asarray(field.frames[0].transmission)
    truth = np.log(t[[0, 2]] / t[1] * camera[[0, 2]])
    change = np.log(target.median() / reference.median())
    error = np.hypot(target.log_error(), reference.log_error())
    assert min(reference.logs.shape[1], target.logs.shape[1]) >= 30
    assert np.all(np.abs(change - truth) <= 3 * error + 0.01), (change, truth, error)
    assert np.all(np.abs(change) > 3 * error), (change, error)


def test_independent_photometry_recovers_the_true_transmission():
    """The real-frame tests' oracle (sep, tests/independent.py) on frames whose transmission is
    known: undersampled, sparse, colour (superpixels of a Bayer sensor), registered, with hot
    pixels; within 3 of its bootstrap errors (plus 1 %) in every channel, as the real-frame
    tests use it."""
    from independent import independent_transmission

    field = SyntheticField(SyntheticSpec.from_scenario("undersampled-sparse-colour", n_frames=3, seed=1))
    reference = field.render(0).astype(np.float64)
    for k in (1, 2):
        truth = np.asarray(field.frames[k].transmission) / np.asarray(field.frames[0].transmission)
        for c, stars in enumerate(independent_transmission(reference, field.render(k).astype(np.float64))):
            assert stars.ratios.size >= 12
            error = stars.bootstrap_error()
            assert abs(stars.transmission - truth[c]) <= 3 * error + 0.01 * truth[c], (
                k,
                c,
                stars.transmission,
                truth[c],
            )
            assert error < 0.1 * truth[c]


def test_a_crowded_field_too_small_for_faint_sky_still_has_a_noise_truth(tmp_path):
    """The crowded scenario on 600 x 400 px leaves no pixel of faint sky: the noise truth is
    then the covered pixels', a number (truth.json stays strict JSON)."""
    spec = SyntheticSpec.from_scenario("crowded", width=600, height=400, n_frames=2, seed=3)
    write_synthetic_set(tmp_path, spec=spec)
    truth = json.loads((tmp_path / "truth.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    noise = [frame["background_noise"] for frame in truth["frames"]]
    assert all(np.isfinite(v).all() and min(v) > 0 for v in noise), noise
