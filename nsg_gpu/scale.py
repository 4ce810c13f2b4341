"""The scale stage: the photometric scale ``m`` of a target per channel, from the reference's stars.

Second stage of a target, after the reference is prepared (:mod:`nsg_gpu.reference`). The
target's FWHM is measured at the reference's bright isolated stars; every reference star is
recentred on the target (frames are registered, so stars are looked for where the reference
has them) and the frame is failed when too few of the brightest are found. The stars are then
measured at one position per star in both frames, moved in the target by the frame's
registration residual (an affine offset fitted to the centroids), not at each frame's own
centroid: the reference's catalogue position for the plain aperture, the mean of the two
frames' centroids for PSF weights (:func:`shared_positions`). The PSFs of both
frames are fitted (:mod:`nsg_gpu.psf`; integrated over the pixels where either frame's stars
are undersampled, and then convolved with the registration's kernel where a frame was
resampled: :mod:`nsg_gpu.resampling`), the stars are measured in both frames with the same
aperture and weights (:mod:`nsg_gpu.photometry`), corrected for the share of the light each
frame's weights keep, and NSG's robust line fit gives ``m`` per channel. The gradient stage
(:mod:`nsg_gpu.gradient`) comes next.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np

from . import photometry, scalefit
from .backend import get_backend
from .errors import TooFewStarsError
from .io import Frame
from .noise import DETECT_NOISE_PIXELS, ksigma_noise
from .progress import Stopwatch
from .psf import (
    MAX_UNDERSAMPLED_BETA_ERROR,
    MIN_PSF_FWHM,
    MIN_PSF_STARS,
    MIN_WEIGHT_FWHM,
    MoffatPSF,
    fit_target_psf,
    fits_psf_from,
    integrated_fit,
    plausible,
    psf_stamps,
    stamp_noise,
    stamp_radius,
    stamp_ratio,
)
from .reference import Reference, beside_trails
from .resampling import interpolation_kernel, noise_correlation, registration_kernel
from .stamps import channel_peaks, gather_stamps, local_level, peak_contrast, stamp_peaks
from .stars import detection_image, estimate_fwhm, typical_fwhm

__all__ = [
    "ScaleMeasurement",
    "measure_scale",
    "fit_psfs",
    "MIN_PAIR_SNR",
    "JUDGED_PAIR_SNR",
    "MIN_REGISTERED_FRACTION",
    "registration_offsets",
]

#: Pairs below this signal-to-noise (both frames combined, per channel) are left out: at 3
#: a detection is barely a star, and its weight in the fit is 1 % of a pair at 30.
MIN_PAIR_SNR = 3.0
#: Pairs at or above this signal-to-noise are judged by NSG's pair selection (its ratio
#: tolerance and outlier removal); fainter ones by the weighted fit's biweight only.
JUDGED_PAIR_SNR = 10.0
#: Stars whose target peak is below this many noise sigmas do not measure the target's FWHM.
MIN_FWHM_PEAK_SNR = 20.0
#: Where fewer than five do, stars at this many read it if they read it at least BROAD_FWHM
#: times the reference's (:func:`_broad_target_fwhm`).
BROAD_FWHM_PEAK_SNR = 7.0
BROAD_FWHM = 1.5
#: Where one frame's stars are this many times as broad as the other's or more, the plain
#: aperture measures them: the PSF weights read targets much sharper than their reference
#: high by more than they state (against a reference of 9 px, 3 px targets +1.7 % and
#: +1.6 %, stated 0.7 % and 0.9 %: the two fitted indices' difference 0.06-0.13 off, where
#: the correction needs it to 0.02). Targets 2-4 times broader than the reference read RMS
#: 0.93 % (RMS z 0.93) on the weights since the neighbours are left out of the PSF fits,
#: 1.35 % (z 1.05) on the aperture (docs/scale-accuracy.md, "The neighbours in the PSF
#: stars' wings"). The aperture's correction is the fitted PSFs': on 18 such targets of 2.8-11
#: px RMS 0.73 % (z 1.10), against 0.88 % (z 0.85) with an assumed index
#: (docs/scale-accuracy.md, "The plain aperture's correction from the fitted PSFs").
MAX_PSF_WIDTH_RATIO = 2.0
#: Share of the bright reference stars that must be found within the search radius.
MIN_REGISTERED_FRACTION = 0.5
#: ... or, where the reference's brightest detections hold some that are not stars (hot
#: pixels spread by its own registration, which no target has at those places), at least
#: this share, and at least MIN_JUDGED_STARS - 2 of them, found within REGISTERED_SHIFT px
#: of their reference positions (their median): the stars of a registered frame sit where
#: the reference has them, to a few tenths of a pixel, while chance matches of a frame not
#: registered lie anywhere within the search radius.
MIN_SHARP_FRACTION = 0.2
REGISTERED_SHIFT = 0.5
#: The stars that judge registration: peaks this many noise sigmas above their surroundings
#: in the reference (above the 5 sigma of "found" in a target of a third the transmission),
#: at least MIN_JUDGED_STARS of them.
JUDGED_STAR_SNR = 15.0
MIN_JUDGED_STARS = 5
#: The brightest judged stars from which a target's depth relative to the reference is read.
DEPTH_STARS = 20
#: Errors of the PSF where it is not fitted (a fitted one carries its fit's covariance): a
#: Moffat of index 3 is assumed (seeing-limited stars have 2.5-4.5), at the FWHM measured
#: from the stars' half-maximum areas.
ASSUMED_BETA_ERROR = 0.75
ASSUMED_FWHM_ERROR = 0.03
#: Relative error of the seeing correction of PSF weights on stars under 2 px where either
#: frame was resampled, beyond the fits' covariance: the Moffat integrated over the pixels and
#: convolved with the kernel read from the noise is not the captured profile exactly. On
#: registered mono generator frames almost without noise the scales missed by up to 2.1 %
#: (RMS 1.1 %) where the fits stated 0.2-0.4 % (docs/scale-accuracy.md, "Undersampled mono
#: frames").
UNDERSAMPLED_KERNEL_ERROR = 0.01
#: How many standard errors of their difference the PSF weights' scale may stand from the
#: plain aperture's on the same stars before the difference counts as the model's error
#: (:func:`aperture_check`).
APERTURE_CHECK_SIGMAS = 2.0
#: The check measures the plain aperture on at most this many stars, those of the highest
#: signal-to-noise, which hold most of what the scales know.
CHECK_STARS = 300
#: Where the PSF weights stand from the aperture by more than their difference's standard
#: error, a frame whose reference annuli scatter by at most this many times its single
#: pixels' noise (the median over the checked stars; ``Reference.pixel_noise``) is measured
#: with the plain aperture, corrected by the fitted PSFs, if that is expected nearer the
#: truth (:func:`_expected_error`). Denser fields
#: scatter more (the generator's default scenario 1.13-1.40, its other sets 1.11 and up,
#: crowded 2.3-3.4; stars with halos on a clear sky 1.01-1.02), and there the light of their
#: faint stars biases the aperture by as much as the weights' model error
#: (docs/scale-accuracy.md, "Profiles no Moffat is").
CLEAR_ANNULUS = 1.05
#: The check against the aperture leaves out stars whose catalogue neighbours' light counts
#: in their plain aperture (less its annulus) for more than this share of their own
#: (:func:`_without_neighbours`): 12 % of the checked stars on the crowded scenario, 6 % on
#: the field-dependent one, 2-3 % on the default one. A plain aperture's scale keeps their
#: fluxes as measured and counts their neighbours' light in their errors
#: (:func:`_neighbour_error`).
MAX_NEIGHBOUR_SHARE = 0.5
#: The share of the frames' difference in their neighbours' light taken out of a plain
#: aperture's fluxes (:func:`_neighbours_light`) that is counted as left in each star's flux
#: ratio (:func:`_neighbour_error`): the neighbours' catalogue fluxes and the frames' profiles
#: are models. One value, not tuned: with it the crowded scenario in aperture mode reads
#: RMS 0.33 % (0.85 % before the correction), and the sparse sets as before it
#: (docs/scale-accuracy.md, "The plain aperture on a crowded field").
NEIGHBOUR_LIGHT_ERROR = 0.25


@dataclass
class ScaleMeasurement:
    """The scale of one target and what it was measured from."""

    scale: np.ndarray  # m per channel
    pairs: int
    fwhm: float  # the target's
    fits: list  # scalefit.ScaleFit per channel
    correction: np.ndarray  # (channels, stars), applied to the reference's fluxes
    target_flux: list | None = None  # per channel, the fluxes of the pairs given to the fit
    reference_flux: list | None = None  # per channel, corrected for the seeing
    reference_psf: MoffatPSF | None = None  # fitted, or None where the fit was not possible
    target_psf: MoffatPSF | None = None
    #: With PSF weights, per channel: the log ratio of their scale to the plain aperture's on
    #: the same stars and its standard error (:func:`aperture_check`), or None.
    aperture_check: list | None = None
    #: With PSF weights: the median over the checked stars of the reference's annulus scatter
    #: over its single pixels' noise (1 on an empty sky; the light of faint stars and
    #: neighbours raises it).
    crowding: float | None = None
    #: Whether the fluxes are PSF-weighted sums; False: the plain aperture, whose seeing
    #: correction uses the fitted PSFs where ``reference_psf`` is set, else an assumed Moffat.
    weighted: bool = True

    @property
    def photometry(self) -> str:
        """What measured the fluxes: ``psf`` (PSF weights), ``aperture-fitted`` (the plain
        aperture corrected by the fitted PSFs) or ``aperture`` (corrected by an assumed Moffat)."""
        if self.weighted:
            return "psf"
        return "aperture-fitted" if self.target_psf is not None else "aperture"


def _target_fwhm(reference: Reference, image, noise: float) -> float:
    """The target's FWHM at the reference's bright isolated stars; the reference's where too
    few stand out of the target's noise (noise inflates the area above half maximum of faint
    ones), unless those of them that do read it much broader (:func:`_broad_target_fwhm`)."""
    stars = reference.stars
    bright = reference.photometry_index[reference.isolated][:200]
    if bright.size < 5:
        return stars.fwhm
    half = max(4, int(math.ceil(3 * stars.fwhm)))
    reading = _fwhm_reading(image, stars.x[bright], stars.y[bright], MIN_FWHM_PEAK_SNR * noise, 12, half, 200)
    if reading is None:
        return _broad_target_fwhm(reference, image, noise, bright)
    return reading if math.isfinite(reading) else stars.fwhm


def _fwhm_reading(image, x, y, threshold: float, sky_half: int, half: int, most: int) -> float | None:
    """:func:`typical_fwhm` of the first ``most`` stars at ``x, y`` whose peak stands
    ``threshold`` above their local sky (:func:`local_level` at ``sky_half``), read in windows
    of ``half``; None where fewer than five stand out, NaN where fewer than five read it."""
    be = get_backend(image)
    local = local_level(image, x, y, sky_half)
    shown = np.nonzero(stamp_peaks(image, x, y) - local > threshold)[0][:most]
    if shown.size < 5:
        return None
    values = estimate_fwhm(image, x[shown], y[shown], background=be.asarray(local[shown]), half=half)
    values = values[values > 0.8]
    return typical_fwhm(values) if values.size >= 5 else math.nan


def _broad_target_fwhm(reference: Reference, image, noise: float, bright: np.ndarray) -> float:
    """The FWHM of a target whose stars stand too little out of its noise to read it at
    :data:`MIN_FWHM_PEAK_SNR`: where the brightest 30 of ``bright`` that reach
    :data:`BROAD_FWHM_PEAK_SNR` read it at least :data:`BROAD_FWHM` times the reference's
    (with windows and local sky sized from that reading, twice), that; else the reference's.

    Stars much broader than the reference's peak low: a target of 11 px against a reference
    of 2.8 px had none of 200 bright stars at 20 sigmas, and the reference's FWHM sized its
    apertures, which kept two thirds of its stars' light (scale +53 %). A frame under thin
    cloud keeps the reference's: the areas of its faint stars, which noise inflates, do not
    read half as broad again."""
    stars = reference.stars
    x, y = stars.x[bright], stars.y[bright]
    reading = stars.fwhm
    for _ in range(2):
        half = max(12, int(math.ceil(3 * reading)))
        reading = _fwhm_reading(image, x, y, BROAD_FWHM_PEAK_SNR * noise, half, half, 30)
        if reading is None or not math.isfinite(reading):
            return stars.fwhm
    return reading if reading >= BROAD_FWHM * stars.fwhm else stars.fwhm


def _find_stars(reference: Reference, frame: Frame, image, noise: float, fwhm_t: float):
    """The reference's stars recentred on the target, and which were found there.

    Raises
    ------
    TooFewStarsError
        Too few of the brightest stars the frame covers are where the reference has them.
    """
    params = reference.params
    stars = reference.stars
    idx = reference.photometry_index
    x, y = stars.x[idx], stars.y[idx]
    tx, ty = photometry.recentre(image, x, y, fwhm=max(stars.fwhm, fwhm_t))
    shift = np.hypot(tx - x, ty - y)
    # Found: the centroid moved little and a star really stands there (the centroid of bare
    # sky also lies near the window's centre).
    with np.errstate(divide="ignore", invalid="ignore"):  # a frame without noise: no star found
        snr = peak_contrast(image, x, y, max(stars.fwhm, fwhm_t)) / noise
    found = np.isfinite(shift) & (shift <= params.star_search_radius) & (snr > 5)
    covered = get_backend(image).to_host(gather_stamps(image, x, y, 2).min(axis=(1, 2))) > 0
    judged = _judged_stars(reference, covered, snr)
    share = float(found[judged].mean()) if judged.size else 1.0
    matched = judged[found[judged]]
    in_place = (
        matched.size >= MIN_JUDGED_STARS - 2
        and share >= MIN_SHARP_FRACTION
        and float(np.median(shift[matched])) <= REGISTERED_SHIFT
    )
    if judged.size >= MIN_JUDGED_STARS and share < MIN_REGISTERED_FRACTION and not in_place:
        raise TooFewStarsError(
            frame.path,
            f"only {int(found[judged].sum())} of the reference's {judged.size} brightest stars in the frame's "
            f"coverage are found within {params.star_search_radius:g} px of their reference positions: the "
            "frame does not look registered to the reference, or shows no stars (cloud, dew, a closed "
            "shutter); register it first, or raise --star-search-radius",
        )
    ox, oy = registration_offsets(x, y, tx, ty, found)
    return x + ox, y + oy, found, shared_positions(x, y, tx - ox, ty - oy, found)


def shared_positions(x, y, cx, cy, found) -> tuple[np.ndarray, np.ndarray]:
    """Where PSF weights measure each star in both frames, in the reference's pixels: the
    mean of its centroid in the reference ``(x, y)`` and in the target ``(cx, cy)`` (moved
    back by the registration residual), where it was ``found``; else the reference's.

    A centroid moves with its frame's noise, towards the noise's bright side, and PSF weights
    set there keep more of that frame's noise than of the other's: measured at the
    reference's own centroids, faint stars read brighter in the reference than in the target
    (by 0.14 of their error for stars of 1 px under weights of 2 px, whose centroids scatter
    by 0.25 px), which put the scale of undersampled mono frames 0.4 % high (18 targets,
    docs/scale-accuracy.md). At the mean of the two centroids each frame keeps half of its
    own share and the two shares cancel where the frames are about as deep; and a star's
    neighbours, which pull its centroid alike in both frames, pull the weights alike.
    """
    use = found & np.isfinite(cx) & np.isfinite(cy)
    return np.where(use, 0.5 * (x + cx), x), np.where(use, 0.5 * (y + cy), y)


def _judged_stars(reference: Reference, covered: np.ndarray, snr: np.ndarray) -> np.ndarray:
    """Indices of the stars a target's registration is judged on: the brightest that it
    ``covered`` at all and that stand out of the reference's noise enough for any registered
    target to show them (a sparse field's brightest 50 reach down to stars a shorter or hazier
    frame cannot show). ``snr``: each star's strength in the target, in its noise.

    A frame shallower than the reference (thin cloud, haze, worse seeing) shows them fainter
    by its depth, the median ratio of its stars' strength to the reference's at the brightest
    unsaturated of them (a saturated star's strength in the reference is clipped): it is
    judged on those it shows at JUDGED_STAR_SNR. A frame not registered, or without stars,
    has no depth at the reference's positions; too few stars are left, and it is judged on
    the strong ones, as a deep frame is.
    """
    strong = covered & (reference.peak_snr >= JUDGED_STAR_SNR)
    judged = np.nonzero(strong)[0][:50]
    if judged.size < MIN_JUDGED_STARS:
        return judged
    head = judged[reference.channel_peak[judged] < reference.params.linear_range][:DEPTH_STARS]
    depth = float(np.median(snr[head] / reference.peak_snr[head])) if head.size else 0.0
    showable = np.nonzero(strong & (reference.peak_snr * min(depth, 1.0) >= JUDGED_STAR_SNR))[0][:50]
    return showable if showable.size >= MIN_JUDGED_STARS else judged


#: Found stars (the brightest first) on which a target's registration residual is fitted.
OFFSET_STARS = 200
#: Fewest of them for an affine residual (a shift, rotation, scale and shear); fewer give
#: their median shift.
AFFINE_OFFSET_STARS = 12


def registration_offsets(x, y, tx, ty, found) -> tuple[np.ndarray, np.ndarray]:
    """Where the target's stars lie relative to the reference's ``(x, y)``: the frame's
    registration residual, an affine offset fitted to the centroid shifts ``(tx - x, ty - y)``
    of the brightest ``found`` stars (clipped at 3 x 1.4826 times the median distance from the fit,
    about 5 sigma per axis), or their median shift.

    A star's own centroid in the target is not its position: it moves with the noise and
    towards its neighbours, and PSF weights set off the star keep less of its light, in the
    target only. On a crowded field (one star per 110 px) the scale came out 0.5 % high from
    that alone without noise; at the reference's positions moved by the frame's residual,
    within 0.05 % (docs/scale-accuracy.md).
    """
    use = np.nonzero(found & np.isfinite(tx) & np.isfinite(ty))[0][:OFFSET_STARS]
    zero = np.zeros(np.shape(x))
    if use.size == 0:
        return zero, zero
    dx, dy = (tx - x)[use], (ty - y)[use]
    if use.size < AFFINE_OFFSET_STARS:
        return zero + float(np.median(dx)), zero + float(np.median(dy))
    x0, y0 = float(np.mean(x[use])), float(np.mean(y[use]))
    half = max(float(np.ptp(x[use])), float(np.ptp(y[use])), 1.0) / 2
    design = np.column_stack([np.ones(use.size), (x[use] - x0) / half, (y[use] - y0) / half])
    keep = np.ones(use.size, bool)
    for _ in range(5):
        cx = np.linalg.lstsq(design[keep], dx[keep], rcond=None)[0]
        cy = np.linalg.lstsq(design[keep], dy[keep], rcond=None)[0]
        miss = np.hypot(dx - design @ cx, dy - design @ cy)
        limit = max(3 * 1.4826 * float(np.median(miss[keep])), 0.05)
        now = miss <= limit
        if now.sum() < AFFINE_OFFSET_STARS or np.array_equal(now, keep):
            break
        keep = now
    everywhere = np.column_stack([np.ones(np.size(x)), (np.asarray(x) - x0) / half, (np.asarray(y) - y0) / half])
    return everywhere @ cx, everywhere @ cy


def measure_scale(reference: Reference, frame: Frame, *, timings: dict | None = None) -> ScaleMeasurement:
    """The photometric scale ``m`` per channel of ``frame`` against the reference.

    ``frame`` as :func:`nsg_gpu.reference.as_measured` gives it (``normalize_frame`` does):
    scattered zeros as data, negative data raised by a pedestal.

    ``timings``, when given, gains the seconds spent in ``detect`` (target FWHM, recentring,
    registration check) and ``photometry`` (PSF fits, star fluxes, scale fit).

    Raises
    ------
    TooFewStarsError
        The frame is not registered to the reference, or has too few usable star pairs.
    """
    clock = Stopwatch(timings)
    params = reference.params
    data = frame.data
    stars = reference.stars
    image = detection_image(data)
    noise_t = ksigma_noise(image, max_pixels=DETECT_NOISE_PIXELS)
    fwhm_t = _target_fwhm(reference, image, noise_t)
    tx, ty, found, shared = _find_stars(reference, frame, image, noise_t, fwhm_t)
    # Non-linearity is a property of each channel: a red star can clip in red while its
    # intensity stays low, so the peak test uses the brightest channel in both frames.
    peak_t = channel_peaks(data, tx, ty)
    clock.lap("detect")
    # Colour frames' undersampled stars keep the plain aperture: the Bayer cells share each
    # star's light out by where it falls, which no PSF weight follows.
    read = min(stars.fwhm, fwhm_t)
    undersampled = read < MIN_PSF_FWHM
    # The plain aperture measures frames whose stars are twice as broad as the other's or
    # more, and every frame with ``--photometry aperture``; it takes the seeing correction of
    # its small loss beyond the aperture from the fitted PSFs where the stars are resolved,
    # else from an assumed Moffat (docs/scale-accuracy.md, "The plain aperture's correction
    # from the fitted PSFs").
    plain_only = params.photometry == "aperture" or max(stars.fwhm, fwhm_t) >= MAX_PSF_WIDTH_RATIO * read
    try:
        fits_psfs = read >= fits_psf_from(data.shape[0]) and not (plain_only and undersampled)
        psfs = fit_psfs(reference, frame, fwhm_t) if fits_psfs else None
    except (np.linalg.LinAlgError, ValueError, FloatingPointError):
        # The fits of stars under 2 px are an option beside the aperture, which measured
        # these frames before, and the plain aperture's only correct it: a numerical failure
        # there leaves the frame to the aperture with an assumed Moffat.
        if not (undersampled or plain_only):
            raise
        psfs = None
    if psfs is not None and undersampled and not all(_index_determined(p) for p in psfs):
        psfs = None
    measure = functools.partial(_measure, reference, frame, tx, ty, found, shared, peak_t, fwhm_t)
    if plain_only:
        measured = measure(psfs, weighted=False)
    elif psfs is None or not undersampled:
        measured = measure(psfs)
        if _apart_on_a_clear_sky(measured):
            # Stars no Moffat fits (a halo) on a sky clear enough for the plain aperture:
            # whichever is expected to be nearer the truth. The aperture's small correction
            # for the light beyond it is the fitted PSFs'.
            plain = functools.partial(measure, psfs, weighted=False)
            measured = _least_uncertain([plain], measured, key=_expected_error)
    else:
        # Undersampled mono stars: the PSF weights or the plain aperture, whichever states
        # the smaller uncertainty (psf.MIN_MONO_PSF_FWHM); either alone where the other has
        # too few usable pairs.
        measured = _least_uncertain([functools.partial(measure, psfs), functools.partial(measure, None)])
    clock.lap("photometry")
    return measured


def _least_uncertain(measurements, measured: ScaleMeasurement | None = None, *, key=None) -> ScaleMeasurement:
    """Of ``measured`` and what each of ``measurements`` (callables) measures, the one stating
    the smallest relative scale uncertainty (or the smallest ``key``); the first on a tie. A
    measurement with too few usable pairs drops out; its error is raised only where nothing
    is left."""
    candidates = [] if measured is None else [measured]
    failure = None
    for measurement in measurements:
        try:
            candidates.append(measurement())
        except TooFewStarsError as exc:
            failure = failure or exc
    if not candidates:
        raise failure
    return min(candidates, key=key or _relative_error)


def _apart_on_a_clear_sky(measured: ScaleMeasurement) -> bool:
    """Whether PSF weights stand from the plain aperture (:func:`aperture_check`) by more than
    the standard error of their difference, on a sky whose annuli scatter by at most
    :data:`CLEAR_ANNULUS` times its single pixels' noise."""
    checks = measured.aperture_check or []
    apart = any(c is not None and abs(c[0]) > c[1] for c in checks)
    return apart and measured.crowding is not None and measured.crowding <= CLEAR_ANNULUS


def _relative_error(measured: ScaleMeasurement) -> float:
    return max(f.scale_error / f.scale for f in measured.fits)


def _expected_error(measured: ScaleMeasurement) -> float:
    """The root of the expected squared relative error of the scale, the worst channel's:
    its stated variance and, on PSF weights that the check (:func:`aperture_check`) left
    within its gate, the difference's excess over its expected spread, ``d^2 - sigma^2``,
    an unbiased estimate of the weights' squared model error against an unbiased aperture
    (beyond the gate the excess is part of the stated uncertainty already)."""
    checks = measured.aperture_check or [None] * len(measured.fits)
    worst = 0.0
    for fit, check in zip(measured.fits, checks):
        variance = (fit.scale_error / fit.scale) ** 2
        if check is not None and not _beyond_gate(*check):
            variance += _excess_variance(*check)
        worst = max(worst, variance)
    return math.sqrt(worst)


def _beyond_gate(difference: float, sigma: float) -> bool:
    """Whether the check's difference counts as the PSF weights' model error
    (:data:`APERTURE_CHECK_SIGMAS` of its standard error)."""
    return abs(difference) > APERTURE_CHECK_SIGMAS * sigma


def _excess_variance(difference: float, sigma: float) -> float:
    """What the check's squared difference holds beyond its expected spread: an estimate of
    the weights' squared model error (0 where the difference is within its spread)."""
    return max(difference * difference - sigma * sigma, 0.0)


def _measure(
    reference: Reference, frame: Frame, tx, ty, found, shared, peak_t, fwhm_t: float, psfs, *, weighted: bool = True
) -> ScaleMeasurement:
    """The photometry and the scale fit of :func:`measure_scale`, with ``psfs`` (the fitted
    reference and target PSFs) or, where None, the plain aperture; with ``weighted`` False,
    the plain aperture whose seeing correction is that of ``psfs``. The plain aperture measures
    the reference at its catalogue and the target there moved by its registration residual
    (``tx, ty``); PSF weights measure both at the ``shared`` positions
    (:func:`shared_positions`), the target's moved by the same residual. A defect of either
    frame near a star (a hot pixel, a cosmic ray) is left out of both
    (:func:`photometry.shared_defects`)."""
    params = reference.params
    data = frame.data
    stars = reference.stars
    if psfs is not None and weighted:
        reference_psf, target_psf = psfs
        # The broader PSF weighs the pixels of both frames: it is close to the best weight
        # for the frame whose stars are noisiest per pixel.
        # The weights are the Moffat alone, at the field's typical width and without the
        # registration's kernel: the same weights serve every star, and each star's
        # correction follows its own PSFs.
        weight = max((p.weights() for p in psfs), key=lambda p: p.fwhm)
        if weight.fwhm < MIN_WEIGHT_FWHM:
            weight = weight.at(MIN_WEIGHT_FWHM / weight.fwhm)
        fwhm_max = weight.pixel_fwhm
    else:
        reference_psf, target_psf = psfs or (
            MoffatPSF.from_fwhm(stars.fwhm, photometry.MOFFAT_BETA),
            MoffatPSF.from_fwhm(fwhm_t, photometry.MOFFAT_BETA),
        )
        weight = None
        fwhm_max = max(stars.fwhm, fwhm_t)
    geometry = photometry.geometry_for(fwhm_max, params)
    rx, ry = stars.x[reference.photometry_index], stars.y[reference.photometry_index]
    if weight is None:
        ref_at, tgt_at = (rx, ry), (tx, ty)
        ref_cut = reference.cutouts(geometry)
    else:
        px, py = shared
        ref_at, tgt_at = (px, py), (px + (tx - rx), py + (ty - ry))
        ref_cut = photometry.cut_out(reference.frame.data, px, py, geometry)
    tgt_cut = photometry.cut_out(data, *tgt_at, geometry, keep_mosaic=weight is None)
    # A hot pixel or cosmic ray near a star, in either frame, is left out of both.
    ref_defects, tgt_defects = photometry.shared_defects(
        ref_cut, *ref_at, tgt_cut, *tgt_at, photometry.DEFECT_CORE_FWHM * fwhm_max
    )
    tgt_m = photometry.measure_stars(data, *tgt_at, geometry, weight, cutouts=tgt_cut, excluded=tgt_defects)
    if weight is None:
        # The cached reference photometry, made again where a defect lies near the star.
        ref_m = _with_defects(reference, geometry, ref_cut, ref_at, ref_defects)
    else:
        ref_m = photometry.measure_stars(
            reference.frame.data, *ref_at, geometry, weight, cutouts=ref_cut, excluded=ref_defects
        )
    if weight is None:
        # The catalogue neighbours' light that each frame's aperture counts with each star,
        # out of its flux: on a crowded field the frames' PSFs share it between aperture and
        # annulus differently (docs/scale-accuracy.md, "The plain aperture on a crowded field").
        # A star outshone by its neighbours keeps its fluxes as measured, and counts the
        # frames' difference in its error.
        shares = _neighbours_light(geometry, reference, target_psf, reference_psf, reference.photometry_index)
        tgt_m, ref_m, taken_out = _without_neighbours(tgt_m, ref_m, shares)
        neighbour_error = _neighbour_error(shares, taken_out)
    else:
        neighbour_error = np.zeros(tgt_m.ok.shape)
    usable = (
        ref_m.ok & tgt_m.ok & found & (peak_t < params.linear_range) & (reference.channel_peak < params.linear_range)
    )
    # A trail across the reference: its stars whose annulus comes near it at these frames'
    # geometry (the reference's catalogue left out those that come near at its own).
    usable &= ~beside_trails(stars, rx, ry, geometry)
    channels = data.shape[0]
    # One factor per star, the same in every channel: a star's PSFs are those of its place
    # in the field where a frame's PSF has a field model, else the frame's one Moffat.
    ref_x, ref_y = stars.x[reference.photometry_index], stars.y[reference.photometry_index]
    per_star = photometry.seeing_correction(
        geometry, reference_psf=reference_psf, target_psf=target_psf, weight=weight, x=ref_x, y=ref_y
    )
    correction = np.broadcast_to(per_star, (channels, ref_x.size))
    # The correction's own uncertainty, from the PSFs' (the same for every channel).
    correction_error = correction_uncertainty(
        geometry,
        reference_psf=reference_psf.uniform(),
        target_psf=target_psf.uniform(),
        weight=weight,
    )
    if psfs is not None and min(stars.fwhm, fwhm_t) < MIN_PSF_FWHM and (reference_psf.blur or target_psf.blur):
        # Stars under 2 px seen through a registration's kernel: the model's own error.
        correction_error = math.hypot(correction_error, UNDERSAMPLED_KERNEL_ERROR)
    scales, fits, pairs = [], [], []
    for c in range(channels):
        x, y = tgt_m.flux[c], ref_m.flux[c] * correction[c]
        sx, sy = tgt_m.flux_error[c], ref_m.flux_error[c] * correction[c]
        sx = np.hypot(sx, neighbour_error * np.abs(x))
        fit, pairs_c = fit_pairs(x, y, sx, sy, usable, params)
        if fit is None:
            raise TooFewStarsError(
                frame.path,
                f"channel {c}: {int(pairs_c.sum())} usable star pairs (unsaturated, fully covered, signal-to-noise "
                f">= {MIN_PAIR_SNR:g}); at least {params.min_star_pairs} are needed for a photometric scale",
            )
        if not _gives_a_scale(fit):
            raise TooFewStarsError(
                frame.path, f"channel {c}: the {fit.n_pairs} star pairs give no positive scale ({fit.scale:g})"
            )
        fit = replace(fit, scale_error=math.hypot(fit.scale_error, correction_error * fit.scale))
        scales.append(fit.scale)
        fits.append(fit)
        pairs.append(pairs_c)
    checks = crowding = None
    if weight is not None:
        rows = _check_stars(tgt_m, ref_m, correction, pairs)
        if rows.size:
            # Single pixels' noise: a resampled reference's annuli scatter less than the noise
            # before its interpolation (``reference.noise``), which would read crowded skies clear.
            noise = np.maximum(np.asarray(reference.pixel_noise, float).reshape(-1, 1), 1e-30)
            crowding = float(np.nanmedian(ref_cut.background_std[:, rows] / noise))
        # The catalogue neighbours' light each frame's aperture counts with the checked stars.
        # Stars outshone by their neighbours are left out of the check: their neighbours'
        # catalogue fluxes and profiles would decide it.
        shares = _neighbours_light(geometry, reference, target_psf, reference_psf, reference.photometry_index[rows])
        plain = [
            photometry.measure_stars(
                image, at[0][rows], at[1][rows], geometry, photometry.FLAT, cutouts=cut.subset(rows), excluded=defects
            )
            for image, at, cut, defects in (
                (data, tgt_at, tgt_cut, tgt_defects[rows]),
                (reference.frame.data, ref_at, ref_cut, ref_defects[rows]),
            )
        ]
        *plain, taken_out = _without_neighbours(*plain, shares)
        fits, checks = aperture_check(
            fits,
            correction_error,
            weighted=(tgt_m.flux[:, rows], tgt_m.flux_error[:, rows], ref_m.flux[:, rows], ref_m.flux_error[:, rows]),
            weighted_correction=correction[:, rows],
            plain=(plain[0].flux, plain[0].flux_error, plain[1].flux, plain[1].flux_error),
            plain_correction=photometry.seeing_correction(
                geometry, reference_psf=reference_psf, target_psf=target_psf, x=ref_x[rows], y=ref_y[rows]
            ),
            usable=usable[rows] & plain[0].ok & plain[1].ok & taken_out,
            params=params,
        )
    return ScaleMeasurement(
        np.array(scales),
        max(f.n_pairs for f in fits),
        target_psf.fwhm if psfs is not None else fwhm_t,
        fits,
        correction,
        target_flux=[tgt_m.flux[c][p] for c, p in enumerate(pairs)],
        reference_flux=[ref_m.flux[c][p] * correction[c][p] for c, p in enumerate(pairs)],
        reference_psf=reference_psf if psfs is not None else None,
        target_psf=target_psf if psfs is not None else None,
        aperture_check=checks,
        crowding=crowding,
        weighted=weight is not None,
    )


def _check_stars(target, reference, correction, pairs) -> np.ndarray:
    """The :data:`CHECK_STARS` pairs of the highest signal-to-noise in their best channel,
    among those the scale fits were given (indices into the measured stars)."""
    candidates = np.flatnonzero(np.any(pairs, axis=0))
    if candidates.size <= CHECK_STARS:
        return candidates
    snr = np.max(
        [
            _pair_snr(
                target.flux[c],
                reference.flux[c] * correction[c],
                target.flux_error[c],
                reference.flux_error[c] * correction[c],
                pairs[c],
            )
            for c in range(len(pairs))
        ],
        axis=0,
    )[candidates]
    return np.sort(candidates[np.argsort(-snr, kind="stable")[:CHECK_STARS]])


def aperture_check(
    fits: list, correction_error: float, *, weighted, weighted_correction, plain, plain_correction, usable, params
) -> tuple[list, list]:
    """The PSF weights' scale against the plain aperture's on the same stars, both corrected
    by the same fitted PSFs. ``weighted`` and ``plain`` are each ``(target flux, its error,
    reference flux, its error)`` ``(channels, stars)``, their corrections the factors applied
    to the reference's fluxes. Returns ``fits`` (the weights' scale per channel over all
    their stars), each with its uncertainty widened where the two disagree, and per channel
    the log ratio of the two scales on these stars and its standard error (None where either
    has too few pairs).

    The correction of PSF weights rests on the Moffat's wings, which hold the light the weights
    pass over; the aperture's rests on them only for the little light beyond 3 FWHM. A profile
    no Moffat is (a core with a broad halo, scattered light) is fitted by a Moffat whose index
    follows the part of the profile each frame's stamps see, and the weights' scale then misses
    by percents while the fits' covariance states tenths (docs/scale-accuracy.md, "Profiles
    no Moffat is"). The two scales share the stars and their noise: the aperture's is the
    noisier, and for the weights' near the best their difference has about the variance of
    the aperture's less theirs (at least half the aperture's), to which the weights' stated
    correction error adds. A difference beyond :data:`APERTURE_CHECK_SIGMAS` of that is the
    model's: what exceeds the expected spread is added to the weights' uncertainty. Which of the
    two is right the stars do not say, so the weights' scale is kept and stated as uncertain
    as the disagreement makes it. On a crowded field the frames' PSFs share the neighbours'
    light between a star's aperture and its annulus differently, which moves the aperture's
    scale by up to 2 %; the caller takes the catalogue neighbours' light out of the
    aperture's fluxes first (:func:`photometry.neighbours_light`).
    """
    checked, checks = [], []
    for c, fit in enumerate(fits):
        pair = []
        for (x, sx, y, sy), factor in ((weighted, weighted_correction[c]), (plain, plain_correction)):
            one, _ = fit_pairs(x[c], y[c] * factor, sx[c], sy[c] * factor, usable, params)
            ok = one is not None and one.n_pairs > 0 and one.scale > 0 and math.isfinite(one.scale)
            pair.append(one if ok else None)
        if None in pair:
            checked.append(fit)
            checks.append(None)
            continue
        weights, aperture = pair
        difference = math.log(weights.scale / aperture.scale)
        spread, own = aperture.scale_error / aperture.scale, weights.scale_error / weights.scale
        sigma = math.hypot(math.sqrt(max(spread * spread - own * own, 0.5 * spread * spread)), correction_error)
        if _beyond_gate(difference, sigma):
            excess = math.sqrt(_excess_variance(difference, sigma))
            fit = replace(fit, scale_error=math.hypot(fit.scale_error, excess * fit.scale))
        checked.append(fit)
        checks.append((difference, sigma))
    return checked, checks


def _neighbours_light(geometry, reference: Reference, target_psf: MoffatPSF, reference_psf: MoffatPSF, index):
    """The catalogue neighbours' light that the target's and the reference's plain aperture
    count with each star of ``index`` (catalogue rows), as a share of its own
    (:func:`photometry.neighbours_light`, each frame's PSF at the field's typical width);
    ``(2, len(index))``, the target's first."""
    stars = reference.stars
    return photometry.neighbours_light(
        geometry, (target_psf.uniform(), reference_psf.uniform()), stars.flux, stars.x, stars.y, index
    )


def _neighbour_error(shares: np.ndarray, taken_out: np.ndarray) -> np.ndarray:
    """Each star's relative error of its flux ratio from its neighbours' light
    (``shares``, the target's and the reference's, :func:`_neighbours_light`): what of the two
    frames' difference is not taken out, :data:`NEIGHBOUR_LIGHT_ERROR` of it where
    ``taken_out`` and all of it where the star keeps its fluxes as measured. In the pairs'
    errors it weighs a crowded field's outshone stars down, while a sparse field's few stars
    all still count."""
    return np.where(taken_out, NEIGHBOUR_LIGHT_ERROR, 1.0) * np.abs(shares[0] - shares[1])


def _without_neighbours(target: photometry.StarMeasurement, reference: photometry.StarMeasurement, shares):
    """Both frames' plain-aperture fluxes less the catalogue neighbours' light each counts with
    each star (``shares``, the target's and the reference's share of the star's own,
    :func:`_neighbours_light`), and where that was done: in both frames or in neither, not
    where the neighbours count for more than :data:`MAX_NEIGHBOUR_SHARE` of the star in
    either (those keep their fluxes as measured)."""
    taken_out = (np.abs(shares) <= MAX_NEIGHBOUR_SHARE).all(axis=0)
    out = []
    for measured, share in zip((target, reference), shares):
        factor = np.where(taken_out, 1.0 + share, 1.0)
        out.append(replace(measured, flux=measured.flux / factor, flux_error=measured.flux_error / factor))
    return out[0], out[1], taken_out


def _gives_a_scale(fit: scalefit.ScaleFit | None) -> bool:
    """Whether ``fit`` (:func:`fit_pairs`) exists and rests on pairs that give a positive,
    finite scale."""
    return fit is not None and fit.n_pairs > 0 and fit.scale > 0 and math.isfinite(fit.scale)


def fit_pairs(x, y, sx, sy, usable, params) -> tuple[scalefit.ScaleFit | None, np.ndarray]:
    """One channel's scale fit of :func:`_measure` from the target's fluxes ``x`` and the
    reference's corrected ones ``y`` with their errors: every ``usable`` star counts, weighted
    by its noise; only pairs too faint to tell a star from the sky (signal-to-noise under
    :data:`MIN_PAIR_SNR`) are left out, and those from :data:`JUDGED_PAIR_SNR` up are judged
    by NSG's ratio tolerance. Returns the fit (None where fewer than
    ``params.min_star_pairs`` pairs are left) and the pairs it was given."""
    snr = _pair_snr(x, y, sx, sy, usable)
    pairs = usable & (snr >= MIN_PAIR_SNR)
    if pairs.sum() < params.min_star_pairs:
        return None, pairs
    fit = scalefit.fit_scale(
        x[pairs],
        y[pairs],
        target_error=sx[pairs],
        reference_error=sy[pairs],
        tolerance=params.star_flux_tolerance,
        outlier_removal=params.outlier_removal,
        judged=snr[pairs] >= JUDGED_PAIR_SNR,
        min_pairs=max(params.min_star_pairs, scalefit.FEW_STAR_PAIRS),
    )
    return fit, pairs


def _with_defects(reference: Reference, geometry, cut, at, defects) -> photometry.StarMeasurement:
    """The reference's plain-aperture photometry (kept), measured again for the stars with
    ``defects`` pixels (:func:`photometry.shared_defects`) without them."""
    measured = reference.measurement(geometry)
    rows = np.nonzero(defects.any(axis=(1, 2)))[0]
    if rows.size == 0:
        return measured
    again = photometry.measure_stars(
        reference.frame.data, at[0][rows], at[1][rows], geometry, cutouts=cut.subset(rows), excluded=defects[rows]
    )
    spliced = {}
    for name in ("flux", "flux_error", "background"):
        spliced[name] = getattr(measured, name).copy()
        spliced[name][:, rows] = getattr(again, name)
    spliced["ok"] = measured.ok.copy()
    spliced["ok"][rows] = again.ok
    return replace(measured, **spliced)


def _index_determined(psf: MoffatPSF) -> bool:
    """Whether a fitted Moffat's index is known to within :data:`MAX_UNDERSAMPLED_BETA_ERROR`
    of itself (its fit's covariance)."""
    return psf.covariance is not None and psf.covariance[2] <= (MAX_UNDERSAMPLED_BETA_ERROR * psf.beta) ** 2


def correction_uncertainty(
    geometry: photometry.ApertureGeometry,
    *,
    reference_psf: MoffatPSF,
    target_psf: MoffatPSF,
    weight: MoffatPSF | None,
) -> float:
    """Relative standard error of :func:`nsg_gpu.photometry.seeing_correction` from the PSFs'
    parameter errors, each frame's taken as independent: the correction's share of the
    scale's uncertainty, which no scatter of the pairs shows since it moves every pair alike.

    A fitted Moffat carries its fit's covariance (:func:`nsg_gpu.psf.parameter_covariance`),
    propagated through the kept share's derivatives by ``log alpha`` and ``beta``, and by the
    elongation's ``g1, g2`` where the fit measured them (the weights held: they are a choice,
    not a measurement); an assumed one (the plain aperture's
    fallback, a Moffat of index 3 at the quick FWHM) is off by :data:`ASSUMED_BETA_ERROR` and
    :data:`ASSUMED_FWHM_ERROR`.
    """
    variance = 0.0
    for psf in (reference_psf, target_psf):
        kept = photometry.kept_share(geometry, psf, weight)
        if psf.covariance is None:
            for beta, fwhm in (
                (psf.beta + ASSUMED_BETA_ERROR, psf.fwhm),
                (psf.beta, psf.fwhm * (1 + ASSUMED_FWHM_ERROR)),
            ):
                shape = MoffatPSF.from_fwhm(fwhm, max(beta, 1.05))
                moved = photometry.kept_share(geometry, replace(psf, alpha=shape.alpha, beta=shape.beta), weight)
                variance += (moved / kept - 1) ** 2
            continue
        # d log(kept share) / d(log alpha, beta[, g1, g2]), by central differences.
        gradient = np.array(
            [
                (photometry.kept_share(geometry, up, weight) - photometry.kept_share(geometry, down, weight))
                / (2 * step * kept)
                for up, down, step in _parameter_moves(psf)
            ]
        )
        variance += max(float(gradient @ _parameter_covariance(psf)[: gradient.size, : gradient.size] @ gradient), 0.0)
    return math.sqrt(variance)


def _parameter_moves(psf: MoffatPSF) -> list[tuple[MoffatPSF, MoffatPSF, float]]:
    """``psf`` moved up and down along each fitted parameter, and the step: ``log alpha`` by
    1e-3, ``beta`` by 2e-3, and the elongation's ``g1, g2`` by 1e-3 where the fit measured a
    drawn-out profile (:attr:`MoffatPSF.shear_covariance`)."""
    a, b, (g1, g2) = psf.alpha, psf.beta, psf.shear
    moves = [
        (replace(psf, alpha=a * math.exp(1e-3)), replace(psf, alpha=a * math.exp(-1e-3)), 1e-3),
        (replace(psf, beta=b + 2e-3), replace(psf, beta=b - 2e-3), 2e-3),
    ]
    if psf.shear_covariance is not None and not psf.round:
        moves += [
            (replace(psf, shear=(g1 + 1e-3, g2)), replace(psf, shear=(g1 - 1e-3, g2)), 1e-3),
            (replace(psf, shear=(g1, g2 + 1e-3)), replace(psf, shear=(g1, g2 - 1e-3)), 1e-3),
        ]
    return moves


def _parameter_covariance(psf: MoffatPSF) -> np.ndarray:
    """The fit's covariance of ``(log alpha, beta, g1, g2)`` as a matrix: the width and index's
    block and the elongation's (0 where not measured), taken apart."""
    (caa, cab, cbb), (c11, c12, c22) = psf.covariance, psf.shear_covariance or (0.0, 0.0, 0.0)
    return np.array([[caa, cab, 0, 0], [cab, cbb, 0, 0], [0, 0, c11, c12], [0, 0, c12, c22]], float)


def _pair_snr(x, y, sx, sy, usable) -> np.ndarray:
    """Signal-to-noise of each pair in one channel, both frames combined, at the ratio
    median of the usable pairs."""
    positive = usable & (x > 0) & (y > 0)
    ratio = float(np.median(y[positive] / x[positive])) if positive.any() else 1.0
    return (y + ratio * x) / np.maximum(np.hypot(sy, ratio * sx), 1e-30)


def _target_kernel(reference: Reference, frame: Frame, integrated: bool):
    """The registration's kernel that the target's PSF fit convolves its Moffat with, or None.

    Undersampled stars (an ``integrated`` fit) have their cores reshaped by it: the frame's
    own (:func:`nsg_gpu.resampling.interpolation_kernel`), as the reference's fit has its
    own. Stars of 2.5 px and more are fitted sampled, the reference's without a kernel; the
    kernel still moves a registered target's fitted index (crowded targets sharper than
    their reference read +0.7 % without it), and there it is read against the reference's
    noise (:func:`nsg_gpu.resampling.registration_kernel`), whose unresolved stars would
    otherwise be taken for a kernel (docs/scale-accuracy.md, "The registration's kernel
    above 2.5 px"). A reference resampled itself is fitted through its own kernel, and a
    target's is read against what its noise holds beyond that kernel
    (:attr:`Reference.sky_correlation`; docs/scale-accuracy.md, "A registered reference")."""
    if integrated:
        return interpolation_kernel(frame.data)
    return registration_kernel(noise_correlation(frame.data), reference.sky_correlation)


def fit_psfs(reference: Reference, frame: Frame, fwhm_t: float) -> tuple[MoffatPSF, MoffatPSF] | None:
    """The reference's and the target's Moffat PSFs, the target's fitted against the
    reference's sky (:func:`nsg_gpu.psf.fit_target_psf`), both integrated over the pixels
    where either frame's stars are undersampled (:func:`nsg_gpu.psf.integrated_fit`); None
    where either fit fails."""
    radius = stamp_radius(max(reference.stars.fwhm, fwhm_t))
    integrated = integrated_fit(reference.stars.fwhm, fwhm_t)
    fitted_reference = reference.psf_fit(radius, pixel_integrated=integrated)
    if fitted_reference is None:
        return None
    stamps = fitted_reference.stamps
    target = psf_stamps(frame.data, stamps.xi + stamps.dx, stamps.yi + stamps.dy, radius)
    s0 = stamp_ratio(target.take(fitted_reference.fitted), stamps.take(fitted_reference.fitted))
    if not (math.isfinite(s0) and s0 > 0):
        return None
    noise, gain_inv = stamp_noise(target)
    if not noise > 0:
        return None
    target_psf = fit_target_psf(
        target,
        stamps,
        fitted_reference.star_model,
        fitted_reference.fitted,
        s0=s0,
        fwhm=fwhm_t,
        sigma=noise,
        reference_sigma=fitted_reference.noise,
        gain_inv=gain_inv,
        reference_gain_inv=fitted_reference.gain_inv,
        pixel_integrated=integrated,
        field=fitted_reference.psf.field,
        masked=fitted_reference.masked,
        blur=_target_kernel(reference, frame, integrated),
    )
    if target_psf.stars < MIN_PSF_STARS or not plausible(target_psf, fwhm_t):
        return None
    return fitted_reference.psf, target_psf
