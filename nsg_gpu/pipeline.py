"""One target, in memory: the stages of NSG in order.

The data flow of DESIGN.md, for one frame against a prepared reference
(:mod:`nsg_gpu.reference`)::

    check -> scale m (nsg_gpu.scale) -> gradient G (nsg_gpu.gradient)
          -> apply m*T - G, noise (nsg_gpu.apply) -> weight (nsg_gpu.noise) -> FrameResult

:func:`normalize_frame` is that flow; reading and writing files around it are the jobs'
(:mod:`nsg_gpu.jobs`), and a whole run is :func:`nsg_gpu.run.normalize`.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .apply import normalize_pixels
from .backend import get_backend, single_threaded_blas
from .diagnostics import FrameDiagnostics, PhotometryPairs
from .errors import FrameDataError, FrameShapeError
from .gradient import GradientModel, model_gradient
from .io import SIXTEEN_BIT_WHITE, Frame
from .noise import frame_noise, weight_from_noise
from .reference import Reference, as_frame, as_measured, check_coverage
from .results import FrameResult
from .scale import ScaleMeasurement, measure_scale

__all__ = ["normalize_frame"]


def normalize_frame(reference: Reference, frame, *, diagnostics: bool = False) -> FrameResult:
    """Normalize one target to the reference, in memory.

    Parameters
    ----------
    reference : Reference
        From :func:`nsg_gpu.reference.prepare_reference`.

    frame : Frame, path or array
        The target: a frame as read by :func:`nsg_gpu.io.read_frame`, a file to read, or its
        data ``(height, width)`` or ``(channels, height, width)`` in the reference's units.

    diagnostics : bool
        Also keep what the fits used (star pairs, background samples, splines) in
        ``result.diagnostics`` (a :class:`~nsg_gpu.diagnostics.FrameDiagnostics`, host arrays of
        at most a few hundred kB); the numbers of the result are the same either way.

    Returns
    -------
    FrameResult
        With ``data`` holding ``m*T - G`` (0 where T is 0), truncated to
        ``[0, white level]`` when the parameters ask for it, on the reference's backend.

    Raises
    ------
    FrameError
        Unreadable, shape or units unlike the reference's, no data, too few stars or samples.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    ref = reference.frame
    frame = as_frame(frame, get_backend(ref.data))
    if frame.data.shape != ref.data.shape:
        raise FrameShapeError(
            frame.path,
            f"is {_describe(frame.data.shape)} but the reference {ref.path.name} is "
            f"{_describe(ref.data.shape)}; frames must be registered to the reference",
        )
    if not same_units(frame.white_level, ref.white_level):
        raise FrameDataError(
            frame.path,
            f"units unlike the reference's: {_units(frame.white_level)} against {_units(ref.white_level)} in "
            f"{ref.path.name}; write all frames in the same units (same bit depth, or all normalized to [0, 1])",
        )
    # Scattered zeros (a sky clipped at 0) are data, and a frame holding negative data is
    # measured with a pedestal (reference.as_measured); the gradient model takes it, so that
    # m*T - G is at the reference's level, or at the level of the reference's own pedestal,
    # taken out after the noise is read.
    frame, _ = as_measured(frame)
    check_coverage(frame)
    with single_threaded_blas():
        measured = measure_scale(reference, frame, timings=timings)
        m = measured.scale
        gradient = model_gradient(reference, frame, m, timings=timings)
        cards = _noise_cards(reference, frame)
        out, high, _ = normalize_pixels(
            frame.data,
            m,
            gradient.image,
            white_level=ref.white_level,
            truncate=reference.params.truncate and not reference.pedestal,
            measure_noise=False,
            timings=timings,
            overwrite_gradient=True,  # G is not needed after this: its buffer takes the output
        )
        # The weight's noise: the multiscale estimate, which registration does not bias, read
        # at the reference's step (every k-th pixel of frames a registration upscaled by k).
        measured_noise = None if cards is not None else frame_noise(out, step=reference.noise_step, timings=timings)
        if reference.pedestal:
            high = _without_pedestal(out, frame.data, reference)
    if not math.isfinite(high):
        largest = float(get_backend(frame.data).to_host(abs(frame.data).max()))
        raise FrameDataError(
            frame.path,
            f"pixels beyond float32's range once scaled by {max(m):.4g} (its largest pixel is {largest:.3g}): "
            "corrupt data, or units unlike the reference's",
        )
    gradient.image = None  # frame-sized; the diagnostics keep only the samples and splines
    if cards is not None:
        snr, weight = weight_from_noise(cards[0], cards[1], m)
        source, noise = "NOISExx", np.asarray(cards[1])
    else:
        snr, weight = weight_from_noise(reference.noise, measured_noise)
        source, noise = "noiseMultiscale", measured_noise
    transmission = [float(1 / v) for v in m]
    # The transmission's error from the scale's: the same relative error.
    transmission_error = [
        float(fit.scale_error / fit.scale**2) if math.isfinite(fit.scale_error) else None for fit in measured.fits
    ]
    return FrameResult(
        path=str(frame.path),
        # The scale as a resumed run reads it back from NSGS (1/transmission), so that both
        # rows are the same to the last bit (it differs from m by a unit in the last place at most).
        scale=[1.0 / t for t in transmission],
        transmission=transmission,
        transmission_error=transmission_error,
        snr=[float(v) for v in snr],
        weight=weight,
        weight_source=source,
        star_pairs=measured.pairs,
        samples=gradient.n_samples,
        noise=[float(v) for v in noise],
        fwhm=measured.fwhm,
        photometry=measured.photometry,
        beta=measured.target_psf.beta if measured.target_psf is not None else None,
        ellipticity=measured.target_psf.ellipticity if measured.target_psf is not None else None,
        elongation_angle=measured.target_psf.elongation_angle if measured.target_psf is not None else None,
        high=high,
        meta=frame.meta,
        seconds=time.perf_counter() - started,
        data=out,
        diagnostics=_diagnostics(reference, measured, gradient) if diagnostics else None,
        timings=timings,
    )


def _without_pedestal(out, data, reference: Reference) -> float:
    """Take the reference's pedestal out of the output ``out`` (in place, where ``data``, the
    target, holds data) and, with ``truncate``, clip it to the reference's own range: from
    minus the pedestal (a hair below its least value) to the white level. Returns the largest
    value of ``m*T - G`` before the clip."""
    xp = get_backend(out).xp
    pedestal = np.float32(reference.pedestal)
    out -= pedestal
    out[data == 0] = 0
    high = float(get_backend(out).to_host(out.max()))
    if reference.params.truncate:
        xp.clip(out, -pedestal, np.float32(reference.frame.white_level), out=out)
    return high


def _diagnostics(reference: Reference, measured: ScaleMeasurement, gradient: GradientModel) -> FrameDiagnostics:
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
        covered=gradient.covered,
        star_rejected=reference.rejected,
        used=gradient.used,
        difference=gradient.difference,
        samples=gradient.samples,
        splines=gradient.splines,
        circles=reference.circles,
    )


def _noise_cards(reference: Reference, frame: Frame):
    """The NOISExx cards of both frames when both carry one per channel, else None."""
    ref_noise = reference.frame.meta.noise
    tgt_noise = frame.meta.noise
    if ref_noise and tgt_noise and len(ref_noise) == len(tgt_noise) == frame.data.shape[0]:
        return ref_noise, tgt_noise
    return None


def same_units(white_level: float, other: float) -> bool:
    """Whether frames of these white levels hold data in the same units: the same white level,
    or both 16 bits or more. Float frames in ADU read their white level from their own
    brightest pixel above 65535 (a flat-divided frame, a camera of more than 16 bits), so it
    differs from frame to frame of one set; the reference's governs the run."""
    return white_level == other or min(white_level, other) >= SIXTEEN_BIT_WHITE


def _units(white_level: float) -> str:
    if white_level == 1.0:
        return "data normalized to [0, 1]"
    return f"data up to {white_level:g} (ADU)"


def _describe(shape) -> str:
    channels, height, width = shape
    kind = "mono" if channels == 1 else f"{channels}-channel colour"
    return f"{width}x{height} {kind}"
