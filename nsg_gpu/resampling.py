"""What a registration's interpolation did to a frame, read from its noise.

A target registered onto the reference's grid at a sub-pixel offset has every pixel made of
the captured pixels around it, weighted by the interpolation kernel at that offset (a cubic
spline, Lanczos, bicubic: whatever the registration used). Its stars are convolved with that
kernel, which no Moffat is: for stars of 1.5-2.5 px a Moffat fitted to them misses the share
of the light the photometry's weights keep by 0.5-2.4 % (docs/scale-accuracy.md). The noise
was white before and went through the same kernel, so the noise's autocorrelation along each
axis is the kernel's. :func:`interpolation_kernel` finds the interpolation (spline, bicubic,
Lanczos, linear) and the sub-pixel shift along each axis whose correlations these are
(:func:`matched_kernel`): a kernel with the shift's phase, which moves each star's core
off-centre as the registration did; a zero-phase kernel of the same magnitude misread the
cores of stars of 1.5-2.5 px by a few hundredths in the PSF's index, worth up to 1.6 % of
scale (docs/scale-accuracy.md). The noise cannot tell a shift from its mirror: the target's
PSF fit chooses (:mod:`nsg_gpu.psf`), and the photometry's kept share does not depend on it.
Where no interpolation at one shift matches (a frame rotated by more than a degree or two,
whose shift varies across it), the zero-phase kernel of the noise's spectrum is taken. The
PSF model of the frame is convolved with the kernel (:mod:`nsg_gpu.psf`).

The autocorrelation at lag ``l`` comes from the robust variance of pixel differences at that
lag, ``D(l) = 2 sigma^2 (1 - rho(l))``, against the differences at lags where an interpolation
kernel no longer correlates the noise, on the frame high-passed across the axis (which takes
out smooth sky and nebula and keeps the noise's correlation along the axis): stars, hot
pixels and no-data pixels do not move a median. A frame that was not
resampled has no correlation beyond the estimate's error, and no kernel.

A crowded field's unresolved stars correlate its pixels too, with the PSF's autocorrelation
(:func:`sky_correlation`): read alone, a resampled crowded frame matches no interpolation, and
:func:`matched_kernel` can match one beside a share of the sky's.

In the flow: the scale stage (:mod:`nsg_gpu.scale`) reads each frame's kernel before its PSF
fit; the reference's is read once (:mod:`nsg_gpu.reference`), and a target's above 2.5 px
against what the reference's noise holds beyond its own kernel
(:func:`registration_kernel`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .backend import get_backend

__all__ = [
    "InterpolationKernel",
    "interpolation_kernel",
    "interpolation_taps",
    "matched_kernel",
    "own_kernel",
    "noise_correlation",
    "correlation_kernel",
    "registration_kernel",
    "kernel_correlations",
    "sky_correlation",
    "smoothed",
    "INTERPOLATIONS",
    "MIN_CORRELATION",
]

#: Lags at which the noise's correlation is read (interpolation kernels of 4-8 taps correlate
#: neighbours up to 3 px apart, with little beyond 2), and the lags taken as uncorrelated.
CORRELATION_LAGS = (1, 2, 3)
UNCORRELATED_LAGS = (6, 7)
#: A frame whose neighbouring pixels' noise correlates by less than this along both axes has
#: no kernel: white noise of 400 000 pixels reads within about 0.01, a cubic spline's shift
#: of 0.1 px gives 0.022.
MIN_CORRELATION = 0.02
#: Pixels read: bands of rows across the frame.
KERNEL_PIXELS = 400_000
BAND_ROWS = 16
#: Half-width of the kernel's taps: the zero-phase kernel's, and a matched interpolation's (a
#: spline's taps reach further; cut at 5 px they differ from SciPy's shift by 0.003 of a
#: pixel's value at most; the fits' cost grows with the taps).
KERNEL_HALF = 4
MATCHED_HALF = 5


@dataclass(frozen=True)
class InterpolationKernel:
    """A separable kernel: taps at integer offsets ``-h..h`` along x and y, each of unit sum.

    A registered pixel ``p`` is ``sum_a x[a] * captured(p + a)`` along x (likewise y). The
    taps' centroid (:attr:`centre`) is the sub-pixel offset at which the camera saw the
    reference's pixel: a star the registration put at ``x0`` was captured at ``x0 +
    centre``. ``name``: the interpolation it was matched to, or ``"zero-phase"``.
    """

    x: tuple[float, ...]
    y: tuple[float, ...]
    name: str = "zero-phase"

    @property
    def half(self) -> int:
        return len(self.x) // 2

    @property
    def centre(self) -> tuple[float, float]:
        """The taps' centroids along x and y (0 for a zero-phase kernel)."""
        if self.symmetric:
            return 0.0, 0.0
        offsets = np.arange(-self.half, self.half + 1)
        return float(np.dot(offsets, self.x)), float(np.dot(offsets, self.y))

    @property
    def symmetric(self) -> bool:
        return self.x == self.x[::-1] and self.y == self.y[::-1]

    def noise_gain(self) -> float:
        """What the kernel leaves of white noise's standard deviation."""
        return math.sqrt(sum(v * v for v in self.x) * sum(v * v for v in self.y))


def _bands(data, max_pixels: int) -> list[np.ndarray]:
    """Bands of :data:`BAND_ROWS` rows spread over the frame, the channels' mean, on the
    host; no-data pixels (0 in any channel) as NaN."""
    be = get_backend(data)
    _, height, width = data.shape
    count = max(1, min(height // BAND_ROWS, int(math.ceil(max_pixels / (BAND_ROWS * width)))))
    starts = np.linspace(0, height - BAND_ROWS, count).astype(int) if height >= BAND_ROWS else [0]
    bands = []
    for start in starts:
        block = be.to_host(data[:, start : start + BAND_ROWS]).astype(np.float64)
        mean = block.mean(axis=0)
        mean[np.any(block == 0, axis=0)] = np.nan
        bands.append(mean)
    return bands


#: Pixels of the high-passed bands beyond this many robust sigmas (stars, hot pixels) are
#: left out, with :data:`CLIP_GROWTH` px around them: a star's profile correlates its pixels.
CLIP_SIGMA = 3.0
CLIP_GROWTH = 2


#: Where more than this share of the high-passed pixels are 0 (to :data:`LINEAR_ROWS_ZERO` of
#: the largest tenth's), the pixels across the axis were interpolated linearly between captured
#: ones (a linear upscaling by 2, 3 or 4 on the captured grid makes one in two, two in three,
#: three in four such rows), and the high-pass takes the pixels :data:`WIDE_ACROSS` away.
LINEAR_ROWS_SHARE = 0.25
LINEAR_ROWS_ZERO = 1e-4
WIDE_ACROSS = 3


def _high_pass(band: np.ndarray, axis: int) -> np.ndarray:
    """Each pixel less the mean of its two neighbours across ``axis``, NaN where clipped.

    A frame upscaled linearly has rows (across ``axis``) that are exactly the mean of their
    neighbours, whose high-pass is 0 (:data:`LINEAR_ROWS_SHARE`); there the two pixels taken
    lie :data:`WIDE_ACROSS` away, which spans a captured row wherever the row is. Across the
    axis any such filter leaves the correlations along it as they are (it multiplies the
    noise's autocovariance along the axis by one factor at every lag)."""
    high = _across(band, axis, 1)
    finite = np.isfinite(high)
    if finite.any():
        low, high_end = np.percentile(np.abs(high[finite]), [100 * LINEAR_ROWS_SHARE, 90])
        if low <= LINEAR_ROWS_ZERO * high_end:
            high = _across(band, axis, WIDE_ACROSS)
            finite = np.isfinite(high)
    if not finite.any():
        return high
    values = high[finite]
    level = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - level)))
    loud = (np.abs(np.nan_to_num(high, nan=level) - level) > CLIP_SIGMA * spread).astype(np.uint8)
    loud = ndimage.maximum_filter(loud, size=2 * CLIP_GROWTH + 1) > 0
    return np.where(loud, np.nan, high)


def _across(band: np.ndarray, axis: int, reach: int) -> np.ndarray:
    """Each pixel less the mean of the two pixels ``reach`` away across ``axis``."""
    if axis == 1:
        return band[reach:-reach] - 0.5 * (band[: -2 * reach] + band[2 * reach :])
    return band[:, reach:-reach] - 0.5 * (band[:, : -2 * reach] + band[:, 2 * reach :])


def _difference_variance(highs: list[np.ndarray], lag: int, axis: int) -> float:
    """Robust variance (1.4826 times the median absolute difference, squared) of pixel
    differences at ``lag`` along ``axis`` (1: x, 0: y) of the high-passed bands
    (:func:`_high_pass`, across that axis): that takes out the sky's and the nebula's smooth
    structure, which would otherwise grow the differences with the lag, and multiplies the
    noise's autocovariance along ``axis`` by one factor at every lag. The differences of
    stationary noise are symmetric about 0."""
    values = []
    for high in highs:
        if high.shape[axis] <= lag:
            continue
        a = high[:, lag:] - high[:, :-lag] if axis == 1 else high[lag:] - high[:-lag]
        values.append(np.abs(a[np.isfinite(a)]))
    values = np.concatenate(values) if values else np.zeros(0)
    if values.size < 1000:
        return float("nan")
    return (1.4826 * float(np.median(values))) ** 2


def noise_correlation(data, *, max_pixels: int = KERNEL_PIXELS) -> np.ndarray:
    """The noise's correlation coefficient at :data:`CORRELATION_LAGS` along x and y,
    ``(2, lags)``, from ``data`` ``(channels, h, w)`` (any backend)."""
    bands = _bands(data, max_pixels)
    out = np.full((2, len(CORRELATION_LAGS)), np.nan)
    for row, axis in enumerate((1, 0)):
        highs = [_high_pass(band, axis) for band in bands]
        free = np.mean([_difference_variance(highs, lag, axis) for lag in UNCORRELATED_LAGS])
        if not free > 0:
            continue
        for j, lag in enumerate(CORRELATION_LAGS):
            out[row, j] = 1 - _difference_variance(highs, lag, axis) / free
    return out


def _zero_phase_taps(rho: np.ndarray) -> tuple[float, ...]:
    """Taps ``-h..h`` of the zero-phase kernel whose autocorrelation has coefficients
    ``rho`` at lags 1, 2, ..., and unit sum."""
    f = (np.arange(1024) + 0.5) / 2048  # (0, 1/2): the spectrum is even
    spectrum = 1 + 2 * sum(r * np.cos(2 * np.pi * f * lag) for lag, r in zip(CORRELATION_LAGS, rho))
    at_zero = 1 + 2 * float(np.sum(rho))
    magnitude = np.sqrt(np.clip(spectrum, 0, None) / max(at_zero, 1e-12))
    k = np.arange(-KERNEL_HALF, KERNEL_HALF + 1)
    # h(k) = 2 * integral over (0, 1/2) of |H(f)| cos(2 pi f k), by the midpoint rule.
    taps = np.mean(magnitude[None, :] * np.cos(2 * np.pi * f[None, :] * k[:, None]), axis=1)
    taps = taps / taps.sum()
    return tuple(float(v) for v in taps)


def interpolation_kernel(data, *, max_pixels: int = KERNEL_PIXELS) -> InterpolationKernel | None:
    """The kernel the frame's pixels went through (see the module's text), or None where its
    noise is white (a frame that was not resampled): the interpolation of
    :data:`INTERPOLATIONS` at the sub-pixel shift whose correlations match the noise's, or,
    where none does within :data:`MATCH_TOLERANCE`, the zero-phase kernel of the noise's
    spectrum."""
    return correlation_kernel(noise_correlation(data, max_pixels=max_pixels))


def correlation_kernel(rho: np.ndarray) -> InterpolationKernel | None:
    """:func:`interpolation_kernel` of noise correlations ``rho`` ``(2, lags)`` already read
    (:func:`noise_correlation`)."""
    if not smoothed(rho):
        return None
    return matched_kernel(rho) or InterpolationKernel(_zero_phase_taps(rho[0]), _zero_phase_taps(rho[1]))


def registration_kernel(rho: np.ndarray, reference_rho: np.ndarray) -> InterpolationKernel | None:
    """The interpolation a registered target went through, read from its noise's
    correlations ``rho`` less the reference's ``reference_rho`` (``(2, lags)`` each,
    :func:`noise_correlation`): the matched kernel (:func:`matched_kernel`) of the
    correlations the target has beyond the reference's, or None where it has none (a frame
    not resampled) or no interpolation at one shift matches them.

    Read against the reference's, the sky's own correlations (its unresolved stars correlate
    the pixels of a crowded field by about 0.02 at lags 1-2, which a frame read alone takes
    for a kernel's) are not taken for the registration's: on the crowded scenario 14 of 16
    targets matched an interpolation at their shift, none of 8 read alone
    (docs/scale-accuracy.md, "The registration's kernel above 2.5 px").

    The excess is the difference of two readings, each with its own noise, so it matches
    within :data:`MATCH_TOLERANCE` times the square root of 2: crowded targets shifted by
    about half a pixel matched their cubic spline within 0.0103-0.0109 and were fitted
    without it (docs/scale-accuracy.md, "Crowded seeds the kernel was not tuned on").
    """
    excess = np.asarray(rho, float) - np.asarray(reference_rho, float)
    return matched_kernel(excess, math.sqrt(2) * MATCH_TOLERANCE) if smoothed(excess) else None


def smoothed(rho: np.ndarray) -> bool:
    """Whether correlations ``rho`` ``(2, lags)`` show an interpolation: it smooths, so
    neighbours correlate by :data:`MIN_CORRELATION` or more along at least one axis."""
    return bool(np.all(np.isfinite(rho)) and np.max(rho[:, 0]) >= MIN_CORRELATION)


#: Interpolations a registration may have used, as functions of the offset ``t`` from a
#: captured pixel (the splines' through SciPy's prefiltered interpolation, below).
INTERPOLATIONS = ("linear", "cubic spline", "quintic spline", "bicubic", "Lanczos-3", "Lanczos-4")
#: A matched kernel is used where the RMS difference of its correlations (lags 1-3, both
#: axes) from the noise's is within this. Shifted frames match within 0.002-0.008 (the
#: generator's registered sets; 0.010-0.013 on its crowded set, whose stars leave more in
#: the noise); frames rotated by 3-45 degrees, whose shift varies across them, by 0.011-0.036.
#: A rotation of a degree or less reads like a shift (within 0.006).
MATCH_TOLERANCE = 0.01
#: Sub-pixel shifts tried, 0 to 1/2 px (a shift and its mirror correlate alike).
_SHIFTS = np.linspace(0.0, 0.5, 101)


def _keys(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def _lanczos(t: np.ndarray, n: int) -> np.ndarray:
    return np.where(np.abs(t) < n, np.sinc(t) * np.sinc(t / n), 0.0)


def interpolation_taps(name: str, shift: float, half: int = MATCHED_HALF) -> tuple[float, ...]:
    """Taps ``-half..half`` (unit sum) of interpolation ``name`` (:data:`INTERPOLATIONS`)
    resampling a frame at ``shift`` px: registered ``p`` from captured ``p + shift``, so
    that the taps' centroid is ``shift``."""
    a = np.arange(-half, half + 1, dtype=float)
    if name.endswith("spline") or name == "linear":
        order = {"linear": 1, "cubic spline": 3, "quintic spline": 5}[name]
        impulse = np.zeros(4 * half + 1)
        impulse[2 * half] = 1.0
        # out[c + m] = K(m + shift): the response of registered c + m to captured c.
        out = ndimage.shift(impulse, -shift, order=order, mode="constant")
        taps = out[half : 3 * half + 1][::-1]
    elif name == "bicubic":
        taps = _keys(shift - a)
    else:
        taps = _lanczos(shift - a, int(name[-1]))
    # The cut taps, corrected by the least change that restores a unit sum and the centroid at
    # ``shift`` (an interpolation reproduces a constant and a slope), which the star
    # photometry's kept share depends on.
    basis = np.stack([np.ones_like(a), a])
    miss = np.array([1.0 - taps.sum(), shift - float(np.dot(a, taps))])
    taps = taps + np.linalg.solve(basis @ basis.T, miss) @ basis
    return tuple(float(v) for v in taps)


def _correlations(taps) -> np.ndarray:
    h = np.asarray(taps)
    full = np.correlate(h, h, "full")
    centre = h.size - 1
    return np.array([full[centre + lag] for lag in CORRELATION_LAGS]) / full[centre]


_TABLE: dict[str, np.ndarray] = {}


def _table(name: str) -> np.ndarray:
    """Correlations at :data:`CORRELATION_LAGS` of ``name``'s kernel at each of
    :data:`_SHIFTS`, ``(shifts, lags)``; computed once."""
    if name not in _TABLE:
        _TABLE[name] = np.array([_correlations(interpolation_taps(name, float(v))) for v in _SHIFTS])
    return _TABLE[name]


def matched_kernel(
    rho: np.ndarray, tolerance: float = MATCH_TOLERANCE, *, sky: np.ndarray | None = None
) -> InterpolationKernel | None:
    """The interpolation of :data:`INTERPOLATIONS`, and its shift along each axis, whose
    correlations are nearest the noise's ``rho`` ``(2, lags)`` (x, y); None where even the
    nearest is further than ``tolerance`` (RMS), as for a frame whose shift varies across it
    (a rotation) or that went through something else.

    ``sky``: the correlations' shape that the frame's unresolved stars add
    (:func:`sky_correlation`), at any strength from 0 to :data:`MAX_SKY_CORRELATION` at lag
    1, the same along both axes: the interpolation is matched to what ``rho`` holds beyond it.

    The correlations tell a shift from its mirror apart no more than the noise does; the
    positive one is taken. The photometry's kept share does not depend on the choice
    (:func:`nsg_gpu.photometry.kept_share` averages the kernel with its mirrors).
    """
    rho = np.asarray(rho, float)
    strengths = [0.0] if sky is None else np.linspace(0.0, MAX_SKY_CORRELATION, SKY_STEPS)
    best = None
    for strength in strengths:
        rest = rho if sky is None else rho - strength * np.asarray(sky, float)[None, :] / float(sky[0])
        for name in INTERPOLATIONS:
            table = _table(name)
            misses = [np.sum((table - rest[axis]) ** 2, axis=1) for axis in (0, 1)]
            picks = [int(np.argmin(m)) for m in misses]
            rms = math.sqrt((misses[0][picks[0]] + misses[1][picks[1]]) / (2 * len(CORRELATION_LAGS)))
            if best is None or rms < best[0]:
                best = (rms, name, picks)
    rms, name, (px, py) = best
    if rms > tolerance:
        return None
    return InterpolationKernel(
        interpolation_taps(name, float(_SHIFTS[px])), interpolation_taps(name, float(_SHIFTS[py])), name
    )


def own_kernel(rho: np.ndarray, fwhm: float) -> InterpolationKernel | None:
    """The interpolation a frame of noise correlations ``rho`` ``(2, lags)`` and stars of
    ``fwhm`` px was resampled with itself (a registered reference's): matched plainly
    (:func:`matched_kernel`), or where nothing matches so, beside its unresolved stars'
    correlations (:func:`sky_correlation`), which on a crowded field would otherwise leave no
    interpolation matched; None for a frame not resampled or turned.

    A kernel that would not itself correlate neighbours by :data:`MIN_CORRELATION` is none:
    the correlations of a crowded frame not resampled are its sky's (0.017-0.031 at lag 1 on
    the generator's crowded frames, where an interpolation at a shift of 0.08 px or less
    matched beside them). The sky's share is tried only where no interpolation matches
    without it: on the field-dependent scenario's registered references it would take some
    of what is the kernel's (docs/scale-accuracy.md, "A registered reference")."""
    if not smoothed(rho):
        return None
    kernel = matched_kernel(rho) or matched_kernel(rho, sky=sky_correlation(fwhm))
    return kernel if kernel is not None and smoothed(kernel_correlations(kernel)) else None


def kernel_correlations(kernel: InterpolationKernel) -> np.ndarray:
    """The correlations ``(2, lags)`` (x, y) that ``kernel`` gives white noise."""
    return np.stack([_correlations(kernel.x), _correlations(kernel.y)])


#: The unresolved stars of a crowded field correlate its pixels by up to this much at lag 1
#: (0.017-0.031 on the generator's crowded frames not resampled, 0.02-0.04 read beside a
#: registration's kernel); :func:`matched_kernel` tries this many strengths from 0 to it.
MAX_SKY_CORRELATION = 0.06
SKY_STEPS = 25


@functools.lru_cache(maxsize=64)
def _sky_correlation(fwhm: float) -> tuple[float, ...]:
    half = 64
    y, x = np.mgrid[-half:half, -half:half]
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / SKY_BETA) - 1.0))
    profile = (1.0 + (x * x + y * y) / alpha**2) ** -SKY_BETA
    spectrum = np.fft.fft2(np.fft.ifftshift(profile))
    auto = np.real(np.fft.ifft2(np.abs(spectrum) ** 2))  # [dy, dx]

    def along(lag: int) -> float:
        # As :func:`noise_correlation` reads it: high-passed across the axis
        # (each pixel less the mean of its two neighbours), at ``lag`` along it.
        return 1.5 * auto[0, lag] - 2.0 * auto[1, lag] + 0.5 * auto[2, lag]

    free = float(np.mean([along(lag) for lag in UNCORRELATED_LAGS]))
    return tuple(float((along(lag) - free) / (along(0) - free)) for lag in CORRELATION_LAGS)


#: The Moffat index of the unresolved stars' profile in :func:`sky_correlation` (the shape
#: moves by 0.01 between indices 3 and 4.5).
SKY_BETA = 3.0


def sky_correlation(fwhm: float) -> np.ndarray:
    """The shape, at :data:`CORRELATION_LAGS`, of the correlations that a field's unresolved
    stars of ``fwhm`` px give its pixels as :func:`noise_correlation` reads them: their light
    is the PSF at random places, whose autocorrelation is the PSF's. 1 at lag 0; about 0.84,
    0.51, 0.24 at lags 1-3 for stars of 3 px."""
    return np.array(_sky_correlation(round(float(fwhm), 2)))
