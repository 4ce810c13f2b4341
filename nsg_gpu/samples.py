"""Background samples: a grid of square bins, their medians, validity and star rejection.

The grid is built once on the reference (NSG section 7.1): square bins of ``sample_size``
pixels, centred on the image. A bin is usable only when fewer than 1 % of its pixels are 0
("no data") in every channel, in both the reference and the target. Medians ignore 0 and
saturated pixels. Bins near the reference's brighter stars are rejected (section 7.3), and
when more bins survive than ``max_samples`` they are merged into weighted super-samples
(section 7.4) so the spline stays small.

In the flow: the grid and the reference's medians are made once by
:mod:`nsg_gpu.reference`; each target's medians feed the gradient stage (:mod:`nsg_gpu.gradient`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import kernels
from .backend import get_backend
from .spline import PLANE_SMOOTHNESS

__all__ = [
    "SampleGrid",
    "SampleSet",
    "make_grid",
    "bin_statistics",
    "bin_medians",
    "sample_cap",
    "median_stride",
    "star_rejection",
    "trail_rejection",
    "bin_samples",
    "MIN_SAMPLES",
    "strided_blocks",
]

#: A bin with this share of zero pixels or more, in any channel, is not used (NSG's rule).
MAX_BLACK_PIXEL_FRACTION = 0.01
#: Fewer usable background samples than this is an error for the frame.
MIN_SAMPLES = 3
#: A bin's median is taken over a regular sub-grid of at least this many of its pixels.
MEDIAN_PIXELS = 1024


@dataclass(frozen=True)
class SampleGrid:
    """Geometry of the sample bins: offset, size and count."""

    size: int
    x0: int
    y0: int
    n_cols: int
    n_rows: int

    @property
    def centre_x(self) -> np.ndarray:
        return self.x0 + np.arange(self.n_cols) * self.size + 0.5 * self.size - 0.5

    @property
    def centre_y(self) -> np.ndarray:
        return self.y0 + np.arange(self.n_rows) * self.size + 0.5 * self.size - 0.5

    @property
    def count(self) -> int:
        return self.n_cols * self.n_rows


def make_grid(height: int, width: int, size: int) -> SampleGrid:
    """The centred grid of NSG: offset ``round((W mod S) / 2)``, as many whole bins as fit."""
    size = int(size)
    x0 = int(math.floor((width % size) / 2 + 0.5))
    y0 = int(math.floor((height % size) / 2 + 0.5))
    return SampleGrid(size, x0, y0, (width - x0) // size, (height - y0) // size)


def median_stride(size: int) -> int:
    """Pixel stride within a bin of ``size`` px for its median: 1 up to 2 x MEDIAN_PIXELS px.

    Large bins (those of 26-61 MP frames are 100-150 px) give their median from a regular
    sub-grid of at least :data:`MEDIAN_PIXELS` pixels; the median of n pixels of Gaussian
    noise has a standard deviation of about ``1.25 sigma / sqrt(n)``, so 1000 pixels keep it
    near 0.04 sigma, well below what the spline's smoothing averages away.
    """
    return max(1, int(math.floor(math.sqrt(size * size / MEDIAN_PIXELS))))


def bin_statistics(data, grid: SampleGrid, white_level: float, *, stride: int = 1, launcher=None):
    """Median of every bin per channel, and its count of pixels in no-data regions.

    Parameters
    ----------
    data : array (channels, height, width)
        Any backend.

    grid : SampleGrid

    white_level : float
        Pixels at or above it (compared in float32) are saturated and ignored, like zeros.

    stride : int
        The median is taken over every ``stride``-th pixel of every ``stride``-th row of each
        bin (from its corner); the no-data count always covers every pixel.

    launcher : optional
        Runs the ``samples.cu`` kernel instead (:data:`nsg_gpu.kernels.DEVICE`, or the tests'
        host emulation on NumPy buffers); CuPy arrays always use the kernel.

    Returns
    -------
    medians : array (channels, n_rows, n_cols), float64
        Median of the pixels ``0 < v < white_level`` (float32 arithmetic, as
        ``numpy.nanmedian``); NaN where a bin has none.

    nodata : int array (channels, n_rows, n_cols)
        Pixels of the bin in "no data" regions: zeros that survive a 3x3 binary opening of
        the zero mask of the grid's crop.

    Notes
    -----
    The NumPy path is the twin of ``bin_medians_f32``. :func:`bin_medians` gives the same
    medians and validity on the CPU faster, opening only the bins that can fail.
    """
    be = get_backend(data)
    xp, ndi = be.xp, be.ndimage
    s = grid.size
    stride = max(1, int(stride))
    channels = data.shape[0]
    white = np.float32(white_level)
    launcher = launcher or kernels.launcher_for(be.is_gpu)
    if launcher is not None:
        frame = xp.ascontiguousarray(data, dtype=xp.float32)
        medians = xp.empty((channels, grid.n_rows, grid.n_cols), dtype=xp.float64)
        nodata = xp.empty((channels, grid.n_rows, grid.n_cols), dtype=xp.int32)
        config = launcher.config("bin_medians_f32", medians.size)
        launcher(
            "bin_medians_f32",
            config,
            (
                frame,
                channels,
                *data.shape[1:],
                s,
                stride,
                grid.x0,
                grid.y0,
                grid.n_cols,
                grid.n_rows,
                white,
                medians,
                nodata,
            ),
        )
        return medians, nodata
    crop = _crop(data, grid)
    # "No data" regions (registration borders) are what the black-pixel rule is for; scattered
    # zeros (a raw frame clipped at 0) are merely ignored by the median. A 3x3 opening keeps
    # the regions and drops the scattered pixels.
    structure = xp.ones((1, 3, 3), dtype=bool)
    regions = ndi.binary_opening(crop == 0, structure=structure)
    nodata = regions.reshape(channels, grid.n_rows, s, grid.n_cols, s).sum(axis=(2, 4))
    medians = _usable_median(_bin_pixels(crop, grid, stride), white, xp)
    return medians.astype(xp.float64), nodata


def bin_medians(data, grid: SampleGrid, white_level: float, *, stride: int | None = None):
    """Median of every bin per channel, and the bins' validity.

    Parameters
    ----------
    data : array (channels, height, width)
        Any backend (CuPy runs the ``samples.cu`` kernel).

    grid : SampleGrid

    white_level : float
        Pixels at or above it are saturated and ignored, like zeros.

    stride : int, optional
        Take the median over every ``stride``-th pixel of every ``stride``-th row of each
        bin; by default :func:`median_stride` of the bin size. Validity always counts
        every pixel.

    Returns
    -------
    medians : array (channels, n_rows, n_cols), float64
        NaN where a bin has no usable pixel.

    valid : bool array (n_rows, n_cols)
        Fewer than 1 % of the bin's pixels in no-data regions, in every channel.
    """
    be = get_backend(data)
    xp = be.xp
    stride = median_stride(grid.size) if stride is None else max(1, int(stride))
    if kernels.launcher_for(be.is_gpu) is not None:  # the kernel, on the GPU
        medians, nodata = bin_statistics(data, grid, white_level, stride=stride)
        valid = xp.all(nodata < MAX_BLACK_PIXEL_FRACTION * grid.size * grid.size, axis=0)
        return medians, valid
    crop = _crop(data, grid)
    valid = _valid_bins(crop, grid, xp, be.ndimage)
    medians = _usable_median(_bin_pixels(crop, grid, stride), np.float32(white_level), xp)
    return medians.astype(xp.float64), valid


def _crop(data, grid: SampleGrid):
    """The region the bins tile."""
    s = grid.size
    return data[:, grid.y0 : grid.y0 + grid.n_rows * s, grid.x0 : grid.x0 + grid.n_cols * s]


def _bin_pixels(crop, grid: SampleGrid, stride: int):
    """``(channels, n_rows, n_cols, pixels)``: each bin's pixels on its ``stride`` sub-grid."""
    s = grid.size
    channels = crop.shape[0]
    blocks = crop.reshape(channels, grid.n_rows, s, grid.n_cols, s)[:, :, ::stride, :, ::stride]
    return blocks.transpose(0, 1, 3, 2, 4).reshape(channels, grid.n_rows, grid.n_cols, -1)


def _valid_bins(crop, grid: SampleGrid, xp, ndi):
    """NSG's black-pixel rule per bin, over all channels."""
    s = grid.size
    channels = crop.shape[0]
    limit = MAX_BLACK_PIXEL_FRACTION * s * s
    # "No data" regions (registration borders) are what the black-pixel rule is for; scattered
    # zeros (a raw frame clipped at 0) are merely ignored by the median. A 3x3 opening keeps
    # the regions and drops the scattered pixels. The opening only removes zeros, so only
    # bins with at least `limit` zeros before it can fail; it is computed on those bins
    # alone, each with a 2-pixel margin (the reach of a 3x3 opening), which gives the same
    # counts as opening the whole frame.
    raw = (crop == 0).reshape(channels, grid.n_rows, s, grid.n_cols, s).sum(axis=(2, 4))
    candidates = np.argwhere(get_backend(raw).to_host(xp.any(raw >= limit, axis=0)))
    zeros = xp.zeros((grid.n_rows, grid.n_cols), dtype=bool)
    structure = xp.ones((1, 3, 3), dtype=bool)
    height, width = crop.shape[1:]
    for row, col in candidates:
        top, left = row * s, col * s
        y0, x0 = max(0, top - 2), max(0, left - 2)
        window = crop[:, y0 : min(height, top + s + 2), x0 : min(width, left + s + 2)] == 0
        opened = ndi.binary_opening(window, structure=structure)
        inner = opened[:, top - y0 : top - y0 + s, left - x0 : left - x0 + s]
        zeros[row, col] = bool(xp.any(inner.reshape(channels, -1).sum(axis=1) >= limit))
    return ~zeros


def _usable_median(blocks, white_level: float, xp):
    """Median over the last axis of the pixels in ``(0, white_level)``; NaN where none are.

    The same value as ``nanmedian`` with the other pixels set to NaN: rows where every
    pixel is usable take one partition at the middle, the few others are sorted.
    """
    usable = (blocks > 0) & (blocks < white_level)
    count = usable.sum(axis=-1)
    n = blocks.shape[-1]
    out = xp.full(count.shape, xp.nan, dtype=xp.float32)
    if n == 0:
        return out
    full = count == n
    if bool(xp.any(full)):
        rows = blocks[full]
        lower, upper = (n - 1) // 2, n // 2
        # A partition at both middle ranks on the CPU; a sort on the GPU, whose partition
        # takes one rank only.
        part = np.partition(rows, (lower, upper), axis=-1) if xp is np else xp.sort(rows, axis=-1)
        out[full] = 0.5 * (part[:, lower] + part[:, upper])
    partial = (count > 0) & ~full
    if bool(xp.any(partial)):
        values = xp.where(usable[partial], blocks[partial], xp.inf).astype(xp.float32)
        values.sort(axis=-1)
        k = count[partial]
        lower = xp.take_along_axis(values, ((k - 1) // 2)[:, None], axis=-1)[:, 0]
        upper = xp.take_along_axis(values, (k // 2)[:, None], axis=-1)[:, 0]
        out[partial] = 0.5 * (lower + upper)
    return out


def strided_blocks(data, grid: SampleGrid, stride: int):
    """``(channels, n_rows, s', n_cols, s')``: each bin's pixels on its ``stride`` sub-grid
    (a view of the frame, no copy)."""
    s = grid.size
    crop = _crop(data, grid)
    return crop.reshape(crop.shape[0], grid.n_rows, s, grid.n_cols, s)[:, :, ::stride, :, ::stride]


def star_rejection(grid: SampleGrid, x, y, radius) -> np.ndarray:
    """Bins to reject around stars at ``(x, y)`` with circle radii ``radius`` (NSG 7.3).

    Within the window of bins the circle spans, a bin is rejected when it lies in the star's
    bin row or column, or when its centre is closer than ``radius + size / 2``.

    Returns
    -------
    bool ndarray (n_rows, n_cols)
        True for rejected bins.
    """
    rejected = np.zeros((grid.n_rows, grid.n_cols), bool)
    s = grid.size
    cx, cy = grid.centre_x, grid.centre_y

    def key(v, origin, n):
        return int(np.clip(math.floor((v - origin) / s), 0, n - 1))

    for xs, ys, r in zip(np.asarray(x, float), np.asarray(y, float), np.asarray(radius, float)):
        c_lo, c_hi = key(xs - r, grid.x0, grid.n_cols), key(xs + r, grid.x0, grid.n_cols)
        r_lo, r_hi = key(ys - r, grid.y0, grid.n_rows), key(ys + r, grid.y0, grid.n_rows)
        col, row = math.floor((xs - grid.x0) / s), math.floor((ys - grid.y0) / s)
        sub_x = cx[c_lo : c_hi + 1][None, :]
        sub_y = cy[r_lo : r_hi + 1][:, None]
        near = np.hypot(sub_x - xs, sub_y - ys) < r + 0.5 * s
        same_line = (np.arange(r_lo, r_hi + 1)[:, None] == row) | (np.arange(c_lo, c_hi + 1)[None, :] == col)
        rejected[r_lo : r_hi + 1, c_lo : c_hi + 1] |= near | same_line
    return rejected


def trail_rejection(grid: SampleGrid, trails: np.ndarray, reach: float) -> np.ndarray:
    """Bins to reject along trails (``trails`` ``(k, 6)``: each its pieces' stretch of a line,
    :func:`nsg_gpu.stars.trail_lines`): those that come within ``reach`` px of one, across
    its line and along it beyond its ends (a bin's half-extent on either axis is its
    half-diagonal projected there).

    Returns
    -------
    bool ndarray (n_rows, n_cols)
        True for rejected bins.
    """
    from .stars import trail_coordinates

    rejected = np.zeros((grid.n_rows, grid.n_cols), bool)
    cx, cy = np.meshgrid(grid.centre_x, grid.centre_y)
    for trail in np.asarray(trails, np.float64).reshape(-1, 6):
        extent = 0.5 * grid.size * (abs(trail[2]) + abs(trail[3]))
        across, beyond = trail_coordinates(cx, cy, trail)
        rejected |= (across < reach + extent) & (beyond < reach + extent)
    return rejected


@dataclass
class SampleSet:
    """Samples for the spline: positions (px), difference per channel, weight (bins merged)."""

    x: np.ndarray
    y: np.ndarray
    values: np.ndarray  # (channels, n)
    weight: np.ndarray

    def __len__(self) -> int:
        return int(self.x.size)


#: NSG's cap of the spline's nodes at the highest smoothness below a plane's (7.4).
PLANE_RAMP_SAMPLES = 500


def sample_cap(max_samples: int, smoothness: float) -> int | None:
    """NSG's cap on the spline's nodes for a smoothness (7.4): ``max_samples`` up to 0, then
    falling linearly to :data:`PLANE_RAMP_SAMPLES` at 4; None (no binning) at 4 and above,
    where a plane is fitted over every sample."""
    if smoothness >= PLANE_SMOOTHNESS:
        return None
    if smoothness <= 0:
        return int(max_samples)
    share = smoothness / PLANE_SMOOTHNESS
    return max(1, int(round(max_samples + (PLANE_RAMP_SAMPLES - max_samples) * share)))


def bin_samples(samples: SampleSet, grid: SampleGrid, max_samples: int | None) -> SampleSet:
    """Merge samples into super-samples of k x k bins when there are more than ``max_samples``.

    NSG 7.4: with ``f = n / max_samples``, blocks of ``ceil(sqrt(f))`` bins square (2 x 1 when
    ``f <= 2``); a block's node is the mean of its members' positions and differences, with
    weight the member count. If that still exceeds the cap, the cap shrinks once by
    ``cap * cap / n`` and the binning is redone. ``max_samples`` None: no binning.
    """
    n = len(samples)
    if max_samples is None or n <= max_samples:
        return samples
    result = _bin_once(samples, grid, n / max_samples)
    if len(result) > max_samples:
        cap = max_samples * max_samples / len(result)
        result = _bin_once(samples, grid, n / cap)
    return result


def _bin_once(samples: SampleSet, grid: SampleGrid, factor: float) -> SampleSet:
    if factor > 2:
        kx = ky = int(math.ceil(math.sqrt(factor)))
    else:
        kx, ky = 2, 1
    col = np.floor((samples.x - grid.x0) / grid.size).astype(np.int64) // kx
    row = np.floor((samples.y - grid.y0) / grid.size).astype(np.int64) // ky
    key = row * (grid.n_cols // kx + 2) + col
    unique, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)

    def mean(v):
        return np.bincount(inverse, weights=v, minlength=unique.size) / counts

    values = np.stack([mean(v) for v in samples.values])
    return SampleSet(mean(samples.x), mean(samples.y), values, counts.astype(float))
