"""Differential photometry of the reference's stars.

Frames are registered, so every target is measured at the reference's star positions after
recentring; a star that moves further than ``star_search_radius`` is not paired, and a frame
where most stars move that far is reported as not registered. The background is the plain
annulus mean (photutils' ``ApertureStats`` definition, computed for all stars at once):
everything in the annulus but the sky and the noise (faint neighbours, nebula, wings)
scales with the transmission, and the mean stays linear in it; a
median or a clipped mean responds to faint neighbours in proportion to the noise instead,
which differs from frame to frame and biases the scale. A hot pixel or cosmic ray near a
star, in either frame, is left out of both (:func:`shared_defects`): left in, it spoils the
star's flux, and among the few pairs of a sparse field the robust fit cannot tell it from
the stars' own scatter.

Seeing changes between frames. Every star is measured in both frames within the same
circle, ``aperture_fwhm`` (3 by default) times the larger of the two FWHM, and with the same
pixel weights, so that whatever else lies there (neighbours, nebula) is the same sky in both
frames and cancels in the ratio; only the star's own light is shared differently by the two
PSFs. By default (``photometry="psf"``) each pixel is weighted by the broader frame's fitted
Moffat PSF, which puts the weight where the star's light is and gives about a third of a
plain aperture's noise; the share of a star's light those weights keep differs by up to 30 %
between frames, and :func:`seeing_correction` restores it from the two fitted PSFs
(:mod:`nsg_gpu.psf`, which fits the target's PSF against the reference's so that their
difference is right). With ``photometry="aperture"``, where one frame's stars are twice as
broad as the other's or more, or where a PSF cannot be fitted, the weights are a plain
photutils aperture, and the correction uses the two fitted PSFs where the stars are 2 px
and more and were fitted, else a Moffat of index 3 at each frame's FWHM
(``docs/scale-accuracy.md`` has what each reaches). The scale ``m`` per channel
is then fitted to the pairs by :mod:`nsg_gpu.scalefit`.

Images reach this module as small cutouts around the stars (a mosaic on the host), so a
frame on the GPU never crosses to the host whole.

In the flow: the measuring half of the scale stage (:mod:`nsg_gpu.scale`), below it; the
reference's measurements are kept by :class:`nsg_gpu.reference.Reference`.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, replace

import numpy as np
from scipy import integrate
from scipy.interpolate import CubicSpline

from .backend import get_backend
from .psf import MoffatPSF, pixel_mean
from .stamps import gather_stamps
from .stars import neighbour_pairs

#: Relative error floor of one star's flux (flat-field and PSF variations across the field);
#: it keeps the few brightest stars from outweighing all others in the fit.
SYSTEMATIC_ERROR = 0.005
#: Share of the aperture that may hold scattered zero pixels.
MAX_HOLE_FRACTION = 0.05
#: A pixel beyond a star's core is a defect of one frame (a hot pixel, a cosmic ray) where it
#: stands this many noise sigmas above the star's background, more than twice as far above
#: it as the mean of its 8 neighbours, and the other frame shows nothing there
#: (:func:`shared_defects`).
DEFECT_SIGMA = 8.0
#: What the other frame must show at a defect's pixel, in its noise sigmas, for it to be a
#: star seen in both instead.
SHOWN_SIGMA = 3.0
#: How far (px) a defect's mask reaches beyond the pixels that show it: a registration's
#: cubic spline spreads a hot pixel over 2 x 2 pixels at a half-pixel shift and rings beyond
#: (lobes of -13 %, +3.4 % and -0.9 % of it per axis), so that 3 px leave about 1 % of it.
DEFECT_REACH = 3
#: Defects within this many FWHM of a star's centre are not told from its own light.
DEFECT_CORE_FWHM = 2.0
#: Moffat index assumed for a frame whose PSF could not be fitted (too few bright isolated
#: stars). Seeing-limited stars have beta of about 2.5-4.5; on frames with beta 2.8-3.3 a
#: fixed 3 leaves the plain aperture's correction up to 0.5 % off at 3 FWHM
#: (docs/scale-accuracy.md).
MOFFAT_BETA = 3.0

__all__ = [
    "ApertureGeometry",
    "StarMeasurement",
    "Cutouts",
    "cut_out",
    "aperture_geometry",
    "geometry_for",
    "recentre",
    "measure_stars",
    "shared_defects",
    "kept_share",
    "neighbour_shares",
    "neighbours_light",
    "seeing_correction",
]


@dataclass(frozen=True)
class ApertureGeometry:
    """Radii in pixels: measuring aperture and background annulus."""

    radius: float
    annulus_inner: float
    annulus_outer: float


def aperture_geometry(
    fwhm: float, *, aperture_fwhm: float, aperture_add: float, gap: float, bg_delta: float
) -> ApertureGeometry:
    """Aperture radii for a pair of frames whose larger FWHM is ``fwhm`` (px).

    The annulus starts ``gap`` beyond the aperture and is as wide as the aperture radius, or
    ``bg_delta`` where that is wider: a wide annulus keeps the background's noise small
    against the aperture's.
    """
    # Radii in half pixels, so that frames of similar seeing share the reference's cutouts.
    radius = math.ceil(2 * max(aperture_fwhm * fwhm + aperture_add, 3.0)) / 2
    inner = radius + gap
    return ApertureGeometry(radius, inner, inner + max(bg_delta, radius))


def geometry_for(fwhm: float, params) -> ApertureGeometry:
    """:func:`aperture_geometry` for frames whose larger FWHM is ``fwhm`` (px), with the
    aperture settings of resolved ``params`` (:class:`nsg_gpu.params.Parameters`)."""
    return aperture_geometry(
        fwhm,
        aperture_fwhm=params.aperture_fwhm,
        aperture_add=params.aperture_add,
        gap=params.aperture_gap,
        bg_delta=params.aperture_bg_delta,
    )


@dataclass
class StarMeasurement:
    """Aperture photometry of stars in one frame, per channel.

    ``flux`` is in the measuring aperture, background-subtracted (it may be negative for a
    faint star); ``ok`` is False where an aperture or most of an annulus has no data, or
    leaves the image.
    """

    geometry: ApertureGeometry
    flux: np.ndarray  # (channels, n)
    flux_error: np.ndarray  # (channels, n)
    background: np.ndarray  # (channels, n)
    ok: np.ndarray  # (n,)


def recentre(image, x, y, *, fwhm: float, background=None) -> tuple[np.ndarray, np.ndarray]:
    """Intensity-weighted centroids near ``(x, y)`` on a 2-D image (any backend).

    The window is ``1.5 * fwhm`` around the rounded position; ``background`` (an image of
    the same shape) is subtracted first when given.
    """
    be = get_backend(image)
    xp = be.xp
    half = max(2, int(math.ceil(1.5 * fwhm)))
    win = gather_stamps(image, x, y, half)
    if background is not None:
        win = win - gather_stamps(background, x, y, half)
    win = xp.clip(win - xp.median(win.reshape(win.shape[0], -1), axis=1)[:, None, None], 0, None)
    off = xp.arange(-half, half + 1, dtype=xp.float64)
    total = win.sum(axis=(1, 2))
    safe = xp.where(total > 0, total, 1)
    dy = (win.sum(axis=2) * off).sum(axis=1) / safe
    dx = (win.sum(axis=1) * off).sum(axis=1) / safe
    cx = np.rint(x) + be.to_host(dx)
    cy = np.rint(y) + be.to_host(dy)
    bad = be.to_host(total) <= 0
    cx[bad] = np.nan
    cy[bad] = np.nan
    return cx, cy


@dataclass
class Cutouts:
    """The stars' surroundings in one frame, as :func:`measure_stars` needs them whatever the
    weights: host stamps ``(channels, n, s, s)`` around the rounded positions, each star's
    sub-pixel offset within its stamp, and the annulus background of each star and channel
    (photutils). A reference's cutouts serve every target measured with the same geometry."""

    geometry: ApertureGeometry
    stamps: np.ndarray
    fx: np.ndarray
    fy: np.ndarray
    finite: np.ndarray
    background: np.ndarray  # (channels, n) annulus mean
    background_std: np.ndarray
    counted: np.ndarray  # (channels, n) annulus area with data
    annulus_area: float
    mosaic: tuple | None = None  # _mosaic's result, kept only where asked for

    def subset(self, rows: np.ndarray) -> Cutouts:
        """The cutouts of the stars ``rows`` alone (without a mosaic)."""
        return Cutouts(
            self.geometry,
            self.stamps[:, rows],
            self.fx[rows],
            self.fy[rows],
            self.finite[rows],
            self.background[:, rows],
            self.background_std[:, rows],
            self.counted[:, rows],
            self.annulus_area,
        )


def _mosaic_origins(n: int, side: int):
    """Where :func:`_mosaic` puts each of ``n`` stamps of ``side`` px (the rows and columns
    of their corners), and the mosaic's shape: a square-ish grid."""
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    index = np.arange(n)
    return (index // cols) * side, (index % cols) * side, (rows * side, cols * side)


def _mosaic(stamps: np.ndarray, fx: np.ndarray, fy: np.ndarray):
    """Stamps laid side by side in one image per channel, the stars' positions in it, and the
    stamp index of every mosaic pixel."""
    channels, n, side, _ = stamps.shape
    half = side // 2
    r0, c0, shape = _mosaic_origins(n, side)
    mosaic = np.zeros((channels, *shape))
    cell = np.full(shape, -1, np.int64)
    for i in range(n):
        mosaic[:, r0[i] : r0[i] + side, c0[i] : c0[i] + side] = stamps[:, i]
        cell[r0[i] : r0[i] + side, c0[i] : c0[i] + side] = i
    return mosaic, np.column_stack([c0 + half + fx, r0 + half + fy]), cell


def annulus_statistics(stamps: np.ndarray, fx: np.ndarray, fy: np.ndarray, geometry: ApertureGeometry):
    """Mean, standard deviation and pixel count of each star's annulus, per channel.

    What photutils' ``ApertureStats`` of a ``CircularAnnulus`` gives (its "center" pixels:
    those whose centre lies at ``annulus_inner <= r < annulus_outer``, pixels of value 0 in
    any channel masked; no clipping; NaN where none is left), for all stars at once.

    Parameters
    ----------
    stamps : ndarray (channels, n, s, s)
        Stamps centred on the pixels nearest to the stars (:func:`cut_out`); ``s`` must reach
        beyond the annulus.

    fx, fy : ndarray (n,)
        Each star's offset from its stamp's centre pixel.

    Returns
    -------
    mean, std, count : ndarray (channels, n) float64
    """
    channels, n, side, _ = stamps.shape
    mean, std, count = np.empty((channels, n)), np.empty((channels, n)), np.empty(n)
    # Stars in groups whose float64 copies stay in the CPU's cache between the passes.
    group = max(1, (1 << 19) // (8 * channels * side * side))
    for i0 in range(0, n, group):
        i1 = min(n, i0 + group)
        mean[:, i0:i1], std[:, i0:i1], count[i0:i1] = _annulus_group(stamps[:, i0:i1], fx[i0:i1], fy[i0:i1], geometry)
    return mean, std, np.broadcast_to(count, (channels, n)).copy()


def _annulus_group(stamps: np.ndarray, fx: np.ndarray, fy: np.ndarray, geometry: ApertureGeometry):
    side = stamps.shape[-1]
    half = side // 2
    off = np.arange(-half, half + 1, dtype=np.float64)
    dx = off[None, None, :] - np.asarray(fx, np.float64)[:, None, None]
    dy = off[None, :, None] - np.asarray(fy, np.float64)[:, None, None]
    r2 = dx * dx + dy * dy
    inner, outer = geometry.annulus_inner, geometry.annulus_outer
    ring = (r2 < outer * outer) & ~(r2 < inner * inner)
    ring &= np.all(stamps != 0, axis=0)
    count = ring.sum(axis=(1, 2)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(ring, stamps.astype(np.float64), 0.0)
        mean = values.sum(axis=(2, 3)) / count
        values -= mean[..., None, None]
        values *= ring
        np.multiply(values, values, out=values)
        std = np.sqrt(values.sum(axis=(2, 3)) / count)
    return mean, std, count


def cut_out(data, x, y, geometry: ApertureGeometry, *, keep_mosaic: bool = False) -> Cutouts:
    """Stamps around ``(x, y)`` in every channel of ``data`` ``(channels, h, w)`` and the
    annulus mean around each star; pixels of value 0 (no data, or outside the image) are
    masked. ``keep_mosaic`` keeps the stamps' mosaic for the plain aperture's sums (it doubles
    the cutouts' size, so cached cutouts go without)."""
    be = get_backend(data)
    channels = data.shape[0]
    finite = np.isfinite(x) & np.isfinite(y)
    x = np.where(finite, x, 0.0)
    y = np.where(finite, y, 0.0)
    half = int(math.ceil(geometry.annulus_outer)) + 1
    stamps = be.to_host(gather_stamps(data, x, y, half)).astype(np.float32)  # (c, n, s, s)
    fx, fy = np.asarray(x) - np.rint(x), np.asarray(y) - np.rint(y)
    n = fx.size
    annulus_area = math.pi * (geometry.annulus_outer**2 - geometry.annulus_inner**2)
    background = np.zeros((channels, n))
    background_std = np.zeros((channels, n))
    counted = np.zeros((channels, n))
    if n:
        background, background_std, counted = annulus_statistics(stamps, fx, fy, geometry)
    laid = _mosaic(stamps, fx, fy) if n and keep_mosaic else None
    return Cutouts(
        geometry,
        stamps,
        fx,
        fy,
        finite,
        background,
        background_std,
        counted,
        annulus_area,
        laid,
    )


def _pixels(mask: np.ndarray):
    """``(star, row, column)`` of the true pixels of ``mask`` ``(n, s, s)`` (a 1-D search:
    several times faster than ``np.nonzero`` over three axes)."""
    side = mask.shape[-1]
    i, rest = np.divmod(np.flatnonzero(mask), side * side)
    y, x = np.divmod(rest, side)
    return i, y, x


def _noise_and_level(cut: Cutouts):
    """Each channel's noise (the median of the annuli's standard deviations) and each star's
    background ``(channels, n)``, in the stamps' precision."""
    finite_std = [v[np.isfinite(v) & (v > 0)] for v in cut.background_std]
    sigma = np.array([float(np.median(v)) if v.size else np.inf for v in finite_std])
    return sigma.astype(cut.stamps.dtype), np.nan_to_num(cut.background).astype(cut.stamps.dtype)


def _defect_seeds(cut: Cutouts, sigma: np.ndarray, level: np.ndarray, core_radius: float):
    """Pixels ``(star, row, column)`` beyond ``core_radius`` of their star that stand
    :data:`DEFECT_SIGMA` noise sigmas (``sigma`` per channel) above its background (``level``
    per channel and star) in some channel and more than twice as far above it as the mean of
    their 8 neighbours."""
    stamps = cut.stamps
    side = stamps.shape[-1]
    threshold = level + DEFECT_SIGMA * sigma[:, None]
    high = np.any(stamps > threshold[..., None, None], axis=0)
    i, y, x = _pixels(_beyond_core(high, cut, core_radius, np.arange(high.shape[0])))
    inner = (y > 0) & (y < side - 1) & (x > 0) & (x < side - 1)
    i, y, x = i[inner], y[inner], x[inner]
    c = np.argmax(stamps[:, i, y, x] - threshold[:, i], axis=0)  # the channel where it stands out most
    around = np.zeros(c.size)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                around += stamps[c, i, y + dy, x + dx]
    sharp = stamps[c, i, y, x] - level[c, i] > 2 * (around / 8 - level[c, i])
    return i[sharp], y[sharp], x[sharp]


def _shown(cut: Cutouts, sigma: np.ndarray, level: np.ndarray, i, y, x) -> np.ndarray:
    """Whether ``cut`` shows anything at its stamps' pixels ``(i, y, x)`` (:data:`SHOWN_SIGMA`
    noise sigmas above the background in some channel); False off its stamps."""
    side = cut.stamps.shape[-1]
    on = (y >= 0) & (y < side) & (x >= 0) & (x < side)
    shown = np.zeros(i.size, bool)
    values = cut.stamps[:, i[on], y[on], x[on]]
    shown[on] = np.any(values > level[:, i[on]] + SHOWN_SIGMA * sigma[:, None], axis=0)
    return shown


def _moved(mask: np.ndarray, dy: np.ndarray, dx: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``mask`` ``(n, s, s)``, nonzero in ``rows`` only, with star ``i``'s pixel ``(a, b)``
    moved to ``(a + dy[i], b + dx[i])``."""
    out = np.zeros_like(mask)
    side = mask.shape[-1]
    for a, b in set(zip(dy[rows].tolist(), dx[rows].tolist())):
        if abs(a) >= side or abs(b) >= side:
            continue
        moving = rows[(dy[rows] == a) & (dx[rows] == b)]
        src_y, dst_y = slice(max(0, -a), side - max(0, a)), slice(max(0, a), side - max(0, -a))
        src_x, dst_x = slice(max(0, -b), side - max(0, b)), slice(max(0, b), side - max(0, -b))
        out[moving, dst_y, dst_x] = mask[moving, src_y, src_x]
    return out


def _beyond_core(mask: np.ndarray, cut: Cutouts, core_radius: float, rows: np.ndarray) -> np.ndarray:
    """``mask`` cleared within ``core_radius`` of each star of ``rows``."""
    side = mask.shape[-1]
    half = side // 2
    k = min(half, int(math.ceil(core_radius)) + 1)
    box = slice(half - k, half + k + 1)
    off = np.arange(-k, k + 1, dtype=np.float64)
    r2 = (off[None, None, :] - cut.fx[rows, None, None]) ** 2 + (off[None, :, None] - cut.fy[rows, None, None]) ** 2
    mask[rows, box, box] &= r2 > core_radius * core_radius
    return mask


def shared_defects(reference: Cutouts, rx, ry, target: Cutouts, tx, ty, core_radius: float):
    """The pixels near each star that a defect of either frame spoils, in both frames' stamps.

    A hot pixel or a cosmic ray is in one frame only; left in, it adds its light to that
    frame's star (in the aperture) or takes it away (in the annulus), and a few spoiled pairs
    of a sparse field decide its scale. It shows as a pixel beyond ``core_radius`` of the
    star that stands :data:`DEFECT_SIGMA` noise sigmas above the star's background in some
    channel of one frame (a hot photosite is in one channel), more than twice as far above it
    as the mean of its 8 neighbours (a star's wing, a nebula and the sky are smoother), where
    the other frame shows nothing (a neighbouring star, however sharp, is in both). Its mask
    reaches :data:`DEFECT_REACH` px further, beyond the core, and is left out of both frames:
    whatever else lies there (sky, nebula, a neighbour's wing) is gone from both alike. The
    stamps are centred on the pixels nearest to ``(rx, ry)`` and ``(tx, ty)``, which may
    differ by a pixel or more; each frame's pixels are moved onto the other's. The noise of
    each frame and channel is the median of its annuli's standard deviations.

    Returns
    -------
    reference_mask, target_mask : ndarray (n, s, s) bool
    """
    n, side = reference.stamps.shape[1], reference.stamps.shape[-1]
    finite = np.isfinite(rx) & np.isfinite(ry) & np.isfinite(tx) & np.isfinite(ty)
    dy = np.where(finite, np.rint(np.nan_to_num(ty)) - np.rint(np.nan_to_num(ry)), 0).astype(np.int64)
    dx = np.where(finite, np.rint(np.nan_to_num(tx)) - np.rint(np.nan_to_num(rx)), 0).astype(np.int64)
    ref_noise, tgt_noise = _noise_and_level(reference), _noise_and_level(target)
    # The defects of both frames, in the reference's stamps.
    i, y, x = _defect_seeds(reference, *ref_noise, core_radius)
    alone = ~_shown(target, *tgt_noise, i, y - dy[i], x - dx[i])
    ri, ry_, rx_ = i[alone], y[alone], x[alone]
    i, y, x = _defect_seeds(target, *tgt_noise, core_radius)
    alone = ~_shown(reference, *ref_noise, i, y + dy[i], x + dx[i])
    i, y, x = i[alone], y[alone] + dy[i[alone]], x[alone] + dx[i[alone]]
    i, y, x = np.concatenate([ri, i]), np.concatenate([ry_, y]), np.concatenate([rx_, x])
    mask = np.zeros((n, side, side), bool)
    for a in range(-DEFECT_REACH, DEFECT_REACH + 1):
        for b in range(-DEFECT_REACH, DEFECT_REACH + 1):
            on = (y + a >= 0) & (y + a < side) & (x + b >= 0) & (x + b < side)
            mask[i[on], y[on] + a, x[on] + b] = True
    rows = np.unique(i)
    ref_mask = _beyond_core(mask, reference, core_radius, rows)
    tgt_mask = _beyond_core(_moved(ref_mask, -dy, -dx, rows), target, core_radius, rows)
    return ref_mask, tgt_mask


def _without(cut: Cutouts, excluded: np.ndarray, geometry: ApertureGeometry) -> Cutouts:
    """``cut`` with the annulus statistics of the stars that have ``excluded`` pixels made
    again without them (their sums less the excluded pixels': only those are read)."""
    i, y, x = _pixels(excluded)
    half = excluded.shape[-1] // 2
    r2 = (x - half - cut.fx[i]) ** 2 + (y - half - cut.fy[i]) ** 2
    values = cut.stamps[:, i, y, x].astype(np.float64)
    ring = (r2 < geometry.annulus_outer**2) & ~(r2 < geometry.annulus_inner**2) & np.all(values != 0, axis=0)
    i, values = i[ring], values[:, ring]
    n = cut.background.shape[1]
    gone = np.bincount(i, minlength=n).astype(np.float64)
    background, background_std, counted = cut.background.copy(), cut.background_std.copy(), cut.counted.copy()
    rows = np.nonzero(gone)[0]
    for c in range(values.shape[0]):
        total = np.bincount(i, weights=values[c], minlength=n)[rows]
        squares = np.bincount(i, weights=values[c] ** 2, minlength=n)[rows]
        count, mean, std = counted[c, rows], background[c, rows], background_std[c, rows]
        left = count - gone[rows]
        with np.errstate(invalid="ignore", divide="ignore"):
            new_mean = (mean * count - total) / left
            variance = (count * (std * std + mean * mean) - squares) / left - new_mean * new_mean
        background[c, rows] = np.where(left > 0, new_mean, np.nan)
        background_std[c, rows] = np.where(left > 0, np.sqrt(np.maximum(variance, 0.0)), np.nan)
        counted[c, rows] = left
    return replace(cut, background=background, background_std=background_std, counted=counted)


def _mosaic_mask(excluded: np.ndarray) -> np.ndarray:
    """``excluded`` ``(n, s, s)`` laid out as :func:`_mosaic` lays out the stamps."""
    n, side, _ = excluded.shape
    r0, c0, shape = _mosaic_origins(n, side)
    i, a, b = _pixels(excluded)
    out = np.zeros(shape, bool)
    out[r0[i] + a, c0[i] + b] = True
    return out


#: :func:`measure_stars`' weight for a plain aperture summed at pixel centres.
FLAT = "flat"


def measure_stars(
    data,
    x,
    y,
    geometry: ApertureGeometry,
    weight: MoffatPSF | str | None = None,
    *,
    cutouts: Cutouts | None = None,
    excluded: np.ndarray | None = None,
) -> StarMeasurement:
    """Photometry at ``(x, y)`` in every channel of ``data`` ``(channels, h, w)``.

    The background is the annulus mean (photutils; :func:`cut_out`, or ``cutouts`` made
    before for the same stars and geometry). Without ``weight`` the flux is the photutils sum
    over the circular aperture; with it, every pixel within the aperture radius counts with
    the profile ``weight`` (a Moffat centred on the star, less its value at the aperture's
    edge so that it falls to 0 there), which gives the bright core more say than the noisy
    wings. ``weight=FLAT`` counts every pixel whose centre lies within the aperture once: the
    plain aperture at pixel centres, with the weights' vectorized sums instead of photutils'
    exact overlaps (what it keeps of a star averages to :func:`kept_share`'s plain aperture
    over where stars fall within their pixels). ``excluded`` ``(n, s, s)`` (over the cutouts' stamps; :func:`shared_defects`) are
    pixels left out: of the annulus, and of the aperture as if they held the background.
    """
    channels = data.shape[0]
    n = int(np.size(x))
    if n == 0:
        empty = np.zeros((channels, 0))
        return StarMeasurement(geometry, empty, empty, empty, np.zeros(0, bool))
    cut = cutouts if cutouts is not None else cut_out(data, x, y, geometry, keep_mosaic=weight is None)
    if excluded is not None and not excluded.any():
        excluded = None
    if excluded is not None:
        cut = _without(cut, excluded, geometry)
    stamps = cut.stamps
    if weight is not None:
        # The weights vanish beyond the aperture: only the box around it is summed.
        half = stamps.shape[-1] // 2
        keep = int(math.ceil(geometry.radius)) + 1
        stamps = stamps[..., half - keep : half + keep + 1, half - keep : half + keep + 1]
        if excluded is not None:
            excluded = excluded[:, half - keep : half + keep + 1, half - keep : half + keep + 1]
    bkg = np.nan_to_num(cut.background)
    if weight is None:
        # photutils is imported where the plain aperture is first used: with astropy's
        # coordinates, tables and WCS, which it brings, it is 0.3-0.45 s of a process's start
        # that a run measuring every frame with PSF weights never needs.
        from photutils.aperture import CircularAperture, aperture_photometry

        # The plain aperture sums the stamps' mosaic (float64), not the stamps.
        mosaic, positions, cell = cut.mosaic if cut.mosaic is not None else _mosaic(stamps, cut.fx, cut.fy)
        no_data = np.any(mosaic == 0, axis=0)
        fill = no_data if excluded is None else no_data | _mosaic_mask(excluded)
        aperture = CircularAperture(positions, r=geometry.radius)
        # Scattered zero pixels (a raw frame clipped at 0) are tolerated up to a few per cent
        # of the aperture and count as background; a registration border in it is not.
        holes = np.asarray(aperture_photometry(no_data.astype(float), aperture, method="center")["aperture_sum"])
        ok = (holes <= MAX_HOLE_FRACTION * aperture.area) & cut.finite
        area, area2 = aperture.area, aperture.area
    else:
        stamps = stamps.astype(np.float64)
        stamp_empty = np.any(stamps == 0, axis=0)  # (n, s, s)
        half = stamps.shape[-1] // 2
        off = np.arange(-half, half + 1, dtype=np.float64)
        r2 = (off[None, None, :] - cut.fx[:, None, None]) ** 2 + (off[None, :, None] - cut.fy[:, None, None]) ** 2
        w = _weight_profile(weight, r2, geometry.radius)  # (n, s, s)
        held = np.sum(w * stamp_empty, axis=(1, 2)) / np.sum(w, axis=(1, 2))
        ok = (held <= MAX_HOLE_FRACTION) & cut.finite
        area, area2 = np.sum(w, axis=(1, 2)), np.sum(w * w, axis=(1, 2))
    flux = np.empty((channels, n))
    flux_error = np.empty((channels, n))
    for c in range(channels):
        ok &= np.isfinite(cut.background[c]) & (cut.counted[c] > 0.3 * cut.annulus_area)
        sky_var = np.nan_to_num(cut.background_std[c]) ** 2
        gain_inv = sky_var / np.maximum(np.abs(bkg[c]), np.sqrt(sky_var) + 1e-30)
        if weight is None:
            filled = mosaic[c].copy()
            hole_cells = cell[fill]
            filled[fill] = np.where(hole_cells >= 0, bkg[c][np.maximum(hole_cells, 0)], 0.0)
            flux[c] = np.asarray(aperture_photometry(filled, aperture)["aperture_sum"], float) - bkg[c] * area
            star_var = np.clip(flux[c], 0, None) * gain_inv
        else:
            signal = np.where(
                stamp_empty if excluded is None else stamp_empty | excluded, 0.0, stamps[c] - bkg[c][:, None, None]
            )
            flux[c] = np.sum(w * signal, axis=(1, 2))
            star_var = np.sum(w * w * np.clip(signal, 0, None), axis=(1, 2)) * gain_inv
        # Error: sky noise over the (weighted) aperture and in the background estimate, the
        # star's shot noise in sky-noise units (gain from sky level/variance), and a floor.
        star = np.clip(flux[c], 0, None)
        flux_error[c] = np.sqrt(
            sky_var * (area2 + area * area / max(cut.annulus_area, 1)) + star_var + (SYSTEMATIC_ERROR * star) ** 2
        )
    # A faint star's flux may come out negative in a channel: it is a measurement all the
    # same, and the scale fit weighs it by its error (a positivity cut would bias it).
    ok &= np.all(np.isfinite(flux), axis=0)
    return StarMeasurement(geometry, flux, flux_error, cut.background.copy(), ok)


def _weight_profile(weight: MoffatPSF | str, r2, radius: float):
    """The photometric weight at squared distances ``r2``: the Moffat's shape less its value at
    ``radius``, and 0 beyond; 1 within ``radius`` for :data:`FLAT`."""
    if isinstance(weight, str):
        return (r2 <= radius * radius).astype(np.float64)
    edge = weight.shape(radius * radius)
    return np.where(r2 <= radius * radius, np.clip(weight.shape(r2) - edge, 0, None), 0.0)


#: kept_share's grid for pixel-integrated light: radii (Simpson's rule), directions over a
#: quarter turn (the pixel's square makes the light depend on the direction as
#: ``cos 4k theta``, which 4 directions average exactly to ``k = 3``) and Gauss-Legendre
#: nodes per axis of the pixel integral. Within 3e-8 of a grid 16 times finer in radius, 4 in
#: direction and 3 in nodes for stars of 0.8 px FWHM and more, in about 2 ms.
INTEGRATED_RADII = 513
INTEGRATED_DIRECTIONS = 4
INTEGRATED_NODES = 6
#: Directions over half a turn at which a drawn-out star's light is averaged (its
#: :attr:`nsg_gpu.psf.MoffatPSF.shear`; the weights stay round, so only the light's mean over
#: directions at each radius counts): kept shares within 3e-8 of 64 directions' for ``1 - b/a``
#: up to 0.5.
SHAPE_DIRECTIONS = 16


def _moffat_outside(radius: float, psf: MoffatPSF) -> float:
    """Share of a Moffat star's light beyond ``radius``; for a pixel-integrated ``psf``, of
    the pixels' light beyond ``radius`` (3 px or more from the star).

    A pixel's mean of the profile is the profile plus a 24th of its Laplacian, and terms of
    higher derivatives; over a disc the Laplacian sums to ``2 pi r P'(r)`` at its edge, and
    what the higher terms add is within 2e-4 of the star's light at 3 px, 4e-5 at 4 px
    (``tests/test_psf.py``).
    """
    if not psf.round:
        # Along a direction where the profile is the round one at ``c r^2``, the light beyond
        # ``radius`` per unit angle is the round one's at ``sqrt(c) radius`` over ``c`` (its
        # radial slope too: the Laplacian's integral is the flux through the circle).
        c = psf.direction_factor((np.arange(SHAPE_DIRECTIONS) + 0.5) * (math.pi / SHAPE_DIRECTIONS))
        round_psf = replace(psf, shear=(0.0, 0.0))
        shares = [_moffat_outside(radius * math.sqrt(f), round_psf) / f for f in c]
        return float(np.mean(shares))
    q = 1 + (radius / psf.alpha) ** 2
    outside = q ** (1 - psf.beta)
    if psf.pixel_integrated:
        slope = -2 * psf.beta * radius / (psf.alpha * psf.alpha) * psf(radius * radius) / q
        outside -= math.pi * radius / 12 * slope
    return outside


def _radial_light(psf: MoffatPSF, radii: np.ndarray) -> np.ndarray:
    """The star's light per unit area at ``radii``, averaged over the directions: ``psf``
    there, or its pixel-integrated mean (:func:`nsg_gpu.psf.pixel_mean`)."""
    if psf.round and not psf.pixel_integrated:
        return psf(radii**2)
    if psf.round:
        theta = (np.arange(INTEGRATED_DIRECTIONS) + 0.5) * (math.pi / 2 / INTEGRATED_DIRECTIONS)
    else:
        # A drawn-out profile repeats over half a turn, not a quarter.
        theta = (np.arange(SHAPE_DIRECTIONS) + 0.5) * (math.pi / SHAPE_DIRECTIONS)
    x, y = radii[:, None] * np.cos(theta), radii[:, None] * np.sin(theta)
    if not psf.pixel_integrated:
        return psf(psf.r2(x, y)).mean(axis=1)
    return pixel_mean(psf, x, y, nodes=INTEGRATED_NODES).mean(axis=1)


def kept_share(geometry: ApertureGeometry, psf: MoffatPSF, weight: MoffatPSF | None = None) -> float:
    """What :func:`measure_stars` returns for a star of unit flux and profile ``psf``.

    The aperture (plain, or weighted by ``weight``) holds part of the light, and the annulus
    mean, subtracted over the aperture's (weighted) area, takes off the wing light that
    falls in the annulus. For a pixel-integrated ``psf`` the light is what the pixels hold,
    the profile's mean over each (the weights stay functions of the pixel centre's
    distance): averaged over where a star falls within its pixel, a sum over pixels is the
    integral over the plane of weight times pixel-integrated light. The weights and the
    aperture being round, a drawn-out ``psf`` (:attr:`nsg_gpu.psf.MoffatPSF.shear`) counts by
    its light's mean over the directions at each radius.
    """
    r, inner, outer = geometry.radius, geometry.annulus_inner, geometry.annulus_outer
    annulus_mean = (_moffat_outside(inner, psf) - _moffat_outside(outer, psf)) / (
        math.pi * (outer * outer - inner * inner)
    )
    if weight is None:
        return 1 - _moffat_outside(r, psf) - math.pi * r * r * annulus_mean
    # Radial integrals by Simpson's rule; both integrands are smooth inside the aperture.
    radii = np.linspace(0.0, r, INTEGRATED_RADII if psf.pixel_integrated else 4097)
    w = _weight_profile(weight, radii**2, r)
    ring = 2 * math.pi * radii
    area = float(integrate.simpson(ring * w, x=radii))
    if psf.blur is not None:
        # The pixels' light is the profile convolved with the registration's kernel; summed
        # under the weights it is the profile under the weights convolved with the kernel.
        w, radii = _blurred_weight(weight, r, psf.blur, INTEGRATED_RADII if psf.pixel_integrated else 1025)
        ring = 2 * math.pi * radii
    held = float(integrate.simpson(ring * w * _radial_light(psf, radii), x=radii))
    return held - area * annulus_mean


#: Catalogue neighbours counted with a star (:func:`neighbours_light`): those within the
#: annulus's outer radius plus this many FWHM. Beyond it a Moffat of index 2 counts under 5e-4
#: of its light in a star's aperture less its annulus.
NEIGHBOUR_REACH_FWHM = 10.0
#: :func:`neighbour_shares` integrates over radii this many to the FWHM (at most 0.05 px
#: apart) and computes the shares at distances this many to the FWHM (at most 0.25 px apart)
#: up to the annulus plus 3 FWHM, farther out at 48 distances in geometric steps, where they
#: are smooth; interpolated between. Within 6e-4 of the neighbour's light of a computation 10
#: times as fine, for stars of 1-3 px (pixel-integrated or not).
NEIGHBOUR_RADII_PER_FWHM = 40.0
NEIGHBOUR_STEPS_PER_FWHM = 16.0
NEIGHBOUR_FAR_STEPS = 48


def neighbour_shares(geometry: ApertureGeometry, psf: MoffatPSF, distances) -> np.ndarray:
    """What the plain aperture (:func:`measure_stars` without weights) counts of a star of
    unit flux and profile ``psf`` lying ``distances`` px from the measured star: its light in
    the aperture less the annulus mean over the aperture's area (at distance 0,
    :func:`kept_share`). The light of a circle of radius ``rho`` around the neighbour falls in
    a disc of radius ``R`` at distance ``d`` over the arc ``2 rho acos((rho^2 + d^2 - R^2) /
    (2 rho d))``; the profile is its mean over the directions (:func:`_radial_light`), without
    a registration's blur. The distances it is computed at are the same for every star, up to
    the annulus plus :data:`NEIGHBOUR_REACH_FWHM` FWHM (farther where asked)."""
    d = np.abs(np.asarray(distances, float))
    if d.size == 0:
        return np.zeros(0)
    outer = geometry.annulus_outer
    far_end = max(outer + NEIGHBOUR_REACH_FWHM * psf.fwhm, float(d.max())) + 1.0
    grid, counted = _neighbour_share_table(
        geometry, psf.alpha, psf.beta, tuple(psf.shear), psf.pixel_integrated, far_end
    )
    return np.interp(d, grid, counted)


@functools.lru_cache(maxsize=8)
def _neighbour_share_table(
    geometry: ApertureGeometry, alpha: float, beta: float, shear: tuple, pixel_integrated: bool, far_end: float
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`neighbour_shares` at its distances up to ``far_end``: ``(distances, shares)``,
    read-only. The profile's light depends only on its width, index, shape and pixel
    integration; the last few tables are kept (the reference's profile asks for the same one
    with every target whose aperture is the same)."""
    psf = MoffatPSF(alpha, beta, pixel_integrated=pixel_integrated, shear=shear)
    r, inner, outer = geometry.radius, geometry.annulus_inner, geometry.annulus_outer
    fwhm = psf.fwhm
    near_end = outer + 3 * fwhm
    step = min(0.25, fwhm / NEIGHBOUR_STEPS_PER_FWHM)
    grid = np.concatenate([np.arange(0.0, near_end, step), np.geomspace(near_end, far_end, NEIGHBOUR_FAR_STEPS)])
    spacing = min(0.05, fwhm / NEIGHBOUR_RADII_PER_FWHM)
    rho = np.linspace(0.0, far_end + outer, int(math.ceil((far_end + outer) / spacing)) + 1)
    light = _radial_light(psf, rho)[None]
    # The three discs' common terms, computed once.
    squares = rho[None] ** 2 + grid[:, None] ** 2
    two_rho = 2 * rho[None]
    products = two_rho * grid[:, None]
    centre = grid == 0

    def disc(radius: float) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            c = squares - radius * radius
            c /= products
        # cos of the half arc, within [-1, 1]; where the circle or the distance is 0, +-inf
        # clipped, and 0 / 0 (a circle through the star's centre) -1 (fmax drops a NaN).
        theta = np.arccos(np.fmin(np.fmax(c, -1.0, out=c), 1.0, out=c), out=c)
        # At the centre (d = 0) a circle is wholly inside or wholly outside.
        theta[centre] = np.where(rho < radius, math.pi, 0.0)
        integrand = np.multiply(two_rho, theta, out=theta)
        integrand *= light
        return integrate.simpson(integrand, x=rho, axis=1)

    ring = (disc(outer) - disc(inner)) / (math.pi * (outer * outer - inner * inner))
    counted = disc(r) - math.pi * r * r * ring
    for array in (grid, counted):
        array.flags.writeable = False
    return grid, counted


def neighbours_light(
    geometry: ApertureGeometry, psfs, flux: np.ndarray, x: np.ndarray, y: np.ndarray, stars: np.ndarray
) -> np.ndarray:
    """For each of ``stars`` (indices into the catalogue ``flux, x, y``) and each profile of
    ``psfs`` (one per frame), the light of the catalogue's other stars within the annulus plus
    :data:`NEIGHBOUR_REACH_FWHM` FWHM that the plain aperture counts with it, as a share of
    its own counted light (:func:`neighbour_shares`, each neighbour's light in proportion to
    its catalogue flux); ``(len(psfs), len(stars))``. Where the frames' PSFs differ,
    neighbours share their light between a star's aperture and its annulus differently in
    each, and on a crowded field that moves the aperture's scale by up to a per cent or two
    (docs/scale-accuracy.md, "The check on a crowded field")."""
    flux = np.clip(np.asarray(flux, float), 0.0, None)
    stars = np.asarray(stars, np.int64)
    out = np.zeros((len(psfs), stars.size))
    reaches = [geometry.annulus_outer + NEIGHBOUR_REACH_FWHM * psf.fwhm for psf in psfs]
    k, j = neighbour_pairs(x, y, stars, max(reaches, default=0.0))
    if k.size == 0:
        return out
    distance = np.hypot(x[j] - x[stars[k]], y[j] - y[stars[k]])
    for row, (psf, reach) in enumerate(zip(psfs, reaches)):
        near = distance <= reach
        counted = flux[j[near]] * neighbour_shares(geometry, psf, distance[near])
        np.add.at(out[row], k[near], counted)
        out[row] /= np.maximum(flux[stars] * kept_share(geometry, psf), 1e-300)
    return out


#: Directions over a quarter turn at which blurred weights are averaged.
BLUR_DIRECTIONS = 8
#: Blurred weights kept (:func:`_blurred_weight`), the oldest dropped first.
BLURRED_WEIGHTS_KEPT = 8
_BLURRED_WEIGHTS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_BLURRED_LOCK = threading.Lock()


def _blurred_weight(weight: MoffatPSF, radius: float, blur, points: int) -> tuple[np.ndarray, np.ndarray]:
    """The weights (:func:`_weight_profile`) convolved with the separable kernel ``blur``,
    averaged over the directions, at ``points`` radii from 0 to ``radius`` plus the
    kernel's half-width; returns ``(weights, radii)``, read-only.

    A kernel with a centroid (a shift's: :class:`nsg_gpu.resampling.InterpolationKernel`)
    took each star from where the camera saw it, so its taps act at their offsets less the
    centroid; and since a shift and its mirror read alike in the noise, and stars fall
    anywhere in their pixels, such a kernel is averaged with its mirrors along each axis
    (which a quarter turn of directions then holds).

    They do not depend on the star's PSF, only on the weights and the kernel: computed once
    for the few last (a target's seeing correction, its uncertainty's differences and a
    field model's nodes ask for the same ones) and kept.
    """
    key = (weight.alpha, weight.beta, float(radius), blur, int(points))
    kept = _BLURRED_WEIGHTS.get(key)
    if kept is not None:
        return kept
    radii = np.linspace(0.0, radius + blur.half, points)
    theta = (np.arange(BLUR_DIRECTIONS) + 0.5) * (math.pi / 2 / BLUR_DIRECTIONS)
    x, y = radii[:, None] * np.cos(theta), radii[:, None] * np.sin(theta)
    offsets = np.arange(-blur.half, blur.half + 1, dtype=float)
    cx, cy = blur.centre
    signs = ((1, 1),) if blur.symmetric else ((1, 1), (1, -1), (-1, 1), (-1, -1))
    total = np.zeros_like(x)
    for a, hx in zip(offsets - cx, blur.x):
        for b, hy in zip(offsets - cy, blur.y):
            if abs(hx * hy) < 1e-7:
                continue
            for sa, sb in signs:
                total += hx * hy / len(signs) * _weight_profile(weight, (x - sa * a) ** 2 + (y - sb * b) ** 2, radius)
    kept = (total.mean(axis=1), radii)
    for array in kept:
        array.flags.writeable = False
    with _BLURRED_LOCK:
        while len(_BLURRED_WEIGHTS) >= BLURRED_WEIGHTS_KEPT:
            _BLURRED_WEIGHTS.pop(next(iter(_BLURRED_WEIGHTS)))
        _BLURRED_WEIGHTS[key] = kept
    return kept


def seeing_correction(
    geometry: ApertureGeometry,
    *,
    reference_psf: MoffatPSF,
    target_psf: MoffatPSF,
    weight: MoffatPSF | None = None,
    x=None,
    y=None,
):
    """Factor turning the ratio ``reference / target`` of measured fluxes into the ratio of
    total fluxes, for stars of the two frames' PSFs measured the same way.

    Each frame's measurement keeps a share ``K`` of a star's light (:func:`kept_share`); the
    factor is ``K_T / K_R``. With a plain aperture of 3 FWHM it is within about 1 % of 1;
    with PSF weights it is further from 1, and it is the *difference* of the two PSFs that
    it needs right, which :func:`nsg_gpu.psf.fit_target_psf` measures.

    With star positions ``x, y`` the factor of each star (an array), from each frame's PSF
    at the star (:attr:`nsg_gpu.psf.MoffatPSF.field`): a share kept is interpolated in the
    logarithm of the width's factor between :data:`FIELD_SHARE_NODES` shares computed across
    the stars' range of factors.
    """
    if x is None or (reference_psf.field is None and target_psf.field is None):
        factor = kept_share(geometry, target_psf.uniform(), weight) / kept_share(
            geometry, reference_psf.uniform(), weight
        )
        return factor if x is None else np.full(np.shape(x), factor)
    return _kept_shares(geometry, target_psf, weight, x, y) / _kept_shares(geometry, reference_psf, weight, x, y)


#: Widths at which a field-dependent PSF's kept share is computed before interpolation:
#: within 2e-5 of the share computed at each star for factors from 0.6 to 2.5.
FIELD_SHARE_NODES = 17


def _kept_shares(geometry: ApertureGeometry, psf: MoffatPSF, weight: MoffatPSF | None, x, y) -> np.ndarray:
    """:func:`kept_share` of each star at ``x, y`` with ``psf`` at its place in the field."""
    factors = psf.factor(np.asarray(x, float), np.asarray(y, float))
    if psf.field is None or factors.size == 0:
        return np.full(factors.shape, kept_share(geometry, psf.uniform(), weight))
    lo, hi = float(np.log(factors.min())), float(np.log(factors.max()))
    if hi <= lo:
        return np.full(factors.shape, kept_share(geometry, psf.at(math.exp(lo)), weight))
    nodes = np.linspace(lo, hi, FIELD_SHARE_NODES)
    shares = np.array([kept_share(geometry, psf.at(math.exp(t)), weight) for t in nodes])
    return CubicSpline(nodes, shares)(np.log(factors))
