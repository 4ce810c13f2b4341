"""Stamps: square cut-outs of an image around star positions.

Every stage that looks at stars takes its pixels here: detection's centroids and FWHM, the
scale stage's recentring and registration check, the photometry's cutouts and the PSF fits.
One rule holds at the image edge: a pixel outside the image reads 0, which every stage
already treats as "no data". Positions are rounded to the nearest pixel; the stamps come
back on the backend of the image, and only the callers decide what crosses to the host.
"""

from __future__ import annotations

import math

import numpy as np

from .backend import get_backend

__all__ = ["gather_stamps", "stamp_peaks", "channel_peaks", "peak_contrast", "local_level"]


def gather_stamps(image, x, y, half: int):
    """Cutouts of side ``2*half + 1`` centred on the pixels nearest to ``(x, y)``.

    Parameters
    ----------
    image : array (height, width) or (channels, height, width)
        Any backend.

    x, y : array-like (n,)
        Positions in pixels (host or backend arrays); rounded to the nearest pixel.

    half : int
        Half the side of the stamps.

    Returns
    -------
    array (n, s, s), or (channels, n, s, s) for a 3-D image
        On the backend of ``image``; pixels outside the image are 0.
    """
    be = get_backend(image)
    xp = be.xp
    h, w = image.shape[-2:]
    xi = xp.rint(be.asarray(x)).astype(xp.int64)
    yi = xp.rint(be.asarray(y)).astype(xp.int64)
    if not be.is_gpu:
        return _gather_windows(image, xi, yi, half)
    return _gather_pixels(image, xi, yi, half)


def _gather_pixels(image, xi, yi, half: int):
    """:func:`gather_stamps` pixel by pixel (one fancy index per pixel, clipped at the
    edges): any backend, and the specification of :func:`_gather_windows`."""
    xp = get_backend(image).xp
    h, w = image.shape[-2:]
    off = xp.arange(-half, half + 1)
    rows = yi[:, None, None] + off[None, :, None]
    cols = xi[:, None, None] + off[None, None, :]
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    rows = xp.clip(rows, 0, h - 1)
    cols = xp.clip(cols, 0, w - 1)
    if image.ndim == 2:
        return xp.where(inside, image[rows, cols], 0)
    return xp.where(inside[None], image[:, rows, cols], 0)


def _gather_windows(image: np.ndarray, xi: np.ndarray, yi: np.ndarray, half: int) -> np.ndarray:
    """:func:`gather_stamps` on the host: the stamps that lie inside the image are copied as
    whole windows (rows of contiguous pixels), the others pixel by pixel."""
    from numpy.lib.stride_tricks import sliding_window_view

    h, w = image.shape[-2:]
    side = 2 * half + 1
    out = np.zeros(image.shape[:-2] + (xi.size, side, side), dtype=image.dtype)
    inside = (yi >= half) & (yi < h - half) & (xi >= half) & (xi < w - half)
    whole = np.flatnonzero(inside)
    if whole.size:
        windows = sliding_window_view(image, (side, side), axis=(-2, -1))
        out[..., whole, :, :] = windows[..., yi[whole] - half, xi[whole] - half, :, :]
    edge = np.flatnonzero(~inside)
    if edge.size:
        out[..., edge, :, :] = _gather_pixels(image, xi[edge], yi[edge], half)
    return out


def stamp_peaks(image, x, y, half: int = 1) -> np.ndarray:
    """The brightest pixel within ``half`` px of each position, on the host (0 off the image)."""
    be = get_backend(image)
    return be.to_host(gather_stamps(image, x, y, half).max(axis=(-2, -1)))


def channel_peaks(data, x, y, half: int = 1) -> np.ndarray:
    """:func:`stamp_peaks` of the brightest channel, ``data.max(axis=0)``, without forming it:
    the maximum over the channels of each channel's stamps, on the host."""
    peaks = stamp_peaks(data, x, y, half)
    return peaks.max(axis=0) if peaks.ndim == 2 else peaks


def peak_contrast(image, x, y, fwhm: float) -> np.ndarray:
    """The brightest pixel within 1 px of each position less the local level around it
    (:func:`local_level` on a window of ``max(6, 3 FWHM)`` px either side), on the host: what
    a star stands out of its surroundings, the same measure in the reference and a target."""
    return stamp_peaks(image, x, y) - local_level(image, x, y, max(6, int(math.ceil(3 * fwhm))))


def local_level(image, x, y, half: int) -> np.ndarray:
    """Median of the border of the ``2*half + 1`` window around each position: the local
    background, on the host."""
    be = get_backend(image)
    stamps = be.to_host(gather_stamps(image, x, y, half))
    border = np.concatenate([stamps[:, 0, :], stamps[:, -1, :], stamps[:, :, 0], stamps[:, :, -1]], axis=1)
    return np.median(border, axis=1)
