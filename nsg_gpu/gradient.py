"""The gradient stage: background samples of ``m*T - R``, a smoothing spline through them, and ``G``.

Third stage of a target, once its scale ``m`` is known (:mod:`nsg_gpu.scale`). The target's
medians in the reference's sample grid (:mod:`nsg_gpu.samples`) are scaled and differenced
with the reference's; samples that are not valid in both frames, or lie in a reference star's
rejection circle, are left out. Bins where one frame alone has many bright pixels (a satellite
trail, a meteor) are measured again in both frames with their outliers clipped, and samples
far out of their neighbourhood are dropped; the rest are merged into super-samples above
``max_samples``, and a thin-plate smoothing spline per channel (:mod:`nsg_gpu.spline`) is
fitted and evaluated over the whole frame as the gradient image ``G``. The apply step
(:mod:`nsg_gpu.apply`) comes next.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import get_backend
from .errors import TooFewSamplesError
from .io import Frame
from .outliers import bright_counts, clipped_medians, one_frame_outliers, pixel_noise, reject_outlier_samples
from .progress import Stopwatch
from .reference import Reference
from .samples import MIN_SAMPLES, SampleSet, bin_medians, bin_samples, sample_cap
from .spline import SurfaceSpline, evaluate_surfaces, fit_surface_splines

__all__ = ["GradientModel", "model_gradient"]


@dataclass
class GradientModel:
    """The gradient ``G`` of one target and what it was fitted on."""

    image: object  # (channels, height, width) float32, on the frame's backend
    n_samples: int  # background samples used, before merging into super-samples
    used: np.ndarray  # (rows, cols) bool: samples that entered the fit
    covered: np.ndarray  # (rows, cols) bool: samples valid in both frames
    difference: np.ndarray  # (channels, rows, cols) m*T - R per sample
    samples: SampleSet  # as fitted (merged)
    splines: list[SurfaceSpline]


def model_gradient(
    reference: Reference, frame: Frame, scale: np.ndarray, *, timings: dict | None = None
) -> GradientModel:
    """The spline model ``G`` of ``m*T - R`` per channel, as a full image on the frame's backend.

    ``timings``, when given, gains the seconds spent in ``sampling``, ``spline_fit`` and
    ``spline_eval``.

    Raises
    ------
    TooFewSamplesError
        Fewer than :data:`~nsg_gpu.samples.MIN_SAMPLES` usable samples, or no spline fits them.
    """
    clock = Stopwatch(timings)
    params = reference.params
    data = frame.data
    be = get_backend(data)
    xp = be.xp
    grid = reference.grid
    medians_t, valid_t = bin_medians(data, grid, frame.white_level)
    covered = be.to_host(reference.valid & valid_t)
    use = covered & ~reference.rejected
    difference = be.to_host(xp.asarray(scale)[:, None, None] * medians_t - reference.medians)
    # Bins that hold something one frame alone has (a trail, a meteor) are measured again in
    # both frames with their outliers clipped: a plain median would carry the trail into G.
    counts = bright_counts(data, grid, medians_t, pixel_noise(data), frame.white_level)
    odd = np.argwhere(one_frame_outliers(counts, reference.bright) & use)
    if odd.size:
        clipped = clipped_medians(data, grid, odd, frame.white_level)
        difference[:, odd[:, 0], odd[:, 1]] = np.asarray(scale)[:, None] * clipped - reference.clipped_medians(odd)
    use &= np.all(np.isfinite(difference), axis=0)
    use = reject_outlier_samples(difference, use)
    rows, cols = np.nonzero(use)
    n = rows.size
    if n < MIN_SAMPLES:
        raise TooFewSamplesError(
            frame.path,
            f"{n} background samples are usable (valid in both frames, away from stars); at least "
            f"{MIN_SAMPLES} are needed: check the frame's coverage, or lower --sample-size",
        )
    samples = SampleSet(grid.centre_x[cols], grid.centre_y[rows], difference[:, rows, cols], np.ones(n))
    samples = bin_samples(samples, grid, sample_cap(params.max_samples, params.gradient_smoothness))
    clock.lap("sampling")
    _, height, width = data.shape
    # Half a bin: the spline varies on the scale of the bins, and this keeps the interpolation
    # within 0.001 sigma of exact evaluation (bench/NOTES.md) at any frame size. The coarse
    # grid is the lattice of the bins' centres and midpoints, which holds the nodes (bins, and
    # super-samples of two), so that its values are one convolution.
    step = max(4, grid.size // 2)
    lattice = (float(grid.centre_x[0]), float(grid.centre_y[0]), grid.size / 2) if grid.size >= 8 else None
    try:
        splines = fit_surface_splines(
            samples.x, samples.y, samples.values, weights=samples.weight, smoothness=params.gradient_smoothness
        )
    except ValueError as exc:
        raise TooFewSamplesError(frame.path, f"the gradient cannot be modelled: {exc}") from exc
    clock.lap("spline_fit")
    image = evaluate_surfaces(splines, height, width, step=step, xp=xp, lattice=lattice)
    clock.lap("spline_eval")
    return GradientModel(image, n, use, covered, difference, samples, splines)
