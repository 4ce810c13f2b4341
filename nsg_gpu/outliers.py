"""Background samples that something other than the sky disturbs, found and measured again.

Part of the gradient stage (:mod:`nsg_gpu.gradient`), with the reference's share prepared once
(:mod:`nsg_gpu.reference`). A satellite or aircraft trail, a meteor or a bright reflection in
one frame raises the median of every bin it crosses, and a spline through those samples would
print a groove along it into every pixel nearby. Such bins have far more bright pixels in one
frame than in the other (stars are in both): :func:`one_frame_outliers` finds them from
:func:`bright_counts`, and :func:`clipped_medians` measures them again in both frames with the
outliers and their wings clipped. :func:`reject_outlier_samples` then drops samples that still
stand far out of their neighbourhood.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .backend import get_backend
from .noise import ksigma_noise
from .samples import SampleGrid, median_stride, strided_blocks

__all__ = [
    "pixel_noise",
    "bright_counts",
    "one_frame_outliers",
    "clipped_medians",
    "nanmedian_last",
    "reject_outlier_samples",
]

#: Pixels a frame's noise is estimated on for finding its bright pixels (a subsample).
NOISE_PIXELS = 250_000

#: Pixels this many noise sigmas above their bin's median count as bright (a star, a trail, a
#: hot pixel).
BRIGHT_SIGMA = 5.0
#: A bin with this many more bright pixels in one frame than in the other (beyond a Poisson
#: margin of 3 sigma) holds something that frame alone has: a satellite or aircraft trail, a
#: meteor. Stars are in both frames.
MIN_EXCESS = 6
#: Clipping of the pixels of such bins before their median: this many sigmas (1.4826 MAD),
#: this many rounds.
CLIP_SIGMA = 3.0
CLIP_ROUNDS = 3
#: Pixels within 2 px of a clipped one are left out as well (the clipped light's wings).
_WINGS = np.ones((1, 1, 5, 5), bool)
#: A sample that differs from the median of its neighbours (within OUTLIER_REACH bins) by more
#: than this many robust standard deviations of such differences is left out of the fit.
OUTLIER_SIGMA = 5.0
OUTLIER_REACH = 2


def pixel_noise(data) -> np.ndarray:
    """Each channel's k-sigma pixel noise on a subsample, the scale of "bright" in
    :func:`bright_counts`; the same estimate for the reference and every target."""
    return np.array([ksigma_noise(data[c], max_pixels=NOISE_PIXELS) for c in range(data.shape[0])])


def bright_counts(data, grid: SampleGrid, medians, noise, white_level: float, *, stride: int | None = None):
    """Pixels of every bin more than :data:`BRIGHT_SIGMA` noise sigmas above its median.

    Parameters
    ----------
    data : array (channels, height, width)
        Any backend; the comparison runs there.

    medians : array (channels, n_rows, n_cols)
        The bins' medians (:func:`bin_medians`), on the backend of ``data``.

    noise : array-like (channels,)
        The frame's pixel noise per channel.

    Returns
    -------
    ndarray (channels, n_rows, n_cols) of int, on the host
        Counted on the same sub-grid of pixels as the medians.
    """
    be = get_backend(data)
    xp = be.xp
    stride = median_stride(grid.size) if stride is None else max(1, int(stride))
    blocks = strided_blocks(data, grid, stride)
    level = (
        xp.asarray(medians, dtype=xp.float32)
        + xp.asarray(BRIGHT_SIGMA * np.asarray(noise), dtype=xp.float32)[:, None, None]
    )
    bright = (blocks > level[:, :, None, :, None]) & (blocks < np.float32(white_level))
    return be.to_host(bright.sum(axis=(2, 4)))


def one_frame_outliers(counts_target: np.ndarray, counts_reference: np.ndarray) -> np.ndarray:
    """``(n_rows, n_cols)`` bins where one frame has far more bright pixels than the other in
    any channel: a trail or a meteor in that frame alone (stars, in both, do not count)."""
    high = np.maximum(counts_target, counts_reference)
    low = np.minimum(counts_target, counts_reference)
    return np.any(high > low + MIN_EXCESS + 3.0 * np.sqrt(low), axis=0)


def clipped_medians(data, grid: SampleGrid, bins: np.ndarray, white_level: float, *, stride: int | None = None):
    """Medians of the bins ``bins`` (``(n, 2)`` rows and columns) after clipping their bright
    and dark outliers, per channel, on the host.

    The pixels ``0 < v < white_level`` of each bin are clipped at :data:`CLIP_SIGMA` robust
    sigmas (1.4826 MAD) around their median, :data:`CLIP_ROUNDS` times, and the pixels within
    2 px of a clipped one go with it: a trail's core and wings go, and the sky's median stays
    where it was. On the host, for the few bins that need it.

    Returns
    -------
    ndarray (channels, n), float64
        NaN where a bin has no usable pixel.
    """
    be = get_backend(data)
    stride = median_stride(grid.size) if stride is None else max(1, int(stride))
    blocks = strided_blocks(data, grid, stride)
    bins = np.asarray(bins, dtype=np.int64).reshape(-1, 2)
    if bins.shape[0] == 0:
        return np.zeros((data.shape[0], 0))
    picked = blocks[:, be.asarray(bins[:, 0]), :, be.asarray(bins[:, 1]), :]  # (n, channels, s', s')
    values = be.to_host(picked).astype(np.float64)  # (n, channels, s', s')
    values = np.where((values > 0) & (values < white_level), values, np.nan)
    flat = values.reshape(values.shape[0], values.shape[1], -1)
    # A bin of one channel may have no data: NaN, without a warning (nanmedian_last warns of
    # nothing, and the comparisons' invalid values are NumPy's floating-point errors).
    with np.errstate(all="ignore"):
        clipped = np.zeros(flat.shape, bool)
        for _ in range(CLIP_ROUNDS):
            kept = np.where(clipped, np.nan, flat)
            centre = nanmedian_last(kept)[..., None]
            spread = 1.4826 * nanmedian_last(np.abs(kept - centre))[..., None]
            clipped = np.abs(flat - centre) > CLIP_SIGMA * spread
        # A trail's or a star's wings lie next to its clipped pixels, below the clip: they go too.
        wings = ndimage.binary_dilation(clipped.reshape(values.shape), structure=_WINGS)
        out = nanmedian_last(np.where(wings, np.nan, values).reshape(flat.shape))
    return out.T


def nanmedian_last(values: np.ndarray) -> np.ndarray:
    """``np.nanmedian(values, axis=-1)`` to the bit, by one sort of all rows (NaN sort last)
    rather than NumPy's loop over rows: the middle value, or the mean ``(a + b) / 2`` of the
    two middle values, of each row's non-NaN values; NaN for a row of NaN alone."""
    ordered = np.sort(values, axis=-1)
    count = values.shape[-1] - np.count_nonzero(np.isnan(values), axis=-1)
    low = np.take_along_axis(ordered, np.maximum((count - 1) // 2, 0)[..., None], axis=-1)[..., 0]
    high = np.take_along_axis(ordered, np.minimum(count // 2, values.shape[-1] - 1)[..., None], axis=-1)[..., 0]
    out = (low + high) / 2
    out[count == 0] = np.nan
    return out


def reject_outlier_samples(values: np.ndarray, use: np.ndarray, *, sigma: float = OUTLIER_SIGMA) -> np.ndarray:
    """``use`` without the samples that stand out of their neighbourhood.

    Each used sample is compared, per channel, with the median of the used samples within
    :data:`OUTLIER_REACH` bins (itself left out); the gradient varies on larger scales, so the
    difference is the samples' own scatter unless something else lies in the bin. A sample
    whose difference exceeds ``sigma`` robust standard deviations (1.4826 MAD of all such
    differences of that channel) in any channel is dropped.

    Parameters
    ----------
    values : ndarray (channels, rows, cols)
        Per-sample values on the host, e.g. ``m*T - R``.

    use : ndarray (rows, cols) of bool
    """
    channels, rows, cols = values.shape
    reach = OUTLIER_REACH
    masked = np.pad(
        np.where(use[None], values, np.nan), ((0, 0), (reach, reach), (reach, reach)), constant_values=np.nan
    )
    stack = np.stack(
        [
            masked[:, reach + dy : reach + dy + rows, reach + dx : reach + dx + cols]
            for dy in range(-reach, reach + 1)
            for dx in range(-reach, reach + 1)
            if dy or dx
        ]
    )
    judged = use & (np.sum(np.isfinite(stack[:, 0]), axis=0) >= 3)
    if judged.sum() < 10:
        return use
    # A sample without used neighbours compares with NaN. nanmedian_last, not np.nanmedian:
    # the latter warns of all-NaN slices, and silencing a warning with catch_warnings is not
    # safe while other threads run (it swaps the process's filters).
    with np.errstate(all="ignore"):
        residual = values - nanmedian_last(np.moveaxis(stack, 0, -1))
    centred = residual[:, judged] - np.median(residual[:, judged], axis=1)[:, None]
    scatter = 1.4826 * np.median(np.abs(centred), axis=1)
    with np.errstate(invalid="ignore"):
        outlier = np.any(np.abs(residual) > sigma * np.maximum(scatter, 1e-30)[:, None, None], axis=0)
    return use & ~(outlier & judged)
