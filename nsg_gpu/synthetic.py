"""Seeded synthetic frames with known truth, shared by the tests, the benchmarks and ``nsg synth``.

A :class:`SyntheticField` is one patch of sky: a star field with a power-law flux distribution
(some stars saturate), an extended nebula, and per-frame observing conditions: transmission
(per channel for colour), Moffat PSF of varying FWHM, an additive sky (pedestal, plane,
curvature and a light-pollution dome), Poisson and read noise, hot pixels, a satellite trail
and zero registration borders. Frame ``k`` is::

    frame_k = clip( t_k * (stars_k + nebula) + sky_k + noise_k , 0, 1 )   (0 outside the border)

so the scale that brings it to the reference is ``m_k = t_ref / t_k`` and the gradient to
remove is ``m_k * sky_k - sky_ref``. :meth:`SyntheticField.perfect_normalization` applies
exactly that, which is what a normalizer should approach.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.ndimage
from astropy.io import fits

__all__ = ["FrameTruth", "SyntheticSpec", "SyntheticField", "write_synthetic_set", "block_residual"]

#: Channel-to-channel colour of the atmosphere's extinction (blue dims most).
_CHANNEL_EXTINCTION = np.array([0.0, 0.35, 0.8])


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


class SyntheticField:
    """A star field and nebula observed in several frames; frame 0 is the natural reference."""

    def __init__(self, spec: SyntheticSpec | None = None, **overrides):
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

    # -- construction ---------------------------------------------------------------------------
    def _make_nebula(self, rng) -> np.ndarray:
        spec = self.spec
        h, w = spec.height, spec.width
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        nebula = np.zeros((h, w), np.float32)
        for _ in range(6):
            cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
            sx, sy = rng.uniform(0.03, 0.15) * w, rng.uniform(0.03, 0.15) * h
            amp = rng.uniform(2, 6) * spec.noise_sigma
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
            beta=float(rng.uniform(2.8, 3.3)),
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
    @property
    def reference(self) -> FrameTruth:
        return self.frames[0]

    def sky(self, k: int) -> np.ndarray:
        """The additive sky of frame ``k``: pedestal plus gradient, ``(channels, h, w)``."""
        spec, truth = self.spec, self.frames[k]
        h, w = spec.height, spec.width
        v, u = np.mgrid[-1 : 1 : h * 1j, -1 : 1 : w * 1j].astype(np.float32)
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
        return mask

    def stars(self, k: int) -> np.ndarray:
        """Star light of frame ``k`` above the atmosphere (transmission 1), ``(channels, h, w)``."""
        truth = self.frames[k]
        return self._render_stars(truth.fwhm, truth.beta)

    def _render_stars(self, fwhm: float, beta: float) -> np.ndarray:
        spec = self.spec
        h, w = spec.height, spec.width
        alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
        # Stamps wide enough that the Moffat wing beyond them holds < 0.02 % of the light, so
        # every star's total flux in the image is its catalogue flux times the transmission,
        # whatever the seeing: the truth a scale measurement is checked against.
        radius = int(math.ceil(alpha * math.sqrt(2e-4 ** (1 / (1 - beta)) - 1)))
        off = np.arange(-radius, radius + 1)
        # Sub-pixel positions quantized to 1/16 px: one normalized stamp per phase.
        phases = (np.arange(16) - 7.5) / 16.0
        r2y = (off[None, :] - phases[:, None]) ** 2  # (phase, s)
        stamps = (1 + (r2y[:, None, :, None] + r2y[None, :, None, :]) / alpha**2) ** (-beta)
        stamps /= stamps.sum(axis=(2, 3), keepdims=True)
        stamps = stamps.astype(np.float32)  # (phase_y, phase_x, s, s)
        out = np.zeros((self.channels, h * w), np.float64)
        x0 = np.rint(self.star_x).astype(np.int64)
        y0 = np.rint(self.star_y).astype(np.int64)
        qx = np.clip(np.floor((self.star_x - x0 + 0.5) * 16), 0, 15).astype(np.int64)
        qy = np.clip(np.floor((self.star_y - y0 + 0.5) * 16), 0, 15).astype(np.int64)
        for chunk in np.array_split(np.arange(self.star_x.size), max(1, self.star_x.size // 400)):
            px = x0[chunk, None, None] + off[None, None, :]
            py = y0[chunk, None, None] + off[None, :, None]
            inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
            flat = (py * w + px)[inside]
            profile = stamps[qy[chunk], qx[chunk]]
            for c in range(self.channels):
                vals = (profile * self.star_flux[chunk, c][:, None, None].astype(np.float32))[inside]
                out[c] += np.bincount(flat, weights=vals, minlength=h * w)
        return out.reshape(self.channels, h, w).astype(np.float32)

    def noise_free(self, k: int) -> np.ndarray:
        """Frame ``k`` without noise, defects or borders (saturation applied)."""
        t = np.asarray(self.frames[k].transmission, np.float32)[:, None, None]
        return np.clip(t * (self.stars(k) + self.nebula) + self.sky(k), 0, 1).astype(np.float32)

    def render(self, k: int) -> np.ndarray:
        """Frame ``k`` as a camera would record it, ``(channels, h, w)`` float32 in [0, 1]."""
        spec, truth = self.spec, self.frames[k]
        rng = np.random.default_rng(self._frame_seeds[k])
        h, w = spec.height, spec.width
        t = np.asarray(truth.transmission, np.float32)[:, None, None]
        signal = t * (self.stars(k) + self.nebula) + self.sky(k)
        # Gain chosen so that the sky's shot noise plus read noise is about noise_sigma.
        read = 0.4 * spec.noise_sigma
        gain = spec.sky_level / (spec.noise_sigma**2 - read**2)
        data = rng.poisson(np.clip(signal, 0, None) * gain).astype(np.float32) / gain
        data += rng.normal(0, read, data.shape).astype(np.float32)
        if truth.trail:
            yy, xx = np.mgrid[0:h, 0:w]
            distance = np.abs((yy - 0.2 * h) - 0.45 * (xx - 0.1 * w)) / math.hypot(1, 0.45)
            data += (0.02 * np.exp(-0.5 * (distance / 1.2) ** 2)).astype(np.float32)[None]
        n_hot = int(spec.hot_pixel_fraction * h * w)
        hot = rng.integers(0, h * w, n_hot)
        data.reshape(self.channels, -1)[:, hot] = rng.uniform(0.1, 1.0, n_hot).astype(np.float32)
        data = np.clip(data, 0, 1)
        data[:, ~self.coverage(k)] = 0
        # A pixel that lands exactly on 0 would read as "no data"; real sky never does.
        data[:, self.coverage(k)] = np.maximum(data[:, self.coverage(k)], 1e-6)
        return data

    def pixel_noise(self, k: int) -> np.ndarray:
        """Noise per channel of the sky in frame ``k`` (shot noise at the sky level plus read)."""
        spec, truth = self.spec, self.frames[k]
        read = 0.4 * spec.noise_sigma
        gain = spec.sky_level / (spec.noise_sigma**2 - read**2)
        return np.sqrt(np.asarray(truth.sky_level) / gain + read**2)

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


def write_synthetic_set(directory: str | Path, spec: SyntheticSpec | None = None, **overrides) -> list[Path]:
    """Write a synthetic set as FITS files plus ``truth.json``; return the frame paths.

    The truth file lists, per frame, its transmission, scale ``m`` against frame 0, FWHM and
    the gradient's strength, so a run's results can be checked against it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    synthetic = SyntheticField(spec, **overrides)
    paths = []
    truth = {"spec": asdict(synthetic.spec), "reference": synthetic.reference.name, "frames": []}
    for k, frame in enumerate(synthetic.frames):
        data = synthetic.render(k)
        path = directory / f"{frame.name}.fits"
        fits.PrimaryHDU(data[0] if synthetic.channels == 1 else data, header=synthetic.header(k)).writeto(
            path, overwrite=True
        )
        paths.append(path)
        entry = asdict(frame)
        entry["scale"] = [float(v) for v in frame.scale(synthetic.reference)]
        entry["pixel_noise"] = [float(v) for v in synthetic.pixel_noise(k)]
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
