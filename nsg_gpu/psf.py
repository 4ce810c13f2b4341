"""Moffat PSF of a frame, fitted jointly to its bright isolated stars.

The scale's photometry weights each star's pixels by the PSF and corrects for the share of
the light those weights keep in each frame (:mod:`nsg_gpu.photometry`), so it needs each
frame's PSF, and above all the *difference* between the target's and the reference's, to
about 0.02 in the Moffat index. One Moffat ``(1 + r^2/alpha^2)^-beta`` is shared by all stars
of a frame; each star has its own amplitude, sub-pixel shift (linearized: the profile's
derivatives are columns of the per-star linear model) and a background plane, or quadratic
surface, all solved exactly for each trial ``(alpha, beta)`` (and elongation, below), which
:func:`scipy.optimize.least_squares` adjusts.
Pixels of value 0 (no data) and residuals beyond 5 sigma (hot pixels, cosmic rays) are left
out, and bright pixels are weighted by their shot noise.

A single frame's fit is pulled by whatever else lies in the stars' wings: nebula, faint
neighbours. The reference and the target show the same sky, scaled by the transmission, so
the target is fitted on its stamps minus ``s0`` times the reference's stamps with the
reference's fitted stars taken out (:func:`fit_target_psf`): what is left of the sky is a
small fraction of it, and whatever the reference's own fit missed reappears in the target's
fit, so that the difference of the two models is right even where each is slightly off.
Not so for the neighbours where the target's stars are broader: their light spreads further
in the target than ``s0`` times the reference's takes out. On a field of one star per 800
px^2, a PSF star's stamp (5 FWHM of the broader frame in radius) holds a dozen fainter stars,
whose light in its outer wings is more than its own there: a target of 8 px against a
reference of 2.8 px fitted its index 3.95 for 3.28. Both fits leave out the pixels where the
catalogue's other stars reach a tenth of the stamp's star's light (:func:`neighbour_mask`):
the outer wings of a crowded field's stamps, the whole stamp of none, since near its core a
PSF star (bright, isolated from anything over 5 % of it) outshines its neighbours.

A pixel records the PSF's light over its square, not its value at the centre. For stars of
a few pixels FWHM the two differ little, and the fit samples the Moffat at the pixel centres.
For undersampled stars they do not: a star's centre pixel holds 12 % less than the sampled
peak at a FWHM of 2 px, 24 % at 1.3 px, and a sampled Moffat fitted to such stars comes out
8 % and 17 % broader, its index 0.3-1 too high. Where either frame's stars are under
:data:`INTEGRATE_BELOW_FWHM` each pixel's model is the Moffat's mean over the pixel
(Gauss-Legendre nodes, :func:`pixel_mean`), and the fitted ``alpha`` and ``beta`` are those
of the PSF before the pixels (``MoffatPSF.pixel_integrated``), which
:func:`nsg_gpu.photometry.kept_share` then integrates over the pixels in turn.

Fast optics widen their stars towards the edges (tilt, field curvature, coma) by tens of per
cent, and one Moffat for the whole frame then reads the mixture of widths as a lower index.
Each fitted star's own width is measured (:func:`_star_widths`), and where the widths vary
across the frame beyond their errors a quadratic surface of the width (:class:`FieldModel`)
joins the Moffat: the fit is redone with each star's ``alpha`` scaled by the surface, and the
target gets its own surface (seeing widens the centre and the edges differently). The
photometry then corrects each star with the PSFs of its place in the field.

A mount that trails or a tube the wind shakes draws every star of a frame out along one
direction. A round Moffat fitted to such stars is broader and of a lower index than the light
it stands for, and the weights' correction from it missed a target drawn out by 0.3 by up to
1.6 %. The Moffat's ``r^2`` is therefore a quadratic form of determinant 1
(:attr:`MoffatPSF.shear`: ``alpha`` stays the axes' geometric mean and the normalization
holds), whose two parameters every fit measures beside ``alpha`` and ``beta``; the round
weights then keep the drawn-out light's mean over directions at each radius
(:func:`nsg_gpu.photometry.kept_share`).

A target registered at a sub-pixel offset shows its stars convolved with the registration's
interpolation kernel, which no Moffat is. The kernel is read from the frame's noise
(:mod:`nsg_gpu.resampling`), and the model is the Moffat convolved with it (``blur``): the
profile is computed over a square around each stamp and convolved there.

In the flow: below the photometry and the scale stage (:mod:`nsg_gpu.scale`); the
reference's fit is kept by :class:`nsg_gpu.reference.Reference`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage, optimize, special
from scipy.spatial import cKDTree

from .backend import get_backend
from .resampling import InterpolationKernel
from .stamps import gather_stamps

__all__ = [
    "MoffatPSF",
    "FieldModel",
    "PSFStamps",
    "cut_stamps",
    "psf_stamps",
    "stamp_noise",
    "stamp_ratio",
    "fit_psf",
    "fit_target_psf",
    "FittedPSF",
    "fit_reference_psf",
    "plausible",
    "stamp_radius",
    "pixel_mean",
    "integrated_fit",
    "fits_psf_from",
    "neighbour_mask",
]

#: Radius of the fitted stamps, in FWHM.
FIT_RADIUS_FWHM = 5.0
#: Pixels where other catalogued stars' light reaches this share of the stamp's own star's
#: are left out of the fits (:func:`neighbour_mask`).
NEIGHBOUR_SHARE = 0.1
#: Neighbours this many FWHM beyond a stamp's edge still count.
NEIGHBOUR_REACH_FWHM = 10.0
#: At most this many rounds of positions, Moffat fit, weights and clipping.
MAX_ROUNDS = 6
#: Residuals beyond this many sigma are left out of the fit: sigmas of the pixels' noise, or
#: more where the model's own error is many times the noise (:func:`_clip_scale`).
CLIP_SIGMA = 5.0
#: The stars' pixels, over which the residuals' spread is read: the star's model at least
#: this many noise sigmas.
STAR_PIXEL_SIGMA = 5.0
#: A spread of the residuals over the stars' pixels (in noise sigmas) beyond which the clip
#: follows it: the generator's Moffats fit to 1.0-1.1, real bright stars (StarGate) to
#: 2.5-3.7, which the clip at 5 noise sigmas serves; almost noiseless frames to 25-70.
MODEL_ERROR_SPREAD = 4.0
#: Of a sampled profile seen through the registration's kernel, the core convolved with it, in
#: shares of the stamps' radius (2.5 FWHM): the scales within 1e-5 of the whole stamp
#: convolved, in half the convolutions (:func:`_blurred_core`).
BLUR_CORE = 0.5
#: Stamps with more than this share of no-data pixels are not fitted.
MAX_EMPTY = 0.02
#: Bright isolated stars a frame's PSF is fitted on, and the fewest that will do.
PSF_STARS = 60
MIN_PSF_STARS = 8
#: Below this FWHM (px, as :func:`nsg_gpu.stars.estimate_fwhm` reads it) colour frames take
#: the plain aperture. Not for want of a model (the pixel-integrated one fits stars down to
#: 0.5 px within 3 %), but the Bayer cells share each red or blue star's light out by where it
#: falls, and on registered colour frames of 1 px stars PSF weights missed the scale by up to
#: 19 % without the registration's kernel and 14 % with it, where the aperture misses by less
#: (docs/scale-accuracy.md, "Undersampled stars" and "The registration's kernel").
MIN_PSF_FWHM = 2.0
#: Mono frames from this reading up fit PSFs; below :data:`MIN_PSF_FWHM` they take the PSF
#: weights (of at least :data:`MIN_WEIGHT_FWHM`, with the pixel-integrated fits and the
#: registration's kernel) or the plain aperture, whichever states the smaller uncertainty:
#: on the generator's registered mono frames of 0.5-1.4 px mostly the weights (RMS 0.70-1.6 %
#: against 0.94-5.2 %), on real ones of 1.3-1.7 px the aperture (docs/scale-accuracy.md,
#: "Undersampled mono frames"). Stars of 0.5 px read about 1.3 px.
MIN_MONO_PSF_FWHM = 1.0
#: PSF weights are never narrower than this FWHM (px, the Moffat's before the pixels): weights
#: as narrow as 1 px stars make each star's kept share hang on where it falls in its pixel
#: (19-35 % scatter at 0.8-1.0 px, 1.5-4 % at 2-2.5 px).
MIN_WEIGHT_FWHM = 2.0
#: Below :data:`MIN_PSF_FWHM` a fit whose index has a standard error above this share of the
#: index was not determined by the few pixels such stars cover: its kernel and index trade
#: against each other, and the correction it gave was 10.8 % off where its covariance stated
#: 1.7 % (index 11.0 +- 21.4); the frame takes the plain aperture instead. Near-Gaussian
#: stars (index 7-12) carry errors of 1-2.4 that change their profile little.
MAX_UNDERSAMPLED_BETA_ERROR = 0.5
#: Where either frame's stars have a FWHM (px, as :func:`nsg_gpu.stars.estimate_fwhm`
#: reads it) below this, the fits integrate the Moffat over each pixel. A sampled fit's
#: seeing correction is off by 1-2 % for stars of 1.3 px, by 0.2 % or less from 2 px (2.26 as
#: read); above, the sampled fit costs half as much.
INTEGRATE_BELOW_FWHM = 2.5
#: Gauss-Legendre nodes per axis of a pixel's integral within :data:`PIXEL_CORE` px of a
#: stamp's centre (the profile's mean over a pixel to 3e-4 of the peak for a FWHM of 0.8 px,
#: 7e-5 from 1 px, 3e-5 from 1.3 px), and beyond it, where the profile bends little across a
#: pixel (1e-4 of the peak at 2.3 px from the star, less farther out).
CORE_NODES = 4
WING_NODES = 2
PIXEL_CORE = 3.5


@dataclass(frozen=True)
class MoffatPSF:
    """``P(r) = (beta - 1) / (pi alpha^2) * (1 + r^2 / alpha^2)^-beta``, of unit total flux.

    ``pixel_integrated``: the frame's pixels hold ``P``'s mean over their square
    (:func:`pixel_mean`), and ``alpha``, ``beta`` describe the PSF before the pixels; else
    the pixels are taken as samples of ``P`` at their centres.
    """

    alpha: float
    beta: float
    stars: int = 0
    pixel_integrated: bool = False
    #: How the width changes across the frame (``alpha`` times the field's factor at a star),
    #: or None where one Moffat holds everywhere.
    field: FieldModel | None = None
    #: The registration's interpolation kernel the frame's pixels went through
    #: (:mod:`nsg_gpu.resampling`), convolved with the profile; None for a frame not resampled.
    blur: InterpolationKernel | None = None
    #: The fit's covariance of ``(log alpha, beta)`` as ``(var log alpha, cov, var beta)``
    #: (:func:`parameter_covariance`), or None where the Moffat was not fitted.
    covariance: tuple[float, float, float] | None = None
    #: Stars drawn out (tracking, wind, tilt): ``(g1, g2)``, the profile a function of
    #: ``(u, v) M (u, v)^T`` with ``M = exp([[g1, g2], [g2, -g1]])`` (determinant 1, so that
    #: ``alpha`` stays the axes' geometric mean and the normalization holds); round at 0.
    shear: tuple[float, float] = (0.0, 0.0)
    #: The fit's covariance of ``shear`` as ``(var g1, cov, var g2)``, or None.
    shear_covariance: tuple[float, float, float] | None = None

    @property
    def fwhm(self) -> float:
        return 2.0 * self.alpha * math.sqrt(2.0 ** (1.0 / self.beta) - 1.0)

    @property
    def round(self) -> bool:
        return self.shear[0] == 0.0 and self.shear[1] == 0.0

    @property
    def ellipticity(self) -> float:
        """``1 - minor / major`` axis of the profile's contours."""
        return 1.0 - math.exp(-math.hypot(*self.shear))

    @property
    def elongation_angle(self) -> float:
        """The major axis's angle from the x axis, degrees in ``(-90, 90]``."""
        angle = math.degrees(0.5 * math.atan2(self.shear[1], self.shear[0])) + 90.0
        return angle - 180.0 if angle > 90.0 else angle

    def quadratic(self) -> tuple[float, float, float]:
        """``(m11, m12, m22)`` of the shape's matrix ``M`` (:attr:`shear`)."""
        g1, g2 = self.shear
        g = math.hypot(g1, g2)
        if g == 0.0:
            return 1.0, 0.0, 1.0
        c, s = math.cosh(g), math.sinh(g) / g
        return c + g1 * s, g2 * s, c - g1 * s

    def r2(self, u, v):
        """The squared distance the profile is a function of, at offsets ``u, v`` (x, y) from
        the star: ``u^2 + v^2`` for a round one."""
        if self.round:
            return u * u + v * v
        m11, m12, m22 = self.quadratic()
        if not (
            isinstance(u, np.ndarray)
            and isinstance(v, np.ndarray)
            and u.ndim
            and u.shape == v.shape
            and u.dtype == v.dtype
        ):
            return m11 * u * u + 2.0 * m12 * u * v + m22 * v * v
        # The same products and sums as above, in two arrays instead of eight.
        out = m11 * u
        out *= u
        term = (2.0 * m12) * u
        term *= v
        out += term
        np.multiply(m22, v, out=term)
        term *= v
        out += term
        return out

    def direction_factor(self, theta):
        """``r2`` at unit distance in directions ``theta`` (radians): the profile along a
        direction is the round one at ``r^2`` times this."""
        m11, m12, m22 = self.quadratic()
        c, s = np.cos(theta), np.sin(theta)
        return m11 * c * c + 2.0 * m12 * c * s + m22 * s * s

    @property
    def pixel_fwhm(self) -> float:
        """The FWHM the stars show in the frame's pixels: for a pixel-integrated PSF about
        ``hypot(fwhm, 1)``, which is what :func:`nsg_gpu.stars.estimate_fwhm` reads on
        such stars from a FWHM of 1.3 px up (within 3 %; 1.6 px for 0.5-1.1)."""
        return math.hypot(self.fwhm, 1.0) if self.pixel_integrated else self.fwhm

    @classmethod
    def from_fwhm(cls, fwhm: float, beta: float, stars: int = 0, *, pixel_integrated: bool = False) -> MoffatPSF:
        return cls(fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0)), beta, stars, pixel_integrated)

    def at(self, factor: float) -> MoffatPSF:
        """The same Moffat ``factor`` times as wide, without a field model: the PSF where the
        field's factor is ``factor``."""
        return replace(self, alpha=self.alpha * factor, field=None)

    def uniform(self) -> MoffatPSF:
        """The Moffat at the field's typical width (factor 1), without the field model."""
        return self.at(1.0) if self.field is not None else self

    def weights(self) -> MoffatPSF:
        """The Moffat alone, as photometric weights: a function of the distance to the star
        (round), at the field's typical width, without the registration's kernel."""
        return MoffatPSF(self.alpha, self.beta, self.stars, self.pixel_integrated)

    def factor(self, x, y) -> np.ndarray:
        """The width's factor at frame positions ``x, y``: the field's, or 1."""
        if self.field is None:
            return np.ones(np.broadcast(np.asarray(x), np.asarray(y)).shape)
        return self.field.factor(x, y)

    def shape(self, r2):
        """The profile without its normalization, 1 at the centre."""
        return (1.0 + r2 / (self.alpha * self.alpha)) ** (-self.beta)

    def __call__(self, r2):
        return (self.beta - 1.0) / (math.pi * self.alpha * self.alpha) * self.shape(r2)


#: A frame's PSF is given a field model (:class:`FieldModel`) where its stars' widths vary
#: across the frame by at least this ratio (the fitted surface's range over the stars)...
FIELD_MIN_RANGE = 1.06
#: ... and the surface explains them better than one width does at this false-alarm
#: probability (an F-test on the widths' residuals).
FIELD_FALSE_ALARM = 1e-3
#: Fewest stars whose widths a field model is fitted to.
FIELD_MIN_STARS = 16
#: Trial widths, relative to the frame's Moffat, at which each star's own width is looked
#: for (:func:`_star_widths`): steps of 4.7 % from 0.6 to 1.8.
WIDTH_TRIALS = np.exp(np.linspace(math.log(0.6), math.log(1.8), 25))


@dataclass(frozen=True)
class FieldModel:
    """How a frame's PSF width changes across the field: its Moffat's ``alpha`` times
    ``f(x, y)``, a quadratic surface in the frame's coordinates (tilt, field curvature and
    coma widen the stars towards the edges, by tens of per cent on fast optics), whose median
    over the fitted stars is 1. Outside the fitted stars' range of ``f`` it is held at that
    range's ends, widened by a tenth."""

    coefficients: tuple[float, ...]  # of 1, u, v, u^2, uv, v^2
    x0: float
    y0: float
    half: float
    low: float
    high: float

    @staticmethod
    def _terms(x, y, x0: float, y0: float, half: float) -> np.ndarray:
        u = (np.asarray(x, float) - x0) / half
        v = (np.asarray(y, float) - y0) / half
        return np.stack([np.ones_like(u), u, v, u * u, u * v, v * v])

    def factor(self, x, y) -> np.ndarray:
        """``f`` at frame positions ``x, y``."""
        f = np.tensordot(np.asarray(self.coefficients), self._terms(x, y, self.x0, self.y0, self.half), axes=1)
        return np.clip(f, self.low, self.high)

    @classmethod
    def fit(cls, x, y, factor, variance) -> FieldModel | None:
        """The surface through stars' widths ``factor`` (relative to any common width) at
        ``x, y`` with their ``variance``; None where the widths do not vary across the frame
        beyond their errors (:data:`FIELD_FALSE_ALARM`) or by less than
        :data:`FIELD_MIN_RANGE`. Stars beyond 4 robust sigmas are left out."""
        x, y, factor, variance = (np.asarray(a, float) for a in (x, y, factor, variance))
        keep = np.isfinite(factor) & np.isfinite(variance) & (variance > 0)
        if keep.sum() < FIELD_MIN_STARS:
            return None
        x0, y0 = (x[keep].min() + x[keep].max()) / 2, (y[keep].min() + y[keep].max()) / 2
        half = max(x[keep].max() - x0, y[keep].max() - y0, 1.0)
        terms = cls._terms(x, y, x0, y0, half).T  # (n, 6)
        for _ in range(4):
            w = 1 / variance[keep]
            a, b = terms[keep], factor[keep]
            coef = np.linalg.lstsq(a * np.sqrt(w)[:, None], b * np.sqrt(w), rcond=None)[0]
            z = (factor - terms @ coef) / np.sqrt(np.where(variance > 0, variance, np.inf))
            spread = 1.4826 * float(np.median(np.abs(z[keep])))
            now = keep & (np.abs(z) <= 4 * max(spread, 1e-12))
            if now.sum() < FIELD_MIN_STARS:
                return None
            if np.array_equal(now, keep):
                break
            keep = now
        n = int(keep.sum())
        w = 1 / variance[keep]
        mean = float(np.sum(w * factor[keep]) / np.sum(w))
        chi_flat = float(np.sum(w * (factor[keep] - mean) ** 2))
        chi_surface = float(np.sum(w * (factor[keep] - terms[keep] @ coef) ** 2))
        f_stat = (chi_flat - chi_surface) / 5 / max(chi_surface / (n - 6), 1e-300)
        fitted = terms[keep] @ coef
        if not (special.fdtrc(5, n - 6, f_stat) < FIELD_FALSE_ALARM and fitted.max() >= FIELD_MIN_RANGE * fitted.min()):
            return None
        if fitted.min() <= 0:
            return None
        norm = float(np.median(fitted))
        coef = coef / norm
        return cls(
            tuple(float(c) for c in coef),
            float(x0),
            float(y0),
            float(half),
            float(fitted.min() / norm / 1.1),
            float(fitted.max() / norm * 1.1),
        )


def _legendre(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes on ``[-1/2, 1/2]`` and weights summing to 1."""
    t, w = np.polynomial.legendre.leggauss(nodes)
    return t / 2, w / 2


def _square_nodes(nodes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offsets ``sx, sy`` and weights of the product rule over the unit square."""
    t, w = _legendre(nodes)
    return np.repeat(t, nodes), np.tile(t, nodes), np.outer(w, w).ravel()


def pixel_mean(psf: MoffatPSF, x, y, *, nodes: int = 8):
    """``psf``'s mean over the unit squares centred at offsets ``(x, y)`` from the star:
    what a pixel there records of a star of unit flux (``nodes`` Gauss-Legendre nodes per
    axis; 8 give about 1e-7 of the peak for a FWHM of 0.8 px)."""
    sx, sy, w = _square_nodes(nodes)
    x, y = np.asarray(x, float), np.asarray(y, float)
    total = np.zeros(np.broadcast(x, y).shape)
    for a, b, weight in zip(sx, sy, w):
        u, v = x + a, y + b
        total += weight * psf(psf.r2(u, v))
    return total


@dataclass
class PSFStamps:
    """Circular stamps of the same stars in one frame: pixels ``(n, p)`` at offsets ``(p,)``
    from the integer centres ``(n,)``; ``dx, dy`` place each star within its centre pixel."""

    data: np.ndarray
    px: np.ndarray
    py: np.ndarray
    xi: np.ndarray
    yi: np.ndarray
    dx: np.ndarray
    dy: np.ndarray

    def take(self, keep: np.ndarray) -> PSFStamps:
        return PSFStamps(self.data[keep], self.px, self.py, self.xi[keep], self.yi[keep], self.dx[keep], self.dy[keep])


def cut_stamps(image, x: np.ndarray, y: np.ndarray, radius: float) -> PSFStamps:
    """Pixels within ``radius`` of each star's nearest pixel, on the host; outside the image
    reads 0. ``image`` may live on any backend: only the stamps cross to the host."""
    be = get_backend(image)
    half = int(math.ceil(radius))
    off = np.arange(-half, half + 1)
    gy, gx = np.meshgrid(off, off, indexing="ij")
    disc = gx * gx + gy * gy <= radius * radius
    px, py = gx[disc].astype(float), gy[disc].astype(float)
    xi = np.rint(x).astype(np.int64)
    yi = np.rint(y).astype(np.int64)
    data = be.to_host(gather_stamps(image, xi, yi, half)[:, be.asarray(disc)]).astype(np.float64)
    return PSFStamps(data, px, py, xi, yi, np.asarray(x, float) - xi, np.asarray(y, float) - yi)


def psf_stamps(data, x: np.ndarray, y: np.ndarray, radius: float) -> PSFStamps:
    """Stamps of the image PSFs are fitted on: the frame itself, or for colour the mean of the
    channels, 0 where any channel is 0. A linear combination keeps the stars' profiles; the
    detection image's colour intensity ``(min + max) / 2`` does not where a star's colour
    changes which channel is brightest. Only the stamps are combined, never the whole frame."""
    planes = [cut_stamps(data[c], x, y, radius) for c in range(data.shape[0])]
    if len(planes) == 1:
        return planes[0]
    values = np.stack([p.data for p in planes])
    first = planes[0]
    combined = np.where(np.all(values != 0, axis=0), values.mean(axis=0), 0.0)
    return PSFStamps(combined, first.px, first.py, first.xi, first.yi, first.dx, first.dy)


def _outer_ring(stamps: PSFStamps) -> np.ndarray:
    """The stamps' pixels beyond 80 % of their radius: sky, far from the star's core."""
    r2 = stamps.px**2 + stamps.py**2
    return r2 >= 0.64 * float(np.max(r2))


def stamp_noise(stamps: PSFStamps) -> tuple[float, float]:
    """Pixel noise of the sky, and the factor turning signal into shot-noise variance (the
    sky's variance over its level), from the stamps' outer rings; NaN noise without them."""
    values = stamps.data[:, _outer_ring(stamps)]
    full = np.all(values != 0, axis=1)
    if not full.any():
        return float("nan"), 0.0
    values = values[full]
    level = np.median(values, axis=1)
    noise = 1.4826 * float(np.median(np.abs(values - level[:, None])))
    return noise, noise * noise / max(float(np.median(level)), noise)


def stamp_ratio(target: PSFStamps, reference: PSFStamps) -> float:
    """A first estimate of the target's brightness over the reference's: the median over
    stars of the ratio of their stamp sums above the stamps' outer rings (about 1 %)."""
    ring = _outer_ring(target)
    full = np.all(target.data != 0, axis=1) & np.all(reference.data != 0, axis=1)
    if not full.any():
        return float("nan")
    t, r = target.data[full], reference.data[full]
    t_sum = np.sum(t - np.median(t[:, ring], axis=1)[:, None], axis=1)
    r_sum = np.sum(r - np.median(r[:, ring], axis=1)[:, None], axis=1)
    good = (r_sum > 0) & (t_sum > 0)
    return float(np.median(t_sum[good] / r_sum[good])) if good.any() else float("nan")


def _background_terms(stamps: PSFStamps, curved: bool) -> np.ndarray:
    """The background's columns ``(k, p)``: a plane, or a quadratic surface."""
    terms = [np.ones_like(stamps.px), stamps.px, stamps.py]
    if curved:
        u, v = stamps.px / max(stamps.px.max(), 1.0), stamps.py / max(stamps.py.max(), 1.0)
        terms += [u * u, u * v, v * v]
    return np.stack(terms)


def _pixel_rule(stamps: PSFStamps) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """How the integrated profile integrates each stamp pixel: per group of pixels (their
    indices), the node offsets ``sx, sy`` and weights; :data:`CORE_NODES` per axis within
    :data:`PIXEL_CORE` of the stamp's centre, :data:`WING_NODES` beyond."""
    core = stamps.px**2 + stamps.py**2 <= PIXEL_CORE * PIXEL_CORE
    groups = []
    for inside, nodes in ((core, CORE_NODES), (~core, WING_NODES)):
        index = np.nonzero(inside)[0]
        if index.size:
            groups.append((index, *_square_nodes(nodes)))
    return groups


def _offsets(stamps: PSFStamps, integrated: bool) -> list[tuple]:
    """Where the profile is evaluated: per group of pixels, their indices (None: all), the
    offsets ``u, v`` from the stars ``(n, pixels[, nodes])``, ``u^2 + v^2`` and the nodes'
    weights (None: the pixel centres, sampled)."""
    ux = stamps.px[None] - stamps.dx[:, None]
    uy = stamps.py[None] - stamps.dy[:, None]
    if not integrated:
        return [(None, ux, uy, ux * ux + uy * uy, None)]
    groups = []
    for index, sx, sy, w in _pixel_rule(stamps):
        u = ux[:, index, None] + sx
        v = uy[:, index, None] + sy
        groups.append((index, u, v, u * u + v * v, w))
    return groups


def _columns(psf: MoffatPSF, offsets: list[tuple], out: np.ndarray, widths: np.ndarray | None = None) -> np.ndarray:
    """The profile and its derivatives by the star's x and y into ``out`` ``(n, 3, p)``: at
    the pixel centres, or their means over the pixels (the nodes' weighted sums); each star's
    ``alpha`` times its factor in ``widths`` ``(n,)`` where given (a field model). A drawn-out
    profile (:attr:`MoffatPSF.shear`) is a function of ``(u, v) M (u, v)^T``, its gradient
    ``M (u, v)``."""
    m11, m12, m22 = psf.quadratic()
    for index, u, v, r2, w in offsets:
        if not psf.round:
            r2 = psf.r2(u, v)
            turned_u, term = m11 * u, m12 * v
            turned_u += term
            turned_v = m12 * u
            np.multiply(m22, v, out=term)
            turned_v += term
            u, v = turned_u, turned_v
        if widths is None:
            a2 = psf.alpha * psf.alpha
        else:
            a2 = (psf.alpha * np.asarray(widths, float)).reshape((-1,) + (1,) * (r2.ndim - 1)) ** 2
        # q = 1 + r2 / a2 and the slope 2 beta / a2 * shape / q, each in one array.
        q = np.divide(r2, a2)
        q += 1.0
        shape = np.power(q, -psf.beta, out=out[:, 0] if w is None else None)
        # d shape / d(star x) = 2 beta u / alpha^2 * q^(-beta-1)
        slope = np.multiply(2.0 * psf.beta / a2, shape)
        slope /= q
        if w is None:
            np.multiply(slope, u, out=out[:, 1])
            np.multiply(slope, v, out=out[:, 2])
        else:
            out[:, 0, index] = shape @ w
            out[:, 1, index] = np.multiply(slope, u, out=q) @ w
            out[:, 2, index] = np.multiply(slope, v, out=q) @ w
    return out


def _square(
    stamps: PSFStamps, margin: int, centre: tuple[float, float] = (0.0, 0.0), half: int | None = None
) -> PSFStamps:
    """The square of pixels around the stamps' discs (or of ``half`` px from the centre),
    ``margin`` px wider on each side (no data: only its offsets and the stars' positions are
    used), with the stars moved by ``centre`` (x, y): where a kernel of that centroid takes
    them from."""
    if half is None:
        half = int(round(max(np.max(np.abs(stamps.px)), np.max(np.abs(stamps.py)))))
    half += margin
    off = np.arange(-half, half + 1, dtype=float)
    gy, gx = np.meshgrid(off, off, indexing="ij")
    cx, cy = centre
    return PSFStamps(
        np.zeros((0, gx.size)), gx.ravel(), gy.ravel(), stamps.xi, stamps.yi, stamps.dx + cx, stamps.dy + cy
    )


def _blurred(columns: np.ndarray, stamps: PSFStamps, blur: InterpolationKernel) -> np.ndarray:
    """Columns ``(n, 3, side * side)`` over :func:`_square`'s pixels convolved with the
    separable ``blur`` and taken at the stamps' pixels: ``(n, 3, p)``."""
    n = columns.shape[0]
    side = int(round(math.sqrt(columns.shape[2])))
    half = side // 2
    grid = columns.reshape(n, 3, side, side)
    grid = ndimage.correlate1d(grid, np.asarray(blur.x), axis=3, mode="constant")
    grid = ndimage.correlate1d(grid, np.asarray(blur.y), axis=2, mode="constant")
    index = (stamps.py.astype(int) + half) * side + (stamps.px.astype(int) + half)
    return np.ascontiguousarray(grid.reshape(n, 3, side * side)[:, :, index])


def _blurred_core(
    columns: np.ndarray, core: tuple, psf: MoffatPSF, widths: np.ndarray | None, blur: InterpolationKernel
) -> np.ndarray:
    """``columns`` ``(n, 3, p)`` (the Moffat at the stamps' pixels) with the profile over the
    stars' cores convolved with ``blur``.

    ``core``: the square's offsets ``u, v`` ``(n, side * side)`` (:func:`_square`, ``half``
    the core's and the kernel's half-width as margin), the core pixels' places in the
    stamps and in the square. Beyond the core the kernel, which keeps the low frequencies of
    a smooth wing, is left out.
    """
    ux, uy, in_stamp, in_square = core
    r2 = psf.r2(ux, uy)
    n = columns.shape[0]
    side = int(round(math.sqrt(r2.shape[1])))
    # As :func:`_columns`' profile: each star's alpha times its factor in ``widths``.
    a2 = psf.alpha * psf.alpha if widths is None else (psf.alpha * np.asarray(widths, float))[:, None] ** 2
    grid = np.power(1.0 + r2 / a2, -psf.beta).reshape(n, side, side)
    grid = ndimage.correlate1d(grid, np.asarray(blur.x), axis=2, mode="constant")
    grid = ndimage.correlate1d(grid, np.asarray(blur.y), axis=1, mode="constant")
    columns[:, 0, in_stamp] = grid.reshape(n, side * side)[:, in_square]
    return columns


def _core(stamps: PSFStamps, blur: InterpolationKernel) -> tuple:
    """The core that :func:`_blurred_core` convolves for a sampled profile seen through
    ``blur`` (:meth:`_StarModels.profile`; beyond it the profile is the stamps' own, the stars
    where the registration put them): over a square with the stars where the camera saw
    them, moved by the kernel's centroid, which the kernel takes back."""
    radius = max(np.max(np.abs(stamps.px)), np.max(np.abs(stamps.py)))
    half = int(math.ceil(BLUR_CORE * radius))
    square = _square(stamps, blur.half, blur.centre, half=half)
    side = 2 * (half + blur.half) + 1
    inside = (np.abs(stamps.px) <= half) & (np.abs(stamps.py) <= half)
    in_stamp = np.nonzero(inside)[0]
    in_square = (stamps.py[in_stamp].astype(int) + half + blur.half) * side + (
        stamps.px[in_stamp].astype(int) + half + blur.half
    )
    ux = square.px[None] - square.dx[:, None]
    uy = square.py[None] - square.dy[:, None]
    return ux, uy, in_stamp, in_square


def _design(psf: MoffatPSF, stamps: PSFStamps, background: np.ndarray, widths: np.ndarray | None = None) -> np.ndarray:
    """Per-star linear model ``(n, k, p)``: profile (sampled, or integrated over the pixels
    where ``psf.pixel_integrated``; each star's width times ``widths`` where given), its x and
    y derivatives, and the ``background`` terms. With :func:`_solve`, the specification of
    :class:`_StarModels`."""
    n, p = stamps.dx.size, stamps.px.size
    design = np.empty((n, 3 + background.shape[0], p))
    _columns(psf, _offsets(stamps, psf.pixel_integrated), design[:, :3], widths)
    design[:, 3:] = background[None]
    return design


def _normal_equations(design: np.ndarray, data: np.ndarray, weight: np.ndarray):
    """Per star, the weighted normal matrix ``(n, k, k)`` (with :func:`_ridge`) and right-hand
    side ``(n, k)`` of the linear model ``design`` ``(n, k, p)``."""
    dw = design * weight[:, None, :]
    normal = dw @ design.transpose(0, 2, 1)
    normal += _ridge(normal)
    return normal, (dw @ data[..., None])[..., 0]


def _ridge(normal: np.ndarray) -> np.ndarray:
    """1e-12 of each normal matrix's trace on its diagonal, and at least the smallest normal
    float: a star whose pixels were all clipped or empty (weights 0) gets coefficients 0
    instead of a singular system."""
    trace = np.trace(normal, axis1=1, axis2=2)
    return (1e-12 * trace + np.finfo(np.float64).tiny)[:, None, None] * np.eye(normal.shape[1])


def _solve(design: np.ndarray, data: np.ndarray, weight: np.ndarray):
    """Weighted least squares per star; returns coefficients ``(n, k)`` and the model."""
    normal, rhs = _normal_equations(design, data, weight)
    coef = np.linalg.solve(normal, rhs[..., None])[..., 0]
    return coef, np.einsum("nkp,nk->np", design, coef)


class _StarModels:
    """The per-star linear models of one fit at fixed weights: :func:`_solve` of
    :func:`_design`, computed by blocks.

    The background columns are the same for every star and every trial Moffat, so their part
    of the normal equations (``B W B^T``, ``B W d``) is formed once per set of weights; a trial
    Moffat only adds its three profile columns and their products. The same system as
    :func:`_solve`'s, summed in another order (equal to rounding; ``tests/test_psf.py``).
    """

    def __init__(
        self,
        stamps: PSFStamps,
        background: np.ndarray,
        data: np.ndarray,
        weight: np.ndarray,
        widths: np.ndarray | None = None,
        blur: InterpolationKernel | None = None,
    ):
        n, p = data.shape
        kb = background.shape[0]
        self.stamps, self.background, self.data, self.weight = stamps, background, data, weight
        self.widths = widths  # each star's width factor (a field model), or None
        self.blur = blur  # the registration's kernel, convolved with the profile, or None
        self.sqrt_weight = np.sqrt(weight)
        self.wdata = weight * data
        pairs = (background[:, None, :] * background[None, :, :]).reshape(kb * kb, p)
        self.bb = (weight @ pairs.T).reshape(n, kb, kb)
        self.bd = self.wdata @ background.T
        self.k = 3 + kb
        self._offsets = None  # the stars' pixel offsets, kept while their positions stand
        # The last few Moffats' profiles and solutions: the fit asks again for the one
        # least_squares settled on (its model, then its profile), at the same positions.
        self._recent: list[tuple] = []

    def _remembered(self, psf: MoffatPSF):
        st = self.stamps
        for entry in self._recent:
            if entry[0] == psf and entry[1] is st.dx and entry[2] is st.dy:
                return entry
        return None

    def profile(self, psf: MoffatPSF) -> np.ndarray:
        """The profile and its x and y derivatives ``(n, 3, p)``, as :func:`_design`'s first
        three columns."""
        entry = self._remembered(psf)
        if entry is not None:
            return entry[3]
        st = self.stamps
        key = (st.dx, st.dy, psf.pixel_integrated)
        if self._offsets is None or any(a is not b for a, b in zip(self._offsets[0], key)):
            # A kernel with a centroid (a shift's) moves the stars by it: what it convolves
            # is evaluated where the camera saw them, so that the fitted positions stay the
            # registered ones. Integrated profiles are convolved over a square around each
            # stamp, sampled ones over the core only (:func:`_core`).
            evaluated, core = st, None
            if self.blur is not None and psf.pixel_integrated:
                evaluated = _square(st, self.blur.half, self.blur.centre)
            elif self.blur is not None:
                core = _core(st, self.blur)
            self._offsets = (key, _offsets(evaluated, psf.pixel_integrated), evaluated, core)
        evaluated, core = self._offsets[2], self._offsets[3]
        columns = _columns(psf, self._offsets[1], np.empty((st.dx.size, 3, evaluated.px.size)), self.widths)
        if self.blur is None:
            return columns
        if core is None:
            return _blurred(columns, st, self.blur)
        return _blurred_core(columns, core, psf, self.widths, self.blur)

    def solve(self, psf: MoffatPSF):
        """Coefficients ``(n, k)`` and the model ``(n, p)``, as ``_solve(_design(...))``
        (not to be modified: the last few are kept and handed out again)."""
        entry = self._remembered(psf)
        if entry is not None:
            return entry[4], entry[5]
        profile = self.profile(psf)
        n, _, p = profile.shape
        kb = self.k - 3
        weighted = profile * self.weight[:, None, :]
        normal = np.empty((n, self.k, self.k))
        normal[:, :3, :3] = weighted @ profile.transpose(0, 2, 1)
        cross = (weighted.reshape(3 * n, p) @ self.background.T).reshape(n, 3, kb)
        normal[:, :3, 3:] = cross
        normal[:, 3:, :3] = cross.transpose(0, 2, 1)
        normal[:, 3:, 3:] = self.bb
        rhs = np.empty((n, self.k))
        rhs[:, :3] = np.einsum("nkp,np->nk", profile, self.wdata)
        rhs[:, 3:] = self.bd
        normal += _ridge(normal)
        coef = np.linalg.solve(normal, rhs[..., None])[..., 0]
        model = np.einsum("nkp,nk->np", profile, coef[:, :3])
        model += coef[:, 3:] @ self.background
        self._recent = [(psf, self.stamps.dx, self.stamps.dy, profile, coef, model)] + self._recent[:3]
        return coef, model


def fit_psf(
    stamps: PSFStamps,
    *,
    fwhm: float,
    sigma: float,
    gain_inv: float = 0.0,
    beta: float = 3.0,
    curved: bool = False,
    extra_variance: np.ndarray | None = None,
    pixel_integrated: bool = False,
    widths: np.ndarray | None = None,
    blur: InterpolationKernel | None = None,
) -> tuple[MoffatPSF, np.ndarray, np.ndarray]:
    """Fit one Moffat to all stamps.

    Parameters
    ----------
    stamps : PSFStamps
        The stars' pixels (0 = no data); stamps with more than 2 % no data are skipped.
    fwhm, beta : float
        Starting values.
    sigma : float
        Noise of a sky pixel; ``gain_inv`` turns signal into shot-noise variance.
    curved : bool
        Fit each star's background as a quadratic surface instead of a plane.
    extra_variance : ndarray (n, p), optional
        Variance each pixel carries besides its own sky and shot noise.
    pixel_integrated : bool
        Model each pixel as the Moffat's mean over it (undersampled stars), not its value at
        the pixel's centre.
    widths : ndarray (n,), optional
        Each star's width relative to the others (a field model's factor at the star): its
        Moffat's ``alpha`` is the fitted one times this.
    blur : InterpolationKernel, optional
        The registration's kernel the frame went through (:mod:`nsg_gpu.resampling`): the
        model is the Moffat (sampled or integrated) convolved with it.

    Returns
    -------
    psf : MoffatPSF
    stars : ndarray of bool over the stamps, those fitted
    model : ndarray (n_fitted, p), the fitted star light alone (no background)
    """
    fit = _fit(
        stamps,
        fwhm=fwhm,
        sigma=sigma,
        gain_inv=gain_inv,
        beta=beta,
        curved=curved,
        extra_variance=extra_variance,
        pixel_integrated=pixel_integrated,
        widths=widths,
        blur=blur,
    )
    return _with_covariance(fit), fit.usable, fit.star


@dataclass
class _Fit:
    """A joint fit and what it was fitted on: the stamps it used (recentred) and their
    per-star models at the final weights."""

    psf: MoffatPSF
    usable: np.ndarray
    star: np.ndarray
    models: _StarModels | None


def _fit(stamps: PSFStamps, *, blur: InterpolationKernel | None = None, **options) -> _Fit:
    """:func:`fit_psf`, keeping the stars' models. A kernel that shifts (a matched
    interpolation's), whose sign the noise does not tell, has it chosen by an integrated fit
    (:func:`_shift_sign`): where a mirror fits better, the fit is redone with it."""
    fit = _fit_once(stamps, blur=blur, **options)
    if not options["pixel_integrated"]:
        # Stars of 2.5 px and more fit a kernel and its mirror alike (their scales within
        # 0.08 %: docs/scale-accuracy.md, "The registration's kernel above 2.5 px").
        return fit
    chosen = _shift_sign(fit, blur)
    if chosen is blur:
        return fit
    return _fit_once(
        stamps, blur=chosen, **{**options, "fwhm": fit.psf.fwhm, "beta": fit.psf.beta, "shear": fit.psf.shear}
    )


def _fit_once(
    stamps: PSFStamps,
    *,
    fwhm: float,
    sigma: float,
    gain_inv: float,
    beta: float,
    curved: bool,
    extra_variance: np.ndarray | None,
    pixel_integrated: bool,
    widths: np.ndarray | None,
    blur: InterpolationKernel | None = None,
    masked: np.ndarray | None = None,
    shear: tuple[float, float] = (0.0, 0.0),
) -> _Fit:
    """One :func:`_fit` with ``blur`` as it is; ``shear`` the start of the Moffat's."""
    usable = np.mean(stamps.data == 0, axis=1) <= MAX_EMPTY
    st = stamps.take(usable)
    st.dx, st.dy = st.dx.copy(), st.dy.copy()
    widths = None if widths is None else np.asarray(widths, float)[usable]
    data = st.data
    variance = np.full(data.shape, sigma * sigma)
    if extra_variance is not None:
        variance += extra_variance[usable]
    left_out = data == 0  # no data, or near another star (``masked``)
    if masked is not None:
        left_out |= masked[usable]
    weight = np.where(left_out, 0.0, 1.0 / variance)
    psf = replace(MoffatPSF.from_fwhm(fwhm, beta, pixel_integrated=pixel_integrated), shear=tuple(shear))
    background = _background_terms(st, curved)
    if data.shape[0] == 0:
        return _Fit(psf, usable, np.zeros((0, data.shape[1])), None)

    def centre(psf, models):
        # Move each star's centre by the shift its derivative columns ask for.
        for _ in range(3):
            coef, _ = models.solve(psf)
            amp = np.where(np.abs(coef[:, 0]) > 0, coef[:, 0], 1.0)
            st.dx = np.clip(st.dx + coef[:, 1] / amp, -0.75, 0.75)
            st.dy = np.clip(st.dy + coef[:, 2] / amp, -0.75, 0.75)

    # Positions, the Moffat, and the weights and clipping that depend on it, in turn until
    # the Moffat settles (the index within 0.005).
    for _ in range(MAX_ROUNDS):
        models = _StarModels(st, background, data, weight, widths, blur)
        centre(psf, models)

        def residual(theta, models=models, shear=psf.shear):
            _, model = models.solve(_trial([*theta, *shear], pixel_integrated))
            return ((data - model) * models.sqrt_weight).ravel()

        solution = optimize.least_squares(
            residual,
            [math.log(psf.alpha), psf.beta],
            bounds=([math.log(0.3), 1.2], [math.log(50.0), MAX_FIT_BETA]),
            x_scale=[0.01, 0.05],
            diff_step=[1e-4, 1e-4],
            # Steps of 1e-6 in log alpha and beta, far inside the rounds' own criterion
            # (beta within 0.005): SciPy's default 1e-8 took a quarter more evaluations for
            # the same parameters to 1e-5 (bench/NOTES.md).
            ftol=1e-6,
            xtol=1e-6,
            gtol=1e-6,
        )
        previous, psf = psf, _trial([*solution.x, *psf.shear], pixel_integrated)
        psf = replace(psf, shear=_shear_step(models, psf))
        coef, model = models.solve(psf)
        star = coef[:, :1] * models.profile(psf)[:, 0]
        weight = np.where(left_out, 0.0, 1.0 / (variance + gain_inv * np.clip(star, 0, None)))
        residual = np.abs(data - model) * np.sqrt(weight)
        weight[residual > CLIP_SIGMA * _clip_scale(residual, star, variance, weight)] = 0.0
        if (
            abs(psf.beta - previous.beta) < 5e-3
            and abs(psf.alpha / previous.alpha - 1) < 1e-3
            and max(abs(a - b) for a, b in zip(psf.shear, previous.shear)) < 1e-3
        ):
            break
    models = _StarModels(st, background, data, weight, widths, blur)
    coef, _ = models.solve(psf)
    star = np.einsum("nkp,nk->np", models.profile(psf), coef[:, :3])
    fitted = MoffatPSF(psf.alpha, psf.beta, int(usable.sum()), pixel_integrated, None, blur, shear=psf.shear)
    return _Fit(fitted, usable, star, models)


#: The bound of the fits' elongation (:attr:`MoffatPSF.shear`): ``1 - minor / major`` up to 0.7.
MAX_SHEAR = 1.2
#: The shear's step in the profile's central differences (:func:`_shear_step`).
SHEAR_STEP = 0.01


def _shear_step(models: _StarModels, psf: MoffatPSF) -> tuple[float, float]:
    """``psf``'s shear moved by one Gauss-Newton step of the joint fit, its width and index
    held: each star's model gains the profile's derivatives by ``g1`` and ``g2`` as columns,
    whose coefficients over the star's amplitude are its own step, and the stars' steps are
    combined by their inverse covariances (the shared shear's least squares, linearized).
    Two profiles per parameter, one solve per star: a fraction of what two more parameters
    of :func:`scipy.optimize.least_squares` cost (its Jacobian, every iteration)."""
    g1, g2 = psf.shear
    columns = []
    for d1, d2 in ((SHEAR_STEP, 0.0), (0.0, SHEAR_STEP)):
        up = models.profile(replace(psf, shear=(g1 + d1, g2 + d2)))[:, 0]
        down = models.profile(replace(psf, shear=(g1 - d1, g2 - d2)))[:, 0]
        columns.append((up - down) / (2 * SHEAR_STEP))
    n, p = models.data.shape
    design = np.empty((n, models.k + 2, p))
    design[:, :3] = models.profile(psf)
    design[:, 3], design[:, 4] = columns
    design[:, 5:] = models.background[None]
    normal, rhs = _normal_equations(design, models.data, models.weight)
    coef = np.linalg.solve(normal, rhs[..., None])[..., 0]
    amplitude = coef[:, 0]
    good = amplitude > 0
    if not good.any():
        return psf.shear
    step = coef[good, 3:5] / amplitude[good, None]
    try:
        inverse = np.linalg.inv(normal[good])[:, 3:5, 3:5] / (amplitude[good] ** 2)[:, None, None]
        precision = np.linalg.inv(inverse)
        total = precision.sum(axis=0)
        if not np.all(np.isfinite(total)) or np.linalg.det(total) <= 0:
            return psf.shear
        moved = np.linalg.solve(total, np.einsum("nij,nj->i", precision, step))
    except np.linalg.LinAlgError:
        # A star whose pixels the clip took nearly all: the shear stays for this round.
        return psf.shear
    shear = np.array([g1, g2]) + moved
    size = math.hypot(*shear)
    if size > MAX_SHEAR:
        shear *= MAX_SHEAR / size
    return float(shear[0]), float(shear[1])


def _moved(psf: MoffatPSF, alpha: float) -> MoffatPSF:
    """A trial of ``psf``'s shape at width ``alpha``, as the fit's own trials are."""
    return MoffatPSF(alpha, psf.beta, 0, psf.pixel_integrated, shear=psf.shear)


def _trial(theta, pixel_integrated: bool) -> MoffatPSF:
    """The Moffat of a fit's parameters ``(log alpha, beta, g1, g2)``."""
    return MoffatPSF(math.exp(theta[0]), float(theta[1]), 0, pixel_integrated, shear=(float(theta[2]), float(theta[3])))


def _clip_scale(residual: np.ndarray, star: np.ndarray, variance: np.ndarray, weight: np.ndarray) -> float:
    """The unit of the fit's clipping, in noise sigmas: 1, or the robust spread (1.4826 times
    the median) of the normalised ``residual`` over the stars' pixels (``star`` at least
    :data:`STAR_PIXEL_SIGMA` noise sigmas, still weighted) over :data:`MODEL_ERROR_SPREAD`
    where that is larger.

    Where the Moffat's own error is many times the noise (bright stars on a frame of very
    little noise, seen through a kernel the noise does not show), a clip at 5 noise sigmas
    takes the stars' cores for outliers, round after round, and leaves the fit to the pixels
    that rounding spares: two machines' BLAS put an undersampled target's FWHM at 0.80 and
    1.00 px, its scale 4.3 % apart (docs/scale-accuracy.md, "Clipping where the model's error
    exceeds the noise"). Outliers are then what stands out of the model's error.
    """
    on = (weight > 0) & (star > STAR_PIXEL_SIGMA * np.sqrt(variance))
    if not on.any():
        return 1.0
    return max(1.0, 1.4826 * float(np.median(residual[on])) / MODEL_ERROR_SPREAD)


def parameter_covariance(models: _StarModels, psf: MoffatPSF) -> np.ndarray:
    """The covariance of a joint fit's ``(log alpha, beta, g1, g2)`` (the last two its
    :attr:`MoffatPSF.shear`), at the fit's final weights.

    The Jacobian is that of the residuals with every star's amplitude, position and
    background solved again (the fit's own residual function; central differences), so the
    stars' linear parameters are accounted for. Two estimates, the larger (by the index's
    variance) kept: the model's, ``(J^T J)^-1`` times the reduced chi-square, and the
    cluster-robust sandwich ``A^-1 (sum_i g_i g_i^T) A^-1`` with each star a cluster
    (``g_i`` its residuals' gradient), which also holds where a star's pixels share an error
    the model lacks (a faint neighbour in its wings, nebula under it, a kernel off at its
    place): such errors pull a star's whole stamp one way and do not average out over its
    pixels, only over the stars.
    """
    theta = np.array([math.log(psf.alpha), psf.beta, *psf.shear])
    steps = np.array([1e-3, 2e-3, 1e-3, 1e-3])

    def residual(t):
        _, model = models.solve(_trial(t, psf.pixel_integrated))
        return (models.data - model) * models.sqrt_weight

    r = residual(theta)
    jac = np.empty(r.shape + (theta.size,))
    for j in range(theta.size):
        d = np.zeros(theta.size)
        d[j] = steps[j]
        jac[..., j] = (residual(theta + d) - residual(theta - d)) / (2 * steps[j])
    inverse = np.linalg.inv(np.einsum("npi,npj->ij", jac, jac))
    n = r.shape[0]
    dof = max(int(np.count_nonzero(models.weight)) - n * models.k - theta.size, 1)
    model = inverse * float(np.sum(r * r)) / dof
    g = np.einsum("npi,np->ni", jac, r)
    sandwich = inverse @ (g.T @ g * n / max(n - 1, 1)) @ inverse
    return sandwich if sandwich[1, 1] > model[1, 1] else model


def _with_covariance(fit: _Fit) -> MoffatPSF:
    """``fit``'s Moffat with its :func:`parameter_covariance`, or without one (so that the
    seeing correction's error falls back to the assumed parameter errors) where the fit's
    Jacobian is singular or the covariance not finite."""
    if fit.models is None:
        return fit.psf
    try:
        covariance = parameter_covariance(fit.models, fit.psf)
    except np.linalg.LinAlgError:
        return fit.psf
    diagonal = np.diag(covariance)
    if not (np.all(np.isfinite(covariance)) and np.all(diagonal >= 0)):
        return fit.psf
    c = covariance
    return replace(
        fit.psf,
        covariance=(float(c[0, 0]), float(c[0, 1]), float(c[1, 1])),
        shear_covariance=(float(c[2, 2]), float(c[2, 3]), float(c[3, 3])),
    )


def _star_widths(fit: _Fit) -> tuple[np.ndarray, np.ndarray]:
    """Each fitted star's own width relative to the fit's Moffat (its index held), and the
    variance of that ratio: the star's chi-square over :data:`WIDTH_TRIALS` of ``alpha``, its
    minimum by a parabola in ``log alpha`` (its curvature gives the variance); NaN for a star
    whose minimum lies at the trials' ends."""
    models = fit.models
    n = models.data.shape[0]
    chi = np.empty((n, WIDTH_TRIALS.size))
    for j, trial in enumerate(WIDTH_TRIALS):
        _, model = models.solve(_moved(fit.psf, fit.psf.alpha * trial))
        chi[:, j] = np.sum(models.weight * (models.data - model) ** 2, axis=1)
    t = np.log(WIDTH_TRIALS)
    step = t[1] - t[0]
    best = np.clip(np.argmin(chi, axis=1), 1, t.size - 2)
    rows = np.arange(n)
    c_minus, c_0, c_plus = chi[rows, best - 1], chi[rows, best], chi[rows, best + 1]
    curvature = (c_plus - 2 * c_0 + c_minus) / (step * step)  # d2 chi / d(log alpha)2
    with np.errstate(invalid="ignore", divide="ignore"):
        vertex = t[best] - step * (c_plus - c_minus) / (2 * (c_plus - 2 * c_0 + c_minus))
        variance = 2 / curvature
    edge = (np.argmin(chi, axis=1) == 0) | (np.argmin(chi, axis=1) == t.size - 1) | ~(curvature > 0)
    factor = np.exp(vertex)
    factor[edge], variance[edge] = np.nan, np.nan
    # Variance of the factor, not of its logarithm.
    return factor, variance * factor * factor


def _linear_widths(fit: _Fit) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_star_widths` by one linear solve: each star's model gains the profile's
    derivative by ``log alpha`` as a column, whose coefficient over the amplitude is the
    star's log width relative to the fit's. Right for widths within a few per cent of the
    fit's, and it reads larger differences smaller: enough to tell whether the widths vary,
    at the cost of two profiles and a solve instead of :data:`WIDTH_TRIALS`' profiles."""
    models, psf = fit.models, fit.psf
    step = 0.02
    wider = models.profile(_moved(psf, psf.alpha * (1 + step)))[:, 0]
    narrower = models.profile(_moved(psf, psf.alpha * (1 - step)))[:, 0]
    n, p = models.data.shape
    design = np.empty((n, models.k + 1, p))
    design[:, :3] = models.profile(psf)
    design[:, 3] = (wider - narrower) / (2 * step)
    design[:, 4:] = models.background[None]
    normal, rhs = _normal_equations(design, models.data, models.weight)
    coef = np.linalg.solve(normal, rhs[..., None])[..., 0]
    amplitude = np.where(coef[:, 0] > 0, coef[:, 0], np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        log_width = coef[:, 3] / amplitude
        variance = np.linalg.inv(normal)[:, 3, 3] / (amplitude * amplitude)
    factor = np.exp(log_width)
    return factor, variance * factor * factor


def _fit_with_field(stamps: PSFStamps, *, start: np.ndarray | None = None, **options) -> _Fit:
    """:func:`_fit`, then a field model (:class:`FieldModel`) from the stars' own widths where
    they vary across the frame, and the fit again with it; ``start`` gives each stamp's width
    factor for the first fit (another frame's field), 1 where None. The result's Moffat holds
    the field model, or none where the widths do not call for one."""
    fit = _fit(stamps, widths=start, **options)
    if fit.models is None or fit.usable.sum() < FIELD_MIN_STARS:
        return fit
    options = {**options, "blur": fit.psf.blur}  # the kernel with the sign the fit chose
    st = fit.models.stamps
    x, y = st.xi + st.dx, st.yi + st.dy
    base = np.ones(st.dx.size) if start is None else np.asarray(start, float)[fit.usable]
    field = None
    # A frame without another's field (the reference) is first asked cheaply whether its
    # widths vary at all; where they do, or where another frame's field is the start, each
    # star's width is searched for.
    if start is not None or FieldModel.fit(x, y, *_linear_widths(fit)) is not None:
        relative, variance = _star_widths(fit)
        field = FieldModel.fit(x, y, base * relative, base * base * variance)
    if field is None:
        return fit if start is None else _fit(stamps, widths=None, **options)
    x_all, y_all = stamps.xi + stamps.dx, stamps.yi + stamps.dy
    refit = _fit(stamps, widths=field.factor(x_all, y_all), **options)
    psf = refit.psf
    return _Fit(
        replace(psf, field=field),
        refit.usable,
        refit.star,
        refit.models,
    )


def fit_target_psf(
    target: PSFStamps,
    reference: PSFStamps,
    reference_star: np.ndarray,
    fitted: np.ndarray,
    *,
    s0: float,
    fwhm: float,
    sigma: float,
    reference_sigma: float,
    gain_inv: float = 0.0,
    reference_gain_inv: float = 0.0,
    beta: float = 3.0,
    pixel_integrated: bool = False,
    field: FieldModel | None = None,
    blur: InterpolationKernel | None = None,
    masked: np.ndarray | None = None,
) -> MoffatPSF:
    """The target's Moffat, fitted on ``target - s0 * (reference - reference's stars)``.

    ``reference_star`` is :func:`fit_psf`'s star model for the stamps ``fitted`` of
    ``reference``; ``target`` holds the same stars at the same integer centres, and ``s0``
    is a first estimate of the target's brightness over the reference's (1 % is plenty);
    ``pixel_integrated`` as the reference's fit. Where the reference's PSF has a ``field``
    model the target's widths are measured star by star too, from the reference's field as
    a start, and the target gets its own field model (seeing widens the stars of the centre
    and the edges differently) or none. ``masked`` ``(stamps, pixels)``: the pixels the
    reference's fit left out (:attr:`FittedPSF.masked`), left out here too.
    """
    t = target.take(fitted)
    r = reference.take(fitted)
    clean = np.where((t.data == 0) | (r.data == 0), 0.0, t.data - s0 * (r.data - reference_star))
    clean_stamps = PSFStamps(clean, t.px, t.py, t.xi, t.yi, t.dx, t.dy)
    # The reference's noise comes along, its stars' shot noise included.
    extra = s0 * s0 * (reference_sigma**2 + reference_gain_inv * np.clip(reference_star, 0, None))
    options = dict(
        fwhm=fwhm,
        sigma=sigma,
        gain_inv=gain_inv,
        beta=beta,
        curved=False,
        extra_variance=extra,
        pixel_integrated=pixel_integrated,
        blur=blur,
        masked=None if masked is None else masked[fitted],
    )
    if field is None:
        return _with_covariance(_fit(clean_stamps, widths=None, **options))
    start = field.factor(clean_stamps.xi + clean_stamps.dx, clean_stamps.yi + clean_stamps.dy)
    return _with_covariance(_fit_with_field(clean_stamps, start=start, **options))


def _shift_sign(fit: _Fit, blur: InterpolationKernel | None) -> InterpolationKernel | None:
    """Of ``blur`` and its mirrors along each axis that it shifts (the noise reads a shift and
    its mirror alike: :func:`nsg_gpu.resampling.matched_kernel`), the one whose stars fit
    ``fit``'s pixels best at ``fit``'s Moffat (each at its own amplitude, position and
    background)."""
    if blur is None or blur.symmetric or fit.models is None:
        return blur
    m = fit.models
    flips = [(fx, fy) for fx in (False, True) for fy in (False, True)]
    cx, cy = blur.centre
    flips = [f for f in flips if (not f[0] or abs(cx) > 0.02) and (not f[1] or abs(cy) > 0.02)]
    best, best_chi2 = blur, math.inf
    for fx, fy in flips:
        kernel = InterpolationKernel(blur.x[::-1] if fx else blur.x, blur.y[::-1] if fy else blur.y, blur.name)
        _, model = _StarModels(m.stamps, m.background, m.data, m.weight, m.widths, kernel).solve(fit.psf)
        chi2 = float(np.sum(m.weight * (m.data - model) ** 2))
        if chi2 < best_chi2:
            best, best_chi2 = (blur if not (fx or fy) else kernel), chi2
    return best


def stamp_radius(fwhm: float) -> int:
    """Radius of the PSF stamps for stars of ``fwhm``, on a ladder of 10 % steps so that the
    reference is fitted once per step, not once per frame."""
    wanted = max(FIT_RADIUS_FWHM * fwhm, 8.0)
    return int(math.ceil(8 * 1.1 ** math.ceil(math.log(wanted / 8) / math.log(1.1) - 1e-9)))


def fits_psf_from(channels: int) -> float:
    """The FWHM reading from which frames of ``channels`` fit PSFs: :data:`MIN_PSF_FWHM` for
    colour frames, :data:`MIN_MONO_PSF_FWHM` for mono ones."""
    return MIN_PSF_FWHM if channels > 1 else MIN_MONO_PSF_FWHM


def integrated_fit(*fwhm: float) -> bool:
    """Whether frames whose stars have these FWHM (px, as measured in pixels) are fitted with
    the Moffat integrated over the pixels: where any is below :data:`INTEGRATE_BELOW_FWHM`.
    The reference's and a target's fits go together, so that their difference is right."""
    return min(fwhm) < INTEGRATE_BELOW_FWHM


#: The bound of the fits' Moffat index.
MAX_FIT_BETA = 20.0
#: The largest Moffat index a fit may have: short of the fit's bound (:data:`MAX_FIT_BETA`),
#: since a fit that ends there has found no index. Above 10 a Moffat's core is a Gaussian's
#: within 1 %, and stars that near-Gaussian do come out so: the StarGate reference fits 11.7
#: with stamps of 24 px and 14.0 with stamps of 22 px (docs/scale-accuracy.md, "The quick
#: FWHM: only the star's own pixels").
MAX_PLAUSIBLE_BETA = 18.0


def plausible(psf: MoffatPSF, fwhm_estimate: float) -> bool:
    """A fitted Moffat that seeing-limited stars can have, near the frame's quick FWHM (which
    is measured in the pixels: :attr:`MoffatPSF.pixel_fwhm`)."""
    return 1.5 <= psf.beta <= MAX_PLAUSIBLE_BETA and 0.6 <= psf.pixel_fwhm / fwhm_estimate <= 1.4


@dataclass
class FittedPSF:
    """A frame's fitted Moffat and the stamps it was fitted on, which a target's fit reuses
    (:func:`fit_target_psf`)."""

    psf: MoffatPSF
    stamps: PSFStamps
    fitted: np.ndarray  # bool over the stamps
    star_model: np.ndarray  # (fitted stamps, pixels)
    noise: float
    gain_inv: float
    masked: np.ndarray | None = None  # (stamps, pixels): near another star, left out


def neighbour_mask(
    stamps: PSFStamps, flux: np.ndarray, x: np.ndarray, y: np.ndarray, stars: np.ndarray, fwhm: float
) -> np.ndarray:
    """The stamps' pixels ``(n, p)`` where other stars' light reaches
    :data:`NEIGHBOUR_SHARE` of the stamp's own star's: each star of ``flux`` at ``(x, y)``
    (``stars`` ``(n,)``: the stamp's own star among them) modelled as a Moffat of ``fwhm`` and
    index 3. Near its core a stamp's star outshines any fainter neighbour; in the wings,
    where the index is read, a neighbour of a hundredth of its light does not."""
    profile = MoffatPSF.from_fwhm(fwhm, 3.0)
    flux = np.clip(np.asarray(flux, float), 0.0, None)
    cx, cy = stamps.xi + stamps.dx, stamps.yi + stamps.dy
    own = flux[stars][:, None] * profile.shape(
        (stamps.px[None] - stamps.dx[:, None]) ** 2 + (stamps.py[None] - stamps.dy[:, None]) ** 2
    )
    light = np.zeros(stamps.data.shape)
    tree = cKDTree(np.column_stack([x, y]))
    extent = float(np.max(np.hypot(stamps.px, stamps.py))) + NEIGHBOUR_REACH_FWHM * fwhm
    for k, near in enumerate(tree.query_ball_point(np.column_stack([cx, cy]), r=extent)):
        others = np.array([j for j in near if j != stars[k]], dtype=np.int64)
        if others.size:
            ox, oy = x[others, None] - stamps.xi[k], y[others, None] - stamps.yi[k]
            light[k] = flux[others] @ profile.shape((stamps.px - ox) ** 2 + (stamps.py - oy) ** 2)
    return light > NEIGHBOUR_SHARE * own


def fit_reference_psf(
    data,
    x: np.ndarray,
    y: np.ndarray,
    *,
    fwhm: float,
    radius: int,
    pixel_integrated: bool = False,
    blur: InterpolationKernel | None = None,
    neighbours: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> FittedPSF | None:
    """The reference's Moffat, fitted on stamps of ``radius`` px around its bright isolated
    stars at ``(x, y)`` (integrated over the pixels with ``pixel_integrated``); None where
    too few stars can be fitted or the fit is implausible.

    A curved background per star: the reference's fit has only its own frame, and a nebula's
    curvature under the wings would otherwise read as wing light. ``neighbours`` ``(flux, x,
    y, stars)``: the catalogue, and the PSF stars' indices in it; the pixels
    :func:`neighbour_mask` marks are left out, and kept with the result for the targets'
    fits.
    """
    if x.size < MIN_PSF_STARS:
        return None
    stamps = psf_stamps(data, x, y, radius)
    noise, gain_inv = stamp_noise(stamps)
    if not noise > 0:
        return None
    masked = None
    if neighbours is not None:
        # The stamps are FIT_RADIUS_FWHM of the broader frame's FWHM in radius: the
        # neighbours' light spreads as that frame's does.
        masked = neighbour_mask(stamps, *neighbours, fwhm=radius / FIT_RADIUS_FWHM)
    fit = _fit_with_field(
        stamps,
        fwhm=fwhm,
        sigma=noise,
        gain_inv=gain_inv,
        beta=3.0,
        curved=True,
        extra_variance=None,
        pixel_integrated=pixel_integrated,
        blur=blur,
        masked=masked,
    )
    if fit.usable.sum() < MIN_PSF_STARS or not plausible(fit.psf, fwhm):
        return None
    return FittedPSF(_with_covariance(fit), stamps, fit.usable, fit.star, noise, gain_inv, masked)
