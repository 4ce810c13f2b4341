"""The run: prepare the reference once, then normalize each target and write it.

Data flow (DESIGN.md)::

    read -> stars (reference, once) -> photometry (scale m) -> samples -> spline G
         -> apply m*T - G, noise, weight -> write -> results

:func:`prepare_reference` computes everything the reference contributes (its stars, sample
medians, noise and the resolved parameters). :func:`normalize_frame` does one target in memory.
:func:`normalize` drives a whole run from files: it never modifies an input, writes each
output atomically, records a per-frame error and goes on, and writes ``results.csv`` and
``results.json``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from . import photometry
from . import psf as psf_fitting
from .apply import normalize_pixels
from .backend import NUMPY, Backend, get_backend
from .errors import (
    FrameDataError,
    FrameError,
    FrameShapeError,
    NSGError,
    OutputError,
    ReferenceFrameError,
    TooFewSamplesError,
    TooFewStarsError,
)
from .io import OUTPUT_FORMATS, Frame, output_path, read_frame, read_meta, set_nsg_keywords, write_frame
from .noise import frame_noise, ksigma_noise, weight_from_noise
from .params import Parameters, resolve_parameters
from .psf import MoffatPSF
from .samples import SampleSet, bin_medians, bin_samples, make_grid, star_rejection
from .spline import evaluate_surfaces, fit_surface_splines
from .stars import StarCatalog, detect_stars, detection_image, estimate_fwhm

__all__ = [
    "Reference",
    "FrameResult",
    "RunResult",
    "prepare_reference",
    "normalize_frame",
    "normalize",
    "plan_run",
    "process_frame",
    "write_reference",
    "FrameJob",
    "RunPlan",
    "STAGES",
    "read_job",
    "compute_job",
    "write_job",
    "failed_result",
]

#: The stages of one target, in order, as keys of :attr:`FrameResult.timings`.
STAGES = ("read", "detect", "photometry", "sampling", "spline_fit", "spline_eval", "apply", "noise", "write")


class _Stopwatch:
    """Adds the wall time since the last lap to a named stage of a timings dict."""

    def __init__(self, timings: dict | None):
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[stage] = self.timings.get(stage, 0.0) + (now - self.last)
        self.last = now


#: Pairs below this signal-to-noise (both frames combined) are too noisy to help the scale.
MIN_PAIR_SNR = 10.0
#: Stars whose target peak is below this many noise sigmas do not measure the target's FWHM.
MIN_FWHM_PEAK_SNR = 20.0
#: At most this many reference stars are measured on each target, brightest first.
MAX_PHOTOMETRY_STARS = 1500
#: Bright isolated reference stars the PSFs are fitted on, and the fewest that will do.
PSF_STARS = 60
MIN_PSF_STARS = 8
#: Below this FWHM (px) stars are too undersampled for a Moffat sampled at pixel centres, and
#: the photometry falls back to the plain aperture.
MIN_PSF_FWHM = 2.0
#: Fewer usable background samples than this is an error for the frame.
MIN_SAMPLES = 3
#: Share of the bright reference stars that must be found within the search radius.
MIN_REGISTERED_FRACTION = 0.5


@dataclass
class Reference:
    """What the reference contributes to every target, computed once."""

    frame: Frame
    params: Parameters
    stars: StarCatalog
    photometry_index: np.ndarray  # catalogue rows measured on targets
    channel_peak: np.ndarray  # brightest channel's peak at each of those stars
    isolated: np.ndarray  # bool over photometry_index
    grid: object
    medians: object  # (channels, rows, cols) backend array
    valid: object  # (rows, cols) backend bool
    rejected: np.ndarray  # (rows, cols) host bool, star circles
    noise: np.ndarray  # per channel
    circles: np.ndarray | None = None  # (n, 3) x, y, radius of the stars that reject samples
    _measurements: dict = field(default_factory=dict)
    _cutouts: dict = field(default_factory=dict)
    _psf_fits: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.frame.path.name

    def measurement(
        self, geometry: photometry.ApertureGeometry, weight: MoffatPSF | None = None
    ) -> photometry.StarMeasurement:
        """Reference photometry for an aperture geometry and weight, measured once and kept."""
        # Compute threads may ask at the same time: both measure, the dict keeps one, and
        # each returns its own (identical) measurement.
        key = (geometry, weight)
        measured = self._measurements.get(key)
        if measured is None:
            idx = self.photometry_index
            x, y = self.stars.x[idx], self.stars.y[idx]
            # The cutouts and their backgrounds depend on the geometry alone; they are the
            # costly part, and few geometries (radii in half pixels) are kept, for their size.
            cutouts = self._cutouts.get(geometry)
            if cutouts is None:
                cutouts = photometry.cut_out(self.frame.data, x, y, geometry)
                if len(self._cutouts) >= 3:
                    self._cutouts.clear()
                self._cutouts[geometry] = cutouts
            measured = photometry.measure_stars(self.frame.data, x, y, geometry, weight, cutouts=cutouts)
            if len(self._measurements) > 8:
                self._measurements.clear()
            self._measurements[key] = measured
        return measured

    def psf_fit(self, radius: int) -> ReferencePSF | None:
        """The reference's PSF fitted on stamps of ``radius`` px around its bright isolated
        stars, fitted once per radius and kept; None where too few stars can be fitted."""
        if radius not in self._psf_fits:
            if len(self._psf_fits) > 8:
                self._psf_fits.clear()
            self._psf_fits[radius] = _fit_reference_psf(self, radius)
        return self._psf_fits[radius]


@dataclass
class ReferencePSF:
    """The reference's Moffat and the stamps it was fitted on, which the target's fit reuses."""

    psf: MoffatPSF
    stamps: psf_fitting.PSFStamps
    fitted: np.ndarray  # bool over the stamps
    star_model: np.ndarray  # (fitted stamps, pixels)
    noise: float
    gain_inv: float


def _fit_reference_psf(reference: Reference, radius: int) -> ReferencePSF | None:
    idx = reference.photometry_index[reference.isolated][:PSF_STARS]
    if idx.size < MIN_PSF_STARS:
        return None
    stamps = psf_fitting.psf_stamps(reference.frame.data, reference.stars.x[idx], reference.stars.y[idx], radius)
    noise, gain_inv = psf_fitting.stamp_noise(stamps)
    if not noise > 0:
        return None
    # A curved background per star: the reference's fit has only its own frame, and the
    # nebula's curvature under the wings would otherwise read as wing light.
    fitted_psf, fitted, star = psf_fitting.fit_psf(
        stamps, fwhm=reference.stars.fwhm, sigma=noise, gain_inv=gain_inv, curved=True
    )
    if fitted.sum() < MIN_PSF_STARS or not _plausible(fitted_psf, reference.stars.fwhm):
        return None
    return ReferencePSF(fitted_psf, stamps, fitted, star, noise, gain_inv)


def _plausible(psf: MoffatPSF, fwhm_estimate: float) -> bool:
    """A fitted Moffat that seeing-limited stars can have, near the frame's quick FWHM."""
    return 1.5 <= psf.beta <= 12.0 and 0.6 <= psf.fwhm / fwhm_estimate <= 1.4


@dataclass
class FrameResult:
    """The outcome for one frame: numbers for the results table, and the data when kept."""

    path: str
    output: str | None = None
    status: str = "ok"  # ok | reference | failed
    error: str | None = None
    scale: list[float] = field(default_factory=list)
    transmission: list[float] = field(default_factory=list)
    snr: list[float] = field(default_factory=list)
    weight: float | None = None
    weight_source: str | None = None
    star_pairs: int | None = None
    samples: int | None = None
    noise: list[float] = field(default_factory=list)
    fwhm: float | None = None
    beta: float | None = None  # Moffat index of the fitted PSF
    high: float | None = None
    exposure: float | None = None
    altitude: float | None = None
    airmass: float | None = None
    filter: str | None = None
    date_obs: str | None = None
    seconds: float | None = None
    resumed: bool = False  # the output of an earlier run was complete and up to date, and kept
    rejected: str | None = None  # why the frame was rejected (its output is in rejected/)
    relative_weight: float | None = None  # weight / best weight (per unit exposure when known)
    relative_transmission: float | None = None
    warning: str | None = None
    data: object = None  # normalized data, only for in-memory use
    diagnostics: object = None  # FrameDiagnostics, only when asked for (plots)
    #: Wall seconds per stage of :data:`STAGES` (those the frame reached).
    timings: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict:
        """A flat dict for results.csv / results.json."""
        out = {
            "file": self.path,
            "output": self.output,
            "status": self.status,
            "error": self.error,
            "rejected": self.rejected,
            "warning": self.warning,
            "resumed": self.resumed,
            "relative_weight": self.relative_weight,
            "relative_transmission": self.relative_transmission,
            "weight": self.weight,
            "weight_source": self.weight_source,
            "star_pairs": self.star_pairs,
            "samples": self.samples,
            "fwhm": self.fwhm,
            "beta": self.beta,
            "high": self.high,
            "altitude": self.altitude,
            "airmass": self.airmass,
            "exposure": self.exposure,
            "filter": self.filter,
            "date_obs": self.date_obs,
            "seconds": self.seconds,
        }
        for c in range(3):
            out[f"scale_{c}"] = self.scale[c] if c < len(self.scale) else None
            out[f"transmission_{c}"] = self.transmission[c] if c < len(self.transmission) else None
            out[f"snr_{c}"] = self.snr[c] if c < len(self.snr) else None
            out[f"noise_{c}"] = self.noise[c] if c < len(self.noise) else None
        return out


@dataclass
class RunResult:
    """All frames of a run, the reference first."""

    reference: str
    frames: list[FrameResult]
    parameters: Parameters | None = None
    reference_reason: str | None = None
    report: str | None = None  # report.html, when written
    report_error: str | None = None  # why it was not

    @property
    def failed(self) -> list[FrameResult]:
        return [f for f in self.frames if f.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed


# -- reference ----------------------------------------------------------------------------------
def _check_data(frame: Frame) -> None:
    data = frame.data
    xp = get_backend(data).xp
    covered = float(xp.count_nonzero(data.min(axis=0) > 0)) / (data.shape[1] * data.shape[2])
    if covered == 0:
        raise FrameDataError(frame.path, "every pixel is 0 (no data); is the frame empty or a failed registration?")
    if covered < 0.05:
        raise FrameDataError(frame.path, f"only {covered:.1%} of the pixels hold data; at least 5 % is needed")


def prepare_reference(frame: Frame, params: Parameters | None = None, *, backend: Backend | None = None) -> Reference:
    """Detect the reference's stars, resolve the Auto parameters and sample its background.

    Parameters
    ----------
    frame : Frame
        The reference, as read by :func:`nsg_gpu.io.read_frame`.

    params : Parameters, optional
        Requested parameters; Auto fields are resolved here.

    backend : Backend, optional
        Where image-sized work runs; by default the backend of ``frame.data``.

    Raises
    ------
    ReferenceFrameError
        The reference has no data or too few stars.
    """
    params = params or Parameters()
    be = backend or get_backend(frame.data)
    if be.is_gpu and get_backend(frame.data) is NUMPY:
        frame = Frame(frame.path, be.asarray(frame.data), frame.header, frame.white_level, frame.meta)
    try:
        _check_data(frame)
    except FrameError as exc:
        raise ReferenceFrameError(frame.path, exc.reason) from exc
    data = frame.data
    _, height, width = data.shape
    stars = detect_stars(data, detection_sigma=params.detection_sigma)
    if len(stars) < params.min_star_pairs:
        raise ReferenceFrameError(
            frame.path,
            f"only {len(stars)} stars detected on the reference (at least {params.min_star_pairs} needed); "
            "choose a reference with more stars or lower --detection-sigma",
        )
    image_max = float(be.to_host(detection_image(data).max()))
    resolved = resolve_parameters(
        params,
        width=width,
        height=height,
        header_focal_length_mm=frame.meta.focal_length_mm,
        header_pixel_size_um=frame.meta.pixel_size_um,
        reference_max=image_max,
        max_star_flux=float(stars.flux.max()),
        n_reference_stars=len(stars),
    )
    linear = np.nonzero(stars.peak < resolved.linear_range)[0][:MAX_PHOTOMETRY_STARS]
    channel_peak = be.to_host(
        photometry._gather_stamps(data.max(axis=0), stars.x[linear], stars.y[linear], 1).max(axis=(1, 2))
    )
    isolated = _isolated(stars, linear, reach=6.0 * stars.fwhm + 4)
    grid = make_grid(height, width, resolved.sample_size)
    if grid.count < MIN_SAMPLES:
        raise ReferenceFrameError(
            frame.path, f"sample size {grid.size} leaves fewer than {MIN_SAMPLES} samples in the image"
        )
    medians, valid = bin_medians(data, grid, frame.white_level)
    n_reject = int(math.floor(len(stars) * min(resolved.limit_sample_stars_percent, 100.0) / 100.0))
    radius = stars.radius[:n_reject] + resolved.aperture_add + resolved.sample_star_growth_rate * stars.flux[:n_reject]
    rejected = star_rejection(grid, stars.x[:n_reject], stars.y[:n_reject], radius)
    noise = frame_noise(data)  # the weight's noise: registration does not bias it
    circles = np.column_stack([stars.x[:n_reject], stars.y[:n_reject], radius])
    return Reference(
        frame, resolved, stars, linear, channel_peak, isolated, grid, medians, valid, rejected, noise, circles=circles
    )


def _isolated(stars: StarCatalog, index: np.ndarray, reach: float) -> np.ndarray:
    """True where no star brighter than 5 % of this one lies within ``reach`` px."""
    tree = cKDTree(np.column_stack([stars.x, stars.y]))
    neighbours = tree.query_ball_point(np.column_stack([stars.x[index], stars.y[index]]), r=reach)
    out = np.ones(index.size, bool)
    for k, (i, near) in enumerate(zip(index, neighbours)):
        for j in near:
            if j != i and stars.flux[j] > 0.05 * stars.flux[i]:
                out[k] = False
                break
    return out


# -- one target ---------------------------------------------------------------------------------
@dataclass
class ScaleMeasurement:
    scale: np.ndarray
    pairs: int
    fwhm: float
    fits: list
    correction: np.ndarray
    target_flux: np.ndarray | None = None  # (channels, pairs) usable pairs, as fitted
    reference_flux: np.ndarray | None = None
    reference_psf: MoffatPSF | None = None  # fitted, or None where the fit was not possible
    target_psf: MoffatPSF | None = None


def measure_scale(reference: Reference, frame: Frame, *, timings: dict | None = None) -> ScaleMeasurement:
    """The photometric scale ``m`` per channel of ``frame`` against the reference.

    ``timings``, when given, gains the seconds spent in ``detect`` (target FWHM, recentring,
    registration check) and ``photometry`` (PSF fits, star fluxes, scale fit).

    Raises
    ------
    TooFewStarsError
        The frame is not registered to the reference, or has too few usable star pairs.
    """
    clock = _Stopwatch(timings)
    params = reference.params
    data = frame.data
    be = get_backend(data)
    stars = reference.stars
    idx = reference.photometry_index
    image = detection_image(data)
    # The target's FWHM, at the reference's bright isolated stars.
    noise_t = ksigma_noise(image)
    bright = idx[reference.isolated][:200]
    fwhm_t = reference.stars.fwhm
    if bright.size >= 5:
        # Only stars whose peak stands well above the target's noise: noise inflates the
        # area above half maximum of faint ones.
        local = _local_level(image, stars.x[bright], stars.y[bright], 12)
        peaks = be.to_host(photometry._gather_stamps(image, stars.x[bright], stars.y[bright], 1).max(axis=(1, 2)))
        strong = (peaks - local) > MIN_FWHM_PEAK_SNR * noise_t
        if strong.sum() >= 5:
            values = estimate_fwhm(
                image,
                stars.x[bright][strong],
                stars.y[bright][strong],
                background=be.asarray(local[strong]),
                half=max(4, int(math.ceil(3 * stars.fwhm))),
            )
            values = values[values > 0.8]
            if values.size >= 5:
                fwhm_t = float(np.median(values))
    tx, ty = photometry.recentre(image, stars.x[idx], stars.y[idx], fwhm=max(stars.fwhm, fwhm_t))
    shift = np.hypot(tx - stars.x[idx], ty - stars.y[idx])
    # Found: the centroid moved little and a star really stands there (the centroid of bare
    # sky also lies near the window's centre).
    level = _local_level(image, stars.x[idx], stars.y[idx], max(6, int(math.ceil(3 * stars.fwhm))))
    peak_here = be.to_host(photometry._gather_stamps(image, stars.x[idx], stars.y[idx], 1).max(axis=(1, 2)))
    found = np.isfinite(shift) & (shift <= params.star_search_radius) & (peak_here - level > 5 * noise_t)
    # Judge registration on the brightest stars that the target covers at all.
    covered = be.to_host(photometry._gather_stamps(image, stars.x[idx], stars.y[idx], 2).min(axis=(1, 2))) > 0
    judged = np.nonzero(covered)[0][:50]
    if judged.size >= 10 and found[judged].mean() < MIN_REGISTERED_FRACTION:
        raise TooFewStarsError(
            frame.path,
            f"only {int(found[judged].sum())} of the reference's {judged.size} brightest stars in the frame's "
            f"coverage are found within {params.star_search_radius:g} px of their reference positions: the "
            "frame does not look registered to the reference, or shows no stars (cloud, dew, a closed "
            "shutter); register it first, or raise --star-search-radius",
        )
    tx = np.where(found, tx, stars.x[idx])
    ty = np.where(found, ty, stars.y[idx])
    # Non-linearity is a property of each channel: a red star can clip in red while its
    # intensity stays low, so the peak test uses the brightest channel in both frames.
    peak_t = be.to_host(photometry._gather_stamps(data.max(axis=0), tx, ty, 1).max(axis=(1, 2)))
    clock.lap("detect")
    sampled = min(stars.fwhm, fwhm_t) >= MIN_PSF_FWHM
    psfs = _fit_psfs(reference, frame, fwhm_t) if params.photometry == "psf" and sampled else None
    if psfs is not None:
        reference_psf, target_psf = psfs
        # The broader PSF weighs the pixels of both frames: it is close to the best weight
        # for the frame whose stars are noisiest per pixel.
        weight = max(psfs, key=lambda p: p.fwhm)
        fwhm_max = weight.fwhm
    else:
        reference_psf = MoffatPSF.from_fwhm(stars.fwhm, photometry.MOFFAT_BETA)
        target_psf = MoffatPSF.from_fwhm(fwhm_t, photometry.MOFFAT_BETA)
        weight = None
        fwhm_max = max(stars.fwhm, fwhm_t)
    geometry = photometry.aperture_geometry(
        fwhm_max,
        aperture_fwhm=params.aperture_fwhm,
        aperture_add=params.aperture_add,
        gap=params.aperture_gap,
        bg_delta=params.aperture_bg_delta,
    )
    ref_m = reference.measurement(geometry, weight)
    tgt_m = photometry.measure_stars(data, tx, ty, geometry, weight)
    usable = (
        ref_m.ok & tgt_m.ok & found & (peak_t < params.linear_range) & (reference.channel_peak < params.linear_range)
    )
    channels = data.shape[0]
    # Signal-to-noise of each pair, on the faintest channel.
    ratio0 = np.median(ref_m.flux[:, usable] / tgt_m.flux[:, usable], axis=1) if usable.any() else np.ones(channels)
    snr = np.min(
        (ref_m.flux + ratio0[:, None] * tgt_m.flux)
        / np.maximum(np.hypot(ref_m.flux_error, ratio0[:, None] * tgt_m.flux_error), 1e-30),
        axis=0,
    )
    usable &= snr >= MIN_PAIR_SNR
    if usable.sum() < params.min_star_pairs:
        raise TooFewStarsError(
            frame.path,
            f"{int(usable.sum())} usable star pairs (unsaturated, fully covered, signal-to-noise >= "
            f"{MIN_PAIR_SNR:g}); at least {params.min_star_pairs} are needed for a photometric scale",
        )
    correction = np.full(
        channels,
        photometry.seeing_correction(geometry, reference_psf=reference_psf, target_psf=target_psf, weight=weight),
    )
    scales, fits = [], []
    for c in range(channels):
        fit = photometry.fit_scale(
            tgt_m.flux[c][usable],
            ref_m.flux[c][usable] * correction[c],
            target_error=tgt_m.flux_error[c][usable],
            reference_error=ref_m.flux_error[c][usable] * correction[c],
            tolerance=params.star_flux_tolerance,
            outlier_removal=params.outlier_removal,
        )
        if fit.n_pairs < params.min_star_pairs or not (fit.scale > 0 and math.isfinite(fit.scale)):
            raise TooFewStarsError(
                frame.path,
                f"channel {c}: {fit.n_pairs} star pairs survive the outlier rejection; at least "
                f"{params.min_star_pairs} are needed",
            )
        scales.append(fit.scale)
        fits.append(fit)
    pairs = max(f.n_pairs for f in fits)
    clock.lap("photometry")
    return ScaleMeasurement(
        np.array(scales),
        pairs,
        target_psf.fwhm if psfs is not None else fwhm_t,
        fits,
        correction,
        target_flux=tgt_m.flux[:, usable],
        reference_flux=ref_m.flux[:, usable] * np.asarray(correction)[:, None],
        reference_psf=reference_psf if psfs is not None else None,
        target_psf=target_psf if psfs is not None else None,
    )


def _psf_radius(fwhm: float) -> int:
    """Radius of the PSF stamps for stars of ``fwhm``, on a ladder of 10 % steps so that the
    reference is fitted once per step, not once per frame."""
    wanted = max(psf_fitting.FIT_RADIUS_FWHM * fwhm, 8.0)
    return int(math.ceil(8 * 1.1 ** math.ceil(math.log(wanted / 8) / math.log(1.1) - 1e-9)))


def _fit_psfs(reference: Reference, frame: Frame, fwhm_t: float) -> tuple[MoffatPSF, MoffatPSF] | None:
    """The reference's and the target's Moffat PSFs, the target's fitted against the
    reference's sky (:func:`nsg_gpu.psf.fit_target_psf`); None where either fit fails."""
    radius = _psf_radius(max(reference.stars.fwhm, fwhm_t))
    fitted_reference = reference.psf_fit(radius)
    if fitted_reference is None:
        return None
    stamps = fitted_reference.stamps
    target = psf_fitting.psf_stamps(frame.data, stamps.xi + stamps.dx, stamps.yi + stamps.dy, radius)
    s0 = psf_fitting.stamp_ratio(target.take(fitted_reference.fitted), stamps.take(fitted_reference.fitted))
    if not (math.isfinite(s0) and s0 > 0):
        return None
    noise, gain_inv = psf_fitting.stamp_noise(target)
    if not noise > 0:
        return None
    target_psf = psf_fitting.fit_target_psf(
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
    )
    if target_psf.stars < MIN_PSF_STARS or not _plausible(target_psf, fwhm_t):
        return None
    return fitted_reference.psf, target_psf


def _local_level(image, x, y, half: int) -> np.ndarray:
    """Median of the border of a window around each position: the local background."""
    be = get_backend(image)
    stamps = be.to_host(photometry._gather_stamps(image, x, y, half))
    border = np.concatenate([stamps[:, 0, :], stamps[:, -1, :], stamps[:, :, 0], stamps[:, :, -1]], axis=1)
    return np.median(border, axis=1)


def model_gradient(
    reference: Reference,
    frame: Frame,
    scale: np.ndarray,
    *,
    record: dict | None = None,
    timings: dict | None = None,
):
    """The spline model ``G`` of ``m*T - R`` per channel, as a full image on the frame's backend.

    ``record``, when given, receives the sample table and the splines (for diagnostics);
    ``timings`` gains the seconds spent in ``sampling``, ``spline_fit`` and ``spline_eval``.

    Returns
    -------
    gradient : array (channels, height, width) float32
    n_samples : int
        Background samples used (before merging into super-samples).
    """
    clock = _Stopwatch(timings)
    params = reference.params
    data = frame.data
    be = get_backend(data)
    xp = be.xp
    grid = reference.grid
    medians_t, valid_t = bin_medians(data, grid, frame.white_level)
    use = be.to_host(reference.valid & valid_t) & ~reference.rejected
    difference = be.to_host(xp.asarray(scale)[:, None, None] * medians_t - reference.medians)
    use &= np.all(np.isfinite(difference), axis=0)
    rows, cols = np.nonzero(use)
    n = rows.size
    if n < MIN_SAMPLES:
        raise TooFewSamplesError(
            frame.path,
            f"{n} background samples are usable (valid in both frames, away from stars); at least "
            f"{MIN_SAMPLES} are needed: check the frame's coverage, or lower --sample-size",
        )
    samples = SampleSet(grid.centre_x[cols], grid.centre_y[rows], difference[:, rows, cols], np.ones(n))
    samples = bin_samples(samples, grid, params.max_samples)
    clock.lap("sampling")
    _, height, width = data.shape
    # Half a bin: the spline varies on the scale of the bins, and this keeps the interpolation
    # within 0.001 sigma of exact evaluation (bench/NOTES.md) at any frame size.
    step = max(4, grid.size // 2)
    try:
        splines = fit_surface_splines(
            samples.x, samples.y, samples.values, weights=samples.weight, smoothness=params.gradient_smoothness
        )
    except ValueError as exc:
        raise TooFewSamplesError(frame.path, f"the gradient cannot be modelled: {exc}") from exc
    clock.lap("spline_fit")
    gradient = evaluate_surfaces(splines, height, width, step=step, xp=xp)
    clock.lap("spline_eval")
    if record is not None:
        record.update(
            used=use,
            covered=be.to_host(reference.valid & valid_t),
            difference=difference,
            samples=samples,
            splines=splines,
        )
    return gradient, n


def normalize_frame(reference: Reference, frame: Frame, *, diagnostics: bool = False) -> FrameResult:
    """Normalize one target to the reference, in memory.

    Parameters
    ----------
    reference : Reference

    frame : Frame

    diagnostics : bool
        Also keep what the fits used (star pairs, background samples, splines) in
        ``result.diagnostics`` (a :class:`~nsg_gpu.diagnostics.FrameDiagnostics`, host arrays of
        at most a few hundred kB); the numbers of the result are the same either way.

    Returns
    -------
    FrameResult
        With ``data`` holding ``m*T - G`` (0 where T is 0), truncated to
        ``[0, white level]`` when the parameters ask for it.

    Raises
    ------
    FrameError
        Shape mismatch, no data, too few stars or samples.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    ref = reference.frame
    be = get_backend(reference.frame.data)
    if frame.data.shape != ref.data.shape:
        raise FrameShapeError(
            frame.path,
            f"is {_describe(frame.data.shape)} but the reference {ref.path.name} is "
            f"{_describe(ref.data.shape)}; frames must be registered to the reference",
        )
    if frame.white_level != ref.white_level:
        raise FrameDataError(
            frame.path,
            f"units unlike the reference's: {_units(frame.white_level)} against {_units(ref.white_level)} in "
            f"{ref.path.name}; write all frames in the same units (same bit depth, or all normalized to [0, 1])",
        )
    if get_backend(frame.data) is not be:
        frame = Frame(frame.path, be.asarray(frame.data), frame.header, frame.white_level, frame.meta)
    _check_data(frame)
    measured = measure_scale(reference, frame, timings=timings)
    m = measured.scale
    record = {} if diagnostics else None
    gradient, n_samples = model_gradient(reference, frame, m, record=record, timings=timings)
    cards = _noise_cards(reference, frame)
    out, high, _ = normalize_pixels(
        frame.data,
        m,
        gradient,
        white_level=ref.white_level,
        truncate=reference.params.truncate,
        measure_noise=False,
        timings=timings,
    )
    del gradient
    # The weight's noise: the multiscale estimate, which registration does not bias.
    measured_noise = None if cards is not None else frame_noise(out, timings=timings)
    snr, weight, source, noise = _weights(reference, cards, measured_noise, m)
    meta = frame.meta
    return FrameResult(
        path=str(frame.path),
        scale=[float(v) for v in m],
        transmission=[float(1 / v) for v in m],
        snr=[float(v) for v in snr],
        weight=weight,
        weight_source=source,
        star_pairs=measured.pairs,
        samples=n_samples,
        noise=[float(v) for v in noise],
        fwhm=measured.fwhm,
        beta=measured.target_psf.beta if measured.target_psf is not None else None,
        high=high,
        exposure=meta.exposure,
        altitude=meta.altitude,
        airmass=meta.airmass,
        filter=meta.filter,
        date_obs=meta.date_obs,
        seconds=time.perf_counter() - started,
        data=out,
        diagnostics=_diagnostics(reference, measured, record) if diagnostics else None,
        timings=timings,
    )


def _diagnostics(reference: Reference, measured: ScaleMeasurement, record: dict):
    from .diagnostics import FrameDiagnostics, PhotometryPairs

    pairs = [
        PhotometryPairs(
            target_flux=measured.target_flux[c],
            reference_flux=measured.reference_flux[c],
            used=fit.used,
            scale=fit.scale,
            intercept=fit.intercept,
        )
        for c, fit in enumerate(measured.fits)
    ]
    _, height, width = reference.frame.data.shape
    return FrameDiagnostics(
        height=height,
        width=width,
        photometry=pairs,
        grid=reference.grid,
        covered=record["covered"],
        star_rejected=reference.rejected,
        used=record["used"],
        difference=record["difference"],
        samples=record["samples"],
        splines=record["splines"],
        circles=reference.circles,
    )


def _noise_cards(reference: Reference, frame: Frame):
    """The NOISExx cards of both frames when both carry one per channel, else None."""
    ref_noise = reference.frame.meta.noise
    tgt_noise = frame.meta.noise
    if ref_noise and tgt_noise and len(ref_noise) == len(tgt_noise) == frame.data.shape[0]:
        return ref_noise, tgt_noise
    return None


def _weights(reference: Reference, cards, measured, m):
    """SNR and weight: NOISExx ``cards`` of both frames when present, else the measured noise."""
    if cards is not None:
        snr, weight = weight_from_noise(cards[0], cards[1], m)
        return snr, weight, "NOISExx", np.asarray(cards[1])
    snr, weight = weight_from_noise(reference.noise, measured)
    return snr, weight, "noiseMultiscale", measured


def _units(white_level: float) -> str:
    if white_level == 1.0:
        return "data normalized to [0, 1]"
    return f"data up to {white_level:g} (ADU)"


def _describe(shape) -> str:
    channels, height, width = shape
    kind = "mono" if channels == 1 else f"{channels}-channel colour"
    return f"{width}x{height} {kind}"


# -- a run from files -----------------------------------------------------------------------------
def _reference_result(reference: Reference, output: Path | None) -> FrameResult:
    frame = reference.frame
    channels = frame.data.shape[0]
    meta = frame.meta
    own = None
    if reference.params.photometry == "psf" and reference.stars.fwhm >= MIN_PSF_FWHM:
        own = reference.psf_fit(_psf_radius(reference.stars.fwhm))
    return FrameResult(
        path=str(frame.path),
        output=str(output) if output else None,
        status="reference",
        scale=[1.0] * channels,
        transmission=[1.0] * channels,
        snr=[1.0] * channels,
        weight=1.0,
        weight_source="reference",
        star_pairs=len(reference.stars),
        samples=int(np.count_nonzero(get_backend(reference.valid).to_host(reference.valid) & ~reference.rejected)),
        noise=[float(v) for v in reference.noise],
        fwhm=own.psf.fwhm if own is not None else reference.stars.fwhm,
        beta=own.psf.beta if own is not None else None,
        high=float(get_backend(frame.data).to_host(frame.data.max())),
        exposure=meta.exposure,
        altitude=meta.altitude,
        airmass=meta.airmass,
        filter=meta.filter,
        date_obs=meta.date_obs,
    )


def _failed_result(path: Path, error: Exception) -> FrameResult:
    """A failed frame's row: the error, and the header facts where the header can be read."""
    result = FrameResult(path=str(path), status="failed", error=str(error))
    try:
        meta = read_meta(path)
    except FrameError:
        return result
    result.exposure, result.altitude, result.airmass = meta.exposure, meta.altitude, meta.airmass
    result.filter, result.date_obs = meta.filter, meta.date_obs
    return result


def _remove_stale_temporaries(outputs) -> None:
    """Delete temporary files a killed run left beside these outputs (never complete files)."""
    for out in outputs:
        for stale in out.parent.glob(f".{out.name}.*.tmp"):
            try:
                stale.unlink()
            except OSError:
                pass


@dataclass(frozen=True)
class FrameJob:
    """One target of a run: where to read it, where its output goes, and the header's history.

    ``fingerprint`` goes into the output's ``NSGHASH`` card (see :mod:`nsg_gpu.resume`).
    """

    path: Path
    output: Path
    reference_name: str
    history: tuple[str, ...] = ()
    fingerprint: str | None = None
    diagnostics: bool = False  # keep what the fits used, for plots


@dataclass
class RunPlan:
    """What a run will do, decided before any pixel is read: reference, targets, outputs."""

    reference_path: Path
    reference_output: Path
    targets: list[Path]
    outputs: dict[Path, Path]
    duplicates: list[FrameResult]
    reference_reason: str | None = None

    def jobs(self, history: Sequence[str] = (), *, diagnostics: bool = False) -> list[FrameJob]:
        name = self.reference_path.name
        return [FrameJob(p, self.outputs[p], name, tuple(history), diagnostics) for p in self.targets]


def plan_run(
    frames: Sequence[str | os.PathLike],
    *,
    reference: str | os.PathLike = "auto",
    output_dir: str | os.PathLike = "nsg",
    params: Parameters | None = None,
    postfix: str = "_nsg",
    output_format: str = "fits",
) -> RunPlan:
    """Choose the reference, drop duplicates and name every output; nothing is written.

    Raises
    ------
    ReferenceFrameError
        The reference does not exist.
    OutputError
        An output would overwrite an input.
    """
    from .select import choose_reference

    params = params or Parameters()
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"--output-format must be one of {', '.join(OUTPUT_FORMATS)}, not {output_format!r}")
    output_dir = Path(output_dir)
    paths = [Path(p) for p in frames]
    reason = None
    if str(reference) == "auto":
        if not paths:
            raise NSGError("no frames given")
        reference_path, reason = choose_reference(paths, detection_sigma=params.detection_sigma)
    else:
        reference_path = Path(reference)
        if not reference_path.is_file():
            raise ReferenceFrameError(reference_path, "the reference frame does not exist")
    seen: dict[Path, Path] = {}
    targets: list[Path] = []
    duplicates: list[FrameResult] = []
    ref_resolved = reference_path.resolve()
    for p in paths:
        key = p.resolve()
        if key == ref_resolved:
            continue
        if key in seen:
            duplicates.append(
                FrameResult(
                    path=str(p), status="failed", error=f"{p}: given twice (also as {seen[key]}); processed once"
                )
            )
            continue
        seen[key] = p
        targets.append(p)
    inputs = {ref_resolved, *seen.keys()}
    outputs = {}
    for p in [reference_path, *targets]:
        out = output_path(p, output_dir, postfix, output_format=output_format)
        if out.resolve() in inputs:
            raise OutputError(
                f"{out}: the output would overwrite an input frame; choose another --output-dir or postfix"
            )
        outputs[p] = out
    return RunPlan(reference_path, outputs[reference_path], targets, outputs, duplicates, reason)


def write_reference(reference: Reference, output: Path, *, fingerprint: str | None = None) -> FrameResult:
    """Write the reference's own copy with NSG's keywords (scale 1, weight 1); return its row."""
    frame = reference.frame
    result = _reference_result(reference, output)
    header = set_nsg_keywords(
        frame.header,
        reference_name=frame.path.name,
        transmission=[1.0] * frame.channels,
        snr=[1.0] * frame.channels,
        weight=1.0,
        weight_keyword=reference.params.weight_keyword,
        weight_source="reference",
        high=result.high,
        history=["reference", *reference.params.history()],
        fingerprint=fingerprint,
        star_pairs=result.star_pairs,
        samples=result.samples,
        fwhm=result.fwhm,
        beta=result.beta,
    )
    write_frame(output, get_backend(frame.data).to_host(frame.data), header, properties=frame.properties)
    return result


def read_job(job: FrameJob) -> Frame:
    """The read stage of :func:`process_frame`: the target's frame from disk.

    Raises
    ------
    FrameError
        The frame cannot be read.
    """
    return read_frame(job.path)


def compute_job(reference: Reference, job: FrameJob, frame: Frame) -> FrameResult:
    """The compute stage of :func:`process_frame`: the normalized data in ``result.data``.

    Raises
    ------
    FrameError
        Shape mismatch, no data, too few stars or samples.
    """
    return normalize_frame(reference, frame, diagnostics=job.diagnostics)


def write_job(reference: Reference, job: FrameJob, frame: Frame, result: FrameResult) -> FrameResult:
    """The write stage of :func:`process_frame`: the output with NSG's keywords, atomically.

    ``result.data`` is released once written and ``result.output`` set.

    Raises
    ------
    OutputError
        The output cannot be written; nothing is left behind.
    """
    header = set_nsg_keywords(
        frame.header,
        reference_name=job.reference_name,
        transmission=result.transmission,
        snr=result.snr,
        weight=result.weight,
        weight_keyword=reference.params.weight_keyword,
        weight_source=result.weight_source,
        high=result.high,
        history=list(job.history),
        fingerprint=job.fingerprint,
        star_pairs=result.star_pairs,
        samples=result.samples,
        fwhm=result.fwhm,
        beta=result.beta,
    )
    write_frame(job.output, get_backend(result.data).to_host(result.data), header, properties=frame.properties)
    result.output = str(job.output)
    result.data = None
    return result


def failed_result(job: FrameJob, error: Exception, timings: dict | None = None) -> FrameResult:
    """The failed row of a job whose read, compute or write raised ``error``."""
    result = _failed_result(job.path, error)
    result.timings = dict(timings or {})
    return result


def process_frame(reference: Reference, job: FrameJob) -> FrameResult:
    """Read, normalize and write one target: the unit of work of every executor.

    The composition of :func:`read_job`, :func:`compute_job` and :func:`write_job`. A
    problem with the frame itself (unreadable, unregistered, no stars, disk full) becomes
    the frame's failed result rather than an exception, so that the run goes on.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        frame = read_job(job)
        timings["read"] = time.perf_counter() - started
        result = compute_job(reference, job, frame)
        timings.update(result.timings)
        mark = time.perf_counter()
        write_job(reference, job, frame, result)
        timings["write"] = time.perf_counter() - mark
    except (FrameError, OutputError) as exc:
        result = failed_result(job, exc, timings)
    result.timings = timings
    result.seconds = time.perf_counter() - started
    return result


def normalize(
    frames: Sequence[str | os.PathLike],
    *,
    reference: str | os.PathLike = "auto",
    output_dir: str | os.PathLike = "nsg",
    params: Parameters | None = None,
    backend: Backend | None = None,
    postfix: str = "_nsg",
    stop_on_error: bool = False,
    progress: Callable[[FrameResult, int, int], None] | None = None,
    executor=None,
    overwrite: bool = False,
    output_format: str = "fits",
    plots: bool = False,
    report: bool = False,
) -> RunResult:
    """Normalize frames on disk to a reference and write ``<stem><postfix>.fits`` for each.

    A rerun keeps every output that is complete and was made from the same input, reference
    and parameters (its ``NSGHASH`` card, :mod:`nsg_gpu.resume`) and redoes the others. After
    the run, frames whose relative weight or transmission is at or below
    ``params.min_weight`` / ``params.min_transmission`` are marked rejected and their outputs
    moved into ``<output_dir>/rejected/`` (:mod:`nsg_gpu.rejection`).

    Parameters
    ----------
    frames : sequence of paths
        Registered FITS or XISF frames. The reference may be among them.

    reference : path or "auto"
        The reference frame, or "auto" to choose one (see :func:`nsg_gpu.select.choose_reference`).

    output_dir : path
        Created if needed; outputs, ``results.csv`` and ``results.json`` go there.

    params : Parameters, optional

    backend : Backend, optional
        NumPy by default.

    stop_on_error : bool
        Stop at the first frame that fails instead of going on.

    progress : callable, optional
        Called as ``progress(result, done, total)`` after each frame.

    executor : optional
        Runs :func:`process_frame` over the targets (:mod:`nsg_gpu.executors`); in-process
        by default.

    overwrite : bool
        Redo every frame, even those whose output is complete and up to date.

    output_format : {"fits", "xisf"}
        Format of the normalized frames (``.fits`` or ``.xisf``).

    plots : bool
        Write the diagnostic plots of every frame to ``output_dir/plots`` as it completes
        (:mod:`nsg_gpu.diagnostics`). Without it, only a few chosen frames are plotted.

    report : bool
        Write ``report.html`` with the run charts and the chosen frames' diagnostics
        (:mod:`nsg_gpu.htmlreport`); ``nsg normalize`` does by default. A report that cannot be
        written leaves the run done, with the reason in ``RunResult.report_error``.

    Returns
    -------
    RunResult
        The reference first, then the targets in input order; failed frames carry their error,
        kept outputs are marked ``resumed``, rejected frames carry the reason in ``rejected``.

    Raises
    ------
    ReferenceFrameError
        The reference is missing or unusable (nothing can be normalized).
    OutputError
        An output would overwrite an input.
    """
    from .executors import InProcessExecutor
    from .rejection import reject_frames
    from .report import write_results, write_weights
    from .resume import clear_outputs, find_complete_output, frame_fingerprint, result_from_header

    params = params or Parameters()
    be = backend or NUMPY
    executor = executor or InProcessExecutor()
    plan = plan_run(
        frames, reference=reference, output_dir=output_dir, params=params, postfix=postfix, output_format=output_format
    )
    _remove_stale_temporaries(plan.outputs.values())
    # Resume: outputs made from the same input, reference and parameters are kept.
    ref_name = plan.reference_path.name
    fingerprints = {
        p: frame_fingerprint(p, reference=plan.reference_path, params=params)
        for p in [plan.reference_path, *plan.targets]
    }
    complete = {}
    if not overwrite:
        for p in [plan.reference_path, *plan.targets]:
            found = find_complete_output(plan.outputs[p], reference_name=ref_name, fingerprint=fingerprints[p])
            if found is not None:
                complete[p] = found
    try:
        ref_frame = read_frame(plan.reference_path)
    except FrameError as exc:
        raise ReferenceFrameError(plan.reference_path, exc.reason) from exc
    prepared = prepare_reference(ref_frame, params, backend=be)
    if plan.reference_path in complete:
        reference_row = _reference_result(prepared, complete.pop(plan.reference_path)[0])
        reference_row.resumed = True
    else:
        clear_outputs(plan.reference_output)
        reference_row = write_reference(prepared, plan.reference_output, fingerprint=fingerprints[plan.reference_path])
    total = len(plan.targets) + 1
    if progress:
        progress(reference_row, 1, total)
    by_path: dict[Path, FrameResult] = {}
    for p, (out, header) in complete.items():
        by_path[p] = result_from_header(p, out, header, weight_keyword=prepared.params.weight_keyword)
        if progress:
            progress(by_path[p], len(by_path) + 1, total)
    # Every frame records its diagnostics (a few hundred kB); with --plots each is plotted and
    # dropped at once, otherwise only the highest- and lowest-weight frames' records are kept.
    jobs = [
        dataclasses.replace(job, fingerprint=fingerprints[job.path])
        for job in plan.jobs(prepared.params.history(), diagnostics=plots or report)
        if job.path not in complete
    ]
    for job in jobs:
        clear_outputs(job.output)  # a frame redone has no output until its new one is complete
    frame_plots: dict[str, list[Path]] = {}
    plot_error = None
    kept: dict[str, tuple] = {}
    results_iter = executor.run(prepared, jobs, stop_on_error=stop_on_error)
    # Results first: zip then runs the executor to its end (its threads joined, its cluster
    # futures released) before it looks at the jobs.
    for result, job in zip(results_iter, jobs):
        if result.diagnostics is not None:
            if plots:
                try:
                    frame_plots[result.path] = _plot_frame(result, result.diagnostics, output_dir)
                except OutputError as exc:
                    plots = False  # the disk is full or gone: the next frames' plots would fail too
                    plot_error = str(exc)
            else:
                _keep_extremes(kept, result)
            result.diagnostics = None
        by_path[job.path] = result
        if progress:
            progress(result, len(by_path) + 1, total)
    results = [reference_row, *plan.duplicates, *(by_path[p] for p in plan.targets if p in by_path)]
    _filter_warnings(results)
    reject_frames(
        results, min_weight=params.min_weight, min_transmission=params.min_transmission, output_dir=output_dir
    )
    run = RunResult(str(plan.reference_path), results, prepared.params, plan.reference_reason)
    run.report_error = plot_error
    write_results(run, output_dir)
    write_weights(run, output_dir)
    if report:
        try:
            run.report = str(_write_report(prepared, run, output_dir, frame_plots, kept))
        except OutputError as exc:  # the frames and results are written; the report is extra
            run.report_error = str(exc)
    return run


def _filter_warnings(results: list[FrameResult]) -> None:
    """Warn on every frame whose FILTER differs from the reference's (the first result)."""
    reference = results[0]
    if not reference.filter:
        return
    for result in results[1:]:
        if result.status == "failed" or not result.filter:
            continue
        if result.filter.strip().casefold() != reference.filter.strip().casefold():
            message = (
                f"FILTER {result.filter!r} differs from the reference's {reference.filter!r}: "
                "frames of different filters should not be normalized to one reference"
            )
            result.warning = f"{result.warning}; {message}" if result.warning else message


def _keep_extremes(kept: dict, result: FrameResult) -> None:
    """Keep ``result``'s diagnostics if it has the highest or lowest weight so far."""
    record = (result, result.diagnostics)
    for key, better in (("high", lambda a, b: a > b), ("low", lambda a, b: a < b)):
        if key not in kept or better(result.weight, kept[key][0].weight):
            kept[key] = record


def _plot_frame(result: FrameResult, diagnostics, output_dir) -> list[Path]:
    from .diagnostics import write_frame_plots

    return write_frame_plots(result, diagnostics, Path(output_dir) / "plots")


def _write_report(prepared: Reference, run: RunResult, output_dir, frame_plots: dict, kept: dict) -> Path:
    """report.html, with the diagnostics of the chosen frames; one whose record was not kept
    during the run (the median-weight frame) is normalized again in memory."""
    from .diagnostics import chosen_frames
    from .htmlreport import write_report

    records = {result.path: diagnostics for result, diagnostics in kept.values()}
    chosen = chosen_frames(run.frames)
    for result in chosen.values():
        if result.path in frame_plots:
            continue
        diagnostics = records.get(result.path)
        if diagnostics is None:
            try:
                diagnostics = normalize_frame(prepared, read_frame(result.path), diagnostics=True).diagnostics
            except FrameError:  # changed on disk since; the report goes without its plots
                continue
        frame_plots[result.path] = _plot_frame(result, diagnostics, output_dir)
    return write_report(run, output_dir, frame_plots=frame_plots, chosen=chosen)
