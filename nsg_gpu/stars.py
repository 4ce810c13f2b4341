"""Star detection by matched filtering, on the reference once and on any frame for its FWHM.

The frame (or, for colour, its HSI intensity ``(min + max) / 2``) minus a smooth background is
convolved with a Gaussian matched to the PSF; stars are the local maxima of that image above
``detection_sigma`` times its noise, away from zero ("no data") pixels. Each star gets an
intensity-weighted centroid, a peak value (for the non-linearity cut), a background-subtracted
flux and a radius. All image-sized work is done with the backend of the input array; only
the short star table comes back to the host.

In the flow: used by the reference's preparation (:mod:`nsg_gpu.reference`, once) and by
the scale stage (:mod:`nsg_gpu.scale`, the target's FWHM); the cut-outs come from
:mod:`nsg_gpu.stamps`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from dataclasses import dataclass

import numpy as np
import scipy.ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from . import kernels
from .backend import get_backend, single_threaded_blas
from .noise import noise_step
from .resampling import (
    INTERPOLATIONS,
    MATCHED_HALF,
    InterpolationKernel,
    correlation_kernel,
    interpolation_taps,
    noise_correlation,
)
from .stamps import gather_stamps

__all__ = [
    "StarCatalog",
    "detection_image",
    "smooth_background",
    "detect_stars",
    "estimate_fwhm",
    "no_data_regions",
    "scattered_zeros",
    "typical_fwhm",
    "gaussian_weights",
    "matched_filter",
    "find_peaks",
    "isolated",
    "single_pixel_advantage",
    "one_channel",
    "trail_lines",
    "trail_coordinates",
    "near_trails",
]

_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
#: Highest sharpness (peak over flux times FWHM squared) taken as a star's in the test that
#: leaves extended sources out: stars read 0.4-1.3 (undersampled ones the most), single hot
#: pixels several.
SHARPNESS_CAP = 1.0
#: The catalogue's FWHM is read from unsaturated stars whose peak stands this many pixel
#: noise sigmas above their surroundings; where fewer than five do, from the five brightest
#: above SPARSE_FWHM_PEAK_SNR that are no broader than stars (SPARSE_FWHM_COMPACT).
FWHM_PEAK_SNR = 30.0
#: ... from five of them at least, or from this many where the frame's saturated stars make
#: up the five (the brightest stars of a sparse field of stars under a pixel); with fewer the
#: filter's guess stays.
MIN_FWHM_READINGS = 2
#: The noise above which the stars that read the FWHM stand is the matched image's (scaled to
#: a pixel), at most this many times the pixels' own.
FWHM_NOISE_CAP = 2.0
#: A star's area above half maximum over this many times the median of its frame's bright
#: stars is a blend, and does not read the frame's FWHM (:func:`typical_fwhm`).
BLEND_AREA = 3.0
#: ... where it is larger than this (px^2; a reading of 4 px); and under a BLEND_AREA-th of
#: the median, where the median is larger than this.
BLEND_MIN_AREA = 4.0 * math.pi
SPARSE_FWHM_PEAK_SNR = 7.0
#: ... and whose peak for their flux is at least this share of the typical star's there
#: (:func:`_compact`): a source twice as broad as the stars peaks at a quarter of theirs for
#: its flux. A nebula's knots, whose light is spread, outshine the faint stars of a sparse
#: field in flux: four of a synthetic frame's five brightest readable detections, which read
#: 17 px where its stars have 2.8 (docs/scale-accuracy.md, "Knots of a nebula among the PSF
#: stars").
SPARSE_FWHM_COMPACT = 0.25
#: A detection whose 4-neighbours hold less than a fifth of its peak is still a star where
#: the light on both sides of it (twice the lesser of each pair of opposite neighbours, over
#: the four axes, above 8 times the window edge's median) is this share of the peak, and
#: :data:`AROUND_SNR` times the pixel noise (the matched filter's, per pixel: on frames not
#: resampled 1.1-2 times the pixels' own spread): about 4 pixel sigmas is its own noise, and a
#: hot pixel's is centred at -4.5 (the least of two noises is negative), so that one in a
#: thousand passes where the share does not decide (hot pixels under about 80 sigma);
#: an undersampled star (0.6 px or more before the pixels, wherever it falls in its pixel),
#: not a hot pixel, a pair of them or a hot pixel beside a star.
UNDERSAMPLED_AROUND = 0.1
AROUND_SNR = 8.0
#: On a resampled mono frame a detection is a hot pixel (or cosmic ray) seen through a
#: registration's interpolation where that fits its 5 x 5 pixels better, by this much
#: chi-square, than any star of FWHM :data:`POINT_TEST_FWHM` or more near the centre
#: (:func:`single_pixel_advantage`); the shifts tried are :data:`POINT_TEST_STEP` apart. On a
#: colour frame, where it fits better at all and its light is in one channel (:func:`one_channel`).
HOT_PIXEL_CHI2 = 25.0
#: A hot pixel (or cosmic ray) within a few pixels of a fainter star holds the matched image's
#: maximum there: once it is taken for a point, the stars it outshone are looked for again
#: with its 5 x 5 pixels' light taken out of the matched image
#: (:func:`_outshone_peaks`), at least this many pixels (along x or y) from it. A star nearer
#: than that is the point's own pixels, and goes with them.
OUTSHONE_CLEAR = 3
#: The points looked beside: those whose peak stands this many pixel sigmas above the
#: background (a fainter reject, often noise, can hold down only stars at the detection's
#: limit, and would cost the stars near it their say in the FWHM and the PSF).
OUTSHONE_POINT_SNR = 10.0
#: Points whose blocks are made and searched together (a few MB each at FWHM 10 px).
_POINTS_AT_ONCE = 512
POINT_TEST_FWHM = (0.8, 1.0, 1.4, 2.0, 2.8, 4.0)
POINT_TEST_STEP = 0.05
#: The brightest detections (by their peak) that are tested, at most: the ones that set the
#: catalogue's FWHM, sharpness and registration check.
POINT_TEST_MAX = 500
#: Once a frame's FWHM is read, no star of it is taken for narrower than this share of it
#: (the PSF varies across a field by a third or so, not by half): the detections that a
#: single pixel, seen through an interpolation where the frame was resampled, fits better, by
#: :data:`HOT_PIXEL_CHI2`, than any star of that FWHM or more are hot pixels (or warm ones);
#: those tried peak at :data:`FAINT_POINT_SNR` pixel sigmas or more (a single pixel can beat a
#: star of half a 2-4 px FWHM by 25 from about 6-7 of them). On a real frame that a Lanczos-3
#: registration resampled (stars of 3.7 px), hot pixels of 9-28 pixel sigmas won by -1 to 16
#: against stars of 0.8 px (:data:`POINT_TEST_FWHM`), too little to tell, and by 46-680
#: against stars of 1.8 px and more; the stars' own advantage stayed at -95 and below.
STAR_FWHM_SHARE = 0.5
FAINT_POINT_SNR = 5.0
#: On a frame whose stars read NARROW_TEST_FWHM px or more, a detection that peaks at
#: NARROW_TEST_SNR pixel sigmas or more and reads under NARROW_SHARE of their FWHM is no star
#: (a hot pixel an upscaling registration spread over 2-3 px; stars of a field-dependent PSF
#: read 0.8 of the frame's and more, and faint ones scatter by about a sixth).
NARROW_TEST_FWHM = 4.0
NARROW_TEST_SNR = 10.0
NARROW_SHARE = 0.6
#: Pixels at or below this fraction of the detection image's maximum are taken as clamped (a
#: registration sets the negative lobes of a bright point's interpolation to zero, or to a
#: hair above it so as not to read as no data) and left out of the point test's fits.
CLAMPED = 1e-4
#: The share of a detection's light in one channel that makes it one photosite.
ONE_CHANNEL_SHARE = 0.8
#: A detection with this share of its light in one channel, that light PHOTOSITE_SNR times the
#: noise of its 3 x 3 sum or more, is one photosite whatever its shape: a full-resolution
#: debayer (bilinear, VNG, RCD) spreads a hot photosite over 3 x 3 pixels of its channel, no
#: single pixel; a star, even a red one, leaves a third of its light or more in the others.
PHOTOSITE_SHARE = 0.95
PHOTOSITE_SNR = 20.0
#: Only detections whose brightest pixel is this many times the pixel noise are tested: the
#: fainter ones fit either, and do not set the catalogue's FWHM or sharpness.
POINT_TEST_SNR = 10.0
#: A satellite's or aircraft's trail is detected as a chain of pieces along a line, each a few
#: pixels from the next (a local maximum of the matched filter along a ridge). Detections
#: within TRAIL_REACH FWHM of one another are neighbours; a detection whose neighbours (two
#: or more) lie on a line through it, their scatter across it at most TRAIL_SCATTER px RMS,
#: is on a line; TRAIL_PIECES or more such detections connected by neighbours, together on
#: one line within TRAIL_SCATTER px and along at least TRAIL_LENGTH FWHM of it, show a
#: trail. Every detection within TRAIL_WIDTH px of that line (where the noise broke the
#: chain, and beyond) leaves the catalogue, but for those TRAIL_STAR times brighter than the
#: chain's median: stars that the trail crosses.
TRAIL_REACH = 6.0
TRAIL_SCATTER = 1.0
TRAIL_PIECES = 8
TRAIL_LENGTH = 10.0
TRAIL_WIDTH = 2.0
TRAIL_STAR = 3.0


@dataclass
class StarCatalog:
    """Stars of one frame, brightest first; every column is a host NumPy array."""

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray  # background-subtracted sum in a 2-FWHM radius, detection image units
    peak: np.ndarray  # maximum pixel of the detection image at the star
    radius: np.ndarray  # radius (px) where the star meets the noise floor
    fwhm: float  # median FWHM (px) of bright unsaturated stars
    noise: float  # noise of the matched-filter image
    # The frame's noise correlations (nsg_gpu.resampling.noise_correlation, (2, lags)), read
    # once by detect_stars: the interpolation it went through is their kernel (resampling).
    correlation: np.ndarray | None = None
    # Satellite or aircraft trails that detect_stars found (:func:`trail_lines`), one row
    # ``(x, y, direction x, direction y, first, last)`` each; their pieces are not stars.
    trails: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 6)))
    # Stars a few pixels from a hot pixel or cosmic ray that detection took out (found, or
    # measured, without its light; its pixels still hold it): no PSF star.
    near_point: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.near_point is None:
            self.near_point = np.zeros(self.x.shape, bool)

    def __len__(self) -> int:
        return int(self.x.size)

    def take(self, index) -> StarCatalog:
        return StarCatalog(
            self.x[index],
            self.y[index],
            self.flux[index],
            self.peak[index],
            self.radius[index],
            self.fwhm,
            self.noise,
            self.correlation,
            self.trails,
            self.near_point[index],
        )

    @property
    def resampling(self) -> InterpolationKernel | None:
        """The interpolation the frame went through where its noise says it was resampled
        (:func:`nsg_gpu.resampling.correlation_kernel` of :attr:`correlation`), else None."""
        return None if self.correlation is None else correlation_kernel(self.correlation)


def detection_image(data):
    """The 2-D image stars are detected on: the frame itself, or colour intensity.

    ``data`` is ``(channels, height, width)``; colour uses PCL's HSI intensity
    ``(min + max) / 2``, as NSG does. Pixels where any channel is 0 are 0.
    """
    be = get_backend(data)
    xp = be.xp
    if data.shape[0] == 1:
        return data[0]
    if not be.is_gpu and data.dtype == np.float32:
        return _intensity_host(data)
    intensity = 0.5 * (data.min(axis=0) + data.max(axis=0))
    return xp.where(data.min(axis=0) > 0, intensity, 0).astype(data.dtype)


def _intensity_host(data: np.ndarray, block: int = 64) -> np.ndarray:
    """:func:`detection_image` of a float32 colour frame on the host, to the bit: the same
    float32 operations, by blocks of rows, without the whole-frame temporaries."""
    _, height, width = data.shape
    out = np.empty((height, width), dtype=np.float32)
    low = np.empty((block, width), dtype=np.float32)
    empty = np.empty((block, width), dtype=bool)
    for r0 in range(0, height, block):
        r1 = min(height, r0 + block)
        lo, hi, hole = low[: r1 - r0], out[r0:r1], empty[: r1 - r0]
        np.min(data[:, r0:r1], axis=0, out=lo)
        np.max(data[:, r0:r1], axis=0, out=hi)
        hi += lo
        hi *= np.float32(0.5)
        np.greater(lo, 0, out=hole)
        np.logical_not(hole, out=hole)
        np.copyto(hi, 0, where=hole)
    return out


def smooth_background(image, valid, scale: float, factor: int = 4):
    """A smooth background: normalized Gaussian convolution of a block-averaged image.

    Zero pixels do not drag the background down (normalized convolution with the valid mask).
    Averaging ``factor`` x ``factor`` blocks first makes the wide blur cheap at any frame size.

    Parameters
    ----------
    image : array (height, width)
    valid : bool array (height, width)
    scale : float
        Gaussian sigma in full-resolution pixels.
    """
    be = get_backend(image)
    xp, ndi = be.xp, be.ndimage
    h, w = image.shape
    hp, wp = -(-h // factor) * factor, -(-w // factor) * factor
    masked = xp.zeros((hp, wp), dtype=xp.float32)
    weight = xp.zeros((hp, wp), dtype=xp.float32)
    masked[:h, :w] = xp.where(valid, image, 0)
    weight[:h, :w] = valid
    small_sum = masked.reshape(hp // factor, factor, wp // factor, factor).sum(axis=(1, 3))
    small_cnt = weight.reshape(hp // factor, factor, wp // factor, factor).sum(axis=(1, 3))
    sigma = max(scale / factor, 0.5)
    num = ndi.gaussian_filter(small_sum, sigma, mode="nearest")
    den = ndi.gaussian_filter(small_cnt, sigma, mode="nearest")
    small = num / xp.maximum(den, 1e-6)
    if be.is_gpu:
        full = ndi.zoom(small, factor, order=1, grid_mode=True, mode="nearest")
    else:
        full = _upsample_linear(small, factor)
    return full[:h, :w]


def _linear_taps(n: int, factor: int):
    """Source pixels and weight of the second for each of ``n * factor`` outputs: pixel
    centres aligned (``grid_mode``), clamped at the edges (mode "nearest")."""
    x = np.clip((np.arange(n * factor) + 0.5) / factor - 0.5, 0, n - 1)
    first = np.floor(x).astype(np.int64)
    return first, np.minimum(first + 1, n - 1), x - first


def _upsample_linear(small: np.ndarray, factor: int, block: int = 16) -> np.ndarray:
    """``scipy.ndimage.zoom(small, factor, order=1, grid_mode=True, mode="nearest")`` of a
    float32 image, separably: along x, then along y in blocks of rows, in double, rounded
    to float32 at the end. SciPy sums the four products in another order; after the
    rounding the two agree to the bit but for rare last-bit ties (test)."""
    ny, nx = small.shape
    y0, y1, fy = _linear_taps(ny, factor)
    x0, x1, fx = _linear_taps(nx, factor)
    source = small.astype(np.float64)
    across = np.take(source, x0, axis=1)
    across *= 1 - fx
    second = np.take(source, x1, axis=1)
    second *= fx
    across += second
    del second
    out = np.empty((ny * factor, nx * factor), dtype=small.dtype)
    upper = np.empty((block, out.shape[1]))
    lower = np.empty((block, out.shape[1]))
    gy = 1 - fy
    for r0 in range(0, out.shape[0], block):
        r1 = min(out.shape[0], r0 + block)
        a, b = upper[: r1 - r0], lower[: r1 - r0]
        np.take(across, y0[r0:r1], axis=0, out=a)
        a *= gy[r0:r1, None]
        np.take(across, y1[r0:r1], axis=0, out=b)
        b *= fy[r0:r1, None]
        np.add(a, b, out=out[r0:r1], casting="same_kind")
    return out


#: Zero pixels this close to the image's edge are no data whatever their neighbours.
EDGE_NO_DATA = 3


def no_data_regions(empty):
    """The pixels of ``empty`` (a boolean image, any backend) that lie in a 3 x 3 square of
    empty pixels: ``scipy.ndimage.binary_opening`` with a 3 x 3 square, by shifted slices.

    Registration borders and other no-data regions are such squares; the scattered zeros of
    a frame whose sky was clipped at zero (calibrated without a pedestal, a dim sky) are
    not, and are data.
    """
    xp = get_backend(empty).xp
    eroded = xp.zeros_like(empty)
    across = empty[:, :-2] & empty[:, 1:-1] & empty[:, 2:]
    eroded[1:-1, 1:-1] = across[:-2] & across[1:-1] & across[2:]
    grown = eroded.copy()
    grown[:, 1:] |= eroded[:, :-1]
    grown[:, :-1] |= eroded[:, 1:]
    out = grown.copy()
    out[1:] |= grown[:-1]
    out[:-1] |= grown[1:]
    return out


def scattered_zeros(empty, planes):
    """The pixels of ``empty`` (a boolean image, or planes ``(channels, h, w)``; any backend)
    outside the :func:`no_data_regions` of every one of ``planes`` (boolean images) and
    farther than :data:`EDGE_NO_DATA` from the image's edge: the zeros of a sky clipped at 0,
    which are data. A registration border narrower than 3 px (a sub-pixel shift's column, the
    thin end of a turned frame's wedge) runs along the image's edge."""
    regions = functools.reduce(operator.or_, (no_data_regions(plane) for plane in planes))
    scattered = empty & ~regions
    edge = EDGE_NO_DATA
    scattered[..., :edge, :] = False
    scattered[..., -edge:, :] = False
    scattered[..., :edge] = False
    scattered[..., -edge:] = False
    return scattered


def _scattered_zeros_as_data(image, data):
    """``image`` (the detection image of ``data``) with its scattered zero pixels (outside
    :func:`no_data_regions` of every channel) given their value, or the least positive float32 where that is
    not above zero, so that only no-data regions read as no data. A frame with a tenth of its
    sky pixels clipped at zero otherwise has a zero within a few pixels of nearly every star,
    and the detection's margin around no data left 0-2 of the 93 stars sep finds on it."""
    be = get_backend(image)
    xp = be.xp
    empty = image <= 0
    if not bool(empty.any()):
        return image
    # A colour frame's regions are each channel's own: their scattered zeros together (a
    # colour intensity is 0 where any channel is) make squares of zeros where none of them has one.
    mono = data.ndim == 2 or data.shape[0] == 1
    scattered = scattered_zeros(empty, [empty] if mono else (plane <= 0 for plane in data))
    if not bool(scattered.any()):
        return image
    level = image if mono else 0.5 * (data.min(axis=0) + data.max(axis=0))
    tiny = np.float32(np.finfo(np.float32).tiny)
    return xp.where(scattered, xp.maximum(level, tiny), image).astype(xp.float32)


def estimate_fwhm(image, x, y, background=0.0, half: int = 8) -> np.ndarray:
    """FWHM (px) of stars from the area above half their peak.

    ``2 * sqrt(area / pi)`` of the pixels above half the (background-subtracted) peak within
    ``half`` pixels of the star and joined to the peak through such pixels (8-connected), the
    peak being the brightest sampled pixel near the centre. Cheap and robust; it sizes
    apertures and filters and is not a measurement in itself (it reads about 5 % high for
    well-sampled Moffat stars). Only the star's own pixels count, so that neighbours and
    noise elsewhere in a window sized from a first guess do not inflate it (a larger reading
    would widen the next window in turn).
    """
    be = get_backend(image)
    xp = be.xp
    win = gather_stamps(image, x, y, half)
    if np.isscalar(background):
        win = win - background
    else:
        win = win - background[:, None, None]
    offsets = xp.arange(-half, half + 1)
    disc = (offsets[:, None] ** 2 + offsets[None, :] ** 2) <= half * half
    peak = win[:, half - 1 : half + 2, half - 1 : half + 2].max(axis=(1, 2))
    above = (win > 0.5 * peak[:, None, None]) & disc
    return be.to_host(2.0 * xp.sqrt(_joined_to_centre(above, half).sum(axis=(1, 2)) / math.pi))


def _joined_to_centre(above, half: int):
    """The pixels of ``above`` (n, s, s) joined to the central 3 x 3 pixels through pixels of
    ``above`` (8-connected within each stamp): ``binary_propagation`` of the backend's
    ``ndimage`` from the centre's."""
    be = get_backend(above)
    seed = be.xp.zeros_like(above)
    seed[:, half - 1 : half + 2, half - 1 : half + 2] = above[:, half - 1 : half + 2, half - 1 : half + 2]
    return be.ndimage.binary_propagation(seed, structure=be.xp.ones((1, 3, 3), bool), mask=above)


def _mad_sigma(values) -> float:
    """1.4826 times the median absolute deviation of ``values`` (any backend): a robust
    standard deviation, on the host."""
    xp = get_backend(values).xp
    return float(1.4826 * xp.median(xp.abs(values - xp.median(values))))


def typical_fwhm(values: np.ndarray, flux: np.ndarray | None = None) -> float:
    """The FWHM (px) typical of stars whose :func:`estimate_fwhm` readings are ``values``:
    that of their mean area above half maximum, the tenth largest and smallest areas left
    out (one at each end from five values, so that a blend among a few stars does not move
    it; none below five), NaN for none. Areas over :data:`BLEND_AREA` times the median (and
    over :data:`BLEND_MIN_AREA`: an undersampled star's one to four pixels all count) are
    left out first: stars joined above half maximum, which on a field of broad stars can be
    two in sixteen (their mean would then read 9 px for stars of 7). Where the median is
    over :data:`BLEND_MIN_AREA`, so are areas under a :data:`BLEND_AREA`-th of it: hot pixels
    on broad stars' peaks (four of fourteen read 1.1-3.4 px among stars of 9.7). The areas are whole
    pixels, and an undersampled star's is one or two pixels as it falls on a pixel's centre
    or between two, so their median jumps between 1.13 and 1.60 px with the share of stars
    on each side; their mean over many stars, which fall anywhere in their pixels, grows with
    the stars' width as it does.

    With the readings' ``flux``, where the area that holds the middle of their light is over
    :data:`BLEND_AREA` times the median, the areas are judged against it instead: on a frame
    registered with an upscaling (Siril's 2x, a drizzle) a hot pixel is a blob of 2-3 px and
    can outnumber stars of 7 px, with a fiftieth of their light."""
    values = np.asarray(values, float)
    finite = np.isfinite(values)
    area = np.pi * (values[finite] / 2) ** 2
    if not area.size:
        return float("nan")
    order = np.argsort(area, kind="stable")
    area = area[order]
    middle = float(np.median(area))
    if flux is not None:
        light = np.cumsum(np.clip(np.asarray(flux, float)[finite][order], 0, None))
        if light[-1] > 0:
            lit = float(area[np.searchsorted(light, 0.5 * light[-1])])
            middle = lit if lit > BLEND_AREA * middle else middle
    area = area[area <= max(BLEND_AREA * middle, BLEND_MIN_AREA)]
    if middle > BLEND_MIN_AREA:
        area = area[area * BLEND_AREA >= middle]
    cut = max(1, area.size // 10) if area.size >= 5 else 0
    return float(2.0 * math.sqrt(area[cut : area.size - cut].mean() / math.pi))


def gaussian_weights(sigma: float) -> np.ndarray:
    """Half of SciPy's Gaussian kernel (centre first) for ``sigma``, truncated at 4 sigma."""
    radius = int(4.0 * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (float(sigma) * float(sigma)) * x**2)
    return (phi / phi.sum())[radius:]


def matched_filter(residual, sigma: float, *, launcher=None):
    """The image convolved with a Gaussian of ``sigma`` px, zero outside: the matched filter.

    Parameters
    ----------
    residual : array (height, width) float32
        Background-subtracted image, on any backend.

    sigma : float
        Gaussian sigma (px).

    launcher : optional
        Runs the ``detect.cu`` kernels instead (:data:`nsg_gpu.kernels.DEVICE`, or the tests'
        host emulation on NumPy buffers); CuPy arrays always use the kernels.

    Returns
    -------
    array (height, width) float32, on the backend of ``residual``

    Notes
    -----
    The NumPy path, ``scipy.ndimage.gaussian_filter(mode="constant")``, is the twin of
    ``convolve_axis_f32``; the kernel sums in double in SciPy's order, so the two agree to
    the last bit but for rare ties in the final rounding.
    """
    be = get_backend(residual)
    launcher = launcher or kernels.launcher_for(be.is_gpu)
    if launcher is None:
        return be.ndimage.gaussian_filter(residual, sigma, mode="constant")
    xp = be.xp
    image = xp.ascontiguousarray(residual, dtype=xp.float32)
    h, w = image.shape
    weights = xp.asarray(gaussian_weights(sigma), dtype=xp.float64)
    radius = weights.size - 1
    across = xp.empty_like(image)
    out = xp.empty_like(image)
    config = launcher.config("convolve_axis_f32", h * w)
    # SciPy filters axis 0 first, then axis 1, rounding to float32 in between.
    launcher("convolve_axis_f32", config, (image, across, h, w, weights, radius, 0))
    launcher("convolve_axis_f32", config, (across, out, h, w, weights, radius, 1))
    return out


def find_peaks(matched, image, *, half: int, threshold: float, margin: int, launcher=None):
    """Local maxima of ``matched`` above ``threshold`` whose surroundings hold data.

    A pixel is a peak when it is the maximum of its ``(2 half + 1)`` square window, exceeds
    ``threshold`` (compared in float32), lies at least ``margin`` px from the image edges and
    every ``image`` pixel within ``margin`` px (a square) is above 0. ``margin`` and ``half``
    are at least 1; a margin below ``half`` is raised to it.

    Parameters
    ----------
    matched, image : array (height, width) float32
        The matched-filter image and the image itself (0 = no data).

    launcher : optional
        Runs ``find_peaks_f32`` instead (see :func:`matched_filter`).

    Returns
    -------
    bool array (height, width) on the backend of ``matched``
    """
    be = get_backend(matched)
    xp = be.xp
    threshold = np.float32(threshold)
    if margin < 1 or half < 1:
        raise ValueError(f"find_peaks needs margin >= 1 and half >= 1, got {margin} and {half}")
    margin = max(int(margin), int(half))
    launcher = launcher or kernels.launcher_for(be.is_gpu)
    if launcher is None:
        return _find_peaks_host(matched, image, half=half, threshold=threshold, margin=margin)
    h, w = matched.shape
    peaks = xp.empty((h, w), dtype=xp.uint8)
    matched = xp.ascontiguousarray(matched, dtype=xp.float32)
    image = xp.ascontiguousarray(image, dtype=xp.float32)
    config = launcher.config("find_peaks_f32", h * w)
    launcher("find_peaks_f32", config, (matched, image, peaks, h, w, threshold, half, margin))
    return peaks.view(bool)


def _window_max(image: np.ndarray, half: int) -> np.ndarray:
    """``scipy.ndimage.maximum_filter(image, size=2 * half + 1)`` (mode "reflect"), exactly:
    separable maxima of shifted slices. Mirrored pixels lie inside the clipped window, so
    the window clipped to the image gives the same maximum.

    Along each axis, ``ahead[i]`` = max of ``[i, i + half]`` (clipped) is built by doubling
    spans (spans of 1, 2, 4, ... px, the last one overlapping), in about ``log2(half) + 1``
    passes, and the window ``[i - half, i + half]`` is ``max(ahead[i - half], ahead[i])``
    (``ahead[0]`` near the start, whose span lies inside the clipped window)."""
    out = image
    for axis in (1, 0):
        out = _axis_window_max(out, half, axis)
    return out if out is not image else image.copy()


def _axis_window_max(image: np.ndarray, half: int, axis: int) -> np.ndarray:
    n = image.shape[axis]
    reach = min(half, n - 1)
    if reach < 1:
        return image.copy()

    def span(start, stop):
        index = [slice(None), slice(None)]
        index[axis] = slice(start, stop)
        return tuple(index)

    # ahead[i] = max of image[i : i + width] (clipped), the width doubling; two buffers in
    # turn, so that no maximum reads what it writes.
    ahead, spare = image, None
    width = 1
    while width < reach + 1:
        step = min(width, reach + 1 - width)  # the last doubling overlaps to land on reach + 1
        target = np.empty_like(image) if spare is None or spare is image else spare
        np.maximum(ahead[span(0, n - step)], ahead[span(step, n)], out=target[span(0, n - step)])
        target[span(n - step, n)] = ahead[span(n - step, n)]
        ahead, spare = target, ahead
        width += step
    out = spare if spare is not None and spare is not image else np.empty_like(image)
    np.maximum(ahead[span(reach, n)], ahead[span(0, n - reach)], out=out[span(reach, n)])
    np.maximum(ahead[span(0, reach)], ahead[span(0, 1)], out=out[span(0, reach)])
    return out


def _find_peaks_host(matched, image, *, half: int, threshold, margin: int):
    """:func:`find_peaks` on the host: the window maximum by shifted slices, and the "data all
    around" test only at the candidates (the same as eroding "has data" ``margin`` times with
    a 3 x 3 square): their own windows where they are few, else a summed-area table of the
    no-data pixels."""
    h, w = matched.shape
    peaks = (matched > threshold) & (matched == _window_max(matched, half))
    peaks[:margin] = False
    peaks[h - margin :] = False
    peaks[:, :margin] = False
    peaks[:, w - margin :] = False
    ys, xs = np.nonzero(peaks)
    side = 2 * margin + 1
    if ys.size and ys.size * side * side < h * w:
        # Few candidates: look at their own windows (all inside the image, by the margin).
        holes = ~_data_around(image, xs, ys, margin)
        peaks[ys[holes], xs[holes]] = False
    elif ys.size:
        empty = np.zeros((h + 1, w + 1), dtype=np.int32)
        np.cumsum(~(image > 0), axis=0, dtype=np.int32, out=empty[1:, 1:])
        np.cumsum(empty[1:, 1:], axis=1, dtype=np.int32, out=empty[1:, 1:])
        top, bottom, left, right = ys - margin, ys + margin + 1, xs - margin, xs + margin + 1
        holes = empty[bottom, right] - empty[top, right] - empty[bottom, left] + empty[top, left]
        peaks[ys[holes > 0], xs[holes > 0]] = False
    return peaks


#: Candidate windows looked at in one go by :func:`_find_peaks_host`.
_WINDOWS_AT_ONCE = 2048


def _data_around(image, xs, ys, margin: int) -> np.ndarray:
    """Whether every pixel of ``image`` within ``margin`` px (a square) of each pixel ``xs,
    ys`` holds data (is above 0; outside the image is no data), as a host bool array: the
    candidates' own windows, :data:`_WINDOWS_AT_ONCE` at a time."""
    be = get_backend(image)
    out = np.zeros(np.size(xs), dtype=bool)
    for start in range(0, out.size, _WINDOWS_AT_ONCE):
        chunk = slice(start, start + _WINDOWS_AT_ONCE)
        windows = gather_stamps(image, xs[chunk], ys[chunk], margin)
        out[chunk] = be.to_host((windows > 0).all(axis=(1, 2)))
    return out


def detect_stars(
    data,
    *,
    fwhm: float | None = None,
    detection_sigma: float = 5.0,
    max_stars: int = 20000,
) -> StarCatalog:
    """Detect stars on a frame.

    Parameters
    ----------
    data : array (channels, height, width) or (height, width)
        Frame data on any backend; 0 marks no data.

    fwhm : float, optional
        PSF FWHM guess in pixels for the matched filter; estimated when not given (a first
        pass with 3 px, then a second pass with the measured value).

    detection_sigma : float
        Threshold of the matched-filter image in units of its noise.

    max_stars : int
        Keep at most this many stars, brightest first.

    Returns
    -------
    StarCatalog
        Host arrays, sorted by flux, brightest first.

    Notes
    -----
    Runs on the backend of ``data``; image-sized intermediates stay there. On a resampled
    frame (its noise correlated: :func:`nsg_gpu.resampling.interpolation_kernel`) the bright
    detections that are single pixels seen through an interpolation are left out
    (:func:`single_pixel_advantage`); on a colour frame, those whose light is in one channel
    (:func:`one_channel`: a colour sensor's hot pixel is one photosite). Once the frame's FWHM
    is read (from five stars or more, or fewer beside saturated ones:
    :data:`MIN_FWHM_READINGS`), on any frame, the detections that peak at
    :data:`FAINT_POINT_SNR` pixel sigmas or more are judged so again against stars of at
    least :data:`STAR_FWHM_SHARE` of it, where that is broader than
    :data:`POINT_TEST_FWHM`'s narrowest. On a frame a registration upscaled by k (its noise's
    correlations, :func:`nsg_gpu.noise.noise_step`), these tests take every k-th pixel around
    each detection: there a hot pixel is one captured pixel seen through the upscaling's
    interpolation, and a star has its captured width.
    """
    be = get_backend(data)
    xp = be.xp
    image = data if data.ndim == 2 else detection_image(data)
    image = image.astype(xp.float32, copy=False)
    image = _scattered_zeros_as_data(image, data)
    valid = image > 0
    correlation = noise_correlation(data if data.ndim == 3 else data[None])
    kernel = correlation_kernel(correlation)
    resampled = kernel is not None
    # A registration that upscaled by k: its hot pixels are judged on every k-th pixel.
    upscaled = noise_step(correlation, colour=data.ndim == 3 and data.shape[0] > 1)
    guess = 3.0 if fwhm is None else float(fwhm)
    catalog = _detect_once(be, image, valid, guess, detection_sigma, max_stars, resampled, data, upscaled)
    for _ in range(2):
        if fwhm is not None or len(catalog) < 5 or abs(catalog.fwhm - guess) < 0.2 * guess:
            break
        guess = float(np.clip(catalog.fwhm, 1.0, 20.0))
        catalog = _detect_once(be, image, valid, guess, detection_sigma, max_stars, resampled, data, upscaled)
    pieces, lines = trail_lines(catalog.x, catalog.y, catalog.flux, catalog.fwhm)
    catalog = catalog.take(~pieces)
    catalog.correlation, catalog.trails = correlation, lines
    return catalog


def trail_pieces(x: np.ndarray, y: np.ndarray, flux: np.ndarray, fwhm: float) -> np.ndarray:
    """Which detections are pieces of a satellite's or aircraft's trail, as a host bool
    array (:func:`trail_lines`)."""
    return trail_lines(x, y, flux, fwhm)[0]


def trail_lines(x: np.ndarray, y: np.ndarray, flux: np.ndarray, fwhm: float) -> tuple[np.ndarray, np.ndarray]:
    """Which detections are pieces of a satellite's or aircraft's trail (see
    :data:`TRAIL_REACH` and the constants after it), as a host bool array, and the trails,
    ``(k, 6)``: a point on each line, its direction, and how far along it (from that point)
    its pieces reach either way, and a link's reach (TRAIL_REACH FWHM) beyond,
    ``(x, y, dx, dy, first, last)`` (:func:`near_trails`).

    A trail is detected as dozens to hundreds of "stars" in a row: in a sparse field they
    outnumber the stars, judge a frame's registration and star signal-to-noise, and come out
    as pairs that no other frame has. Stars are not in a row: in a crowded field or a
    cluster a star's neighbours lie all around it, and a chance alignment of a few does not
    reach TRAIL_PIECES connected detections on one line.
    """
    x, y, flux = (np.asarray(a, np.float64) for a in (x, y, flux))
    n = x.size
    out = np.zeros(n, bool)
    lines = []
    if n < TRAIL_PIECES:
        return out, np.zeros((0, 6))
    width = max(float(fwhm), 1.0)
    pairs = cKDTree(np.column_stack([x, y])).query_pairs(TRAIL_REACH * width, output_type="ndarray")
    if pairs.shape[0] < TRAIL_PIECES:
        return out, np.zeros((0, 6))
    i, j = np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])
    dx, dy = x[j] - x[i], y[j] - y[i]
    count = np.bincount(i, minlength=n).astype(np.float64)
    # The scatter across the best line through each detection and its neighbours (the
    # detection itself at the origin, in the sums with weight one).
    points = count + 1.0
    mx, my = np.bincount(i, dx, n) / points, np.bincount(i, dy, n) / points
    sxx = np.bincount(i, dx * dx, n) / points - mx * mx
    syy = np.bincount(i, dy * dy, n) / points - my * my
    sxy = np.bincount(i, dx * dy, n) / points - mx * my
    across = 0.5 * (sxx + syy) - np.sqrt(0.25 * (sxx - syy) ** 2 + sxy * sxy)
    on_line = (count >= 2) & (across <= TRAIL_SCATTER**2)
    link = on_line[pairs[:, 0]] & on_line[pairs[:, 1]]
    if not link.any():
        return out, np.zeros((0, 6))
    graph = coo_matrix((np.ones(int(link.sum())), (pairs[link, 0], pairs[link, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels[on_line], minlength=labels.max() + 1)
    for label in np.nonzero(sizes >= TRAIL_PIECES)[0]:
        members = np.nonzero(on_line & (labels == label))[0]
        centre, along, scatter = _line_through(x[members], y[members])
        extent = np.ptp((x[members] - centre[0]) * along[0] + (y[members] - centre[1]) * along[1])
        if scatter > TRAIL_SCATTER**2 or extent < TRAIL_LENGTH * width:
            continue
        faint = flux <= TRAIL_STAR * np.median(flux[members])
        # The line through the chain, then through every piece near it (one chain may be a
        # short part of the trail, and its line off by pixels at the frame's far side).
        for _ in range(2):
            on = faint & (np.abs((x - centre[0]) * along[1] - (y - centre[1]) * along[0]) <= TRAIL_WIDTH)
            centre, along, _ = _line_through(x[on], y[on])
        if np.count_nonzero(out[on]) <= 0.5 * np.count_nonzero(on):
            # (Another chain of a trail already found gives its line again.)
            # Its stretch: from its first piece to its last, and a link's reach beyond each
            # (where the noise hid the next pieces, as it breaks the chain).
            position = (x[on] - centre[0]) * along[0] + (y[on] - centre[1]) * along[1]
            ends = (position.min() - TRAIL_REACH * width, position.max() + TRAIL_REACH * width)
            lines.append([centre[0], centre[1], along[0], along[1], *ends])
        out |= on
    return out, np.array(lines, np.float64).reshape(-1, 6)


def trail_coordinates(x, y, trail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points ``(x, y)`` in one trail's frame (a row of :func:`trail_lines`): their distance
    across its line, and how far beyond its pieces' ends they lie along it (0 between them)."""
    cx, cy, ax, ay, first, last = np.asarray(trail, np.float64)
    dx, dy = np.asarray(x, np.float64) - cx, np.asarray(y, np.float64) - cy
    position = dx * ax + dy * ay
    return np.abs(dx * ay - dy * ax), np.maximum(np.maximum(first - position, position - last), 0.0)


def near_trails(x, y, trails: np.ndarray, reach: float) -> np.ndarray:
    """Which points ``(x, y)`` lie within ``reach`` px of any of the ``trails``
    (:func:`trail_lines`: each its pieces' stretch of its line), as a host bool array."""
    near = np.zeros(np.shape(x), bool)
    for trail in np.asarray(trails, np.float64).reshape(-1, 6):
        across, beyond = trail_coordinates(x, y, trail)
        near |= np.hypot(across, beyond) <= reach
    return near


def _line_through(x: np.ndarray, y: np.ndarray) -> tuple[tuple[float, float], np.ndarray, float]:
    """The total least-squares line through points: their centre, the unit vector along the
    line, and the variance of their distances across it."""
    values, vectors = np.linalg.eigh(np.cov(np.vstack([x, y]), bias=True))
    return (float(x.mean()), float(y.mean())), vectors[:, 1], float(values[0])


def _brightest(peak_residual: np.ndarray, threshold: float) -> np.ndarray:
    """The detections whose peak stands more than ``threshold`` over the background, brightest
    first, :data:`POINT_TEST_MAX` at most."""
    tested = np.nonzero(peak_residual > threshold)[0]
    return tested[np.argsort(-peak_residual[tested], kind="stable")[:POINT_TEST_MAX]]


def _readings(be, image, background, cx, cy, index: np.ndarray, *, half: int) -> np.ndarray:
    """:func:`estimate_fwhm` of the detections ``index``, each above the smooth ``background``
    at its pixel."""
    rows = be.asarray(np.rint(cy[index]).astype(np.int64))
    cols = be.asarray(np.rint(cx[index]).astype(np.int64))
    return estimate_fwhm(image, cx[index], cy[index], background=background[rows, cols], half=half)


def _detect_once(
    be, image, valid, fwhm, detection_sigma, max_stars, resampled=False, data=None, upscaled: int = 1
) -> StarCatalog:
    xp = be.xp
    h, w = image.shape
    background = smooth_background(image, valid, scale=max(8.0 * fwhm, 16.0))
    residual = xp.where(valid, image - background, 0).astype(xp.float32)
    sigma = fwhm * _FWHM_TO_SIGMA
    matched = matched_filter(residual, sigma)
    # Noise of the matched image from the median absolute deviation of a pixel subsample.
    step = max(1, int(math.sqrt(h * w / 2.0e6)))
    sub = matched[::step, ::step][valid[::step, ::step]]
    if sub.size == 0:
        return _empty(fwhm)
    noise = _mad_sigma(sub)
    if not noise > 0:
        return _empty(fwhm)
    half = max(2, int(math.ceil(1.5 * fwhm)))
    # Stay clear of no-data pixels and of the image edge by a few FWHM.
    margin = half + int(math.ceil(2 * fwhm)) + 1
    size = 2 * max(1, int(round(fwhm))) + 1
    peaks = find_peaks(matched, image, half=size // 2, threshold=detection_sigma * noise, margin=margin)
    ys, xs = xp.nonzero(peaks)
    if ys.size == 0:
        return _empty(fwhm, noise)
    image_max = float(be.to_host(image.max()))
    # The residual's own pixel noise, which the point tests below count in.
    pixel_sigma = _mad_sigma(residual[::step, ::step][valid[::step, ::step]])
    pixel_noise = noise * math.sqrt(4 * math.pi) * sigma
    judge = functools.partial(
        _judge_peaks,
        be,
        image=image,
        half=half,
        fwhm=fwhm,
        pixel_noise=pixel_noise,
        pixel_sigma=pixel_sigma,
        image_max=image_max,
        resampled=resampled,
        data=data,
        step=upscaled,
    )
    cx, cy, flux, peak_value, peak_residual, keep, gone = judge(residual, xs, ys)
    # Stars with a point's light a few pixels away: found or measured without it, but their
    # pixels hold it, and they do not read the FWHM.
    by_point = xp.zeros(xs.shape, bool)
    # The residual the later point test reads: the points' pixels out where stars were
    # found or measured without them.
    judged_on = residual
    # The points bright enough to outshine a star (:data:`OUTSHONE_POINT_SNR`).
    gone = gone[peak_residual[gone] > OUTSHONE_POINT_SNR * pixel_sigma]
    if gone.size:
        fill = _point_fill(residual, xs[gone], ys[gone])
        # A hot pixel (or cosmic ray) brighter than a star a few pixels away holds the
        # matched image's maximum there, and the star is no peak of its own; the point goes,
        # and the stars it outshone are looked for again without it. A star kept beside one
        # is measured without it too (its centroid is not drawn to it, nor its flux raised).
        more_x, more_y = _outshone_peaks(
            be,
            matched,
            residual,
            image,
            xs[gone],
            ys[gone],
            fill,
            xs[keep],
            ys[keep],
            sigma,
            size // 2,
            detection_sigma * noise,
            margin,
        )
        beside, touching = _near_points(be, xs, ys, keep, xs[gone], ys[gone], half + 2)
        by_point[touching] = True
        if more_x.size or beside.size:
            judged_on = _without_points(residual, xs[gone], ys[gone], fill)
            if beside.size:
                again = judge(judged_on, xs[beside], ys[beside])
                for measure, remeasured in zip((cx, cy, flux, peak_value, peak_residual), again[:5]):
                    measure[beside] = remeasured
                by_point[beside] = True
            if more_x.size:
                more = judge(judged_on, more_x, more_y)
                cx, cy, flux, peak_value, peak_residual, xs, ys, keep, by_point = (
                    xp.concatenate([a, b])
                    for a, b in zip(
                        (cx, cy, flux, peak_value, peak_residual, xs, ys, keep, by_point),
                        (*more[:5], more_x, more_y, more[5], xp.ones(more_x.shape, bool)),
                    )
                )
    cx, cy, flux, peak_value, peak_residual, xs, ys, by_point = (
        be.to_host(a[keep]) for a in (cx, cy, flux, peak_value, peak_residual, xs, ys, by_point)
    )
    cx, cy, flux, peak_value, peak_residual = (a.astype(np.float64) for a in (cx, cy, flux, peak_value, peak_residual))
    order = np.argsort(-flux)[:max_stars]
    cx, cy, flux, peak_value, peak_residual, xs, ys, by_point = (
        a[order] for a in (cx, cy, flux, peak_value, peak_residual, xs, ys, by_point)
    )
    # A trail's pieces do not read the FWHM (five of them read 20 px on a sparse field).
    trail = trail_pieces(cx, cy, flux, fwhm)
    # FWHM from bright stars that are clearly unsaturated and well above the noise; on a
    # sparse field with fewer of them, from its five brightest (by flux: a hot pixel that a
    # registration spread over two pixels can peak as high as a star, with a fraction of its
    # flux) unsaturated detections that stand out of the noise enough to show their width,
    # among those no broader than stars (_compact: a nebula's knots outshine faint stars in
    # flux; a guess kept for want of stars sizes every aperture and filter after it). The noise
    # they stand above is the matched image's (which also holds what the filter keeps of the
    # nebula and of faint stars: 1.05-1.9 times the pixels' own on the generator's fields), at
    # most FWHM_NOISE_CAP times the pixels' own: on broad stars over a nebula it was 5 times
    # that, too few stars stood 30 of it above their sky, and five faint detections and knots
    # read 20 px where the stars have 9.7.
    unsaturated = peak_value < 0.5 * image_max
    readable = unsaturated & ~trail & ~by_point
    # (The pixels' own noise from a sixteenth of the subsample above: 4 ms on 26 MP.)
    coarse = residual[:: 4 * step, :: 4 * step][valid[:: 4 * step, :: 4 * step]]
    own = _mad_sigma(coarse) if coarse.size else pixel_noise
    reading_noise = min(pixel_noise, FWHM_NOISE_CAP * own)
    bright = np.nonzero(readable & (peak_residual > FWHM_PEAK_SNR * reading_noise))[0][:200]
    if bright.size < 5:
        shown = np.nonzero(readable & (peak_residual > SPARSE_FWHM_PEAK_SNR * reading_noise))[0]
        bright = shown[_compact(peak_residual[shown], flux[shown], fwhm)][:5]
    # Fewer readings will do where saturated stars make up the five: on a sparse field of
    # stars under a pixel whose brightest are saturated, two or three are unsaturated, and the
    # 3 px guess kept for want of five made apertures of 10 px that held the raw frames' hot
    # pixels rather than the stars' light. (Without saturated stars, a few readings among
    # hundreds of a registration's spread hot pixels stay unread, as they were.)
    saturated = int(np.count_nonzero(~unsaturated & ~trail & ~by_point))

    def enough(readings: int) -> bool:
        return readings >= MIN_FWHM_READINGS and readings + saturated >= 5

    measured, read = fwhm, False
    if enough(bright.size):
        values = _readings(be, image, background, cx, cy, bright, half=max(4, int(math.ceil(3 * fwhm))))
        usable = np.isfinite(values) & (values > 0.8)
        if enough(int(usable.sum())):
            measured, read = typical_fwhm(values[usable], flux[bright][usable]), True
    fwhms = _star_test_fwhms(measured / upscaled)
    if read and fwhms[0] > POINT_TEST_FWHM[0]:
        # Stars read, no star is much narrower than they are: the hot pixels that stars of
        # 0.8 px could pass for, and the fainter ones, are told from them; on a frame not
        # resampled too (a single pixel through no interpolation: the shift 0), where a
        # nebula's light under the smooth background lifts a faint one's cross with it.
        # (Where too few stars read the FWHM, the guess would take undersampled stars for
        # single pixels.)
        tested = _brightest(peak_residual, FAINT_POINT_SNR * pixel_sigma) if pixel_sigma > 0 else np.zeros(0, int)
        if tested.size:
            at = be.asarray(xs[tested]), be.asarray(ys[tested])
            star = np.ones(cx.size, bool)
            star[tested] = ~_seen_through_interpolation(
                data, image, judged_on, *at, pixel_sigma, image_max, fwhms, level=True, step=upscaled
            )
            cx, cy, flux, peak_value, peak_residual, by_point = (
                a[star] for a in (cx, cy, flux, peak_value, peak_residual, by_point)
            )
            unsaturated = peak_value < 0.5 * image_max
    if read and measured >= NARROW_TEST_FWHM and pixel_sigma > 0:
        # Broad stars read, no star is much narrower than they are: a hot pixel that a
        # registration's upscaling (Siril's 2x, a drizzle) made a blob of 2-3 px is no point
        # seen through a sub-pixel shift's kernel, and on an uncalibrated frame such blobs
        # outnumber the stars.
        # (Saturated stars read broad: flat tops. The hot pixels are as bright as stars.)
        tested = _brightest(peak_residual, NARROW_TEST_SNR * pixel_sigma)
        if tested.size:
            readings = _readings(be, image, background, cx, cy, tested, half=int(math.ceil(2 * measured)))
            star = np.ones(cx.size, bool)
            star[tested] = ~(readings < NARROW_SHARE * measured)
            cx, cy, flux, peak_value, peak_residual, by_point = (
                a[star] for a in (cx, cy, flux, peak_value, peak_residual, by_point)
            )
            unsaturated = peak_value < 0.5 * image_max
    # Extended sources (nebular knots, galaxies) are far less concentrated than the PSF: an
    # unsaturated star's sharpness is 0.4-1.3 whatever its FWHM, a knot's 0.1-0.3. Judged
    # against the brightest quarter's median, or, where knots outnumber stars there (a sparse
    # field on a nebula), against the median of the five highest unsaturated peaks, which are
    # stars; that one at most SHARPNESS_CAP, so that hot pixels there cannot raise it.
    # Saturated stars, flattened (0.1-0.3), stay: their circles keep background samples off.
    sharpness = peak_residual / flux * measured**2
    if sharpness.size >= 5:
        typical = float(np.median(sharpness[: max(5, sharpness.size // 4)]))
        candidates = np.nonzero(unsaturated)[0]
        if candidates.size >= 5:
            typical = max(typical, _highest_peaks_sharpness(sharpness[candidates], peak_residual[candidates]))
        point_like = (sharpness > 0.4 * typical) | ~unsaturated
        cx, cy, flux, peak_value, peak_residual, by_point = (
            a[point_like] for a in (cx, cy, flux, peak_value, peak_residual, by_point)
        )
    level = np.maximum(peak_residual / max(3 * pixel_noise, 1e-30), 1.0 + 1e-9)
    radius = np.maximum(measured * _FWHM_TO_SIGMA * np.sqrt(2 * np.log(level)), 1.0)
    return StarCatalog(cx + 0.0, cy + 0.0, flux, peak_value, radius, measured, noise, near_point=by_point)


def _judge_peaks(
    be, residual, xs, ys, *, image, half, fwhm, pixel_noise, pixel_sigma, image_max, resampled, data, step=1
):
    """The first measures of the peaks at pixels ``xs, ys`` (backend arrays) of the matched
    image, on ``residual`` (the background-subtracted detection image) within ``half`` px:
    centroid, flux, peak value and peak above the background; which of them are stars, not
    hot pixels or cosmic rays (the tests below); and the indices of those that had light and
    were taken for such points (on the backend)."""
    xp = be.xp
    win = gather_stamps(residual, xs, ys, half)
    weights = xp.clip(win, 0, None)
    total = weights.sum(axis=(1, 2))
    offsets = xp.arange(-half, half + 1, dtype=xp.float32)
    ok = total > 0
    cy = ys + (weights.sum(axis=2) * offsets).sum(axis=1) / xp.where(ok, total, 1)
    cx = xs + (weights.sum(axis=1) * offsets).sum(axis=1) / xp.where(ok, total, 1)
    rr = offsets[:, None] ** 2 + offsets[None, :] ** 2
    flux = (win * (rr <= (2 * fwhm) ** 2)).sum(axis=(1, 2))
    peak_value = gather_stamps(image, xs, ys, 1).max(axis=(1, 2))
    peak_residual = win[:, half - 1 : half + 2, half - 1 : half + 2].max(axis=(1, 2))
    # Hot pixels and cosmic rays: a star's 4-neighbours hold a good share of its peak
    # (half of it at FWHM 2 px), a single bright pixel's do not. An undersampled star near a
    # pixel's centre keeps less in its cross (15-20 % of its peak at FWHM 1-1.6 px, 3-12 % at
    # 0.5-0.7 px before the pixels), but its light shows on both sides of it along every
    # axis: twice the lesser of each pair of opposite neighbours, summed over the four axes,
    # is a tenth of its peak or more wherever its cross holds less than a fifth (stars of
    # 0.6 px and more). A hot pixel's neighbours hold the sky, and a pair of hot pixels, or a
    # hot pixel beside a star, lights one side only.
    centre = win[:, half, half]
    cross = 0.25 * (win[:, half - 1, half] + win[:, half + 1, half] + win[:, half, half - 1] + win[:, half, half + 1])
    lit = ok & (flux > 0)
    keep = lit & (cross > 0.2 * centre)
    # The rest (few where the stars are resolved) are judged by the light on both sides.
    judged = xp.nonzero(lit & ~keep)[0]
    if judged.size:
        sub = win[judged]
        ring = sub[:, half - 1 : half + 2, half - 1 : half + 2] - _edge_median(sub)[:, None, None]
        symmetric = 2 * sum(
            xp.minimum(ring[:, 1 + dy, 1 + dx], ring[:, 1 - dy, 1 - dx]) for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1))
        )
        c = centre[judged]
        keep[judged] = (symmetric > UNDERSAMPLED_AROUND * c) & (symmetric > AROUND_SNR * pixel_noise)
    if resampled:
        # A resampled frame: a hot pixel comes out spread over its neighbours by the
        # interpolation, and passes the tests above; its shape is the kernel's.
        tested = xp.nonzero(keep & (centre > POINT_TEST_SNR * pixel_sigma))[0]
        tested = tested[xp.argsort(-centre[tested])[:POINT_TEST_MAX]]
        if tested.size:
            points = _seen_through_interpolation(
                data, image, residual, xs[tested], ys[tested], pixel_sigma, image_max, POINT_TEST_FWHM, step=step
            )
            keep[tested[be.asarray(points)]] = False
    return cx, cy, flux, peak_value, peak_residual, keep, xp.nonzero(lit & ~keep)[0]


def _outshone_peaks(be, matched, residual, image, px, py, fill, kx, ky, sigma, nms_half, threshold, margin):
    """Peaks that the points at pixels ``px, py`` (rejected detections: hot pixels, cosmic
    rays) held down: the pixels of the matched image's maxima near the points once the light
    of their 5 x 5 pixels of ``residual``, less ``fill`` (host, per point: the median of the
    ring around them, :func:`_point_fill`), is taken out of it (over ``threshold``, with data ``margin`` px
    around, the maximum within ``nms_half`` px, as :func:`find_peaks`), at least
    :data:`OUTSHONE_CLEAR` px from every point and more than ``nms_half`` px from the
    detections kept (``kx, ky``), on the backend.

    Local: each point's light is convolved with the matched filter's Gaussian of ``sigma``
    px on a block around it (the filter is linear) and subtracted there, and the block's
    maxima found on the host, :data:`_POINTS_AT_ONCE` points at a time: a frame's hundreds or
    thousands of hot pixels cost milliseconds, not a pass over the frame. Where two points'
    blocks overlap, each block keeps the other's light (a peak there is judged with it)."""
    xp = be.xp
    reach = 2 + int(math.ceil(4.0 * sigma))  # where a point's light moves the matched image
    block = reach + nms_half
    side = 2 * block + 1
    centre = slice(block - 2, block + 3)
    offsets = np.arange(-block, block + 1)
    inner = (np.abs(offsets)[:, None] <= reach) & (np.abs(offsets)[None, :] <= reach)
    clear = (np.abs(offsets)[:, None] >= OUTSHONE_CLEAR) | (np.abs(offsets)[None, :] >= OUTSHONE_CLEAR)
    host_x, host_y = be.to_host(px).astype(np.int64), be.to_host(py).astype(np.int64)
    x, y, height = [], [], []
    for first in range(0, host_x.size, _POINTS_AT_ONCE):
        cx, cy = px[first : first + _POINTS_AT_ONCE], py[first : first + _POINTS_AT_ONCE]
        patches = be.to_host(gather_stamps(residual, cx, cy, 2)).astype(np.float64)
        patches -= fill[first : first + _POINTS_AT_ONCE, None, None]
        light = np.zeros((patches.shape[0], side, side))
        light[:, centre, centre] = patches
        light = scipy.ndimage.gaussian_filter(light, (0, sigma, sigma), mode="constant")
        values = be.to_host(gather_stamps(matched, cx, cy, block)).astype(np.float64) - light
        highest = scipy.ndimage.maximum_filter(
            values, size=(1, 2 * nms_half + 1, 2 * nms_half + 1), mode="constant", cval=-np.inf
        )
        found = (values == highest) & (values > threshold) & (inner & clear)[None]
        k, dy, dx = np.nonzero(found)
        x.append(host_x[first + k] + offsets[dx])
        y.append(host_y[first + k] + offsets[dy])
        height.append(values[k, dy, dx])
    x, y, height = (np.concatenate(a) for a in (x, y, height))
    px, py = host_x, host_y
    # One peak per place (blocks overlap), the highest first; none near a point or a star kept.
    kx, ky = be.to_host(kx), be.to_host(ky)
    at = np.column_stack([x, y])
    apart = cKDTree(np.column_stack([px, py])).query(at, p=np.inf)[0] >= OUTSHONE_CLEAR if x.size else np.zeros(0, bool)
    if x.size and kx.size:
        apart &= cKDTree(np.column_stack([kx, ky])).query(at, p=np.inf)[0] > nms_half
    if x.size:
        # Data all around (a square of ``margin`` px), as find_peaks asks of its peaks.
        apart &= _data_around(image, be.asarray(x), be.asarray(y), margin)
    x, y, height = x[apart], y[apart], height[apart]
    chosen = []
    for i in np.lexsort((x, y, -height)):
        if all(max(abs(x[i] - x[j]), abs(y[i] - y[j])) > nms_half for j in chosen):
            chosen.append(i)
    chosen = np.asarray(chosen, np.int64)
    return be.asarray(x[chosen]).astype(xp.int64), be.asarray(y[chosen]).astype(xp.int64)


def _near_points(be, xs, ys, keep, px, py, reach: int):
    """Indices (on the backend) of the detections kept (``keep``) at pixels ``xs, ys`` that
    have a point at ``px, py`` within ``reach`` px (along x or y) but none nearer than
    :data:`OUTSHONE_CLEAR`, to be measured without the points; and of those with one nearer
    (the point's 5 x 5 pixels hold the star's own: measured as they are)."""
    kept = be.to_host(be.xp.nonzero(keep)[0])
    if kept.size == 0:
        return be.asarray(kept), be.asarray(kept)
    points = cKDTree(np.column_stack([be.to_host(px), be.to_host(py)]))
    at = np.column_stack([be.to_host(xs)[kept], be.to_host(ys)[kept]])
    nearest = points.query(at, p=np.inf)[0]
    touching = nearest < OUTSHONE_CLEAR
    return be.asarray(kept[(nearest <= reach) & ~touching]), be.asarray(kept[touching])


def _without_points(residual, px, py, fill):
    """``residual`` (a copy) with the 5 x 5 pixels around each point at ``px, py`` replaced by
    ``fill`` (host, per point: the median of the ring just outside them, :func:`_point_fill`):
    the point's light out, the sky or nebula under it kept."""
    be = get_backend(residual)
    px, py = be.to_host(px).astype(np.int64), be.to_host(py).astype(np.int64)
    cleaned = residual.copy()
    for oy in range(-2, 3):
        for ox in range(-2, 3):
            rows, cols = py + oy, px + ox
            inside = (rows >= 0) & (rows < residual.shape[0]) & (cols >= 0) & (cols < residual.shape[1])
            cleaned[be.asarray(rows[inside]), be.asarray(cols[inside])] = be.asarray(fill[inside])
    return cleaned


def _point_fill(residual, px, py) -> np.ndarray:
    """Per point at ``px, py``: the median of ``residual``'s ring of pixels just outside its 5 x 5
    pixels (the edge of the 7 x 7 square), on the host, in ``residual``'s type."""
    be = get_backend(residual)
    return be.to_host(_edge_median(gather_stamps(residual, px, py, 3))).astype(residual.dtype)


def _highest_peaks_sharpness(sharpness: np.ndarray, peak: np.ndarray) -> float:
    """The median ``sharpness`` (peak over flux times the FWHM squared) of the five highest
    ``peak``s, which are stars, at most :data:`SHARPNESS_CAP`, so that single hot pixels among
    them do not raise it."""
    highest = np.argsort(-peak, kind="stable")[:5]
    return min(float(np.median(sharpness[highest])), SHARPNESS_CAP)


def _compact(peak: np.ndarray, flux: np.ndarray, fwhm: float) -> np.ndarray:
    """Which detections (``peak`` above the background and ``flux``, brightest first) are no
    broader than stars: sharpness at ``fwhm`` (the pass's FWHM) at least
    :data:`SPARSE_FWHM_COMPACT` of the five highest peaks' (:func:`_highest_peaks_sharpness`;
    the knots of a nebula peak low for their flux)."""
    sharpness = peak / np.where(flux > 0, flux, np.inf) * fwhm**2
    if sharpness.size < 5:
        return np.ones(sharpness.size, bool)
    return sharpness >= SPARSE_FWHM_COMPACT * _highest_peaks_sharpness(sharpness, peak)


def _seen_through_interpolation(
    data, image, residual, xs, ys, pixel_sigma, image_max, fwhms, level: bool = False, step: int = 1
) -> np.ndarray:
    """Which detections at pixels ``xs, ys`` (on the image's backend) are single pixels, seen
    through a registration's interpolation where there was one, rather than stars of
    ``fwhms`` (:func:`single_pixel_advantage` on ``residual``, the background-subtracted
    detection image; its templates hold the identity, an interpolation at shift 0; with
    ``level``, both on a level of their own): a host bool array.

    ``step``: the frame was upscaled by that factor (:func:`nsg_gpu.noise.noise_step`), and
    each window takes every ``step``-th pixel around the detection, where a hot pixel is one
    captured pixel seen through the upscaling's interpolation and a star has its captured
    width (``fwhms`` in captured pixels)."""
    be = get_backend(image)
    if data is not None and data.ndim == 3 and data.shape[0] > 1:
        # A colour sensor's hot pixel is one photosite: its light is in one channel, and its
        # shape is judged there (in the intensity, min + max of the channels, a lobe clamped at
        # zero in that channel does not show as clamped). Stars of a pixel or less before the
        # registration can look like single pixels too, but show in every channel.
        single, windows, raw, photosite = _one_channel_windows(data, xs, ys, pixel_sigma, step)
        unclamped = raw > CLAMPED * image_max
        return photosite | (single & (single_pixel_advantage(windows, pixel_sigma, unclamped, fwhms, level) > 0))
    inner = be.to_host(_windows(residual, xs, ys, step))
    raw = be.to_host(_windows(image, xs, ys, step))
    unclamped = raw > CLAMPED * image_max
    return single_pixel_advantage(inner, pixel_sigma, unclamped, fwhms, level) > HOT_PIXEL_CHI2


def _windows(image, xs, ys, step: int = 1):
    """5 x 5 windows of ``image`` centred on pixels ``xs, ys``, of every ``step``-th pixel
    along both axes; on the image's backend."""
    return gather_stamps(image, xs, ys, 2 * step)[:, ::step, ::step]


def _registered(taps: np.ndarray, captured: np.ndarray) -> np.ndarray:
    """Registered 1-D profiles at offsets -2..2 of captured profiles ``(n, offsets -m..m)``
    through ``taps`` (``-h..h``): registered ``p`` is ``sum_a taps[a] captured(p + a)``."""
    h, m = taps.size // 2, captured.shape[1] // 2
    rows = np.zeros((5, captured.shape[1]))
    for i, p in enumerate(range(-2, 3)):
        for a in range(-h, h + 1):
            if -m <= p + a <= m:
                rows[i, p + a + m] += taps[a + h]
    return captured @ rows.T


def _unit_outer(py: np.ndarray, px: np.ndarray) -> np.ndarray:
    """Every outer product of a row of ``py`` and one of ``px`` as unit-norm 5 x 5 templates,
    ``(25, n)``."""
    t = (py[:, None, :, None] * px[None, :, None, :]).reshape(-1, 25)
    return (t / np.linalg.norm(t, axis=1, keepdims=True)).T


def _point_templates(
    fwhms: tuple[float, ...] = POINT_TEST_FWHM,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Unit-norm 5 x 5 templates ``(25, n)``: a single captured pixel (under the registered
    one or a neighbour) seen through each interpolation of
    :data:`nsg_gpu.resampling.INTERPOLATIONS` at shifts of -1/2 to 1/2 px in steps of
    :data:`POINT_TEST_STEP` along x and y; and pixel-integrated Gaussian stars of ``fwhms``
    at quarter-pixel places within a pixel of the centre, through each interpolation at shifts
    of -1/4, 0, 1/4 and 1/2 px. Made once for each ``fwhms``. Each family comes with its
    templates' squares: a template's norm over the pixels a window keeps is the root of
    their sum there."""
    return _single_pixel_templates(), _star_templates(tuple(fwhms))


@functools.lru_cache(maxsize=1)
def _single_pixel_templates() -> tuple[np.ndarray, np.ndarray]:
    point = []
    for name in INTERPOLATIONS:
        points = np.concatenate([_point_profiles(name, float(v), np.arange(-1, 2)) for v in _point_shifts()])
        point.append(_unit_outer(points, points))
    point = np.concatenate(point, axis=1)
    return point, point**2


@functools.lru_cache(maxsize=8)
def _star_templates(fwhms: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    star = []
    for name in INTERPOLATIONS:
        for fwhm in fwhms:
            stars = np.concatenate([_star_profiles(name, fwhm, v, _STAR_PLACES) for v in _STAR_SHIFTS])
            star.append(_unit_outer(stars, stars))
    star = np.concatenate(star, axis=1)
    return star, star**2


def _star_test_fwhms(fwhm: float) -> tuple[float, ...]:
    """The star FWHMs a frame whose stars read ``fwhm`` px is tested against, once that is
    read: :data:`STAR_FWHM_SHARE` of it (down to a tenth of a pixel) and the broader
    ones of :data:`POINT_TEST_FWHM`."""
    narrowest = math.floor(10 * STAR_FWHM_SHARE * fwhm) / 10
    return (narrowest, *(f for f in POINT_TEST_FWHM if f > narrowest))


#: The star templates' registration shifts and places (within a pixel of the centre).
_STAR_SHIFTS = (-0.25, 0.0, 0.25, 0.5)
_STAR_PLACES = np.arange(-1.0, 1.0001, 0.25)
#: Captured profiles span this many pixels either side, enough for the kernels' taps.
_PROFILE_HALF = 2 + MATCHED_HALF + 2


def _point_profiles(name: str, shift: float, pixels: np.ndarray) -> np.ndarray:
    """Registered 1-D profiles (offsets -2..2) of single captured pixels at ``pixels``
    through interpolation ``name`` at ``shift``, ``(len(pixels), 5)``."""
    m = _PROFILE_HALF
    single = np.zeros((len(pixels), 2 * m + 1))
    single[np.arange(len(pixels)), m + np.asarray(pixels)] = 1.0
    return _registered(_signed_taps(name, shift), single)


def _star_profiles(name: str, fwhm: float, shift: float, places: np.ndarray) -> np.ndarray:
    """Registered 1-D profiles (offsets -2..2) of pixel-integrated Gaussians of ``fwhm`` at
    ``places`` through interpolation ``name`` at ``shift``, ``(len(places), 5)``."""
    from scipy.special import ndtr

    q = np.arange(-_PROFILE_HALF, _PROFILE_HALF + 1)
    sigma = fwhm * _FWHM_TO_SIGMA
    places = np.asarray(places, float)[:, None]
    captured = ndtr((q + 0.5 - places) / sigma) - ndtr((q - 0.5 - places) / sigma)
    return _registered(_signed_taps(name, shift), captured)


def single_pixel_advantage(
    windows: np.ndarray,
    pixel_sigma: float,
    valid: np.ndarray | None = None,
    fwhms: tuple[float, ...] = POINT_TEST_FWHM,
    level: bool = False,
) -> np.ndarray:
    """How much better, in chi-square (``pixel_sigma`` per pixel), a single captured pixel
    seen through a registration's interpolation fits each 5 x 5 window (background-subtracted,
    centred on a detection; host array ``(n, 5, 5)``) than any star of ``fwhms`` (px,
    ascending): large for a hot pixel or cosmic ray that a registration spread over its
    neighbours, which the tests of a single bright pixel no longer see; negative for stars.

    The interpolation and its shift are free for every window (:func:`_point_templates`): a
    registration that also rotated or warped the frame shifts each pixel by its own amount,
    and one that clamps its kernel's lobes at high contrast shows a hot pixel through another
    kernel than the noise's. A least-squares amplitude per template: the chi-square is the
    window's square sum less the square of its projection on the unit template, so only the
    largest projections count.

    ``valid`` (``(n, 5, 5)`` bool), where given, marks the pixels that hold data: a
    registration clamps the negative lobes of a bright point's interpolation at zero, and
    such pixels (and no-data ones) are left out of that window's fit, every template cut to
    the rest and normalized again.

    With ``level``, both fits have a level of their own too (every template less its mean
    over the window's kept pixels, normalized again): a nebula's light that the smooth
    background leaves under a warm pixel is no star's wing."""
    fwhms = tuple(fwhms)
    (point, point_squares), (star, star_squares) = _point_templates(fwhms)
    flat = np.asarray(windows, dtype=np.float64).reshape(len(windows), 25)
    keep = np.ones(flat.shape, bool) if valid is None else np.asarray(valid, bool).reshape(flat.shape)
    best_point, best_star = np.zeros(len(flat)), np.zeros(len(flat))
    chosen_point, chosen_star = np.zeros(len(flat), np.int64), np.zeros(len(flat), np.int64)
    # One BLAS thread: the same sums, and so the same decisions, on any machine.
    with single_threaded_blas():
        full = keep.all(axis=1)
        levelled = _levelled_templates(fwhms) if level else (None, None)
        for best, chosen, templates, squares, centred in (
            (best_point, chosen_point, point, point_squares, levelled[0]),
            (best_star, chosen_star, star, star_squares, levelled[1]),
        ):
            # Full windows a few at a time into one buffer: every window's projections on
            # tens of thousands of templates at once would be a fresh array of hundreds of
            # megabytes, which costs more to fill than the products themselves.
            whole = np.nonzero(full)[0]
            matrix = centred if level else templates
            buffer = np.empty((min(whole.size, _FULL_WINDOWS_AT_ONCE), matrix.shape[1]))
            for start in range(0, whole.size, _FULL_WINDOWS_AT_ONCE):
                rows = whole[start : start + _FULL_WINDOWS_AT_ONCE]
                projections = np.matmul(flat[rows], matrix, out=buffer[: rows.size])
                best[rows], chosen[rows] = _row_best(projections)
            # Windows with pixels left out: each template cut to the rest and normalized
            # again, a few windows at a time (the norms from the templates' squares).
            cut = np.nonzero(~full)[0]
            for start in range(0, cut.size, _CUT_WINDOWS_AT_ONCE):
                rows = cut[start : start + _CUT_WINDOWS_AT_ONCE]
                kept = keep[rows].astype(np.float64)
                values = np.where(keep[rows], flat[rows], 0.0)
                dot, square_sums = values @ templates, kept @ squares
                if level:
                    count = np.maximum(kept.sum(axis=1, keepdims=True), 1.0)
                    level_sums = (kept @ templates, values.sum(axis=1, keepdims=True), count)
                    projections = _kept_projections(dot, square_sums, *level_sums)
                else:
                    projections = _kept_projections(dot, square_sums)
                best[rows], chosen[rows] = _row_best(projections)
        # Both grids refined around their best: at a signal-to-noise of hundreds a grid's
        # step alone misfits a hot pixel or a star by more than the two differ.
        for best, chosen, refined in (
            (best_point, chosen_point, _refined_points),
            (best_star, chosen_star, functools.partial(_refined_stars, fwhms=fwhms)),
        ):
            pairs = [(i, rows) for i in range(len(flat)) for rows in refined(int(chosen[i]))]
            if pairs:
                owner = np.array([i for i, _ in pairs])
                rows_y, rows_x = (np.stack([rows[axis] for _, rows in pairs]) for axis in (0, 1))
                fine = _refined_best(flat[owner], keep[owner], full[owner] & (not level), rows_y, rows_x, level)
                np.maximum.at(best, owner, fine)
    best_point, best_star = np.maximum(best_point, 0), np.maximum(best_star, 0)
    return (best_point**2 - best_star**2) / pixel_sigma**2


def _row_best(projections: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's largest value and its first column, in one pass over the rows."""
    chosen = projections.argmax(axis=1)
    return np.take_along_axis(projections, chosen[:, None], axis=1)[:, 0], chosen


#: Full windows whose projections are made together (a quarter to a half megabyte each).
_FULL_WINDOWS_AT_ONCE = 32

#: Windows with pixels left out whose projections are made together (each a row of as many
#: values as there are templates, up to 70000: half a megabyte a window).
_CUT_WINDOWS_AT_ONCE = 16


def _refined_best(flat, keep, whole, rows_y, rows_x, level: bool) -> np.ndarray:
    """The largest projection of each window ``flat`` ``(n, 25)`` (its kept pixels ``keep``)
    on the outer products of its pair of unit profiles ``rows_y``, ``rows_x`` ``(n, 21, 5)``:
    the refined templates around a window's best. Windows ``whole`` (every pixel kept, no
    level) take them as two small products; the others cut to their kept pixels
    (:func:`_outer_projections`). ``(n,)``."""
    fine = np.empty(len(flat))
    for start in range(0, len(flat), _REFINED_AT_ONCE):
        part = slice(start, start + _REFINED_AT_ONCE)
        plain = start + np.nonzero(whole[part])[0]
        rest = start + np.nonzero(~whole[part])[0]
        if plain.size:
            fine[plain] = _bilinear(rows_y[plain], flat[plain], rows_x[plain]).max(axis=(1, 2))
        if rest.size:
            projections = _outer_projections(flat[rest], keep[rest], rows_y[rest], rows_x[rest], level)
            fine[rest] = projections.max(axis=(1, 2))
    return fine


#: Windows' refined templates taken together (441 values a window in each of a few arrays:
#: a few megabytes).
_REFINED_AT_ONCE = 1024


def _bilinear(rows_y: np.ndarray, windows: np.ndarray, rows_x: np.ndarray) -> np.ndarray:
    """``rows_y @ window @ rows_x.T`` for each window ``(n, 25)`` and its profiles ``(n, a, 5)``,
    ``(n, b, 5)``: the window's sums over the outer products of every pair of rows,
    ``(n, a, b)``."""
    return np.matmul(np.matmul(rows_y, windows.reshape(-1, 5, 5)), np.swapaxes(rows_x, 1, 2))


def _outer_projections(values, keep, rows_y, rows_x, level: bool = False) -> np.ndarray:
    """The projections of each window's ``values`` ``(n, 25)`` on the outer products of every
    row of its ``rows_y`` ``(n, a, 5)`` and one of its ``rows_x`` ``(n, b, 5)``, each template
    cut to the window's ``keep`` pixels and normalized again (with ``level``, less its mean
    over them first); templates with no weight left give 0. ``(n, a, b)``.

    A template's sums over the kept pixels are bilinear forms of its profiles, so each is two
    small products: its sum with the values, its square sum (the profiles squared) and, for
    the level, its plain sum."""
    kept = np.asarray(keep, np.float64)
    values = np.where(keep, values, 0.0)
    dot, square_sums = _bilinear(rows_y, values, rows_x), _bilinear(rows_y**2, kept, rows_x**2)
    if level:
        count = np.maximum(kept.sum(axis=1), 1.0)[:, None, None]
        level_sums = (_bilinear(rows_y, kept, rows_x), values.sum(axis=1)[:, None, None], count)
        return _kept_projections(dot, square_sums, *level_sums)
    return _kept_projections(dot, square_sums)


def _kept_projections(dot, square_sums, sums=None, value_sums=None, count=None) -> np.ndarray:
    """Projections of windows on templates cut to each window's kept pixels and normalized
    again, from the templates' sums there: ``dot`` with the window's values and
    ``square_sums`` of their squares; with a level (``sums`` of the templates, ``value_sums``
    of the values, ``count`` kept pixels, all broadcast alike), each template less its mean
    over the kept pixels first. Templates with no weight left give 0."""
    floor = 0.0
    if sums is not None:
        square_sums = square_sums - sums * sums / count
        dot = dot - sums * value_sums / count
        floor = 1e-12
    norm = np.sqrt(np.maximum(square_sums, 0.0))
    return dot / np.where(norm > floor, norm, np.inf)


def _centred(templates: np.ndarray) -> np.ndarray:
    """``templates`` ``(pixels, n)`` less each column's mean, normalized again (a column with
    nothing left gives 0): a template's fit with a level of its own."""
    centred = templates - templates.mean(axis=0)
    norm = np.linalg.norm(centred, axis=0)
    return centred / np.where(norm > 1e-12, norm, np.inf)


@functools.lru_cache(maxsize=8)
def _levelled_templates(fwhms: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_point_templates`' single-pixel and star templates :func:`_centred`, made once
    for each ``fwhms``."""
    (point, _), (star, _) = _point_templates(fwhms)
    return _centred(point), _centred(star)


def _point_shifts() -> np.ndarray:
    return np.round(np.arange(-0.5, 0.5001, POINT_TEST_STEP), 6)


def _signed_taps(name: str, shift: float) -> np.ndarray:
    """Taps of interpolation ``name`` at ``shift`` px, of either sign."""
    t = np.asarray(interpolation_taps(name, abs(shift)))
    return t if shift >= 0 else t[::-1]


def _refined_points(index: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Single-pixel templates around column ``index`` of :func:`_point_templates`' points, as
    pairs of 1-D profiles (y and x, unit rows ``(21, 5)``) whose outer products they are: the
    same interpolation, the point within one grid step of its own place along each axis, in
    steps of a tenth of it."""
    shifts = _point_shifts()
    rows = 3 * shifts.size
    name = index // rows**2
    row_y, row_x = divmod(index % rows**2, rows)
    return [(_refined_point_rows(name, row_y), _refined_point_rows(name, row_x))]


@functools.cache
def _refined_point_rows(name: int, row: int) -> np.ndarray:
    """Unit 1-D profiles ``(21, 5)`` around row ``row`` of the point profiles of interpolation
    ``INTERPOLATIONS[name]``. A place is a pixel and a shift (pixel ``p`` at shift ``v`` lies at
    ``v - p``); past half a pixel's shift it is the next pixel's, so that a point near the
    half pixel is refined on both sides."""
    shift_index, pixel = divmod(row, 3)
    places = _point_shifts()[shift_index] - (pixel - 1) + POINT_TEST_STEP * np.linspace(-1, 1, 21)
    nearest = np.floor(places + 0.5)  # the pixel (negated) whose shift is within -1/2..1/2
    profiles = np.concatenate(
        [_point_profiles(INTERPOLATIONS[name], float(u - n), [int(-n)]) for u, n in zip(places, nearest, strict=True)]
    )
    return profiles / np.linalg.norm(profiles, axis=1, keepdims=True)


def _refined_stars(index: int, fwhms: tuple[float, ...] = POINT_TEST_FWHM) -> list[tuple[np.ndarray, np.ndarray]]:
    """Star templates around column ``index`` of :func:`_point_templates`' stars of ``fwhms``,
    as pairs of 1-D profiles (y and x, unit rows ``(21, 5)``), one pair per FWHM: the same
    interpolation and shifts, places within half a grid step of its own along each axis in
    steps of a twentieth of the step, and FWHMs of its own and halfway (geometrically) to its
    neighbours in ``fwhms``."""
    rows = len(_STAR_SHIFTS) * len(_STAR_PLACES)
    per_name = len(fwhms) * rows**2
    name, f = index // per_name, (index % per_name) // rows**2
    row_y, row_x = divmod(index % rows**2, rows)
    tried = [fwhms[f]] + [math.sqrt(fwhms[f] * fwhms[g]) for g in (f - 1, f + 1) if 0 <= g < len(fwhms)]
    return [(_refined_star_rows(name, fwhm, row_y), _refined_star_rows(name, fwhm, row_x)) for fwhm in tried]


@functools.cache
def _refined_star_rows(name: int, fwhm: float, row: int) -> np.ndarray:
    """Unit 1-D profiles ``(21, 5)`` of stars of ``fwhm`` around row ``row`` of the star
    profiles of interpolation ``INTERPOLATIONS[name]``."""
    shift_index, place = divmod(row, len(_STAR_PLACES))
    step = _STAR_PLACES[1] - _STAR_PLACES[0]
    around = _STAR_PLACES[place] + step / 2 * np.linspace(-1, 1, 21)
    profiles = _star_profiles(INTERPOLATIONS[name], fwhm, _STAR_SHIFTS[shift_index], around)
    return profiles / np.linalg.norm(profiles, axis=1, keepdims=True)


def _one_channel_windows(data, x, y, pixel_sigma: float = 0.0, step: int = 1):
    """:func:`one_channel` of the detections at ``(x, y)``, with each one's 5 x 5 window of
    its brightest channel less that window's edge median, the same window as it is, and
    whether it is one photosite whatever its shape (:data:`PHOTOSITE_SHARE`, at a pixel noise
    of ``pixel_sigma``; none where that is 0): host arrays ``(n,)``, ``(n, 5, 5)``, ``(n, 5,
    5)``, ``(n,)``; the windows of every ``step``-th pixel (:func:`_windows`)."""
    raw = np.stack(
        [np.asarray(get_backend(data).to_host(_windows(data[c], x, y, step)), np.float64) for c in range(data.shape[0])]
    )
    light = _inner_light(raw)
    channel = np.argmax(light, axis=0)
    windows = raw[channel, np.arange(raw.shape[1])]
    most, total = light.max(axis=0), np.maximum(light.sum(axis=0), 1e-30)
    single = most >= ONE_CHANNEL_SHARE * total
    photosite = (most >= PHOTOSITE_SHARE * total) & (most >= PHOTOSITE_SNR * 3 * pixel_sigma) & (pixel_sigma > 0)
    return single, windows - _edge_median(windows)[:, None, None], windows, photosite


def _edge_median(windows):
    """The median of the edge pixels of each square window ``(n, k, k)``, on the windows'
    backend."""
    xp = get_backend(windows).xp
    edge = xp.concatenate([windows[:, 0], windows[:, -1], windows[:, 1:-1, 0], windows[:, 1:-1, -1]], axis=1)
    return xp.median(edge, axis=1)


def _inner_light(raw: np.ndarray) -> np.ndarray:
    """Each channel's light in the inner 3 x 3 of 5 x 5 windows ``(channels, n, 5, 5)``: its sum
    above the edge median, at least 0; ``(channels, n)``."""
    light = [np.clip((w[:, 1:-1, 1:-1] - _edge_median(w)[:, None, None]).sum(axis=(1, 2)), 0, None) for w in raw]
    return np.array(light)


def one_channel(data, x, y) -> np.ndarray:
    """True where one channel holds at least :data:`ONE_CHANNEL_SHARE` of the light in the
    3 x 3 pixels around ``(x, y)`` (integer pixels) of ``data`` ``(channels, h, w)``, any
    backend: each channel's sum above the median of the 5 x 5 window's edge pixels. A host
    array."""
    return _one_channel_windows(data, x, y)[0]


def _empty(fwhm: float, noise: float = 0.0) -> StarCatalog:
    e = np.zeros(0)
    return StarCatalog(e, e, e, e, e, float(fwhm), noise)


def neighbour_pairs(x: np.ndarray, y: np.ndarray, index: np.ndarray, reach: float) -> tuple[np.ndarray, np.ndarray]:
    """Each catalogue star within ``reach`` px of the stars ``index`` (of the catalogue ``x,
    y``), the star itself left out: pairs ``(k, j)``, ``k`` a position in ``index`` and ``j``
    the neighbour's catalogue index, in ``index``'s order."""
    index = np.asarray(index, np.int64)
    if index.size == 0 or np.size(x) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    tree = cKDTree(np.column_stack([x, y]))
    near = tree.query_ball_point(np.column_stack([np.asarray(x)[index], np.asarray(y)[index]]), r=reach)
    k = np.repeat(np.arange(index.size), [len(n) for n in near])
    j = np.fromiter((v for n in near for v in n), np.int64, count=k.size)
    other = j != index[k]
    return k[other], j[other]


def isolated(stars: StarCatalog, index: np.ndarray, reach: float) -> np.ndarray:
    """True for each star ``stars[index]`` that has no star brighter than 5 % of it within
    ``reach`` px."""
    index = np.asarray(index, np.int64)
    k, j = neighbour_pairs(stars.x, stars.y, index, reach)
    out = np.ones(index.size, bool)
    out[k[stars.flux[j] > 0.05 * stars.flux[index[k]]]] = False
    return out
