"""Independent references for the real-frame tests, computed with other tools than ours.

- :func:`independent_transmission`: wide-aperture photometry with sep (SExtractor's library):
  stars detected at 5 sigma on the reference (sep's own background), matched to the target's
  detections, measured with ``sep.sum_circle`` in both frames with a local annulus, and the
  median of the target-to-reference flux ratios with a bootstrap error (or, with
  :meth:`StarRatios.summed`, the ratio of the brightest stars' summed fluxes). Nothing in it
  comes from ``nsg_gpu``.
- :func:`extractor_stars`: sep's detections at 5 sigma, less single hot pixels.
- :func:`stacked_stars`: sep's detections on the median of registered frames, where a
  sensor's hot pixels, which move with each frame's registration, mostly do not survive.
- :func:`star_colours`: the median red-to-green and blue-to-green flux ratios of a colour
  frame's stars, measured in that frame alone (no other frame, no matching, no scale).
- :func:`spline_smoothing`: how much registration smoothed a frame's pixel noise, from the
  noise's own structure (the variances of its pixel differences), independently of any noise
  estimate of ours; and the sub-pixel offset that explains it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.ndimage
import scipy.special
import sep
from astropy.io import fits

SHARED_DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
NGC7023 = SHARED_DATA_ROOT / "ngc7023"
STARGATE = SHARED_DATA_ROOT / "stargate"
#: The frame the NGC 7023 frames were registered to (not resampled).
NGC7023_REFERENCE = "000_Light_NGC_7023_10.0s_IRCUT_20240730-224436.fits.gz"
#: The frame the stargate frames were registered to (not resampled).
STARGATE_REFERENCE = "sg_0005.fits.gz"

#: Detection threshold on the reference, in sep's background RMS.
DETECTION_SIGMA = 5.0
#: Stars closer than this (px) in the reference and the target are the same star.
MATCH_RADIUS = 1.5
#: Stars whose peak exceeds this share of either frame's maximum are left out (NSG's linear range).
LINEAR_SHARE = 0.7
#: Least flux signal-to-noise in both frames.
MIN_SNR = 10.0

__all__ = [
    "NGC7023",
    "NGC7023_REFERENCE",
    "STARGATE",
    "STARGATE_REFERENCE",
    "StarRatios",
    "StarColours",
    "star_colours",
    "read_planes",
    "independent_transmission",
    "extractor_stars",
    "stacked_stars",
    "spline_smoothing",
    "core_and_halo_stars",
    "core_and_halo_frames",
    "halo_settings",
]


def read_planes(path: Path) -> np.ndarray:
    """A FITS frame as float64 ``(channels, height, width)``, native byte order."""
    data = np.asarray(fits.getdata(path), dtype=np.float64)
    return np.ascontiguousarray(data if data.ndim == 3 else data[None])


@dataclass
class StarRatios:
    """Target-to-reference flux ratios of the matched stars of one channel."""

    ratios: np.ndarray
    x: np.ndarray
    y: np.ndarray
    radius: float
    detected: int  # reference detections at 5 sigma (before matching and cuts)
    reference_flux: np.ndarray | None = None  # the stars' fluxes in the reference

    @property
    def transmission(self) -> float:
        return float(np.median(self.ratios))

    def summed(self, brightest: int = 7) -> tuple[float, float]:
        """The ratio of the summed fluxes of the ``brightest`` stars of the reference (a
        curve of growth's measure: each star counts by its light, not by one vote), and its
        bootstrap error over those stars."""
        order = np.argsort(-self.reference_flux)[:brightest]
        ratios, flux = self.ratios[order], self.reference_flux[order]
        value = float(np.sum(ratios * flux) / np.sum(flux))
        picks = np.random.default_rng(0).integers(0, order.size, (2000, order.size))
        spread = np.sum(ratios[picks] * flux[picks], axis=1) / np.sum(flux[picks], axis=1)
        return value, float(spread.std())

    def bootstrap_error(self, *, resamples: int = 2000, seed: int = 0) -> float:
        """Standard deviation of the median over bootstrap resamples of the stars."""
        return float(_median_bootstrap(self.ratios, resamples, seed))


def _median_bootstrap(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Standard deviation of the median of ``values`` along the last axis (the stars) over
    bootstrap resamples of the stars; one value per leading row."""
    picks = np.random.default_rng(seed).integers(0, values.shape[-1], (resamples, values.shape[-1]))
    return np.median(values[..., picks], axis=-1).std(axis=-1)


def _detect(image: np.ndarray, nodata: np.ndarray):
    background = sep.Background(image, mask=nodata)
    objects = sep.extract(image - background.back(), DETECTION_SIGMA, err=background.globalrms, mask=nodata, minarea=5)
    return objects


def extractor_stars(planes: np.ndarray, *, edge: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """sep's detections at 5 sigma on the channel mean of a frame, less single hot pixels
    (no neighbour holding a tenth of the peak above the sky) and those within ``edge`` px of
    the image's border."""
    mean = np.ascontiguousarray(planes.mean(axis=0))
    objects = _detect(mean, _nodata(planes))
    h, w = mean.shape
    x, y = objects["x"], objects["y"]
    inside = (x > edge) & (x < w - 1 - edge) & (y > edge) & (y < h - 1 - edge)
    x, y = x[inside], y[inside]
    xi, yi = np.rint(x).astype(int), np.rint(y).astype(int)
    sky = np.median(mean[mean > 0])
    centre = mean[yi, xi] - sky
    neighbours = [mean[yi + dy, xi + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    star = np.maximum.reduce(neighbours) - sky > 0.1 * centre
    return x[star], y[star]


def stacked_stars(frames: list[np.ndarray], *, threshold: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """sep's detections (``threshold`` sigma, 5 px) on the median of registered frames'
    channel means where all of them hold data. A sensor's hot pixels move with each frame's
    registration, the stars stay: the median keeps the stars, and takes most hot pixels out."""
    stack = np.stack([np.asarray(f, np.float64).mean(axis=0) for f in frames])
    nodata = ~(stack > 0).all(axis=0)
    median = np.ascontiguousarray(np.where(nodata, 0.0, np.median(stack, axis=0)))
    background = sep.Background(median, mask=nodata)
    objects = sep.extract(median - background.back(), threshold, err=background.globalrms, mask=nodata, minarea=5)
    return objects["x"], objects["y"]


def extractor_shape(planes: np.ndarray, *, brightest: int = 15) -> tuple[float, float]:
    """The stars' elongation as sep's second moments read it: the median ``1 - b/a`` of the
    ``brightest`` detections on the channel mean, and the median angle of their major axes
    (degrees from the x axis, towards y; taken about the first's, since angles repeat each
    half turn)."""
    mean = np.ascontiguousarray(planes.mean(axis=0))
    objects = _detect(mean, _nodata(planes))
    objects = objects[np.argsort(objects["flux"])[::-1][:brightest]]
    angles = np.degrees(objects["theta"])
    turned = (angles - angles[0] + 90) % 180 - 90 + angles[0]
    return float(np.median(1 - objects["b"] / objects["a"])), float(np.median(turned))


def _half_light_radius(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    background = sep.Background(image, mask=image == 0)
    radius, _ = sep.flux_radius(image - background.back(), x, y, np.full(x.size, 15.0), 0.5, subpix=5)
    return float(np.median(radius))


def independent_transmission(reference: np.ndarray, target: np.ndarray) -> list[StarRatios]:
    """Median target-to-reference flux ratio per channel, from sep alone.

    Parameters
    ----------
    reference, target : float64 arrays (channels, height, width)
        Registered frames; 0 means no data.

    Returns
    -------
    list of StarRatios, one per channel.

    Notes
    -----
    Stars are detected on the channel mean of each frame and matched within ``MATCH_RADIUS``;
    a detection without a partner (a hot pixel, which registration moves off the sky's grid) is
    dropped. The aperture radius is 4 half-light radii of the broader frame (2.6 Moffat alphas
    at index 3: 98 % of the light, and within 1.5 % of the same share for a frame 1.4 times
    sharper), at least 5 px; the background is the median of an annulus from 3 px beyond the
    aperture, 8 px wide. Stars are kept when their annulus lies in the image and no pixel of
    either frame within it belongs to a no-data region (zeros that survive a 3x3 opening;
    scattered zeros of a sky clipped at 0 are data), their peak stays under ``LINEAR_SHARE`` of
    both frames' maxima, and their flux signal-to-noise is at least ``MIN_SNR`` in both frames.
    """
    ref_mean = np.ascontiguousarray(reference.mean(axis=0))
    tgt_mean = np.ascontiguousarray(target.mean(axis=0))
    ref_nodata, tgt_nodata = _nodata(reference), _nodata(target)
    ref_objects = _detect(ref_mean, ref_nodata)
    tgt_objects = _detect(tgt_mean, tgt_nodata)
    distance = np.hypot(
        ref_objects["x"][:, None] - tgt_objects["x"][None], ref_objects["y"][:, None] - tgt_objects["y"][None]
    )
    matched = distance.min(axis=1) < MATCH_RADIUS if tgt_objects.size else np.zeros(ref_objects.size, bool)
    x, y = ref_objects["x"][matched], ref_objects["y"][matched]
    bright = np.argsort(-ref_objects["flux"][matched])[:15]
    r50 = max(_half_light_radius(ref_mean, x[bright], y[bright]), _half_light_radius(tgt_mean, x[bright], y[bright]))
    radius = max(5.0, 4.0 * r50)
    inner, outer = radius + 3.0, radius + 11.0
    # No no-data pixel (0 in any channel of either frame) within the annulus's outer edge.
    clear = _measurable(x, y, ref_nodata | tgt_nodata, outer)
    peak_ref = _peaks(reference.max(axis=0), x, y)
    peak_tgt = _peaks(target.max(axis=0), x, y)
    linear = (peak_ref < LINEAR_SHARE * reference.max()) & (peak_tgt < LINEAR_SHARE * target.max())
    keep = clear & linear
    results = []
    for c in range(reference.shape[0]):
        fluxes = []
        for frame in (reference, target):
            plane = np.ascontiguousarray(frame[c])
            fluxes.append(_aperture_flux(plane, x[keep], y[keep], radius, inner, outer))
        (f_ref, e_ref), (f_tgt, e_tgt) = fluxes
        good = (f_ref > MIN_SNR * e_ref) & (f_tgt > MIN_SNR * e_tgt)
        results.append(
            StarRatios(
                f_tgt[good] / f_ref[good], x[keep][good], y[keep][good], radius, int(ref_objects.size), f_ref[good]
            )
        )
    return results


#: Colours: aperture radius, annulus (px), least signal-to-noise in every channel.
COLOUR_RADIUS, COLOUR_INNER, COLOUR_OUTER, COLOUR_SNR = 5.0, 8.0, 16.0, 10.0


@dataclass
class StarColours:
    """``log(R / G)`` and ``log(B / G)`` of each star kept in one frame, shape ``(2, n)``."""

    logs: np.ndarray
    detected: int

    def median(self) -> np.ndarray:
        """The median R/G and B/G."""
        return np.exp(np.median(self.logs, axis=1))

    def log_error(self, *, resamples: int = 2000, seed: int = 0) -> np.ndarray:
        """Bootstrap standard errors of the medians' logarithms (relative errors)."""
        return _median_bootstrap(self.logs, resamples, seed)


def star_colours(planes: np.ndarray) -> StarColours:
    """The colours of a colour frame's stars as its camera sees them, from sep alone.

    Stars detected at 5 sigma on the channel mean, whose annulus lies in the image clear of
    no-data regions (as :func:`independent_transmission`'s), measured in every
    channel in a circle of ``COLOUR_RADIUS`` px less the annulus median, and kept where the
    flux is at least ``COLOUR_SNR`` times its error in every channel and the peak stays under
    ``LINEAR_SHARE`` of the frame's maximum (saturated stars lose their colour).
    """
    nodata = _nodata(planes)
    objects = _detect(np.ascontiguousarray(planes.mean(axis=0)), nodata)
    keep = _measurable(objects["x"], objects["y"], nodata, COLOUR_OUTER)
    x, y = objects["x"][keep], objects["y"][keep]
    measured = [
        _aperture_flux(np.ascontiguousarray(p), x, y, COLOUR_RADIUS, COLOUR_INNER, COLOUR_OUTER) for p in planes
    ]
    good = np.all([f > COLOUR_SNR * e for f, e in measured], axis=0)
    good &= _peaks(planes.max(axis=0), x, y) < LINEAR_SHARE * planes.max()
    r, g, b = (f[good] for f, _ in measured)
    return StarColours(np.log(np.array([r / g, b / g])), int(objects.size))


def _measurable(x: np.ndarray, y: np.ndarray, nodata: np.ndarray, outer: float) -> np.ndarray:
    """Stars whose annulus's box (the nearest pixel's centre plus ``ceil(outer)``) lies in the
    image and holds no ``nodata`` pixel within ``outer`` px."""
    h, w = nodata.shape
    reach = int(np.ceil(outer))
    xi, yi = np.rint(x), np.rint(y)
    inside = (xi >= reach) & (xi < w - reach) & (yi >= reach) & (yi < h - reach)
    disk = np.hypot(*np.mgrid[-reach : reach + 1, -reach : reach + 1]) <= outer
    # The disk around each star's pixel, looked up in the image (it lies within it for the
    # stars inside).
    keep = inside.copy()
    row = yi[inside].astype(int)[:, None] + np.arange(-reach, reach + 1)
    column = xi[inside].astype(int)[:, None] + np.arange(-reach, reach + 1)
    keep[inside] = ~(nodata[row[:, :, None], column[:, None, :]] & disk).any(axis=(1, 2))
    return keep


def _nodata(frame: np.ndarray) -> np.ndarray:
    """No-data regions of any channel: zeros that survive a 3x3 opening."""
    return np.any([scipy.ndimage.binary_opening(plane == 0, np.ones((3, 3), bool)) for plane in frame], axis=0)


def _aperture_flux(plane: np.ndarray, x, y, radius: float, inner: float, outer: float):
    """Circular-aperture sums less the annulus median times the aperture's area, and their
    errors from the annulus's scatter."""
    total, _, _ = sep.sum_circle(plane, x, y, radius, subpix=5)
    h, w = plane.shape
    reach = int(np.ceil(outer))
    yy, xx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    flux, error = np.empty(x.size), np.empty(x.size)
    area = np.pi * radius**2
    for i, (xi, yi) in enumerate(zip(x, y)):
        cx, cy = int(np.rint(xi)), int(np.rint(yi))
        r = np.hypot(xx + cx - xi, yy + cy - yi)
        cut = plane[cy - reach : cy + reach + 1, cx - reach : cx + reach + 1]
        ring = cut[(r >= inner) & (r <= outer)]
        level = np.median(ring)
        sigma = 1.4826 * np.median(np.abs(ring - level))
        flux[i] = total[i] - level * area
        # Sky noise in the aperture and in the level, plus the star's shot noise (unknown gain:
        # its own flux in sky units is left out, which makes the cut stricter, not looser).
        error[i] = sigma * np.sqrt(area + area**2 * np.pi / 2 / ring.size)
    return flux, error


def _peaks(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    h, w = image.shape
    peaks = np.empty(x.size)
    for i, (xi, yi) in enumerate(zip(np.rint(x).astype(int), np.rint(y).astype(int))):
        peaks[i] = image[max(yi - 2, 0) : min(yi + 3, h), max(xi - 2, 0) : min(xi + 3, w)].max()
    return peaks


def _spline_gains(offset: float) -> tuple[float, float]:
    """Noise gain ``sum h^2`` of a cubic-spline shift by ``offset`` and its difference ratio
    ``sum (h_k+1 - h_k)^2 / (2 sum h^2)`` (1 without a shift)."""
    delta = np.zeros(41)
    delta[20] = 1
    h = scipy.ndimage.shift(delta, offset, order=3, mode="grid-wrap")
    gain = float(np.sum(h**2))
    return gain, float(np.sum(np.diff(h) ** 2) / gain / 2)


def _clipped_variance(values: np.ndarray) -> float:
    """Variance after 5 rounds of 3-sigma clipping around the median, Gaussian-corrected."""
    kept = values
    for _ in range(5):
        centre, sigma = np.median(kept), kept.std()
        kept = values[np.abs(values - centre) < 3 * sigma]
    return float(kept.var() / 0.9733)  # the share of a Gaussian's variance within 3 sigma


def spline_smoothing(image: np.ndarray) -> tuple[float, tuple[float, float]]:
    """How much a cubic-spline registration smoothed ``image``'s white noise, and the offset.

    The variances of the horizontal, vertical and mixed pixel differences of resampled white
    noise are ``s^2 b_x a_y``, ``s^2 a_x b_y`` and ``s^2 b_x b_y`` (``a`` the spline's noise gain
    along an axis, ``b`` that of its differences), so ``var(mixed) / var(vertical)`` depends on
    the x offset alone and ``var(mixed) / var(horizontal)`` on the y offset alone. Each is
    inverted for an offset in 0-0.5 px (its sign cannot be told), and the smoothing factor of
    the per-pixel noise is ``sqrt(a_x a_y)``: 1 for a frame not resampled, 0.756 at half a pixel
    in both axes. Only pixels whose 3x3 neighbourhood is data count; stars are clipped.
    """
    plane = np.asarray(image, np.float64)
    valid = scipy.ndimage.binary_erosion(plane != 0, np.ones((3, 3), bool), border_value=0)[1:, 1:]
    dx = (plane[1:, 1:] - plane[1:, :-1])[valid]
    dy = (plane[1:, 1:] - plane[:-1, 1:])[valid]
    dxy = (plane[1:, 1:] - plane[1:, :-1] - plane[:-1, 1:] + plane[:-1, :-1])[valid]
    vx, vy, vxy = _clipped_variance(dx), _clipped_variance(dy), _clipped_variance(dxy)
    offsets = np.linspace(0, 0.5, 51)
    gains = np.array([_spline_gains(v) for v in offsets])
    # The difference ratio falls from 1 at no offset to 0.74 at half a pixel.
    ratio_x, ratio_y = vxy / vy / 2, vxy / vx / 2
    offset_x = float(np.interp(ratio_x, gains[::-1, 1], offsets[::-1]))
    offset_y = float(np.interp(ratio_y, gains[::-1, 1], offsets[::-1]))
    smoothing = float(np.sqrt(np.interp(offset_x, offsets, gains[:, 0]) * np.interp(offset_y, offsets, gains[:, 0])))
    return smoothing, (offset_y, offset_x)


def core_and_halo_stars(shape, x, y, flux, fwhm: float, halo_share: float, halo_width: float) -> np.ndarray:
    """Stars of a Gaussian core of ``fwhm`` holding ``1 - halo_share`` of the light and a
    Gaussian halo ``halo_width`` times as broad (seeing with scattered light), integrated over
    square pixels exactly (the error function), on a zero image of ``shape``; each drawn
    within 25 px of its pixel."""
    image = np.zeros(shape)
    sigma = fwhm / (2 * np.sqrt(2 * np.log(2)))
    for xi, yi, fi in zip(x, y, flux):
        i0, j0 = max(int(xi) - 25, 0), max(int(yi) - 25, 0)
        i1, j1 = min(int(xi) + 26, shape[1]), min(int(yi) + 26, shape[0])
        stamp = np.zeros((j1 - j0, i1 - i0))
        for share, width in ((1 - halo_share, sigma), (halo_share, halo_width * sigma)):
            scale = np.sqrt(2) * width
            across = np.diff(0.5 * scipy.special.erf((np.arange(i0, i1 + 1) - 0.5 - xi) / scale))
            down = np.diff(0.5 * scipy.special.erf((np.arange(j0, j1 + 1) - 0.5 - yi) / scale))
            stamp += share * np.outer(down, across)
        image[j0:j1, i0:i1] += fi * stamp
    return image


def halo_settings(seed: int) -> list[tuple[float, float, float, float]]:
    """The ``(transmission, fwhm, sky, noise sigma)`` of a halo set's 3 px reference and its
    four targets (:func:`core_and_halo_frames`; ``bench/scale_errors.py --halo``'s sets)."""
    rng = np.random.default_rng(1000 + seed)
    return [(1.0, 3.0, 0.02, 0.002)] + [
        (float(rng.uniform(0.7, 1.0)), float(rng.uniform(2.3, 4.0)), 0.02 + 0.01 * k, float(rng.uniform(0.0015, 0.003)))
        for k in range(1, 5)
    ]


def core_and_halo_frames(
    frames: list[tuple[float, float, float, float]],
    *,
    seed: int,
    halo_share: float = 0.2,
    halo_width: float = 2.5,
    n_stars: int = 900,
    shape: tuple[int, int] = (1400, 2000),
) -> list[np.ndarray]:
    """One field of ``n_stars`` (uniform places, a power law of fluxes: many faint, a few near
    the range's top) seen in ``frames`` of ``(transmission, fwhm, sky, noise sigma)``: each
    ``(1, h, w)`` float32, the stars :func:`core_and_halo_stars` times the transmission, a sky
    with a slope across the frame, Gaussian noise, clipped to [0, 1]."""
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(10, shape[1] - 10, n_stars), rng.uniform(10, shape[0] - 10, n_stars)
    flux = 0.08 * (1 - rng.uniform(0, 0.995, n_stars)) ** (-1 / 0.8)
    ramp = 0.004 * np.arange(shape[1])[None, :] / shape[1]
    out = []
    for transmission, fwhm, sky, sigma in frames:
        image = transmission * core_and_halo_stars(shape, x, y, flux, fwhm, halo_share, halo_width) + sky + ramp
        image += rng.normal(0.0, sigma, shape)
        out.append(np.clip(image, 0, 1).astype(np.float32)[None])
    return out
