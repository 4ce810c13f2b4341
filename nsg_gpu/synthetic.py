"""Seeded synthetic frames with known truth, shared by the tests, the benchmarks and ``nsg synth``.

A :class:`SyntheticField` is one patch of sky: a star field with a power-law flux distribution
(some stars saturate), an extended nebula, and per-frame observing conditions: transmission
(per channel for colour), Moffat PSF of varying FWHM and index, an additive sky (pedestal,
plane, curvature and a light-pollution dome), Poisson and read noise, hot pixels (and, when
asked, a sensor's fainter warm pixels, the same in every frame), a satellite
trail and zero registration borders. Frame ``k`` is::

    frame_k = clip( t_k * (stars_k + nebula) + sky_k + noise_k , 0, 1 )   (0 outside the border)

so the scale that brings it to the reference is ``m_k = t_ref / t_k`` and the gradient to
remove is ``m_k * sky_k - sky_ref``. :meth:`SyntheticField.perfect_normalization` applies
exactly that, which is what a normalizer should approach.

As unkind as real rigs, when the spec asks (the defaults keep the frames these options came
after, bit for bit): PSFs integrated over each pixel (what an undersampled camera records, not
the Moffat at pixel centres), a FWHM that grows towards the corners, Moffat indices spread per
frame, and registration: the target is captured at a sub-pixel offset, gets its noise, hot
pixels and saturation there, and is shifted back onto the reference's grid by a cubic spline,
clamped to [0, 1], with the uncovered edge left at 0 (the reference is never resampled); with
``rotation`` it is also seen turned about the frame's centre, and turned back; stars drawn
out along one direction (``ellipticities``, ``max_ellipticity``: a tracking error). Named
scenarios (:data:`SCENARIOS`) gather such settings: sparse undersampled colour frames like a
small smart telescope's, a field-dependent PSF, a crowded field.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.ndimage
from astropy.io import fits

from .errors import ParameterError

__all__ = [
    "FrameTruth",
    "SyntheticSpec",
    "SyntheticField",
    "SCENARIOS",
    "write_synthetic_set",
    "block_residual",
]

#: Channel-to-channel colour of the atmosphere's extinction (blue dims most).
_CHANNEL_EXTINCTION = np.array([0.0, 0.35, 0.8])
#: Frames :func:`write_synthetic_set` renders at once, each in a thread (NumPy releases the
#: GIL in most of the work): twice one frame's memory, for most of two cores' speed.
RENDER_THREADS = 2
#: The field whose frame this thread is rendering, and what it has computed for it (see
#: SyntheticField._frame_memo).
_memo = threading.local()


@dataclass
class FrameTruth:
    """What one synthetic frame was made of."""

    name: str
    transmission: list[float]  # per channel
    fwhm: float
    beta: float
    sky_level: list[float]  # per channel pedestal
    gradient_ptp_sigma: float  # peak-to-peak of the sky gradient in units of the pixel noise
    gradient_coefficients: list[list[float]]  # per channel: plane, curvature, dome terms
    border: list[int]  # zero strips: left, right, bottom, top
    wedge: bool  # a triangular no-data corner, as left by a rotation
    trail: bool
    exposure: float
    date_obs: str
    # Offset (dy, dx) in px at which the camera saw the field; registration undid it with a
    # cubic spline. (0, 0): not resampled.
    shift: list[float] = field(default_factory=lambda: [0.0, 0.0])
    # And the angle (degrees) by which the camera saw it turned about the frame's centre.
    rotation: float = 0.0
    # Stars drawn out along one direction (a tracking error, wind): 1 - minor/major axis of
    # the PSF, whose geometric mean FWHM is ``fwhm``, and the major axis' angle (degrees,
    # counter-clockwise from +x).
    ellipticity: float = 0.0
    elongation_angle: float = 0.0

    def scale(self, reference: FrameTruth) -> np.ndarray:
        """``m`` per channel: multiply this frame by it to reach the reference's brightness."""
        return np.asarray(reference.transmission) / np.asarray(self.transmission)


@dataclass
class SyntheticSpec:
    """How to make a synthetic set; every default is a realistic mid-size case."""

    width: int = 2000
    height: int = 1400
    n_frames: int = 5
    colour: bool = False
    seed: int = 1
    n_stars: int = 3500
    noise_sigma: float = 0.0015  # approximate pixel noise of the sky
    sky_level: float = 0.06
    transmissions: list[float] | None = None  # frame 0 is the reference
    fwhms: list[float] | None = None
    max_gradient_sigma: float = 10.0
    hot_pixel_fraction: float = 1e-4
    trail_frame: int | None = 2
    borders: bool = True
    focal_length_mm: float = 530.0
    pixel_size_um: float = 3.76
    exposure: float = 120.0
    noise_seed: int = 0  # another value draws new noise, hot pixels and nothing else
    # -- realism (the defaults leave every frame as it was before these options) ----------------
    scenario: str = "default"  # the SCENARIOS entry these settings came from, for truth.json
    fwhm_range: tuple[float, float] | None = None  # targets' FWHM drawn here; reference at 1/3
    beta_range: tuple[float, float] = (2.8, 3.3)  # Moffat index of every frame drawn here
    pixel_integrated: bool = False  # PSF integrated over each pixel, not sampled at its centre
    # Colour from a one-shot-colour sensor's 2x2 RGGB cells (a superpixel debayer): red and blue
    # each from one photosite, green the mean of two (a hot pixel is one photosite, so in one
    # channel); needs colour and pixel_integrated.
    bayer: bool = False
    fwhm_field: float = 0.0  # FWHM grows by (1 + fwhm_field * r^2), r = 1 in the corners
    registration: bool = False  # targets captured at a sub-pixel offset, shifted back (cubic)
    shifts: list[list[float]] | None = None  # (dy, dx) per frame; default uniform in +-0.5 px
    rotation: float = 0.0  # registered targets also seen turned by up to this many degrees
    nebula_strength: float = 1.0  # the nebula's brightness relative to the default
    ellipticities: list[float] | None = None  # per frame: stars drawn out (1 - minor/major axis)
    max_ellipticity: float = 0.0  # or the targets' drawn out by up to this much (the reference not)
    # Warm pixels: this share of the sensor's pixels, the same ones in every frame, each
    # WARM_PIXEL_RANGE times noise_sigma above its light (log-uniform); a registration moves and
    # spreads them with the frame, where the stars stay (warm_pixels gives their places).
    warm_pixel_fraction: float = 0.0

    @classmethod
    def from_scenario(cls, name: str, **overrides) -> SyntheticSpec:
        """The spec of a named scenario (:data:`SCENARIOS`), with ``overrides`` on top."""
        if name not in SCENARIOS:
            raise ParameterError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")
        return cls(**{**SCENARIOS[name], "scenario": name, **overrides})


def _pixel_and_phase(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The nearest pixel of positions ``v`` and the index (0-15) of their 1/16 px phase in it:
    the stamp a star is drawn with."""
    pixel = np.rint(v).astype(np.int64)
    return pixel, np.clip(np.floor((v - pixel + 0.5) * 16), 0, 15).astype(np.int64)


#: Named settings for :meth:`SyntheticSpec.from_scenario` and ``nsg synth --scenario``.
SCENARIOS: dict[str, dict] = {
    # The generator's defaults: 2000 x 1400 mono, about 3500 stars, FWHM 2.5-4.5 px.
    "default": {},
    # A small smart telescope's colour frames after a 2x2 superpixel debayer (a Seestar S50:
    # 2.4"/px raw, seeing of 2-3.5"): 960 x 540, stars of 0.8-1.4 superpixels FWHM before
    # pixel integration, integrated over each channel's photosites (so that a red or blue
    # star's flux depends by up to 10-30 % on where it falls within the cell), about 130 of
    # them, Moffat index 2.3-4.0, hot pixels, registration at sub-pixel offsets.
    "undersampled-sparse-colour": dict(
        width=960,
        height=540,
        colour=True,
        n_stars=130,
        fwhm_range=(0.8, 1.4),
        beta_range=(2.3, 4.0),
        pixel_integrated=True,
        bayer=True,
        registration=True,
        hot_pixel_fraction=5e-4,
        focal_length_mm=250.0,
        pixel_size_um=5.8,
        exposure=10.0,
        nebula_strength=0.5,
    ),
    # A fast optic's PSF: 70 % broader in the corners than in the centre, indices 2.5-4.0,
    # registered targets.
    "field-dependent-psf": dict(
        width=1600,
        height=1100,
        n_stars=2200,
        fwhm_range=(2.4, 3.6),
        beta_range=(2.5, 4.0),
        fwhm_field=0.7,
        pixel_integrated=True,
        registration=True,
    ),
    # A Milky Way field: 16000 stars on 1600 x 1100 px (one per 110 px), registered targets.
    "crowded": dict(
        width=1600,
        height=1100,
        n_stars=16000,
        fwhm_range=(2.5, 4.0),
        pixel_integrated=True,
        registration=True,
    ),
}
# The same sky through a small refractor and a mono camera (250 mm, 3.76 um pixels: 3.1" per
# pixel): the undersampled colour scenario's stars without its Bayer cells.
SCENARIOS["undersampled-sparse-mono"] = dict(
    SCENARIOS["undersampled-sparse-colour"], colour=False, bayer=False, pixel_size_um=3.76
)


#: A Bayer cell's photosites by channel (red, the two greens, blue), and the share of one
#: photosite's excess that its channel's pixel shows (green is the mean of two).
PHOTOSITE_CHANNELS = np.array([0, 1, 1, 2])
PHOTOSITE_WEIGHTS = (1.0, 0.5, 1.0)

#: How far above its own light a warm pixel stands, in the sky's pixel noise (noise_sigma):
#: an uncalibrated sensor's dark current, from where a 5-sigma detection finds it to where
#: the hot pixels (hot_pixel_fraction, 0.1-1.0) begin.
WARM_PIXEL_RANGE = (5.0, 30.0)

#: A field-dependent FWHM is drawn in steps of this much of the frame's FWHM (1 %): steps of
#: 9 % (8 over a factor of 1.7) put a staircase into the PSF that no smooth field model
#: follows, and moved the field-dependent scenario's scales by +0.4 % on average.
FIELD_STEP = 0.01


#: Rows (columns) of edge values that ``scipy.ndimage.shift`` puts around an image before its
#: spline filter in ``mode="nearest"``; :func:`spline_shift` pads as much, so that its
#: coefficients near the edges are SciPy's.
_SPLINE_PAD = 12
#: The cubic B-spline's pole, sqrt(3) - 2 (as SciPy's ``ni_splines.c`` writes it).
_SPLINE_POLE = -0.267949192431122706472553658494127633


def _spline_coefficients(lines: np.ndarray) -> np.ndarray:
    """The cubic spline's coefficients along axis 0 of ``lines`` (float64, a new array): the
    gain, a causal and an anticausal pass of the pole, started as SciPy's ``spline_filter1d``
    starts them in ``mode="nearest"`` (a mirror that repeats the edge: Unser, Aldroubi and
    Eden, IEEE PAMI 13, 277, 1991), the same operations in the same order, row after row over
    every column at once: each column gets SciPy's bits (``tests/test_synthetic.py``), in a
    third of the time SciPy takes walking one line after another on lines of 540-565 px (whose
    pole power ``z**n``, a subnormal number, slows every product with it)."""
    z = _SPLINE_POLE
    c = np.array(lines, np.float64, order="C", copy=True)
    c *= (1.0 - z) * (1.0 - 1.0 / z)
    n = c.shape[0]
    z_n = z**n
    first = c[0].copy()
    total = c[0] + z_n * c[n - 1]
    z_i = z
    for i in range(1, n):
        # The last term takes the sum so far, where SciPy keeps it (in the line's first pixel).
        total += z_i * (c[i] + z_n * (c[n - 1 - i] if i < n - 1 else total))
        z_i *= z
    total *= z / (1 - z_n * z_n)
    total += first
    c[0] = total
    for i in range(1, n):
        c[i] += z * c[i - 1]
    c[n - 1] *= z / (z - 1)
    for i in range(n - 2, -1, -1):
        c[i] = z * (c[i + 1] - c[i])
    return c


def _spline_shift_axis(image: np.ndarray, shift: float, axis: int) -> np.ndarray:
    """``image`` (float64) moved by ``shift`` px (under the pad's width) along ``axis`` by a
    cubic spline."""
    n = image.shape[axis]
    start = math.floor(-shift)
    first = _SPLINE_PAD + start - 1  # the first of the four coefficients under output pixel 0
    lines = np.moveaxis(image, axis, 0)
    pad = [(_SPLINE_PAD, _SPLINE_PAD)] + [(0, 0)] * (image.ndim - 1)
    coefficients = _spline_coefficients(np.pad(lines, pad, mode="edge"))
    t = -shift - start  # where each output pixel falls between the middle two coefficients
    weights = ((1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6, (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6)
    out = weights[0] * coefficients[first : first + n]
    for j, weight in enumerate(weights[1:], 1):
        out += weight * coefficients[first + j : first + j + n]
    return np.moveaxis(out, 0, axis)


def spline_shift(image: np.ndarray, shift: tuple[float, float] | list[float]) -> np.ndarray:
    """``scipy.ndimage.shift(image, shift, order=3, mode="nearest")`` of a 2-D image, axis by
    axis: a shift's cubic spline is the product of one spline per axis with the same weights
    at every pixel, so each axis takes its spline filter and four taps instead of SciPy's
    sixteen weights per pixel (the same values to a few units in the last place of float64,
    in about a third of the time). Shifts beyond the pad (or not a number), and images with
    pixels that are not finite, are left to SciPy."""
    image = np.asarray(image, np.float64)
    dy, dx = (float(v) for v in shift)
    within = abs(dy) <= _SPLINE_PAD - 2 and abs(dx) <= _SPLINE_PAD - 2  # False for a NaN shift
    if image.ndim != 2 or not within or not np.isfinite(image).all():
        return scipy.ndimage.shift(image, (dy, dx), order=3, mode="nearest")
    return _spline_shift_axis(_spline_shift_axis(image, dy, 0), dx, 1)


class SyntheticField:
    """A star field and nebula observed in several frames; frame 0 is the natural reference."""

    def __init__(self, spec: SyntheticSpec | None = None, **overrides):
        if spec is None and "scenario" in overrides:
            spec = SyntheticSpec.from_scenario(overrides.pop("scenario"))
        spec = spec or SyntheticSpec()
        if overrides:
            spec = SyntheticSpec(**{**asdict(spec), **overrides})
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        self.channels = 3 if spec.colour else 1
        h, w = spec.height, spec.width
        n = spec.n_stars
        self.star_x = rng.uniform(-20, w + 20, n)
        self.star_y = rng.uniform(-20, h + 20, n)
        # Power law: many faint stars, a few that saturate.
        u = rng.uniform(0, 1, n)
        lo, hi, slope = 0.04, 60.0, 0.75
        flux = (lo**-slope - u * (lo**-slope - hi**-slope)) ** (-1 / slope)
        colour = np.ones((n, self.channels))
        if spec.colour:
            temperature = rng.normal(0, 0.25, n)
            colour = np.exp(np.outer(temperature, [0.5, 0.0, -0.5]))
        self.star_flux = flux[:, None] * colour  # (n, channels)
        self.nebula = self._make_nebula(rng)
        self.frames = [self._make_conditions(k, rng) for k in range(spec.n_frames)]
        self._frame_seeds = rng.integers(0, 2**31, spec.n_frames) + 1_000_003 * spec.noise_seed
        self._add_realism()

    @contextmanager
    def _frame_memo(self) -> Iterator[None]:
        """Within it, in this thread, a frame's star light and captured signal are computed
        once and reused (read-only): :func:`write_synthetic_set` needs them for the frame and
        again for its noise. Outside it nothing is kept, so a field holds no frame-sized arrays."""
        _memo.field, _memo.values = self, {}
        try:
            yield
        finally:
            _memo.field, _memo.values = None, None

    def _memoized(self, key: tuple, compute: Callable[[], np.ndarray]) -> np.ndarray:
        if getattr(_memo, "field", None) is not self:
            return compute()
        if key not in _memo.values:
            value = compute()
            value.flags.writeable = False
            _memo.values[key] = value
        return _memo.values[key]

    def _add_realism(self) -> None:
        """Seeing range and registration offsets, from a stream of their own (so the default
        frames, which use neither, are those of the generator before them)."""
        spec = self.spec
        if not 0 <= spec.warm_pixel_fraction <= 1:
            raise ParameterError(f"warm_pixel_fraction {spec.warm_pixel_fraction} is not in [0, 1]")
        rng = np.random.default_rng([spec.seed, 20_251_201])
        for k, truth in enumerate(self.frames):
            if spec.fwhm_range is not None and spec.fwhms is None:
                lo, hi = spec.fwhm_range
                truth.fwhm = lo + (hi - lo) / 3 if k == 0 else float(rng.uniform(lo, hi))
            if spec.shifts is not None:
                truth.shift = [float(v) for v in spec.shifts[k]]
            elif spec.registration and k:
                truth.shift = [float(v) for v in rng.uniform(-0.5, 0.5, 2)]
        if spec.registration and spec.rotation:
            turns = np.random.default_rng([spec.seed, 20_261_202]).uniform(-1, 1, len(self.frames))
            for truth, turn in zip(self.frames[1:], turns[1:]):
                truth.rotation = float(spec.rotation * turn)
        ellipticities = spec.ellipticities
        if ellipticities is None and spec.max_ellipticity:
            drawn = np.random.default_rng([spec.seed, 20_261_206]).uniform(0, spec.max_ellipticity, len(self.frames))
            ellipticities = [0.0] + [float(v) for v in drawn[1:]]
        if ellipticities is not None:
            angles = np.random.default_rng([spec.seed, 20_261_205]).uniform(0, 180, len(self.frames))
            for truth, e, angle in zip(self.frames, ellipticities, angles):
                if not 0 <= e < 1:
                    raise ParameterError(f"ellipticity {e} is not in [0, 1)")
                truth.ellipticity, truth.elongation_angle = float(e), float(angle) if e else 0.0

    # -- construction ---------------------------------------------------------------------------
    def _make_nebula(self, rng) -> np.ndarray:
        spec = self.spec
        h, w = spec.height, spec.width
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        nebula = np.zeros((h, w), np.float32)
        for _ in range(6):
            cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
            sx, sy = rng.uniform(0.03, 0.15) * w, rng.uniform(0.03, 0.15) * h
            amp = rng.uniform(2, 6) * spec.noise_sigma * spec.nebula_strength
            nebula += amp * np.exp(-0.5 * (((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))
        # Filamentary texture where the nebula is bright, on a 10-30 px scale.
        texture = scipy.ndimage.gaussian_filter(rng.normal(0, 1, (h, w)).astype(np.float32), 8)
        texture /= max(float(texture.std()), 1e-12)
        nebula = np.clip(nebula * (1 + 0.35 * texture), 0, None)
        tint = np.array([1.0, 0.7, 0.9])[: self.channels] if spec.colour else np.array([1.0])
        return nebula[None] * tint[:, None, None].astype(np.float32)

    def _make_conditions(self, k: int, rng) -> FrameTruth:
        spec = self.spec
        if spec.transmissions is not None:
            t = spec.transmissions[k]
        else:
            t = 0.95 if k == 0 else float(rng.uniform(0.45, 1.0))
        if spec.fwhms is not None:
            fwhm = spec.fwhms[k]
        else:
            fwhm = 2.8 if k == 0 else (4.2 if k == 1 else float(rng.uniform(2.5, 4.5)))
        airmass_excess = float(rng.uniform(0, 0.1))
        transmission = [t * math.exp(-airmass_excess * e) for e in _CHANNEL_EXTINCTION[: self.channels]]
        ptp = float(rng.uniform(0.3, 1.0) * spec.max_gradient_sigma) if k else float(rng.uniform(1, 3))
        coefficients = [list(rng.normal(0, 1, 6)) for _ in range(self.channels)]
        sky = [spec.sky_level * float(rng.uniform(0.7, 1.4)) for _ in range(self.channels)]
        border = [0, 0, 0, 0]
        wedge = False
        if spec.borders and k:
            border = [int(v) for v in rng.integers(0, 60, 4)]
            wedge = k % 3 == 0
        minutes = 3 * k + (60 * 24 if k >= max(2, spec.n_frames - 1) else 0)
        date = np.datetime64("2025-03-01T21:00:00") + np.timedelta64(minutes, "m")
        return FrameTruth(
            name=f"light_{k:03d}",
            transmission=transmission,
            fwhm=fwhm,
            beta=float(rng.uniform(*spec.beta_range)),
            sky_level=sky,
            gradient_ptp_sigma=ptp,
            gradient_coefficients=coefficients,
            border=border,
            wedge=wedge,
            trail=spec.trail_frame == k,
            exposure=spec.exposure,
            date_obs=str(date),
        )

    # -- components -----------------------------------------------------------------------------
    def _to_capture(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(matrix, offset)`` in (row, column) coordinates: the reference's pixel ``p`` lies
        at ``matrix @ p + offset`` in frame ``k``'s capture (its turn about the frame's centre,
        then its shift)."""
        truth, spec = self.frames[k], self.spec
        turn = math.radians(truth.rotation)
        matrix = np.array([[math.cos(turn), math.sin(turn)], [-math.sin(turn), math.cos(turn)]])
        centre = np.array([(spec.height - 1) / 2, (spec.width - 1) / 2])
        return matrix, centre + np.asarray(truth.shift, float) - matrix @ centre

    def _resampled(self, k: int) -> bool:
        return self.frames[k].shift != [0.0, 0.0] or self.frames[k].rotation != 0.0

    @property
    def reference(self) -> FrameTruth:
        return self.frames[0]

    def sky(self, k: int) -> np.ndarray:
        """The additive sky of frame ``k``: pedestal plus gradient, ``(channels, h, w)``."""
        spec, truth = self.spec, self.frames[k]
        h, w = spec.height, spec.width
        # The grid's rows and columns, broadcast against each other: each pixel's value as
        # from the full grid, without it.
        v = np.mgrid[-1 : 1 : h * 1j].astype(np.float32)[:, None]
        u = np.mgrid[-1 : 1 : w * 1j].astype(np.float32)[None, :]
        out = np.empty((self.channels, h, w), np.float32)
        for c, (a, b, cc, d, e, f) in enumerate(truth.gradient_coefficients):
            # Plane, curvature and a dome of light pollution rising off one edge.
            dome = np.exp(-((u - 1.4 * np.sign(e)) ** 2 + (v - 0.6 * np.tanh(f)) ** 2) / 1.2)
            shape = a * u + b * v + 0.5 * cc * u * u + 0.5 * d * v * v + 2.0 * dome
            shape -= shape.min()
            shape *= truth.gradient_ptp_sigma * spec.noise_sigma / max(float(shape.max()), 1e-12)
            out[c] = truth.sky_level[c] + shape
        return out

    def coverage(self, k: int) -> np.ndarray:
        """True where frame ``k`` has data (registration borders are False)."""
        spec, truth = self.spec, self.frames[k]
        h, w = spec.height, spec.width
        mask = np.ones((h, w), bool)
        left, right, bottom, top = truth.border
        mask[:, :left] = False
        mask[:, w - right :] = False
        mask[:bottom] = False
        mask[h - top :] = False
        if truth.wedge:
            yy, xx = np.mgrid[0:h, 0:w]
            mask &= (xx / (0.3 * w) + yy / (0.35 * h)) > 1.0
        # Registration leaves uncovered the reference's pixels that map outside the capture.
        if truth.rotation:
            matrix, offset = self._to_capture(k)
            yy, xx = np.mgrid[0:h, 0:w]
            y_source = matrix[0, 0] * yy + matrix[0, 1] * xx + offset[0]
            x_source = matrix[1, 0] * yy + matrix[1, 1] * xx + offset[1]
            mask &= (y_source >= 0) & (y_source <= h - 1) & (x_source >= 0) & (x_source <= w - 1)
            return mask
        dy, dx = truth.shift
        y_source = np.arange(h) + dy
        x_source = np.arange(w) + dx
        mask[(y_source < 0) | (y_source > h - 1)] = False
        mask[:, (x_source < 0) | (x_source > w - 1)] = False
        return mask

    def stars(self, k: int, *, captured: bool = False) -> np.ndarray:
        """Star light of frame ``k`` above the atmosphere (transmission 1), ``(channels, h, w)``.

        On the reference's grid, or with ``captured`` on the camera's (at the frame's
        registration offset).
        """
        truth = self.frames[k]
        dy, dx = truth.shift if captured else (0.0, 0.0)
        turn = truth.rotation if captured else 0.0
        return self._memoized(
            ("stars", k, dy, dx, turn),
            lambda: self._render_stars(
                truth.fwhm, truth.beta, dx=dx, dy=dy, at=self._to_capture(k) if turn else None, shape=self._shape(k)
            ),
        )

    def fwhm_at(self, k: int, x, y) -> np.ndarray:
        """The FWHM of frame ``k``'s PSF at pixel positions ``x, y`` (before pixel integration)."""
        return self.frames[k].fwhm * self._field_factor(np.asarray(x, float), np.asarray(y, float))

    def _field_factor(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        spec = self.spec
        cx, cy = (spec.width - 1) / 2, (spec.height - 1) / 2
        r2 = ((x - cx) ** 2 + (y - cy) ** 2) / (cx**2 + cy**2)
        return 1 + spec.fwhm_field * np.clip(r2, 0, 1)

    def _shape(self, k: int) -> tuple[float, float]:
        """Frame ``k``'s stars' ellipticity and the angle (degrees) of their major axis, in the
        camera's frame (a turn adds to it)."""
        truth = self.frames[k]
        return truth.ellipticity, truth.elongation_angle

    def _render_stars(
        self, fwhm: float, beta: float, *, dx: float = 0.0, dy: float = 0.0, at=None, shape=(0.0, 0.0)
    ) -> np.ndarray:
        """The stars drawn at their places moved by ``(dx, dy)``, or by ``at``, a
        ``(matrix, offset)`` of :meth:`_to_capture`; ``shape``: their ellipticity and its
        angle (:meth:`_shape`)."""
        spec = self.spec
        h, w = spec.height, spec.width
        star_x, star_y = self.star_x + dx, self.star_y + dy
        if at is not None:
            (m, offset) = at
            star_y = m[0, 0] * self.star_y + m[0, 1] * self.star_x + offset[0]
            star_x = m[1, 0] * self.star_y + m[1, 1] * self.star_x + offset[1]
        # A field-dependent FWHM in steps of r^2 of FIELD_STEP in the factor, each star at its
        # step's middle (the stamps are made per FWHM).
        if spec.fwhm_field:
            levels = max(1, math.ceil(spec.fwhm_field / FIELD_STEP - 1e-9))
            step = np.clip(np.floor((self._field_factor(star_x, star_y) - 1) / spec.fwhm_field * levels), 0, levels - 1)
            groups = [
                (fwhm * (1 + spec.fwhm_field * (i + 0.5) / levels), np.nonzero(step == i)[0]) for i in range(levels)
            ]
        else:
            groups = [(fwhm, np.arange(star_x.size))]
        out = np.zeros((self.channels, h, w), np.float64)
        for group_fwhm, index in groups:
            if index.size:
                self._add_stars(out, star_x[index], star_y[index], self.star_flux[index], group_fwhm, beta, shape)
        return out.astype(np.float32)

    def _stamps(self, fwhm: float, beta: float, shape=(0.0, 0.0), wanted=None) -> tuple[np.ndarray, np.ndarray]:
        """Normalized Moffat stamps ``(phase_y, phase_x, s, s)`` for 16 x 16 sub-pixel phases;
        with ``bayer``, one set per channel ``(channels, phase_y, phase_x, s, s)``. ``shape``:
        the ellipticity and angle of an elongated PSF (:meth:`_shape`).

        ``wanted``, where given, is a pair of arrays ``(phase_y, phase_x)``: only those stamps
        are made, ``(n, s, s)`` (with ``bayer`` ``(channels, n, s, s)``) in their order, each
        the same to the bit as in the full table (a field-dependent PSF draws a few stars
        with each of its many FWHMs)."""
        if wanted is None:
            grid_y, grid_x = np.divmod(np.arange(256), 16)
            stamps, off = self._stamps(fwhm, beta, shape, (grid_y, grid_x))
            return stamps.reshape(*stamps.shape[:-3], 16, 16, *stamps.shape[-2:]), off
        pick_y, pick_x = (np.asarray(p, np.int64) for p in wanted)
        alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
        ellipticity, angle = shape
        # r^2 = xx * dx^2 + 2 xy * dx dy + yy * dy^2: the axes scaled by 1 / sqrt(1 - e) along
        # the major axis and sqrt(1 - e) across it (their geometric mean 1).
        c, s_ = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        q = 1.0 - ellipticity
        xx, yy, xy = c * c * q + s_ * s_ / q, s_ * s_ * q + c * c / q, c * s_ * (q - 1 / q)
        # Stamps wide enough that the Moffat wing beyond them holds < 0.02 % of the light, so
        # every star's total flux in the image is its catalogue flux times the transmission,
        # whatever the seeing: the truth a scale measurement is checked against.
        radius = int(math.ceil(alpha * math.sqrt(2e-4 ** (1 / (1 - beta)) - 1) / math.sqrt(q)))
        off = np.arange(-radius, radius + 1)
        # Sub-pixel positions quantized to 1/16 px: one normalized stamp per phase.
        phases = (np.arange(16) - 7.5) / 16.0
        if ellipticity:
            d = off[None, :] - phases[:, None]  # (phase, s)
            r2 = (
                yy * (d * d)[pick_y][:, :, None]
                + xx * (d * d)[pick_x][:, None, :]
                + 2 * xy * d[pick_y][:, :, None] * d[pick_x][:, None, :]
            )
        else:
            r2y = (off[None, :] - phases[:, None]) ** 2  # (phase, s)
            r2 = r2y[pick_y][:, :, None] + r2y[pick_x][:, None, :]
        stamps = (1 + r2 / alpha**2) ** (-beta)
        bayer = self.spec.bayer and self.channels == 3
        planes = np.repeat(stamps[None], 3, axis=0) if bayer else None
        if self.spec.pixel_integrated:
            # The mean of the Moffat over each pixel (midpoint rule on n x n points, n at least
            # 8 / FWHM, odd, or even for the photosites' quarters) within 3 FWHM + 3 px of the
            # centre; farther out, where about 0.1 % of the light lies, the centre value is
            # within a few per cent of the mean.
            core = min(radius, int(math.ceil(3 * fwhm / math.sqrt(q))) + 3)
            n = max(3, int(math.ceil(8 / fwhm)))
            n = n + n % 2 if bayer else n | 1
            half = n // 2
            sub = (np.arange(n) - (n - 1) / 2) / n
            inner = slice(radius - core, radius + core + 1)
            d = off[inner][None, :, None] - phases[:, None, None] + sub[None, None, :]  # (phase, s, n)
            d2 = d * d
            for qy in np.unique(pick_y):
                rows = np.nonzero(pick_y == qy)[0]
                qx = pick_x[rows]
                if ellipticity:  # (phase_x, sy, sx, ny, nx)
                    r2 = (
                        yy * d2[qy][None, :, None, :, None]
                        + xx * d2[qx][:, None, :, None, :]
                        + 2 * xy * d[qy][None, :, None, :, None] * d[qx][:, None, :, None, :]
                    )
                else:
                    r2 = d2[qy][None, :, None, :, None] + d2[qx][:, None, :, None, :]
                profile = (1 + r2 / alpha**2) ** (-beta)
                stamps[rows, inner, inner] = profile.mean(axis=(3, 4))
                if bayer:
                    # RGGB: red the top-left photosite, green the other diagonal, blue the
                    # bottom-right; each reads its quarter of the cell, scaled to the cell.
                    top, bottom = profile[..., :half, :], profile[..., half:, :]
                    planes[0, rows, inner, inner] = top[..., :half].mean(axis=(3, 4))
                    planes[1, rows, inner, inner] = (
                        top[..., half:].mean(axis=(3, 4)) + bottom[..., :half].mean(axis=(3, 4))
                    ) / 2
                    planes[2, rows, inner, inner] = bottom[..., half:].mean(axis=(3, 4))
        total = stamps.sum(axis=(1, 2), keepdims=True)
        if bayer:
            # Normalized by the whole cells' light: a channel's share of a star then depends on
            # where the star falls within the cell (1 on average), as a real sensor's does.
            return (planes / total[None]).astype(np.float32), off
        return (stamps / total).astype(np.float32), off

    def _add_stars(self, out, star_x, star_y, star_flux, fwhm: float, beta: float, shape=(0.0, 0.0)) -> None:
        """Add the stars' light to ``out`` ``(channels, h, w)`` float64."""
        h, w = self.spec.height, self.spec.width
        x0, qx = _pixel_and_phase(star_x)
        y0, qy = _pixel_and_phase(star_y)
        # Only the phases these stars fall at: each star's stamp by its phase pair's index.
        used, which = np.unique(qy * 16 + qx, return_inverse=True)
        stamps, off = self._stamps(fwhm, beta, shape, np.divmod(used, 16))
        size = off.size
        flux = star_flux.astype(np.float32)
        per_channel = stamps if stamps.ndim == 4 else [stamps] * self.channels
        # Each star's stamp added where it overlaps the frame, one star after another: a pixel
        # sums its stars' light in catalogue order, however many stars there are.
        tops, lefts = (y0 + int(off[0])).tolist(), (x0 + int(off[0])).tolist()
        for i, (top, left, stamp) in enumerate(zip(tops, lefts, which.tolist())):
            y_lo, y_hi, x_lo, x_hi = max(top, 0), min(top + size, h), max(left, 0), min(left + size, w)
            if y_lo >= y_hi or x_lo >= x_hi:
                continue
            for c in range(self.channels):
                cut = per_channel[c][stamp, y_lo - top : y_hi - top, x_lo - left : x_hi - left]
                out[c, y_lo:y_hi, x_lo:x_hi] += cut * flux[i, c]

    def bayer_shares(self, k: int, x, y) -> np.ndarray:
        """``(channels, n)``: each channel's share of the light of stars at reference positions
        ``x, y`` in frame ``k`` as its photosites caught it (with ``bayer``: 1 on average over
        the places within the cell, 10-30 % off it for stars of about a pixel; else all 1), at
        the place where the frame captured them (its shift and turn) and at the phases the
        stars were drawn at. The truth a photometry of the cells is checked against."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if not (self.spec.bayer and self.channels == 3):
            return np.ones((self.channels, x.size))
        truth = self.frames[k]
        matrix, offset = self._to_capture(k)
        cy = matrix[0, 0] * y + matrix[0, 1] * x + offset[0]
        cx = matrix[1, 0] * y + matrix[1, 1] * x + offset[1]
        planes, _ = self._stamps(truth.fwhm, truth.beta, self._shape(k))
        table = planes.sum(axis=(-1, -2), dtype=np.float64)  # (channels, phase_y, phase_x)
        return table[:, _pixel_and_phase(cy)[1], _pixel_and_phase(cx)[1]]

    def noise_free(self, k: int) -> np.ndarray:
        """Frame ``k`` without noise, defects or borders (saturation applied), on the
        reference's grid: what a registration without interpolation error would give."""
        t = np.asarray(self.frames[k].transmission, np.float32)[:, None, None]
        return np.clip(t * (self.stars(k) + self.nebula) + self.sky(k), 0, 1).astype(np.float32)

    def _captured_signal(self, k: int) -> np.ndarray:
        """What reaches the camera in frame ``k``, on its own grid (float32)."""
        return self._memoized(("signal", k), lambda: self._compute_captured_signal(k))

    def _compute_captured_signal(self, k: int) -> np.ndarray:
        truth = self.frames[k]
        t = np.asarray(truth.transmission, np.float32)[:, None, None]
        if not self._resampled(k):
            return t * (self.stars(k) + self.nebula) + self.sky(k)
        # Nebula and sky are smooth: a spline shift carries them to the camera's grid; the stars
        # are drawn there directly, so their profiles are the PSF's, not an interpolation's.
        smooth = (t * self.nebula + self.sky(k)).astype(np.float64)
        if truth.rotation:
            matrix, offset = self._to_capture(k)
            moved = np.stack(
                [
                    scipy.ndimage.affine_transform(plane, matrix.T, offset=-matrix.T @ offset, order=3, mode="nearest")
                    for plane in smooth
                ]
            )
        else:
            moved = np.stack([spline_shift(plane, truth.shift) for plane in smooth])
        return (t * self.stars(k, captured=True) + moved).astype(np.float32)

    def _gain(self) -> tuple[float, float]:
        """Read noise and gain (signal units per electron) of the camera."""
        spec = self.spec
        # Gain chosen so that the sky's shot noise plus read noise is about noise_sigma.
        read = 0.4 * spec.noise_sigma
        return read, spec.sky_level / (spec.noise_sigma**2 - read**2)

    def render(self, k: int) -> np.ndarray:
        """Frame ``k`` as a camera would record it, ``(channels, h, w)`` float32 in [0, 1],
        registered onto the reference's grid when the frame has an offset, 0 where the
        registration left no data."""
        truth = self.frames[k]
        data = self.capture(k)
        if truth.rotation:
            # Registration: the reference's pixel p lies at matrix @ p + offset in the capture.
            matrix, offset = self._to_capture(k)
            data = np.stack(
                [
                    scipy.ndimage.affine_transform(
                        plane.astype(np.float64), matrix, offset=offset, order=3, mode="nearest"
                    )
                    for plane in data
                ]
            )
            data = np.clip(data, 0, 1).astype(np.float32)
        elif truth.shift != [0.0, 0.0]:
            # Registration: the reference's pixel p lies at p + shift in the capture.
            back = [-v for v in truth.shift]
            data = np.stack([spline_shift(plane, back) for plane in data])
            data = np.clip(data, 0, 1).astype(np.float32)
        covered = self.coverage(k)
        data[:, ~covered] = 0
        # A pixel that lands exactly on 0 would read as "no data"; real sky never does.
        data[:, covered] = np.maximum(data[:, covered], 1e-6)
        return data

    def capture(self, k: int) -> np.ndarray:
        """Frame ``k`` on the camera's own grid, before registration and its borders:
        signal, Poisson and read noise, trail, hot pixels, clipped to [0, 1]."""
        spec, truth = self.spec, self.frames[k]
        rng = np.random.default_rng(self._frame_seeds[k])
        h, w = spec.height, spec.width
        signal = self._captured_signal(k)
        read, gain = self._gain()
        if self._photosites() is None:
            data = rng.poisson(np.clip(signal, 0, None) * gain).astype(np.float32) / gain
            data += rng.normal(0, read, data.shape).astype(np.float32)
        else:
            # Green is the mean of two photosites: half the variance.
            sites = self._photosites()[:, None, None]
            data = (rng.poisson(np.clip(signal, 0, None) * gain * sites) / (gain * sites)).astype(np.float32)
            data += (rng.normal(0, read, data.shape) / np.sqrt(sites)).astype(np.float32)
        if truth.trail:
            yy, xx = np.mgrid[0:h, 0:w]
            distance = np.abs((yy - 0.2 * h) - 0.45 * (xx - 0.1 * w)) / math.hypot(1, 0.45)
            data += (0.02 * np.exp(-0.5 * (distance / 1.2) ** 2)).astype(np.float32)[None]
        if spec.warm_pixel_fraction:
            at, excess, channel = self._warm_pixels()
            flat = data.reshape(self.channels, -1)
            if self._photosites() is None:
                flat[:, at] += excess
            else:
                # A warm photosite, as a hot one: in its channel (half of it in green's mean).
                for c, weight in enumerate(PHOTOSITE_WEIGHTS):
                    flat[c, at[channel == c]] += weight * excess[channel == c]
        n_hot = int(spec.hot_pixel_fraction * h * w)
        hot = rng.integers(0, h * w, n_hot)
        values = rng.uniform(0.1, 1.0, n_hot).astype(np.float32)
        flat = data.reshape(self.channels, -1)
        if self._photosites() is None:
            flat[:, hot] = values
        else:
            # A hot photosite: the red one, one of the two greens (whose mean the green pixel
            # is) or the blue one; the other channels of that pixel keep their light.
            channel = PHOTOSITE_CHANNELS[rng.integers(0, 4, n_hot)]
            for c, weight in enumerate(PHOTOSITE_WEIGHTS):
                at = hot[channel == c]
                flat[c, at] = weight * values[channel == c] + (1 - weight) * flat[c, at]
        return np.clip(data, 0, 1)

    def _warm_pixels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The sensor's warm pixels (flat indices on the camera's grid), their excess and, with
        Bayer cells, each one's channel, from a stream of their own: the same in every frame."""
        spec = self.spec
        rng = np.random.default_rng([spec.seed, 20_261_207])
        n = int(spec.warm_pixel_fraction * spec.height * spec.width)
        at = rng.choice(spec.height * spec.width, n, replace=False)
        lo, hi = np.log(WARM_PIXEL_RANGE)
        excess = (spec.noise_sigma * np.exp(rng.uniform(lo, hi, n))).astype(np.float32)
        return at, excess, PHOTOSITE_CHANNELS[rng.integers(0, 4, n)]

    def warm_pixels(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where frame ``k`` shows the sensor's warm pixels on the reference's grid: ``x, y``
        (px; a registered frame's move with its offset and turn) and each one's excess over its
        light before registration (a registration spreads it over a few pixels)."""
        if not self.spec.warm_pixel_fraction:
            return np.zeros(0), np.zeros(0), np.zeros(0)
        at, excess, _ = self._warm_pixels()
        row, column = np.divmod(at, self.spec.width)
        matrix, offset = self._to_capture(k)
        y, x = np.linalg.solve(matrix, np.stack([row, column]).astype(float) - offset[:, None])
        return x, y, excess.astype(np.float64)

    def _photosites(self) -> np.ndarray | None:
        """Photosites behind each channel's pixel with ``bayer`` (1, 2, 1), else None."""
        return np.array([1.0, 2.0, 1.0]) if self.spec.bayer and self.channels == 3 else None

    def pixel_noise(self, k: int) -> np.ndarray:
        """Noise per channel of the sky in frame ``k`` (shot noise at the sky level plus read)."""
        truth = self.frames[k]
        read, gain = self._gain()
        sites = self._photosites()
        if sites is not None:
            return np.sqrt((np.asarray(truth.sky_level) / gain + read**2) / sites)
        return np.sqrt(np.asarray(truth.sky_level) / gain + read**2)

    def noise_map(self, k: int) -> np.ndarray:
        """The standard deviation of every pixel's noise in frame ``k`` as captured, before
        registration (shot noise of everything plus read noise), ``(channels, h, w)``."""
        read, gain = self._gain()
        sites = self._photosites()
        sites = np.ones(self.channels) if sites is None else sites
        variance = (np.clip(self._captured_signal(k), 0, None) / gain + read**2) / sites[:, None, None]
        return np.sqrt(variance).astype(np.float32)

    def background_noise(self, k: int) -> np.ndarray:
        """The noise per channel of frame ``k``'s background before registration: the RMS of
        :meth:`noise_map` where the star light is under a tenth of the sky's pixel noise (which
        takes in the gradient's and the nebula's shot noise), within the coverage (all of it
        where stars leave no such pixel)."""
        noise = self.noise_map(k)
        t = np.asarray(self.frames[k].transmission, np.float32)[:, None, None]
        faint = (t * self.stars(k, captured=True)).max(axis=0) < 0.1 * self.pixel_noise(k).min()
        keep = faint & self.coverage(k)
        if not keep.any():  # a field of stars everywhere: the covered pixels' noise
            keep = self.coverage(k)
        return np.sqrt(np.mean(noise[:, keep] ** 2, axis=1))

    def perfect_normalization(self, k: int, data: np.ndarray) -> np.ndarray:
        """Frame ``k`` (as rendered) normalized with the true scale and gradient."""
        m = self.frames[k].scale(self.reference)[:, None, None].astype(np.float32)
        gradient = m * self.sky(k) - self.sky(0)
        return np.where(data != 0, m * data - gradient, 0).astype(np.float32)

    def header(self, k: int) -> fits.Header:
        truth, spec = self.frames[k], self.spec
        header = fits.Header()
        header["OBJECT"] = "SYNTHETIC"
        header["EXPTIME"] = (truth.exposure, "[s] exposure time")
        header["DATE-OBS"] = truth.date_obs
        header["FILTER"] = "L" if not spec.colour else "OSC"
        header["FOCALLEN"] = (spec.focal_length_mm, "[mm]")
        header["XPIXSZ"] = (spec.pixel_size_um, "[um]")
        header["YPIXSZ"] = (spec.pixel_size_um, "[um]")
        header["CTYPE1"] = "RA---TAN"
        header["CTYPE2"] = "DEC--TAN"
        header["CRPIX1"] = spec.width / 2
        header["CRPIX2"] = spec.height / 2
        header["CRVAL1"] = 315.4
        header["CRVAL2"] = 68.2
        scale = spec.pixel_size_um / spec.focal_length_mm * 0.206265 / 3600
        header["CDELT1"] = -scale
        header["CDELT2"] = scale
        return header


def upscaled(data: np.ndarray, factor: int) -> np.ndarray:
    """``data`` ``(channels, h, w)`` as a registration that upscales by ``factor`` writes it
    (Siril's x2, a drizzle's grid): every plane zoomed by a cubic spline on the pixels' areas
    (each fine pixel a quarter of a coarse one at x2), clamped to [0, 1],
    regions without data kept without (each pixel of the coarse grid becomes ``factor`` x
    ``factor`` pixels of the fine one); the reference is upscaled as well, since every frame
    of a registration shares the grid."""
    if factor == 1:
        return data
    covered = np.repeat(np.repeat(data[0] != 0, factor, axis=0), factor, axis=1)
    fine = np.stack(
        [
            scipy.ndimage.zoom(plane.astype(np.float64), factor, order=3, mode="nearest", grid_mode=True)
            for plane in data
        ]
    )
    fine = np.clip(fine, 1e-6, 1).astype(np.float32)
    fine[:, ~covered] = 0
    return fine


def write_synthetic_set(
    directory: str | Path, spec: SyntheticSpec | None = None, *, upscale: int = 1, **overrides
) -> list[Path]:
    """Write a synthetic set as FITS files plus ``truth.json``; return the frame paths.

    The truth file lists the spec (with its scenario) and, per frame, its transmission, scale
    ``m`` against frame 0, FWHM (in the centre, before pixel integration) and Moffat index, the
    gradient's strength, the registration offset ``shift`` (dy, dx; 0 for frames not
    resampled) and the noise before registration: ``pixel_noise`` at the sky's pedestal and
    ``background_noise`` over the background (:meth:`SyntheticField.background_noise`), so a
    run's scales and weights can be checked against it.

    ``upscale`` > 1 writes every frame as a registration that upscales by that factor writes it
    (:func:`upscaled`), with ``XPIXSZ``/``YPIXSZ`` and the WCS's pixel scale divided by it;
    ``truth.json`` then says ``"upscale"``, and its noises and shifts stay the capture's.
    """
    if int(upscale) != upscale or not 1 <= upscale <= 4:
        raise ValueError(f"upscale must be 1, 2, 3 or 4, not {upscale}")
    upscale = int(upscale)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    synthetic = SyntheticField(spec, **overrides)
    paths = []
    truth = {"spec": asdict(synthetic.spec), "reference": synthetic.reference.name, "frames": []}
    if upscale > 1:
        truth["upscale"] = upscale

    def render(k: int) -> tuple[np.ndarray, np.ndarray]:
        with synthetic._frame_memo():  # the frame's star light and signal serve its noise too
            return synthetic.render(k), synthetic.background_noise(k)

    # Every frame from its own seed: rendered side by side, the same as one after the other.
    n = len(synthetic.frames)
    with ThreadPoolExecutor(max(1, min(RENDER_THREADS, n))) as pool:
        pending = {}
        for k, frame in enumerate(synthetic.frames):
            for ahead in range(k, min(k + RENDER_THREADS, n)):
                if ahead not in pending:
                    pending[ahead] = pool.submit(render, ahead)
            data, background_noise = pending.pop(k).result()
            data = upscaled(data, upscale)
            header = synthetic.header(k)
            if upscale > 1:
                for key in ("XPIXSZ", "YPIXSZ", "CRPIX1", "CRPIX2", "CDELT1", "CDELT2"):
                    header[key] = header[key] * upscale if key.startswith("CRPIX") else header[key] / upscale
            path = directory / f"{frame.name}.fits"
            fits.PrimaryHDU(data[0] if synthetic.channels == 1 else data, header=header).writeto(path, overwrite=True)
            paths.append(path)
            entry = asdict(frame)
            entry["scale"] = [float(v) for v in frame.scale(synthetic.reference)]
            entry["pixel_noise"] = [float(v) for v in synthetic.pixel_noise(k)]
            entry["background_noise"] = [float(v) for v in background_noise]
            truth["frames"].append(entry)
    (directory / "truth.json").write_text(json.dumps(truth, indent=2))
    return paths


def block_residual(image: np.ndarray, truth: np.ndarray, covered: np.ndarray, block: int = 64) -> np.ndarray:
    """RMS per channel of the medians of ``block`` x ``block`` blocks of ``image - truth``.

    Only pixels where ``covered`` is true count, and only blocks at least half covered. It is
    the residual-gradient figure of the tests and benchmarks (divide by the pixel noise).
    """
    diff = np.where(covered[None], image - truth, np.nan)
    c, h, w = diff.shape
    hb, wb = h // block, w // block
    blocks = diff[:, : hb * block, : wb * block].reshape(c, hb, block, wb, block).transpose(0, 1, 3, 2, 4)
    blocks = blocks.reshape(c, hb, wb, -1)
    enough = np.mean(np.isfinite(blocks), axis=-1) > 0.5
    medians = np.full((c, hb, wb), np.nan)
    for ch in range(c):
        medians[ch][enough[ch]] = np.nanmedian(blocks[ch][enough[ch]], axis=-1)
    return np.sqrt(np.nanmean(medians**2, axis=(1, 2)))
