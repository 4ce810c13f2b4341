"""A small stretched picture of the reference, drawn behind the sample grid of the plots.

Made once per run from the prepared reference (:mod:`nsg_gpu.reference`) when plots or the
report are asked for (:mod:`nsg_gpu.run`), and drawn by :mod:`nsg_gpu.diagnostics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .backend import get_backend

__all__ = ["ReferencePreview", "reference_preview", "PREVIEW_WIDTH", "PREVIEW_BACKGROUND"]

#: Widest (px) the reference is drawn behind the sample grid; it is block-averaged to fit.
PREVIEW_WIDTH = 800
#: Display level of the reference's background after the stretch (PixInsight's auto STF value).
PREVIEW_BACKGROUND = 0.25
#: Shadows are clipped this many normalized MADs below the background (auto STF's value).
PREVIEW_SHADOWS_CLIP = 2.8


@dataclass
class ReferencePreview:
    """The reference as the plots draw it: block-averaged, mean over channels, stretched."""

    image: np.ndarray  # (rows, cols) uint8 on the host, 0 where the reference has no data
    step: int  # reference pixels per preview pixel, along both axes

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """Where the preview lies in reference pixels, as matplotlib's ``imshow`` takes it."""
        rows, cols = self.image.shape
        return (0.0, float(cols * self.step), float(rows * self.step), 0.0)


def reference_preview(reference, *, width: int = PREVIEW_WIDTH) -> ReferencePreview:
    """A small stretched image of the prepared reference, for drawing the sample grid on.

    Made once per run: the mean over channels of ``step`` x ``step`` blocks, ``step`` the
    smallest that leaves at most ``width`` columns, then stretched as PixInsight's automatic
    screen transfer function does (shadows clipped 2.8 normalized MADs below the median, the
    median brought to 0.25 by a midtones transfer).

    Parameters
    ----------
    reference : Reference
        From :func:`nsg_gpu.reference.prepare_reference`.

    width : int
        Most columns of the preview.

    Returns
    -------
    ReferencePreview

    Notes
    -----
    The blocks are summed on the reference's backend; only the preview (a few hundred kB of
    ``uint8``) comes to the host.
    """
    data = reference.frame.data
    backend = get_backend(data)
    channels, height, frame_width = data.shape
    step = max(1, min(math.ceil(frame_width / width), height))
    rows, cols = height // step, frame_width // step
    blocks = data[:, : rows * step, : cols * step].reshape(channels, rows, step, cols, step)
    total = backend.to_host(blocks.sum(axis=(0, 2, 4), dtype=backend.xp.float64))
    return ReferencePreview(_stretch(total / (channels * step * step)), step)


def _midtones(balance: float, x):
    """PixInsight's midtones transfer function: 0 to 0, 1 to 1, ``balance`` to 0.5."""
    return (balance - 1) * x / ((2 * balance - 1) * x - balance)


def _stretch(image: np.ndarray) -> np.ndarray:
    """``image`` (no data at 0) to uint8, background at :data:`PREVIEW_BACKGROUND`."""
    out = np.zeros(image.shape, np.uint8)
    valid = np.isfinite(image) & (image > 0)
    if not valid.any():
        return out
    values = image[valid] / image[valid].max()
    median = float(np.median(values))
    mad = 1.4826 * float(np.median(np.abs(values - median)))
    shadows = max(0.0, median - PREVIEW_SHADOWS_CLIP * mad)
    if shadows >= 1.0:
        return out
    x = np.clip((values - shadows) / (1.0 - shadows), 0.0, 1.0)
    background = (median - shadows) / (1.0 - shadows)
    if 0.0 < background < 1.0:
        x = _midtones(_midtones(PREVIEW_BACKGROUND, background), x)
    out[valid] = np.round(255 * x).astype(np.uint8)
    return out
