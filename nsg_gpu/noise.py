"""Noise estimates and weights.

The noise of a frame is PixInsight's k-sigma estimate on the first wavelet layer: the image
minus its B3-spline smoothing (the first a-trous scale), iteratively clipped at 3 sigma and
divided by that layer's noise fraction for white Gaussian noise. Zero ("no data") pixels and
their neighbours are excluded. When both frames carry NOISExx header cards (measured before
registration by the calibration software), NSG prefers those.
"""

from __future__ import annotations

import numpy as np

from .backend import get_backend

__all__ = ["ksigma_noise", "weight_from_noise", "B3_LAYER1_FRACTION"]

#: Standard deviation of the first B3-spline a-trous layer of unit white Gaussian noise.
B3_LAYER1_FRACTION = 0.8907
_B3 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def ksigma_noise(image, *, max_pixels: int = 4_000_000, iterations: int = 10) -> float:
    """k-sigma noise of a 2-D image (any backend); 0 pixels mean no data.

    ``max_pixels`` caps the pixels used (a regular subsample of rows), so the cost stays
    small on large frames.
    """
    be = get_backend(image)
    xp, ndi = be.xp, be.ndimage
    h, w = image.shape
    stride = max(1, int(np.ceil(h * w / max_pixels)))
    rows = np.arange(0, h, stride)
    kernel = xp.asarray(_B3, dtype=xp.float32)
    # Only the kept rows of the layer and of the mask are computed, each from its 5 source
    # rows: smoothing is separable, so the vertical pass is a weighted sum of 5 row sets
    # (rows past the edge mirrored as mode="reflect" does) and the horizontal pass runs on
    # the kept rows alone. The same numbers as smoothing the whole image, at 1/stride of
    # the cost.
    img = image.astype(xp.float32, copy=False)
    vertical = None
    inside = None
    for k, offset in enumerate(range(-2, 3)):
        source = rows + offset
        mirrored = np.where(source < 0, -source - 1, np.where(source >= h, 2 * h - source - 1, source))
        block = img[xp.asarray(np.clip(mirrored, 0, h - 1))]
        term = block * kernel[k]
        vertical = term if vertical is None else vertical + term
        # The mask: a 5x5 erosion of "has data" with no data beyond the image's edges.
        positive = block > 0
        positive[xp.asarray((source < 0) | (source >= h))] = False
        inside = positive if inside is None else inside & positive
    smooth = ndi.convolve1d(vertical, kernel, axis=1, mode="reflect")
    layer = img[xp.asarray(rows)] - smooth
    valid = ndi.binary_erosion(inside, structure=xp.ones((1, 5), bool), border_value=0)
    values = layer[valid]
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
    return sigma / B3_LAYER1_FRACTION


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
