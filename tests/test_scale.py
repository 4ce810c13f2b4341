"""The scale stage end to end: 1/NSGS against the transmission the generator set."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from conftest import SCALE_TARGET, integrated_gaussians, scale_errors
from independent import core_and_halo_frames, halo_settings

from nsg_gpu import photometry, scale
from nsg_gpu.errors import TooFewStarsError
from nsg_gpu.io import Frame
from nsg_gpu.params import Parameters
from nsg_gpu.psf import MoffatPSF
from nsg_gpu.reference import prepare_reference
from nsg_gpu.scale import UNDERSAMPLED_KERNEL_ERROR, measure_scale, registration_offsets
from nsg_gpu.scalefit import scale_doubt
from nsg_gpu.synthetic import SyntheticField, SyntheticSpec


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mono_set", "colour_set"])
def test_scale_within_half_percent(name, request):
    """1/NSGSc within 0.5 % of the true scale, with FWHM 2.5-4.5 px and Moffat index 2.8-3.3
    against a 2.8 px reference."""
    errors = scale_errors(request.getfixturevalue(name))
    assert np.all(np.abs(errors) < SCALE_TARGET), f"relative scale errors:\n{errors}"


def test_undersampled_frames_fit_the_psf_before_the_pixels():
    """Stars of 1.8 and 2.1 px FWHM integrated over the pixels (read as 2.26 px): the scale
    stage fits both frames' PSFs integrated over the pixels and gets the PSFs the generator
    set, where a fit sampling the Moffat at the pixel centres reads them 7-9 % broader."""
    field = SyntheticField(
        width=900,
        height=700,
        n_stars=900,
        n_frames=2,
        fwhms=[1.8, 2.1],
        beta_range=(2.6, 3.6),
        pixel_integrated=True,
        seed=5,
    )
    reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
    measured = measure_scale(reference, Frame.from_array(field.render(1), name="target"))
    for psf, truth in ((measured.reference_psf, field.frames[0]), (measured.target_psf, field.frames[1])):
        assert psf is not None and psf.pixel_integrated
        assert psf.fwhm == pytest.approx(truth.fwhm, rel=0.02)
        assert psf.beta == pytest.approx(truth.beta, abs=0.15)
    error = _mono_error(field, measured, 1)
    assert abs(error) < 3 * measured.fits[0].scale_error / measured.scale[0]


def test_broad_stars_on_a_nebula_are_measured_with_their_psfs():
    """Stars of 6-8 px (3500 on 2000 x 1400 px, the generator's nebula): the reference's
    FWHM read 20.5 px for stars of 7, every aperture and PSF stamp was sized from it, the
    PSF fit failed and the plain aperture kept 29-40 of 560-1000 stars, 3.6 % and -2.4 % off
    the truth here. Now the PSF weights measure 260-300 stars of each target within 0.5 %."""
    field = SyntheticField(seed=1, n_frames=5, fwhm_range=(6.0, 9.0))
    reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
    assert reference.stars.fwhm == pytest.approx(field.frames[0].fwhm, rel=0.1)
    for k in (1, 3):
        measured = measure_scale(reference, Frame.from_array(field.render(k), name=f"target {k}"))
        assert measured.target_psf is not None
        assert measured.fits[0].n_pairs >= 200
        assert abs(_mono_error(field, measured, k)) < SCALE_TARGET


def test_a_target_of_much_broader_stars_reads_its_own_fwhm_and_takes_the_aperture():
    """Targets of 6 and 11 px against a reference of 2.8 px (Moffat index 3.05-3.19, 3500
    stars). The 11 px target's stars peaked under the 20 noise sigmas that read a target's
    FWHM, and it took the reference's, whose apertures kept two thirds of its stars' light
    (scale +53 %); now its FWHM is read from the brightest at 7 sigmas, within 12 %. Both
    take the plain aperture (a frame twice as broad as the other or more; docs/scale-accuracy.md,
    "The neighbours in the PSF stars' wings"), corrected by the two frames' fitted PSFs. A
    thin-cloud frame keeps the reference's FWHM
    (test_frames_under_thin_cloud_are_judged_on_the_stars_they_show)."""
    field = SyntheticField(seed=1, n_frames=5, fwhms=[2.8, 8.0, 6.0, 4.0, 11.0])
    reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
    for k in (2, 4):
        measured = measure_scale(reference, Frame.from_array(field.render(k), name=f"target {k}"))
        assert measured.fwhm == pytest.approx(field.frames[k].fwhm, rel=0.12)
        assert measured.photometry == "aperture-fitted"
        error = _mono_error(field, measured, k)
        assert abs(error) < 3 * measured.fits[0].scale_error / measured.scale[0], (k, error)


def test_broad_targets_fit_their_index_among_neighbours():
    """Targets of 6 and 8 px against a reference of 2.8 px, 3500 stars (one per 800 px^2):
    each PSF star's stamp (5 FWHM in radius) holds a dozen fainter neighbours, whose light
    in its wings read as a lighter wing, the index 0.3 and 0.7 too high (3.50 for 3.19, 3.95
    for 3.28). With the pixels where neighbours' light reaches a tenth of the star's left
    out (``psf.neighbour_mask``), within 0.15."""
    field = SyntheticField(seed=1, n_frames=5, fwhms=[2.8, 8.0, 6.0, 4.0, 11.0])
    reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
    for k in (1, 2):
        fitted = scale.fit_psfs(reference, Frame.from_array(field.render(k), name=f"target {k}"), field.frames[k].fwhm)
        assert fitted is not None
        assert fitted[1].beta == pytest.approx(field.frames[k].beta, abs=0.15), k
        assert fitted[1].fwhm == pytest.approx(field.frames[k].fwhm, rel=0.03), k


def test_a_target_of_much_broader_stars_is_judged_registered():
    """800 stars; a target of 11 px against a reference of 2.8 px: its stars' peaks, measured
    against the sky just outside the reference's stars (3 reference FWHM), stood under 5
    noise sigmas for most of the reference's brightest, and the frame was refused as not
    registered (20 of 50 found). Measured against the sky outside the broader stars, it is
    measured, within 3 stated errors of the truth."""
    field = SyntheticField(seed=1, n_frames=5, fwhms=[2.8, 8.0, 6.0, 4.0, 11.0], n_stars=800)
    reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
    measured = measure_scale(reference, Frame.from_array(field.render(4), name="target"))
    error = _mono_error(field, measured, 4)
    assert abs(error) < 3 * measured.fits[0].scale_error / measured.scale[0], error


def test_weights_at_shared_positions_keep_neither_frame_s_own_noise():
    """900 stars of 1 px FWHM at signal-to-noise about 8 under PSF weights of 2 px, in two
    frames that differ only by their noise: measured at one frame's own centroids, which
    scatter by 0.25 px and lean towards that frame's noise, it reads brighter than the other
    by 0.14 of the pair's error on average (why the scale of undersampled mono frames came out
    high); at the mean of both frames' centroids (``shared_positions``) by none."""
    rng = np.random.default_rng(0)
    grid = (np.arange(30) + 0.5) * 20
    x = (grid[None, :] + rng.uniform(-0.5, 0.5, (30, 30))).ravel()
    y = (grid[:, None] + rng.uniform(-0.5, 0.5, (30, 30))).ravel()
    clean = integrated_gaussians((600, 600), x, y, 1.0, 12.0) + 100.0
    weight = MoffatPSF.from_fwhm(2.0, 3.0)
    geometry = photometry.aperture_geometry(
        weight.pixel_fwhm, aperture_fwhm=3.0, aperture_add=1.0, gap=2.0, bg_delta=4.0
    )
    leans = {"own": [], "shared": []}
    for _ in range(6):
        a, b = ((clean + rng.normal(0, 1.0, clean.shape))[None].astype(np.float32) for _ in range(2))
        ax, ay = photometry.recentre(a[0], x, y, fwhm=1.0)
        bx, by = photometry.recentre(b[0], x, y, fwhm=1.0)
        found = np.isfinite(ax) & np.isfinite(bx)
        for name, (px, py) in (("own", (ax, ay)), ("shared", scale.shared_positions(ax, ay, bx, by, found))):
            fa = photometry.measure_stars(a, px, py, geometry, weight)
            fb = photometry.measure_stars(b, px, py, geometry, weight)
            ok = fa.ok & fb.ok & found
            leans[name].append((fa.flux[0] - fb.flux[0])[ok] / np.hypot(fa.flux_error[0], fb.flux_error[0])[ok])
    own, shared = np.concatenate(leans["own"]), np.concatenate(leans["shared"])
    standard_error = own.std() / math.sqrt(own.size)
    assert own.size > 5000 and standard_error < 0.02
    assert own.mean() > 0.08, own.mean()
    assert abs(shared.mean()) < 0.04, shared.mean()
    # Where a star is not found in the target, the reference's centroid stands.
    px, py = scale.shared_positions(
        np.array([1.0, 2.0]), np.array([3.0, 4.0]), np.array([1.4, 9.0]), np.array([3.2, 9.0]), np.array([True, False])
    )
    assert np.allclose(px, [1.2, 2.0]) and np.allclose(py, [3.1, 4.0])


def test_registration_offsets_follow_the_frame_not_each_centroid():
    """A target registered with a residual shift and rotation: the offsets fitted to noisy
    centroids, a tenth of them pulled 1-2 px by neighbours, are the residual's to 0.02 px at
    every star."""
    rng = np.random.default_rng(4)
    x, y = rng.uniform(0, 3000, 400), rng.uniform(0, 2000, 400)
    angle, shift = 2e-4, (0.3, -0.2)
    true_dx = shift[0] - angle * (y - 1000)
    true_dy = shift[1] + angle * (x - 1500)
    tx = x + true_dx + rng.normal(0, 0.05, x.size)
    ty = y + true_dy + rng.normal(0, 0.05, x.size)
    pulled = rng.random(x.size) < 0.1
    tx[pulled] += rng.uniform(1, 2, pulled.sum()) * rng.choice([-1, 1], pulled.sum())
    found = rng.random(x.size) < 0.9
    tx[~found] = np.nan
    ox, oy = registration_offsets(x, y, tx, ty, found)
    assert np.max(np.hypot(ox - true_dx, oy - true_dy)) < 0.02
    # With too few stars for an affine residual, the median shift.
    few = np.zeros(x.size, bool)
    few[:8] = True
    ox, oy = registration_offsets(x, y, x + 0.25, y - 0.1, few)
    assert np.allclose(ox, 0.25) and np.allclose(oy, -0.1)


#: Stars of 1.5-2.5 px before the pixels, integrated over them; targets registered.
REGISTERED_SMALL = dict(
    width=900,
    height=700,
    n_stars=900,
    n_frames=4,
    fwhm_range=(1.5, 2.5),
    beta_range=(2.5, 4.0),
    pixel_integrated=True,
    registration=True,
)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [5, 8])
def test_registered_small_stars_with_the_registration_kernel(seed):
    """Stars of 1.5-2.5 px before the pixels, targets registered by a cubic spline at
    sub-pixel offsets: each target's PSF is fitted with the kernel read from its noise (the
    reference, not resampled, has none): the cubic spline at the frame's shift, whose sign
    the fit chooses, and every scale is within 0.8 % of the truth (0.78 % at worst: seed 5's
    frame 2, stated 0.64 %, its index fitted 0.09 low and the reference's 0.08; over seeds 5,
    7, 8, 9, 12 and 13, RMS 0.30 % and 16 of 18 frames within 0.5 %; 0.71 % and 0.27 % before
    the PSF fits left out the neighbours' pixels, ``psf.neighbour_mask``). PSFs fitted without
    the kernel miss by up to 3.9 % (seed 5) and 2.7 % (seed 8), with the zero-phase kernel of
    the noise's spectrum by up to 1.59 % and 0.97 %."""
    field = SyntheticField(**REGISTERED_SMALL, seed=seed)
    reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
    assert reference.interpolation_kernel is None
    for k in range(1, 4):
        measured = measure_scale(reference, Frame.from_array(field.render(k), name=f"target {k}"))
        assert measured.target_psf is not None and measured.target_psf.blur is not None
        assert measured.reference_psf.blur is None
        kernel, shift = measured.target_psf.blur, np.array(field.frames[k].shift[::-1])  # (x, y)
        assert kernel.name == "cubic spline"
        # Where the camera saw the stars; a shift of 1/2 px reads the same as its mirror.
        near_half = np.abs(shift) > 0.45
        assert np.all(np.where(near_half, np.abs(kernel.centre) > 0.4, np.abs(kernel.centre - shift) < 0.04))
        error = measured.scale[0] / field.frames[k].scale(field.reference)[0] - 1
        assert abs(error) < 0.008, (k, field.frames[k].shift, error)
    if seed == 8:  # (seed 5's frame 1 reads under 2 px: it would take the plain aperture)
        # A resampled frame as the reference: its own kernel, the shift's sign chosen by its fit.
        # Frame 2 was seen at (0.43, -0.30) px: the negative sign along y the fit has to find.
        resampled = prepare_reference(Frame.from_array(field.render(2), name="registered reference"), Parameters())
        measured = measure_scale(resampled, Frame.from_array(field.render(1), name="target 1"))
        assert np.allclose(measured.reference_psf.blur.centre, field.frames[2].shift[::-1], atol=0.04)
        assert abs(measured.scale[0] / field.frames[1].scale(field.frames[2])[0] - 1) < 0.005
        # Frame 3, seen at (-0.32, -0.47) px, as the reference: its hot pixels, spread by the
        # registration, read as stars of 1.6 px and every target was refused as unregistered
        # (test_stars.py). Now measured: +0.69 %, stated 0.45 %.
        resampled = prepare_reference(Frame.from_array(field.render(3), name="registered reference"), Parameters())
        measured = measure_scale(resampled, Frame.from_array(field.render(1), name="target 1"))
        assert np.allclose(measured.reference_psf.blur.centre, field.frames[3].shift[::-1], atol=0.04)
        error = measured.scale[0] / field.frames[1].scale(field.frames[3])[0] - 1
        assert abs(error) < 2 * measured.fits[0].scale_error / measured.scale[0], error


@pytest.mark.parametrize(("seed", "k"), [(11, 3), (14, 2), (33, 1)])
def test_crowded_targets_sharper_than_their_reference_fit_through_their_registration(seed, k):
    """The crowded scenario's targets of 2.6-2.8 px against a reference of 3.0 px, registered
    by a cubic spline: fitted sampled, the reference's PSF without a kernel and the target's
    through the kernel read from its noise against the reference's
    (``resampling.registration_kernel``; read alone, the reference's unresolved stars read
    as a kernel too): the spline at the frame's shift, and the scale within 0.5 % of the
    truth (+0.39 %, +0.19 %, +0.25 %; +0.77 %, +0.69 % and +0.60 % fitted without the kernel,
    their indices too high). Seed 33's frame 1, shifted by half a pixel, matches the spline
    within 0.0103 RMS: the tolerance of a difference of two readings, not of one."""
    field = SyntheticField(scenario="crowded", seed=seed)
    reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
    measured = measure_scale(reference, Frame.from_array(field.render(k), name=f"target {k}"))
    psf = measured.target_psf
    assert psf is not None and not psf.pixel_integrated and measured.reference_psf.blur is None
    assert psf.blur is not None and psf.blur.name == "cubic spline", psf.blur
    shift = np.abs(field.frames[k].shift[::-1])  # (x, y); a shift and its mirror read alike
    assert np.allclose(np.abs(psf.blur.centre), shift, atol=0.05), (psf.blur.centre, shift)
    error = measured.scale[0] / field.frames[k].scale(field.reference)[0] - 1
    assert abs(error) < 0.005, error


def test_a_registered_reference_on_a_crowded_field_is_fitted_through_its_own_kernel():
    """The crowded scenario's seed 32, frame 1 as the reference (what ``--reference auto``
    chose there: the sharpest, registered by a cubic spline from (0.35, -0.42) px). Read alone
    its noise matched no interpolation (its unresolved stars add about 0.03 at lag 1), so its
    PSF was fitted without a kernel, and its targets' kernels were read against correlations
    that no interpolation gives: frames 0 and 4 read -0.75 % and -0.55 %. Matched beside its
    sky's correlations (``resampling.sky_correlation``) it is the spline at its shift; the
    reference is fitted through it and the targets' kernels are read against what its noise
    holds beyond it: -0.43 % and -0.18 %."""
    field = SyntheticField(scenario="crowded", seed=32)
    reference = prepare_reference(Frame.from_array(field.render(1), name="registered reference"), Parameters())
    own = reference.own_kernel
    assert own is not None and own.name == "cubic spline", own
    shift = np.abs(field.frames[1].shift[::-1])  # (x, y); a shift and its mirror read alike
    assert np.allclose(np.abs(own.centre), shift, atol=0.05), (own.centre, shift)
    for k in (0, 4):
        measured = measure_scale(reference, Frame.from_array(field.render(k), name=f"target {k}"))
        blur = measured.reference_psf.blur  # the fit chooses the shift's sign
        assert blur is not None and blur.name == own.name and np.allclose(np.abs(blur.centre), np.abs(own.centre))
        error = measured.scale[0] / field.frames[k].scale(field.frames[1])[0] - 1
        assert abs(error) < 0.005, (k, error)


def test_drawn_out_targets_are_corrected_by_their_own_shape():
    """The default scenario's seed 2 with the targets' stars drawn out by 0.3, 0.2, 0.1 and
    0.25 along angles of their own (a trailing mount); the two most drawn out measured. Each
    target's fit reads its ellipticity within 0.02 and its angle within 3 degrees, and the
    round weights' correction integrates the drawn-out light: each scale within 0.5 % of the
    truth and 3 of its stated uncertainty (+0.11 and -0.11 %). A round Moffat fitted to such
    stars read -0.75 and -0.77 % (-0.52 and -0.39 % at 0.2 and 0.1)."""
    ellipticities = [0.0, 0.3, 0.2, 0.1, 0.25]
    field = SyntheticField(scenario="default", seed=2, ellipticities=ellipticities)
    reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
    for k in (1, 4):
        measured = measure_scale(reference, Frame.from_array(field.render(k), name=f"target {k}"))
        assert measured.reference_psf.ellipticity < 0.02
        shape = measured.target_psf
        assert shape.ellipticity == pytest.approx(ellipticities[k], abs=0.02), k
        turn = (shape.elongation_angle - field.frames[k].elongation_angle) % 180
        assert min(turn, 180 - turn) < 3, (k, shape.elongation_angle, field.frames[k].elongation_angle)
        error = measured.scale[0] / field.frames[k].scale(field.frames[0])[0] - 1
        stated = measured.fits[0].scale_error / measured.scale[0]
        assert abs(error) < 0.005 and abs(error) < 3 * stated, (k, error, stated)


@pytest.mark.slow
def test_a_profile_no_moffat_is_measured_with_the_aperture_or_states_the_model_error(monkeypatch):
    """Stars of a Gaussian core and a halo 2.5 times as broad holding 20 % of the light (drawn
    by ``independent.core_and_halo_frames``, not the generator), 900 on 2000 x 1400 px, a
    3.0 px reference and targets of 3.9 and 2.5 px. The Moffats fitted to them take indices
    of 9.6 and 4.6 against the reference's 5.2-5.5, and the PSF weights' scales miss by +2.9
    and -1.5 % while their fits' covariance states 0.30 and 0.24 %. The plain aperture on the
    same stars, corrected by the same fits, stands +2.6 and -1.4 % from them, 6.0 and 4.3
    standard errors of the difference (:func:`nsg_gpu.scale.aperture_check`). On a crowded
    sky the disagreement would be stated: 2.6 and 1.4 %, each error within 3 of it. This sky
    is clear (its annuli scatter by 1.01 times the noise), and the frames take the plain
    aperture, corrected for the light beyond it by the same fits, which states the smaller
    uncertainty: +0.16 and -0.16 %, stating 0.42 and 0.31 % (with the assumed Moffat of
    index 3 instead: -0.35 and +0.14 %, stating 0.79 and 0.70 %)."""
    checked, clear = scale.APERTURE_CHECK_SIGMAS, scale.CLEAR_ANNULUS
    settings = [(1.0, 3.0, 0.02, 0.002), (0.85, 3.9, 0.03, 0.0025), (0.78, 2.5, 0.04, 0.0018)]
    frames = core_and_halo_frames(settings, seed=5)
    reference = prepare_reference(Frame.from_array(frames[0], name="reference"), Parameters())
    for k, (transmission, *_) in enumerate(settings[1:], 1):
        target = Frame.from_array(frames[k], name=f"target {k}")

        def measure(sigmas, annulus, target=target, transmission=transmission):
            monkeypatch.setattr(scale, "APERTURE_CHECK_SIGMAS", sigmas)
            monkeypatch.setattr(scale, "CLEAR_ANNULUS", annulus)
            measured = measure_scale(reference, target)
            return measured, measured.scale[0] * transmission - 1, measured.fits[0].scale_error / measured.scale[0]

        weights, unchecked, unstated = measure(math.inf, 0.0)
        assert weights.target_psf is not None and abs(unchecked) > 3 * unstated, (k, unchecked, unstated)
        widened, error, stated = measure(checked, 0.0)
        ((difference, spread),) = widened.aperture_check
        assert abs(difference) > 3 * spread and widened.crowding <= clear, (k, difference, spread, widened.crowding)
        assert widened.target_psf is not None and error == unchecked and abs(error) < 3 * stated, (k, error, stated)
        plain, error, stated = measure(checked, clear)
        assert not plain.weighted and plain.target_psf is not None, k  # corrected by the fitted PSFs
        assert abs(error) < min(SCALE_TARGET, 3 * stated), (k, error, stated)


def test_a_disagreement_within_the_gate_on_a_clear_sky_takes_the_nearer_measurement(monkeypatch):
    """Stars of a core and a 20 % halo 2.5 times as broad (``core_and_halo_frames``, the
    third of ``bench/scale_errors.py --halo 0.2,2.5``'s sets): targets of 2.74 and 2.67 px
    against a 3.0 px reference. The PSF weights read -0.71 and -0.79 %, stating 0.24 and
    0.20 %, and stand -1.9 and -1.7 standard errors from the aperture: within the check's
    gate, so their uncertainty stays as stated. On this clear sky the aperture's own error is
    small, and ``d^2 - sigma^2`` estimates the weights' squared model error; it exceeds the
    variance the aperture adds, and the frames take the aperture: -0.10 and -0.42 %, stating
    0.28 and 0.26 %."""
    settings = halo_settings(3)
    frames = core_and_halo_frames(settings, seed=3)
    reference = prepare_reference(Frame.from_array(frames[0], name="reference"), Parameters())
    expected = scale._expected_error
    for k in (1, 4):
        target, transmission = Frame.from_array(frames[k], name=f"target {k}"), settings[k][0]

        def measure(key, target=target, transmission=transmission):
            monkeypatch.setattr(scale, "_expected_error", key)
            measured = measure_scale(reference, target)
            return measured, measured.scale[0] * transmission - 1, measured.fits[0].scale_error / measured.scale[0]

        weights, error, stated = measure(scale._relative_error)  # the stated uncertainty alone
        ((difference, spread),) = weights.aperture_check
        assert weights.weighted and weights.crowding <= scale.CLEAR_ANNULUS, k
        assert spread < abs(difference) <= scale.APERTURE_CHECK_SIGMAS * spread, (k, difference, spread)
        assert abs(error) > SCALE_TARGET and abs(error) > 2.5 * stated, (k, error, stated)
        plain, error, stated = measure(expected)
        assert not plain.weighted and abs(error) < min(SCALE_TARGET, 2 * stated), (k, error, stated)


def test_a_resampled_reference_does_not_read_a_crowded_sky_clear():
    """The field-dependent scenario's seed 42 with frame 2, registered, as the reference (as
    ``--reference auto`` may choose it). Its interpolation smoothed its pixels to 0.70 of the
    noise before it (``Reference.noise``, the weight's), and against that its annuli scatter
    by 0.92-1.08 times: the sky was taken for clear, and target 4, standing -1.5 standard
    errors from the aperture, took the fitted aperture at +1.35 % stating 0.45 %. Against
    its single pixels' noise (``Reference.pixel_noise``) they scatter 1.32-1.54 times, as the
    scenario's references not resampled do, and the target keeps the PSF weights. (Since the
    neighbours' light is taken out of the aperture, the two stand -0.30 % apart, 0.48 of their
    spread.) Every target is within 3 stated errors, and their RMS within 0.5 % (the frame
    carries the scenario's trail, and its stars beside it are left out: target 4 reads +0.50 %
    stating 0.57 %, +0.37 % with them; the RMS of the four 0.30 %, 0.36 % with them)."""
    field = SyntheticField(scenario="field-dependent-psf", seed=42)
    reference = prepare_reference(Frame.from_array(field.render(2), name="reference"), Parameters())
    assert reference.pixel_noise[0] < 0.8 * reference.noise[0]
    errors = []
    for k in (0, 1, 3, 4):
        measured = measure_scale(reference, Frame.from_array(field.render(k), name=f"target {k}"))
        error = measured.scale[0] / field.frames[k].scale(field.frames[2])[0] - 1
        assert abs(error) < 3 * measured.fits[0].scale_error / measured.scale[0], (k, error)
        errors.append(error)
    ((difference, spread),) = measured.aperture_check
    assert abs(difference) <= scale.APERTURE_CHECK_SIGMAS * spread, (difference, spread)
    assert measured.crowding > scale.CLEAR_ANNULUS and measured.weighted, measured.crowding
    assert math.sqrt(np.mean(np.square(errors))) < SCALE_TARGET, errors


def test_the_check_on_a_crowded_field_does_not_take_the_apertures_neighbours_for_a_model_error():
    """A crowded field (8700 stars on 1200 x 800 px, one per 110 px) and a target of 4 px
    against a reference of 3 px: the broader frame shares its neighbours' light between a
    star's aperture and its annulus otherwise, and the plain aperture on the same stars read
    the scale 1.75 % off the PSF weights (3.2 times its standard error), which the check took
    for the weights' model error and stated about 1.7 % for an error of -0.32 %. With the
    catalogue neighbours' light taken out of the aperture in each frame
    (:func:`photometry.neighbours_light`, stars whose neighbours count for more than half
    their light left out) the two agree within their spread (-0.42 % at 0.57 %), and the
    weights state 0.47 %."""
    field = SyntheticField(
        scenario="crowded", seed=1, width=1200, height=800, n_stars=8700, n_frames=2, fwhms=[3.0, 4.0]
    )
    reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
    measured = measure_scale(reference, Frame.from_array(field.render(1), name="target"))
    ((difference, spread),) = measured.aperture_check
    assert measured.crowding > 2 * scale.CLEAR_ANNULUS, measured.crowding
    assert abs(difference) < spread, (difference, spread)
    stated = measured.fits[0].scale_error / measured.scale[0]
    error = measured.scale[0] / field.frames[1].scale(field.frames[0])[0] - 1
    assert stated < 0.008 and abs(error) < min(SCALE_TARGET, 3 * stated), (error, stated)


def test_the_plain_aperture_on_a_crowded_field_takes_the_neighbours_light_out():
    """``--photometry aperture`` (NSG's own method) on the crowded field above, a reference of
    3 px against targets of 4 and 2.5 px: the catalogue neighbours' light that each frame's
    aperture counts with each star (:func:`photometry.neighbours_light`, through each frame's
    PSF) read the scales +1.72 % and -0.45 % off the truth; taken out (what is left of the
    frames' difference counted in each star's error), they were +0.24 % and -0.08 % through
    an assumed Moffat of index 3 (the frames' own: 3.00, 3.03, 2.90), and are +0.33 % and
    +0.29 % through the fitted PSFs (indices 3.13, 3.05 and 3.38: the sharp registered target
    on a crowded field reads its index high, as in the PSF weights' path), stating 0.43 and
    0.28 %."""
    field = SyntheticField(
        scenario="crowded", seed=1, width=1200, height=800, n_stars=8700, n_frames=3, fwhms=[3.0, 4.0, 2.5]
    )
    reference = prepare_reference(
        Frame.from_array(field.render(0), name="reference"), Parameters(photometry="aperture")
    )
    for k in (1, 2):
        measured = measure_scale(reference, Frame.from_array(field.render(k), name=f"target {k}"))
        assert not measured.weighted
        error = measured.scale[0] / field.frames[k].scale(field.frames[0])[0] - 1
        stated = measured.fits[0].scale_error / measured.scale[0]
        assert abs(error) < min(SCALE_TARGET, 3 * stated), (k, error, stated)


def test_the_plain_aperture_is_corrected_by_the_fitted_psfs():
    """``--photometry aperture`` on the field-dependent scenario (Moffat index 2.5-4.5, stars
    up to 35 % broader in the corners): the seeing correction of the light beyond the
    aperture from an assumed index 3 (+- 0.75) read the first target's scale -1.74 % off the
    truth, stating 0.81 %; from the two frames' fitted PSFs it is -0.33 %, stating 0.27 %."""
    field = SyntheticField(scenario="field-dependent-psf", seed=1, width=1200, height=800, n_stars=1200, n_frames=3)
    reference = prepare_reference(
        Frame.from_array(field.render(0), name="reference"), Parameters(photometry="aperture")
    )
    assert reference.own_psf() is not None
    measured = measure_scale(reference, Frame.from_array(field.render(1), name="target"))
    assert measured.photometry == "aperture-fitted"
    error = measured.scale[0] / field.frames[1].scale(field.frames[0])[0] - 1
    stated = measured.fits[0].scale_error / measured.scale[0]
    assert abs(error) < min(SCALE_TARGET, 3 * stated), (error, stated)


def test_moffat_stars_agree_with_the_aperture():
    """On the generator's Moffat stars (the default scenario's seed 1, targets of 2.6-4.4 px
    against 2.8 px) the PSF weights and the plain aperture on the same stars agree within
    :data:`nsg_gpu.scale.APERTURE_CHECK_SIGMAS` of their difference's standard error (+0.13 %
    at 0.35 and +0.10 % at 0.40 of it; -0.20 % and +0.09 % before the neighbours' light was
    taken out of the aperture), so the check leaves the stated uncertainties as they are."""
    field = SyntheticField(scenario="default", seed=1, n_frames=3)
    reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
    for k in (1, 2):
        measured = measure_scale(reference, Frame.from_array(field.render(k), name=f"target {k}"))
        ((difference, spread),) = measured.aperture_check
        assert abs(difference) < scale.APERTURE_CHECK_SIGMAS * spread, (k, difference, spread)


def test_targets_registered_with_a_turn():
    """Targets seen turned by 0.4-1.4 degrees about the centre as well as shifted, then
    registered (a cubic spline): their shift changes across the frame, and the noise of the
    most turned one matches no single interpolation (the zero-phase kernel serves). Each
    scale is within 1.5 % of the truth and 3 of its stated uncertainty (0.00, +0.58, +0.95 %
    against 0.56, 0.59 and 0.45 %: the turned frames' PSFs fitted with one kernel; stars of 1.5-2.5 px, RMS 0.59 % over seeds 5, 7, 8 and 9 with turns up
    to 2 degrees, 0.22 % without turns)."""
    field = SyntheticField(**REGISTERED_SMALL, rotation=2.0, seed=8)
    assert [round(abs(f.rotation), 2) for f in field.frames] == [0.0, 0.37, 1.12, 1.38]
    reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
    for k in range(1, 4):
        measured = measure_scale(reference, Frame.from_array(field.render(k), name=f"target {k}"))
        error = measured.scale[0] / field.frames[k].scale(field.reference)[0] - 1
        stated = measured.fits[0].scale_error / measured.scale[0]
        assert abs(error) < 0.015 and abs(error) < 3 * stated, (k, error, stated)


def test_a_turned_reference():
    """The most turned frame of the same set (1.38 degrees) as the reference: its noise
    matches no single interpolation, so its PSF is fitted with the zero-phase kernel, whose
    phase is right nowhere in particular. Every target (one not turned, two turned) still
    measures within 1.5 % of the truth and 3 of its stated uncertainty (-0.50, -0.08, -0.27 %
    against 0.38-0.40 %; RMS 0.59 %, RMS z 1.2 over seeds 5, 7, 8 and 9, worst z 2.1)."""
    field = SyntheticField(**REGISTERED_SMALL, rotation=2.0, seed=8)
    reference = prepare_reference(Frame.from_array(field.render(3), name="turned reference"), Parameters())
    assert reference.interpolation_kernel.name == "zero-phase"
    for k in range(3):
        measured = measure_scale(reference, Frame.from_array(field.render(k), name=f"target {k}"))
        assert measured.target_psf is not None  # the PSF path, not the plain aperture
        error = measured.scale[0] / field.frames[k].scale(field.frames[3])[0] - 1
        stated = measured.fits[0].scale_error / measured.scale[0]
        assert abs(error) < 0.015 and abs(error) < 3 * stated, (k, error, stated)


@pytest.mark.parametrize("seed", [2, 3])
def test_sparse_field_targets_are_judged_registered(seed):
    """25 stars on a nebula, 800 x 600 px: the reference's 50 brightest reach down to stars a
    target cannot show above 5 sigma, and every target was taken for unregistered ("only 5 of
    the reference's 15 brightest stars ... are found"). Judged on the reference's stars that
    stand 15 sigma out of its noise, every target measures, within 3 stated errors."""
    field = SyntheticField(width=800, height=600, n_stars=25, seed=seed, n_frames=4)
    reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
    for k in range(1, 4):
        measured = measure_scale(reference, Frame.from_array(field.render(k), name=f"target {k}"))
        error = _mono_error(field, measured, k)
        assert abs(error) < 3 * measured.fits[0].scale_error / measured.scale[0], (k, error)


def test_a_sparse_field_on_a_bright_nebula_reads_its_stars_not_the_knots():
    """60 stars on the generator's 2000 x 1400 field and nebula (seed 3): fewer than five
    stars stand 30 noises out of it, and four of the five brightest readable detections by
    flux were knots of the nebula, which read 17 px: the reference's FWHM read 16.96 px for
    2.8, its catalogue was the knots', and its targets kept 2-3 star pairs (one failed, one
    came out 147 % off). Now the knots, which peak low for their flux, do not read the FWHM,
    and every target measures with its stars, within 3 stated errors."""
    field = SyntheticField(SyntheticSpec.from_scenario("default", n_stars=60, seed=3, n_frames=6))
    reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
    assert reference.stars.fwhm == pytest.approx(field.frames[0].fwhm, rel=0.15)
    for k in range(1, 6):
        measured = measure_scale(reference, Frame.from_array(field.render(k), name=f"target {k}"))
        error = _mono_error(field, measured, k)
        assert measured.pairs >= 9, (k, measured.pairs)
        assert abs(error) < 3 * measured.fits[0].scale_error / measured.scale[0], (k, error)


def test_a_sparse_fields_psf_is_fitted_on_its_stars_not_the_knots():
    """60 stars on the generator's nebula (seed 2, frame 1): 50 of the 60 brightest isolated
    detections were knots of the nebula, all under 5 noise sigmas at their peak and low for
    their flux, and the PSF fits took them, the target's Moffat index 2.63 for 2.99 (its
    scale 4 % off). The PSF stars are now the stars."""
    field = SyntheticField(SyntheticSpec.from_scenario("default", n_stars=60, seed=2, n_frames=6))
    reference = prepare_reference(Frame.from_array(field.render(1), name="reference"), Parameters())
    rows = reference.psf_stars()
    x, y = reference.stars.x[rows], reference.stars.y[rows]
    distance = np.hypot(x[:, None] - field.star_x[None], y[:, None] - field.star_y[None]).min(axis=1)
    assert rows.size >= 8
    assert np.all(distance < 3.0), np.round(distance, 1)


def test_a_reference_crossed_by_a_trail_leaves_the_stars_and_samples_beside_it_out():
    """The generator's trail (frame 2: 13 sky noises, along y - 0.2 h = 0.45 (x - 0.1 w)) as
    the reference's: in every target's annulus of a star beside it, and in the samples on it.
    No photometry star's annulus reaches within 2 FWHM of it, and every sample bin it crosses
    is rejected; the stars farther away are all kept."""
    field = SyntheticField(width=900, height=700, n_stars=900, seed=4, n_frames=3, borders=False)
    assert field.frames[2].trail
    reference = prepare_reference(Frame.from_array(field.render(2), name="reference"), Parameters())
    stars, params = reference.stars, reference.params
    geometry = photometry.geometry_for(stars.fwhm, params)
    w, h = 900, 700
    along = np.array([1.0, 0.45]) / math.hypot(1.0, 0.45)

    def distance(x, y):
        return np.abs((np.asarray(y) - 0.2 * h) * along[0] - (np.asarray(x) - 0.1 * w) * along[1])

    reach = geometry.annulus_outer + 2 * stars.fwhm
    kept = np.zeros(len(stars), bool)
    kept[reference.photometry_index] = True
    linear = stars.peak < params.linear_range
    near = distance(stars.x, stars.y)
    assert not np.any(kept & (near < reach - 1.0))
    assert np.all(kept[linear & (near > reach + 1.0)][: reference.photometry_index.size])
    grid = reference.grid
    cx, cy = np.meshgrid(grid.centre_x, grid.centre_y)
    crossed = distance(cx, cy) < 0.5 * grid.size
    assert crossed.sum() > 20
    assert np.all(reference.rejected[crossed])


def test_sparse_colour_frame_with_three_pairs_in_a_channel_is_measured_and_flagged():
    """15 undersampled stars on a colour nebula (sep finds 12 of them on the reference and 10
    on the target at 5 sigma): three red pairs, of which the biweight kept two, and the frame
    failed. All three fitted, every channel is within 3 stated errors of the truth, and the
    uncertainty flags the frame."""
    field = SyntheticField(scenario="undersampled-sparse-colour", n_stars=15, seed=1, n_frames=4)
    reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
    measured = measure_scale(reference, Frame.from_array(field.render(1), name="target"))
    errors = np.array([fit.scale_error for fit in measured.fits])
    truth = field.frames[1].scale(field.reference)
    assert np.all(np.abs(measured.scale - truth) < 3 * errors), (measured.scale, truth, errors)
    assert "more than 3 %" in scale_doubt(measured.scale, errors)


def test_frames_under_thin_cloud_are_judged_on_the_stars_they_show():
    """150 stars on 800 x 600 px, targets at a transmission of 0.35 and 0.2 (thin cloud) and
    seeing of 4.2 and 3.7 px against the reference's 2.8: they show the reference's judged
    stars at 0.15 of their strength, and were taken for unregistered ("only 11 of the
    reference's 23 brightest stars ... are found"). Judged on the stars their depth lets them
    show, both are measured, within 3 stated errors of the truth."""
    field = SyntheticField(
        width=800, height=600, n_stars=150, seed=1, n_frames=5, transmissions=[1.0, 0.6, 0.35, 0.2, 0.1]
    )
    reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
    for k in (2, 3):
        measured = measure_scale(reference, Frame.from_array(field.render(k), name=f"target {k}"))
        error = _mono_error(field, measured, k)
        assert abs(error) < 3 * measured.fits[0].scale_error / measured.scale[0], (k, error)


def test_a_reference_with_hot_pixels_among_its_brightest_judges_registered_targets():
    """40 stars (field-dependent scenario, seed 9); the reference is frame 4, registered near
    half a pixel's shift, whose hot pixels, spread over two pixels, are among its brightest
    detections: the targets found 2-3 of its 8-10 judged stars and were taken for
    unregistered. The stars they find sit where the reference has them (median shift under
    half a pixel): every target is measured, within 3 stated errors of the truth."""
    field = SyntheticField(SyntheticSpec.from_scenario("field-dependent-psf", n_stars=40, seed=9))
    reference = prepare_reference(Frame.from_array(field.render(4), name="reference"), Parameters())
    for k in range(4):
        measured = measure_scale(reference, Frame.from_array(field.render(k), name=f"target {k}"))
        truth = field.frames[k].scale(field.frames[4])[0]
        assert abs(measured.scale[0] - truth) < 3 * measured.fits[0].scale_error, (k, measured.scale[0], truth)


def test_a_shifted_sparse_frame_is_still_taken_for_unregistered():
    """The same sparse field with the target moved by 7 px: the judged stars are not found."""
    field = SyntheticField(width=800, height=600, n_stars=25, seed=2, n_frames=2)
    reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
    moved = np.roll(field.render(1), (7, -6), axis=(1, 2))
    with pytest.raises(TooFewStarsError, match="does not look registered"):
        measure_scale(reference, Frame.from_array(moved, name="moved"))


def _mono_error(field: SyntheticField, measured, k: int) -> float:
    """The relative error of a mono target's measured scale against the generator's."""
    return float(measured.scale[0] / field.frames[k].scale(field.reference)[0] - 1)


@pytest.mark.slow
def test_undersampled_mono_frames_take_the_psf_weights_where_they_are_surer():
    """Mono frames of stars of 0.8-1.4 px before the pixels (read 1.5 px), 400 stars, targets
    registered at sub-pixel offsets: each target is measured with the PSF weights
    (pixel-integrated fits with the registration's kernel, weights of at least 2 px) and with
    the plain aperture, and takes the one that states the smaller uncertainty, never more than
    the aperture alone states; every scale within 3 stated errors, RMS 0.97 % over the four
    targets (two take the weights: -1.11, -1.01 %, stating 1.22 %; the aperture states 1.46 and
    1.67 % there). Before hot pixels were left out of both frames' photometry the aperture
    gave 1.54 % (-2.05..-0.36 %) on these frames and the weights were taken on all four."""
    field = SyntheticField(
        scenario="undersampled-sparse-colour", colour=False, bayer=False, n_stars=400, n_frames=5, seed=4
    )
    reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
    aperture = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters(photometry="aperture"))
    assert reference.stars.fwhm < 2.0
    errors, weighted = [], 0
    for k in range(1, 5):
        target = Frame.from_array(field.render(k), name=f"target {k}")
        measured = measure_scale(reference, target)
        alone = measure_scale(aperture, target)
        assert alone.target_psf is None
        stated = measured.fits[0].scale_error / measured.scale[0]
        assert stated <= alone.fits[0].scale_error / alone.scale[0] * (1 + 1e-12)
        if measured.target_psf is not None:
            assert measured.target_psf.pixel_integrated
            weighted += 1
        error = _mono_error(field, measured, k)
        assert abs(error) < 3 * stated, (k, error)
        errors.append(error)
    assert weighted >= 1
    assert np.sqrt(np.mean(np.square(errors))) < 0.011, errors


def test_undersampled_mono_frames_almost_without_noise_are_measured():
    """Registered mono frames of 0.8-1.4 px stars almost without noise: the 5-sigma clipping of
    a tiny noise leaves some stars no pixel in the PSF fits, which once stopped them with a
    singular system; every target is measured, within 3 stated errors and the PSF weights'
    model error on such stars (``UNDERSAMPLED_KERNEL_ERROR``, which is stated only where the
    noise shows the registration's kernel). Frame 2, shifted by only (-0.086, 0.059) px, shows
    none: on the weights it is -0.77 % off, stating 0.18 % from the fits, and the plain
    aperture on the same stars stands 0.78 % from it, 5.5 standard errors of their difference
    (``scale.aperture_check``); the weights then state 0.78 %, and the frame takes the
    aperture, -0.14 % stating 0.49 %, as the three others do (-0.45..+0.05 %, stating
    0.41-0.45 %)."""
    field = SyntheticField(scenario="undersampled-sparse-mono", n_frames=5, seed=3, noise_sigma=1.5e-5)
    reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
    for k in range(1, 5):
        measured = measure_scale(reference, Frame.from_array(field.render(k), name=f"target {k}"))
        error = _mono_error(field, measured, k)
        stated = measured.fits[0].scale_error / measured.scale[0]
        allowed = math.hypot(3 * stated, UNDERSAMPLED_KERNEL_ERROR) if measured.target_psf is not None else 3 * stated
        assert abs(error) < allowed, (k, error)
        if k == 2:
            assert measured.target_psf is None and abs(error) < 3 * stated, (error, stated)


_ALMOST_NOISELESS_TARGET = """
from nsg_gpu.io import Frame
from nsg_gpu.params import Parameters
from nsg_gpu.reference import prepare_reference
from nsg_gpu import scale
from nsg_gpu.scale import measure_scale
from nsg_gpu.synthetic import SyntheticField
field = SyntheticField(scenario="undersampled-sparse-mono", n_frames=5, seed=3, noise_sigma=1.5e-5)
reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
# The PSF weights' measurement, whichever of it and the aperture states the smaller error.
scale._relative_error = lambda measured: 0.0 if measured.target_psf is not None else 1.0
measured = measure_scale(reference, Frame.from_array(field.render(2), name="target 2"))
print(repr(float(measured.scale[0])), repr(float(measured.target_psf.fwhm)))
"""


def _numpy_uses_openblas() -> bool:
    from threadpoolctl import threadpool_info

    return any(info.get("internal_api") == "openblas" for info in threadpool_info())


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not _numpy_uses_openblas(),
    reason="chooses OpenBLAS's x86 kernels (OPENBLAS_CORETYPE)",
)
def test_an_almost_noiseless_fit_does_not_hang_on_the_blas_rounding():
    """The almost noiseless undersampled target above (frame 2: its Moffat's error, for a
    kernel the noise does not show, is 25-70 noise sigmas on its stars' pixels) measured with
    OpenBLAS's SSE3 kernels and with its AVX ones, which round differently: the same scale
    and FWHM within 1e-6 (0.980 px for 0.968, -0.68 %). Clipped at 5 noise sigmas, the fit
    took the stars' cores for outliers round after round and ended where the rounding left
    it: FWHM 0.80 px and +3.86 % with the one, 1.00 px and -0.43 % with the other (and each
    on a machine of its own); the clip now follows the residuals' spread where the model's
    error is that large (``psf._clip_scale``)."""
    readings = []
    for core in ("Prescott", "Sandybridge"):
        run = subprocess.run(
            [sys.executable, "-c", _ALMOST_NOISELESS_TARGET],
            env={**os.environ, "OPENBLAS_CORETYPE": core, "OPENBLAS_VERBOSE": "0"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        readings.append([float(v) for v in run.stdout.split()])
    (scale_a, fwhm_a), (scale_b, fwhm_b) = readings
    assert scale_a == pytest.approx(scale_b, rel=1e-6) and fwhm_a == pytest.approx(fwhm_b, rel=1e-6), readings


def test_undersampled_mono_fits_that_fail_leave_the_frame_to_the_aperture(monkeypatch):
    """Below 2 px the PSF fits are an option beside the plain aperture: a numerical failure
    in them (here a singular system raised on purpose) measures the frame with the aperture,
    as before mono frames of such stars fitted PSFs, instead of stopping the run."""
    field = SyntheticField(scenario="undersampled-sparse-mono", n_frames=2, seed=4, n_stars=400)
    reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
    target = Frame.from_array(field.render(1), name="target")

    def singular(*args, **kwargs):
        raise np.linalg.LinAlgError("Singular matrix")

    monkeypatch.setattr(scale, "fit_psfs", singular)
    measured = scale.measure_scale(reference, target)
    assert measured.target_psf is None
    error = _mono_error(field, measured, 1)
    assert abs(error) < 3 * measured.fits[0].scale_error / measured.scale[0]


@pytest.mark.parametrize(
    ("photometry", "fwhms"), [("aperture", [2.8, 3.4]), ("psf", [2.8, 6.0])], ids=["aperture", "broad"]
)
def test_plain_aperture_fits_that_fail_leave_the_frame_to_the_assumed_index(monkeypatch, photometry, fwhms):
    """The plain aperture's PSF fits only correct it (``--photometry aperture``, and a target
    twice as broad as the reference): a numerical failure in them (a singular system raised
    on purpose), in the targets' fits or the reference's own, measures the frame with the
    assumed Moffat instead of stopping the run."""
    field = SyntheticField(seed=2, n_frames=2, width=900, height=700, n_stars=500, fwhms=fwhms)
    reference = prepare_reference(
        Frame.from_array(field.render(0), name="reference"), Parameters(photometry=photometry)
    )
    target = Frame.from_array(field.render(1), name="target")
    assert scale.measure_scale(reference, target).photometry == "aperture-fitted"

    def singular(*args, **kwargs):
        raise np.linalg.LinAlgError("Singular matrix")

    monkeypatch.setattr(scale, "fit_psfs", singular)
    monkeypatch.setattr(reference, "psf_fit", singular)
    assert reference.own_psf() is None
    measured = scale.measure_scale(reference, target)
    assert measured.photometry == "aperture"
    error = _mono_error(field, measured, 1)
    assert abs(error) < 3 * measured.fits[0].scale_error / measured.scale[0]


@pytest.mark.slow
def test_sparse_colour_fields_are_not_decided_by_hot_pixels():
    """Colour fields of 20 stars of about a superpixel (the undersampled colour scenario with
    20 stars, seeds 21-28, three targets each) with the scenario's hot pixels (5e-4 of the
    pixels, 70-700 noise sigmas): among the 10-20 pairs of a channel a hot pixel near one star
    decided its scale while it was left in (RMS 12.6 % over the 72 channel scales, worst
    65 %); left out of both frames, RMS 6.8 %, worst 30 % (`bench/scale_errors.py --sparse`),
    what the Bayer cells' scatter leaves (5.0 % on the same frames without hot pixels), and
    the stated uncertainties hold it."""
    errors, z = [], []
    for seed in range(21, 29):
        field = SyntheticField(scenario="undersampled-sparse-colour", n_stars=20, n_frames=4, seed=seed)
        reference = prepare_reference(Frame.from_array(field.render(0), name="reference"), Parameters())
        for k in range(1, 4):
            measured = measure_scale(reference, Frame.from_array(field.render(k), name=f"target {k}"))
            truth = field.frames[k].scale(field.reference)
            for c, fit in enumerate(measured.fits):
                errors.append(fit.scale / truth[c] - 1)
                z.append(errors[-1] / (fit.scale_error / fit.scale))
    rms = float(np.sqrt(np.mean(np.square(errors))))
    rms_z = float(np.sqrt(np.mean(np.square(z))))
    assert len(errors) == 72
    assert rms < 0.09, rms
    assert 0.5 <= rms_z <= 2, rms_z
