"""Noise estimates and weights.

Two estimates of a frame's per-pixel noise, both in units of the standard deviation of white
Gaussian noise:

- :func:`ksigma_noise`, PixInsight's k-sigma estimate on the first wavelet layer (the image
  minus its B3-spline smoothing), iteratively clipped at 3 sigma and divided by that layer's
  noise fraction. It is the most robust to stars, and star detection thresholds use it, but
  registration fools it: a frame resampled at a sub-pixel shift by a cubic spline has its
  pixel-scale noise smoothed by a shift-dependent factor (down to 0.69 of it at half a pixel
  in both axes), so a resampled frame reads as cleaner than it is.
- :func:`multiscale_noise`, the noise of the second wavelet layer (scales of 2-4 px) on the
  background: interpolation keeps the noise power at those scales (within 1 % at any shift
  for a cubic spline), so it is what the noise was before registration. Stars, nebula and hot
  pixels are kept out by a multiscale support (pixels where the second or third layer is
  significant, grown by two pixels), gradients by the layers themselves. The weights use it.

Zero ("no data") regions and their neighbours are excluded from both. When both frames carry
NOISExx header cards (measured before registration by the calibration software), NSG prefers
those.

In the flow: the reference's noise is measured once (:mod:`nsg_gpu.reference`), the
target's on its output (:func:`nsg_gpu.pipeline.normalize_frame`), and the weight ends the
pipeline.
"""

from __future__ import annotations

import math
import time

import numpy as np

from . import kernels
from .backend import get_backend

__all__ = [
    "ksigma_noise",
    "multiscale_noise",
    "frame_noise",
    "ksigma_clip",
    "layer_noise",
    "wavelet_layer_rows",
    "noise_row_stride",
    "weight_from_noise",
    "noise_step",
    "UPSCALED_CORRELATIONS",
    "COLOUR_UPSCALED_CORRELATION",
    "COLOUR_UPSCALED_LOBED",
    "UPSCALED_LOBE",
    "B3_LAYER1_FRACTION",
    "B3_LAYER_FRACTIONS",
    "MULTISCALE_BIAS",
    "NOISE_PIXELS",
    "NOISE_BACKGROUND_PIXELS",
]

#: Standard deviation of the first B3-spline a-trous layer of unit white Gaussian noise.
B3_LAYER1_FRACTION = 0.8907
_B3 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
#: Standard deviations of the first three B3-spline a-trous layers of unit white Gaussian noise.
B3_LAYER_FRACTIONS = (0.8907963, 0.2006639, 0.0855075)
#: Pixels where the second or third layer exceeds this many of its noise sigmas are structure.
SUPPORT_SIGMA = 3.0
#: The structure is grown by this many pixels (a square) before the noise is measured.
SUPPORT_GROWTH = 2
#: What :func:`multiscale_noise` reads on unit white Gaussian noise before this correction:
#: the support and the clipping leave out the noise's own largest values (mean of 24 frames of
#: 2000 x 1400 px, each within 0.3 % of it; ``tests/test_noise.py`` checks it).
MULTISCALE_BIAS = 0.9488
#: Pixels :func:`multiscale_noise` measures by default, in bands spread over the frame: the
#: estimate's scatter is about 0.3 % there (0.2 % on twice as many, at twice the cost), far
#: below what a stacking weight needs; ``tests/test_noise.py`` holds the bands to the whole frame.
NOISE_PIXELS = 500_000
#: Background pixels (outside the support) :func:`multiscale_noise` wants under its estimate:
#: where the first sample holds fewer, more bands are measured (``tests/test_noise.py``).
NOISE_BACKGROUND_PIXELS = 200_000
#: ... but at most this many times ``max_pixels`` (0.2-0.4 us a pixel on one CPU core).
NOISE_SAMPLE_GROWTH = 8
#: Lag-1 noise correlations (:func:`nsg_gpu.resampling.noise_correlation`, the smaller of x
#: and y) from which a mono frame is read as upscaled by 2, 3 and 4 (:func:`noise_step`). White
#: noise zoomed by a cubic spline reads 0.52 (x1.5), 0.69 (x2), 0.79 (x2.5), 0.86 (x3), 0.92
#: (x4); linearly, 0.63, 0.76, 0.86, 0.90, 0.94; a registration without upscaling reads at most
#: 0.26 (cubic spline, half a pixel) and 0.50 (linear, half a pixel).
UPSCALED_CORRELATIONS = (0.6, 0.83, 0.91)
#: The same for colour frames, read as upscaled by 2 from here on, by no more: a full-resolution
#: debayer (bilinear) already correlates neighbours by 0.59, 0.64 once registered with a turn
#: by a cubic spline and 0.72 at half a pixel linearly, and read at a step of 2 such a frame's
#: noise follows the Bayer cells' phase (0.92-1.11 at half a pixel); debayered and upscaled by
#: 2 it reads 0.89.
COLOUR_UPSCALED_CORRELATION = 0.75
#: A colour frame of one photosite a pixel (a superpixel debayer) upscaled by 2 with a cubic
#: spline or Lanczos-3 correlates neighbours by only 0.71-0.72, but the kernel's negative lobe,
#: stretched by 2, shows at lag 3 (-0.14 to -0.17): read at a step of 2 where neighbours
#: correlate by this much or more and lag 3 by :data:`UPSCALED_LOBE` or less. A full-resolution
#: debayer, as captured or registered by any interpolation of
#: :data:`nsg_gpu.resampling.INTERPOLATIONS` at a quarter or half a pixel, reads -0.04 to +0.02
#: there (docs/scale-accuracy.md, "Frames a registration upscaled").
COLOUR_UPSCALED_LOBED = 0.65
UPSCALED_LOBE = -0.08
_HALO = 2 * (1 + 2 + 4) + SUPPORT_GROWTH  # rows: the third layer's reach plus the growth
_BAND_ROWS = 64


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
    be = get_backend(values)
    xp = be.xp
    if values.size < 100:
        return 0.0
    if not be.is_gpu:
        return _ksigma_clip_host(values, iterations)
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


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    """``values.mean()`` and ``values.std()`` to the bit, from one sum: NumPy's own steps
    (pairwise sum over the count; the deviations squared in place and summed)."""
    n = np.intp(values.size)  # as NumPy counts: float32 sums are divided in double, then rounded
    kind = values.dtype.type
    mean = kind(np.add.reduce(values) / n)
    deviation = np.subtract(values, mean)
    np.multiply(deviation, deviation, out=deviation)
    return float(mean), float(np.sqrt(kind(np.add.reduce(deviation) / n)))


def _ksigma_clip_host(values: np.ndarray, iterations: int) -> float:
    """:func:`ksigma_clip` on the host, to the bit, with its work arrays reused."""
    sigma = float(values.std())
    centre = 0.0
    distance = np.empty_like(values)
    inside = np.empty(values.shape, dtype=bool)
    for _ in range(iterations):
        np.subtract(values, centre, out=distance)
        np.abs(distance, out=distance)
        np.less(distance, 3 * sigma, out=inside)
        kept = values[inside]
        if kept.size < 100:
            break
        centre, new_sigma = _mean_std(kept)
        if abs(new_sigma - sigma) <= 1e-6 * sigma:
            sigma = new_sigma
            break
        sigma = new_sigma
    return sigma


def layer_noise(layer, valid, *, iterations: int = 10) -> float:
    """The image noise from its first wavelet layer's valid pixels (k-sigma, scaled)."""
    return ksigma_clip(layer[valid], iterations=iterations) / B3_LAYER1_FRACTION


#: Pixels (a regular subsample of rows) behind a detection image's noise in the scale stage
#: and the reference's star strengths. That noise only sets thresholds (a star's peak against
#: 5 or 20 sigma), and half a million pixels give it to about 0.1 %; the whole frame's rows
#: would cost ten times more.
DETECT_NOISE_PIXELS = 500_000


def ksigma_noise(image, *, max_pixels: int = 4_000_000, iterations: int = 10) -> float:
    """k-sigma noise of a 2-D image (any backend); 0 pixels mean no data.

    ``max_pixels`` caps the pixels used (a regular subsample of rows), so the cost stays
    small on large frames. CuPy arrays run the ``noise_layer_f32`` kernel.
    """
    h, w = image.shape
    layer, valid = wavelet_layer_rows(image, noise_row_stride(h, w, max_pixels))
    return layer_noise(layer, valid, iterations=iterations)


def _atrous_smooth(block, step: int, xp, ndi):
    """The B3-spline smoothing at ``step`` (holes of ``step - 1`` pixels), mirrored edges
    (SciPy's "reflect": the edge pixel repeated)."""
    kernel = np.zeros(4 * step + 1)
    kernel[::step] = _B3
    kernel = xp.asarray(kernel)
    out = ndi.correlate1d(block, kernel, axis=0, mode="reflect")
    return ndi.correlate1d(out, kernel, axis=1, mode="reflect")


def _grow(mask, size: int, ndi, *, outside: int):
    """Binary dilation of ``mask`` by a ``size`` x ``size`` square; ``outside`` beyond the edges.
    A float array (``outside`` 0) gets the window's maximum instead."""
    if mask.dtype != bool:
        grown = ndi.maximum_filter1d(mask, size, axis=0, mode="nearest")
        return ndi.maximum_filter1d(grown, size, axis=1, mode="constant", cval=outside)
    grown = ndi.maximum_filter1d(mask.view("uint8"), size, axis=0, mode="nearest")
    return ndi.maximum_filter1d(grown, size, axis=1, mode="constant", cval=outside).astype(bool)


def _shrink(mask, size: int, ndi):
    """Binary erosion of ``mask`` by a ``size`` x ``size`` square (edges extended)."""
    shrunk = ndi.minimum_filter1d(mask.view("uint8"), size, axis=0, mode="nearest")
    return ndi.minimum_filter1d(shrunk, size, axis=1, mode="nearest").astype(bool)


def _band_rows(height: int, width: int, max_pixels: int) -> int:
    """Rows that :func:`_multiscale_bands` measures for ``max_pixels`` (all where ``height``)."""
    return min(height, max(_BAND_ROWS, max_pixels // max(width, 1)))


def _multiscale_bands(image, max_pixels: int):
    """Second and third wavelet layers and validity on bands of rows, at most ``max_pixels``.

    Returns, per band, the two layers on the band's rows plus ``SUPPORT_GROWTH`` rows either
    side (float64), and the validity of the band's own rows: the 13 x 13 window of the second
    layer lies in the image and holds no pixel of a no-data region (zeros that survive a 3x3
    opening, grown by a pixel; scattered zeros of a raw frame clipped at 0 are data).
    """
    be = get_backend(image)
    xp, ndi = be.xp, be.ndimage
    h, w = image.shape
    rows = _band_rows(h, w, max_pixels)
    if rows >= h:
        starts, height = [0], h
    else:
        # Each band at the centre of one of ``count`` equal strips: never the frame's first
        # and last rows, where a registered frame's borders (no data) and vignetting are.
        height = _BAND_ROWS
        count = -(-rows // height)
        centres = (np.arange(count) + 0.5) * h / count
        starts = np.unique(np.clip(np.rint(centres - height / 2), 0, h - height).astype(int)).tolist()
    bands = []
    for start in starts:
        source = np.arange(start - _HALO, start + height + _HALO)
        folded = np.mod(source, 2 * h)
        mirrored = np.where(folded >= h, 2 * h - 1 - folded, folded)
        block = image[xp.asarray(mirrored)].astype(xp.float64)
        smooth1 = _atrous_smooth(block, 1, xp, ndi)
        smooth2 = _atrous_smooth(smooth1, 2, xp, ndi)
        smooth3 = _atrous_smooth(smooth2, 4, xp, ndi)
        keep = slice(_HALO - SUPPORT_GROWTH, _HALO + height + SUPPORT_GROWTH)
        layer2 = (smooth1 - smooth2)[keep]
        layer3 = (smooth2 - smooth3)[keep]
        zero = block == 0
        regions = _grow(_shrink(zero, 3, ndi), 5, ndi, outside=0)
        regions[xp.asarray((source < 0) | (source >= h))] = True
        valid = ~_grow(regions, 13, ndi, outside=1)[_HALO : _HALO + height]
        bands.append((layer2, layer3, valid))
    return bands


def noise_step(correlation, *, colour: bool = False) -> int:
    """The pixel step at which :func:`multiscale_noise` reads a frame whose noise correlations
    are ``correlation`` (:func:`nsg_gpu.resampling.noise_correlation`, ``(2, lags)``): 1, or
    the factor by which a registration upscaled it (2-4 on mono frames,
    :data:`UPSCALED_CORRELATIONS`; 2 on ``colour`` ones, :data:`COLOUR_UPSCALED_CORRELATION`).

    An upscaling by k (Siril's or a drizzle's grid) stretches the registration's kernel by k,
    so the second wavelet layer's scales of 2-4 px are 1-2 of the capture's, where the
    kernel's smoothing follows each frame's sub-pixel shift again; read every k-th pixel, the
    layer is back at 2-4 of the capture's pixels. Every frame of a run is read at the
    reference's step, so that a weight compares like with like.
    """
    if correlation is None:
        return 1
    lag1 = np.asarray(correlation, float)[:, 0]
    if not np.all(np.isfinite(lag1)):
        return 1
    least = float(lag1.min())
    if colour:
        lag3 = np.asarray(correlation, float)[:, 2]
        lobed = least >= COLOUR_UPSCALED_LOBED and float(lag3.max()) <= UPSCALED_LOBE
        return 2 if least >= COLOUR_UPSCALED_CORRELATION or lobed else 1
    return 1 + int(np.count_nonzero(least >= np.asarray(UPSCALED_CORRELATIONS)))


def multiscale_noise(
    image,
    *,
    max_pixels: int = NOISE_PIXELS,
    min_background: int = NOISE_BACKGROUND_PIXELS,
    iterations: int = 20,
    step: int = 1,
) -> float:
    """Per-pixel noise of a 2-D image before any resampling, from its second wavelet layer.

    Parameters
    ----------
    image : array (height, width)
        Any backend; 0 means no data (regions of zeros; scattered zeros are data).

    max_pixels : int
        This many pixels are measured first, in evenly spaced bands of 64 rows, so the cost
        stays small on large frames.

    min_background : int
        Where fewer of those pixels than this are background (a crowded field, a nebula
        filling the frame), the estimate is made again on as many more bands as should hold
        this many, up to the whole frame or :data:`NOISE_SAMPLE_GROWTH` times ``max_pixels``.

    iterations : int
        Rounds of support and clipping at most (they usually settle in 5-10).

    step : int
        Read every ``step``-th pixel of every ``step``-th row: the step of a frame upscaled by
        its registration (:func:`noise_step`); ``max_pixels`` counts the pixels read.

    Returns
    -------
    float
        The standard deviation of white Gaussian noise that gives the background's second
        wavelet layer; 0 when the image has fewer than 100 valid pixels (where the support
        would leave fewer, the estimate of the round before stands).

    Notes
    -----
    The second a-trous layer (the first B3 smoothing minus the second) passes spatial
    frequencies of about 1/16-1/4 per pixel, where a cubic-spline interpolation at any
    sub-pixel shift keeps the noise's power to within 1 %, where a first-layer estimate loses
    up to 31 % of it. For white noise the result is the per-pixel sigma (to the scatter of the
    estimate, 0.1-0.3 % on a megapixel). Structure is kept out by the multiscale support:
    pixels where the second or third layer exceeds ``SUPPORT_SIGMA`` of its noise fraction of
    the current estimate, grown by ``SUPPORT_GROWTH`` pixels; the rest is clipped at 3 sigma,
    and support and estimate alternate until the estimate settles. The division by
    :data:`MULTISCALE_BIAS` undoes what support and clipping take from pure noise. Every
    computation is in float64 on the image's backend; only scalars come back to the host.

    The estimate's scatter goes with the background pixels it rests on, not with the pixels
    sampled: on a crowded field (one star per 110 px) the support leaves 8 % of them, and
    500 000 sampled pixels read the noise to 0.7-1.2 %, which the weight doubles and a
    target's ratio to the reference compounds (NWEIGHT 8-9 % off on such targets;
    docs/scale-accuracy.md, "Where the noise is read").
    """
    if step > 1:
        image = image[::step, ::step]
    h, w = image.shape
    sigma, background = _settled_noise(_multiscale_bands(image, max_pixels), iterations)
    if _band_rows(h, w, max_pixels) < h and 0 < background < min_background:
        wanted = int(math.ceil(max_pixels * min_background / background))
        wanted = min(wanted, NOISE_SAMPLE_GROWTH * max_pixels, h * w)
        sigma, _ = _settled_noise(_multiscale_bands(image, wanted), iterations)
    return float(sigma / MULTISCALE_BIAS)


def _settled_noise(bands, iterations: int) -> tuple[float, int]:
    """:func:`multiscale_noise`'s support and clipping on its bands: the second layer's
    settled sigma (before :data:`MULTISCALE_BIAS`) and the background pixels it rests on."""
    be = get_backend(bands[0][0])
    xp = be.xp
    f2, f3 = B3_LAYER_FRACTIONS[1], B3_LAYER_FRACTIONS[2]
    g = SUPPORT_GROWTH
    # A pixel is left out when its window of 2g + 1 px holds a layer value beyond
    # SUPPORT_SIGMA of its noise: the grown support of an estimate sigma is where the window's
    # largest ratio |layer| / (SUPPORT_SIGMA * fraction) exceeds sigma. That maximum does not
    # depend on sigma, so it is computed once and each round only compares it.
    layer2, level = [], []
    for band2, band3, valid in bands:
        ratio = xp.maximum(xp.abs(band2) / (SUPPORT_SIGMA * f2), xp.abs(band3) / (SUPPORT_SIGMA * f3))
        grown = _grow(ratio, 2 * g + 1, be.ndimage, outside=0)[g:-g]
        layer2.append(band2[g:-g][valid])
        level.append(grown[valid])
    layer2, level = xp.concatenate(layer2), xp.concatenate(level)
    sigma = ksigma_clip(layer2) / f2
    if not sigma > 0:
        return 0.0, 0
    for _ in range(iterations):
        new = ksigma_clip(layer2[level <= sigma]) / f2
        if not new > 0:
            break
        settled = abs(new - sigma) <= 1e-4 * sigma
        sigma = new
        if settled:
            break
    return sigma, int((level <= sigma).sum())


def frame_noise(data, *, max_pixels: int = NOISE_PIXELS, step: int = 1, timings: dict | None = None) -> np.ndarray:
    """:func:`multiscale_noise` of every channel of ``data`` (channels, height, width), read at
    ``step`` (:func:`noise_step`).

    ``timings``, when given, gains the seconds spent under ``noise``.
    """
    started = time.perf_counter()
    noise = np.array([multiscale_noise(data[c], max_pixels=max_pixels, step=step) for c in range(data.shape[0])])
    if timings is not None:
        timings["noise"] = timings.get("noise", 0.0) + time.perf_counter() - started
    return noise


def weight_from_noise(reference_noise, target_noise, scale=None) -> tuple[np.ndarray, float]:
    """Per-channel SNR ``sigma_R / (sigma_T * m)`` and the weight, the mean of SNR squared over
    the channels where both noises are known (above 0; NSG 9.1): a channel without one has SNR
    0 and takes no part in the weight (0 where no channel has both).

    With ``scale`` None the target noise is taken as already in reference units (measured on
    the normalized frame), as in NSG's fallback path.
    """
    reference_noise = np.asarray(reference_noise, float)
    target_noise = np.asarray(target_noise, float)
    m = np.ones_like(target_noise) if scale is None else np.asarray(scale, float)
    denominator = target_noise * m
    valid = (denominator > 0) & (reference_noise > 0)
    snr = np.where(valid, reference_noise / np.where(valid, denominator, 1), 0.0)
    return snr, float(np.mean(snr[valid] ** 2)) if valid.any() else 0.0
