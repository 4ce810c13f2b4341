"""Noise estimates and weights.

The noise of a frame is PixInsight's k-sigma estimate on the first wavelet layer: the image
minus its B3-spline smoothing (the first a-trous scale), iteratively clipped at 3 sigma and
divided by that layer's noise fraction for white Gaussian noise. Zero ("no data") pixels and
their neighbours are excluded. When both frames carry NOISExx header cards (measured before
registration by the calibration software), NSG prefers those.

In the flow: the reference's noise is measured once (:mod:`nsg_gpu.reference`), the
target's on its output (:mod:`nsg_gpu.apply`), and the weight ends the pipeline
(:mod:`nsg_gpu.pipeline`).
"""

from __future__ import annotations

import numpy as np

from . import kernels
from .backend import get_backend

__all__ = [
    "ksigma_noise",
    "ksigma_clip",
    "layer_noise",
    "wavelet_layer_rows",
    "noise_row_stride",
    "weight_from_noise",
    "B3_LAYER1_FRACTION",
]

#: Standard deviation of the first B3-spline a-trous layer of unit white Gaussian noise.
B3_LAYER1_FRACTION = 0.8907
_B3 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def noise_row_stride(height: int, width: int, max_pixels: int) -> int:
    """Every how many rows the noise is sampled so that at most ``max_pixels`` are used."""
    return max(1, int(np.ceil(height * width / max_pixels)))


def wavelet_layer_rows(image, row_stride: int, *, launcher=None):
    """The first B3-spline a-trous layer on every ``row_stride``-th row, and its validity.

    Parameters
    ----------
    image : array (height, width)
        Any backend; 0 means no data.

    row_stride : int
        Rows ``0, row_stride, 2 row_stride, ...`` are returned.

    launcher : optional
        Runs the ``noise_layer_f32`` kernel instead (:data:`nsg_gpu.kernels.DEVICE`, or the
        tests' host emulation); CuPy arrays always use the kernel.

    Returns
    -------
    layer : float32 array (rows, width)
        ``image - smooth(image)``, smooth being the separable B3 spline with SciPy's
        "reflect" boundary, each pass in double rounded to float32.

    valid : bool array (rows, width)
        The 5x5 window around the pixel lies in the image and holds no 0.

    Notes
    -----
    The NumPy path is the twin of ``noise_layer_f32`` and, applied to ``m*T - G``, of the
    layer that ``apply_gradient_f32`` writes.
    """
    be = get_backend(image)
    xp, ndi = be.xp, be.ndimage
    h, w = image.shape
    launcher = launcher or kernels.launcher_for(be.is_gpu)
    if launcher is not None:
        source = xp.ascontiguousarray(image, dtype=xp.float32)
        rows = -(-h // row_stride)
        layer = xp.empty((rows, w), dtype=xp.float32)
        valid = xp.empty((rows, w), dtype=xp.uint8)
        config = launcher.config("noise_layer_f32", rows * w)
        launcher("noise_layer_f32", config, (source, h, w, row_stride, layer, valid))
        return layer, valid.view(bool)
    # Only the kept rows are computed, each from its 5 source rows (mirrored past the edges
    # as mode="reflect" does): the horizontal pass runs on those rows, and the vertical pass
    # is SciPy's own 5-tap convolution of the stacked source rows, read at the middle one.
    # The same bits as smoothing the whole image, at about 5/row_stride of the cost.
    rows = np.arange(0, h, row_stride)
    offsets = np.arange(-2, 3)[:, None]
    source = rows[None, :] + offsets  # (5, rows)
    folded = np.mod(source, 2 * h)
    mirrored = np.where(folded >= h, 2 * h - 1 - folded, folded)
    img = image.astype(xp.float32, copy=False)
    block = img[xp.asarray(mirrored.ravel())].reshape(5, rows.size, w)
    kernel = xp.asarray(_B3, dtype=xp.float32)
    horizontal = ndi.convolve1d(block, kernel, axis=2, mode="reflect")
    smooth = ndi.convolve1d(horizontal, kernel, axis=0, mode="reflect")[2]
    layer = block[2] - smooth
    # Valid: a 5x5 erosion of "has data", with no data beyond the image's edges.
    inside = block > 0
    inside[xp.asarray((source < 0) | (source >= h))] = False
    valid = ndi.binary_erosion(inside.all(axis=0), structure=xp.ones((1, 5), bool), border_value=0)
    return layer, valid


def ksigma_clip(values, *, iterations: int = 10) -> float:
    """Standard deviation of ``values`` (1-D, any backend) after iterative 3-sigma clipping.

    0 with fewer than 100 values.
    """
    xp = get_backend(values).xp
    if values.size < 100:
        return 0.0
    sigma = float(values.std())
    centre = 0.0
    for _ in range(iterations):
        kept = values[xp.abs(values - centre) < 3 * sigma]
        if kept.size < 100:
            break
        new_sigma = float(kept.std())
        centre = float(kept.mean())
        if abs(new_sigma - sigma) <= 1e-6 * sigma:
            sigma = new_sigma
            break
        sigma = new_sigma
    return sigma


def layer_noise(layer, valid, *, iterations: int = 10) -> float:
    """The image noise from its first wavelet layer's valid pixels (k-sigma, scaled)."""
    return ksigma_clip(layer[valid], iterations=iterations) / B3_LAYER1_FRACTION


def ksigma_noise(image, *, max_pixels: int = 4_000_000, iterations: int = 10) -> float:
    """k-sigma noise of a 2-D image (any backend); 0 pixels mean no data.

    ``max_pixels`` caps the pixels used (a regular subsample of rows), so the cost stays
    small on large frames. CuPy arrays run the ``noise_layer_f32`` kernel.
    """
    h, w = image.shape
    layer, valid = wavelet_layer_rows(image, noise_row_stride(h, w, max_pixels))
    return layer_noise(layer, valid, iterations=iterations)


def weight_from_noise(reference_noise, target_noise, scale=None) -> tuple[np.ndarray, float]:
    """Per-channel SNR ``sigma_R / (sigma_T * m)`` and the weight, the mean of SNR squared.

    With ``scale`` None the target noise is taken as already in reference units (measured on
    the normalized frame), as in NSG's fallback path.
    """
    reference_noise = np.asarray(reference_noise, float)
    target_noise = np.asarray(target_noise, float)
    m = np.ones_like(target_noise) if scale is None else np.asarray(scale, float)
    denominator = target_noise * m
    snr = np.where(denominator > 0, reference_noise / np.where(denominator > 0, denominator, 1), 0.0)
    return snr, float(np.mean(snr**2))
