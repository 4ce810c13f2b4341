"""nsg stack: rejection against direct computations, and masters against known truth.

The frames here are built directly: a smooth truth image, Gaussian noise of a different level
per frame, a satellite trail, hot pixels and zero registration borders, so the ideal master
(the weighted average of the noise-free truth) and its noise are known exactly.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.interpolate
import scipy.optimize
import scipy.stats
from astropy.io import fits
from conftest import integrated_gaussians
from typer.testing import CliRunner

import nsg_gpu
from nsg_gpu import pixel_rejection
from nsg_gpu.cli import app
from nsg_gpu.combine import LAD_STEPS, reject_combine
from nsg_gpu.errors import OutputError, ParameterError, StackError
from nsg_gpu.pixel_rejection import (
    METHODS,
    PEAK_BYTES,
    NoiseMap,
    Rejection,
    auto_rejection,
    esd_critical_values,
    peak_excess,
)
from nsg_gpu.stack_inputs import PROCESS_RESERVE, parse_memory, plan_bands
from nsg_gpu.stacking import stack

runner = CliRunner()
SHAPE = (64, 96)


# -- direct computations of every method, one pixel at a time ---------------------------------------
def _direct_pixel(samples, frames, weights, rejection, peak=None, noise=None, noise_scale=None):
    """The documented definitions, written plainly for one pixel: (master, low frames, high frames)."""
    keys = sorted(zip(samples, frames))
    x = np.array([k[0] for k in keys], np.float64)
    f = [k[1] for k in keys]
    n = x.size
    low = np.zeros(n, bool)
    high = np.zeros(n, bool)
    method = rejection.method_for(n)  # auto: NSG's rule applied to this pixel's frames
    rejection = rejection.concrete(method)
    if method == "percentile" and n >= 3:
        m = np.median(x)
        if 1 + m != 1:
            low = rejection.clip_low & ((m - x) / m > rejection.low)
            high = rejection.clip_high & ((x - m) / m > rejection.high)
    elif method == "noise" and n >= 3:
        m = np.median(x)
        spread = rejection.signal_share * float(peak)
        if 1 + np.sqrt(float(noise) ** 2 + spread**2) != 1:
            share = np.ones(len(weights)) if noise_scale is None else noise_scale
            q = np.pi / (2 * n)  # the median's variance: q h in units of noise^2
            h = (n / sum(1 / share[i] for i in sorted(f))) ** 2  # summed in frame order
            s = [np.sqrt(float(noise) ** 2 * (share[i] ** 2 + q * h) / (1 + q) + spread**2) for i in f]
            j = 0
            while rejection.clip_low and j < n and (m - x[j]) / s[j] > rejection.low:
                low[j] = True
                j += 1
            j = n - 1
            while rejection.clip_high and j >= 0 and not low[j] and (x[j] - m) / s[j] > rejection.high:
                high[j] = True
                j -= 1
    elif method in ("sigma", "winsorized") and n >= 3:
        kept = np.ones(n, bool)
        iteration = 0
        while kept.sum() >= 3:
            k = x[kept]
            if method == "sigma":
                s = np.std(k, ddof=1)
                centre = np.median(k)
            else:
                centre, s = _huber(k, rejection.cutoff if iteration == 0 else 0.0)
            if 1 + s == 1:
                break
            new_low = kept & rejection.clip_low & ((centre - x) / s > rejection.low)
            new_high = kept & rejection.clip_high & ((x - centre) / s > rejection.high)
            if not (new_low | new_high).any():
                break
            low |= new_low
            high |= new_high
            kept &= ~(new_low | new_high)
            iteration += 1
    elif method == "esd" and n >= 3:
        low, high = _rosner(x, rejection)
    elif method == "linear" and n >= 5:
        low, high = _linear_clip(x, rejection)
    if (low | high).all():
        low[:], high[:] = False, False
    kept = ~(low | high)
    w = np.array([weights[i] for i in f])
    master = np.sum(w[kept] * x[kept]) / np.sum(w[kept]) if kept.any() else 0.0
    return master, {f[j] for j in np.flatnonzero(low)}, {f[j] for j in np.flatnonzero(high)}


def _huber(k, cutoff):
    mu = np.median(k)
    s = 1.4826 * np.median(np.abs(k - mu))
    for iteration in range(100):
        if 1 + s == 1:
            break
        v = np.clip(k, mu - 1.5 * s, mu + 1.5 * s)
        if cutoff > 0:
            v = np.where((k <= mu - cutoff * s) | (k >= mu + cutoff * s), mu, v)
        previous, mu, s = s, v.mean(), 1.134 * v.std(ddof=1)
        if iteration >= 1 and abs(previous - s) / previous < 0.0005:
            break
    return mu, s


def _rosner(x, rejection):
    """Rosner (1983): remove the most deviant value k times; the outliers are the first r
    removed, r the largest i with R_i > lambda_i."""
    n = x.size
    k = min(max(int(rejection.esd_outliers * n), 1), n - 2)
    remaining = list(range(n))
    removed, statistics, limits = [], [], []
    for i in range(k):
        r = x[remaining]
        mean, sd = r.mean(), r.std(ddof=1)
        if not sd > 0:
            break
        deviation = r - mean
        stat = np.where(deviation >= 0, deviation / sd, -deviation / (sd * rejection.esd_low_relaxation))
        top = np.flatnonzero(stat == stat.max())
        pick = top[-1] if deviation[top[-1]] >= 0 else top[0]
        statistics.append(stat[pick])
        removed.append((remaining.pop(pick), deviation[pick] >= 0))
        size = n - i
        t = scipy.stats.t.ppf(1 - rejection.esd_alpha / (2 * size), size - 2)
        limits.append((size - 1) * t / np.sqrt((size - 2 + t * t) * size))
    outliers = max([i + 1 for i in range(len(statistics)) if statistics[i] > limits[i]], default=0)
    low, high = np.zeros(n, bool), np.zeros(n, bool)
    for position, is_high in removed[:outliers]:
        if is_high:
            high[position] = rejection.clip_high
        else:
            low[position] = rejection.clip_low
    return low, high


def _lad(y):
    """The LAD line through y against rank, by the documented bisection, one pixel at a time."""
    ranks = np.arange(y.size, dtype=np.float64)

    def intercept(b):
        return np.median(y - b * ranks)

    lo_b, hi_b = 0.0, y[-1] - y[0]
    if hi_b > 0:
        for _ in range(LAD_STEPS):
            b = (lo_b + hi_b) / 2
            g = np.sum(ranks * np.sign(y - b * ranks - intercept(b)))
            lo_b, hi_b = (b, hi_b) if g > 0 else (lo_b, b)
        slope = (lo_b + hi_b) / 2
    else:
        slope = 0.0
    a = intercept(slope)
    return a, slope, np.mean(np.abs(y - slope * ranks - a))


def _linear_clip(x, rejection):
    n = x.size
    alive = np.arange(n)
    low, high = np.zeros(n, bool), np.zeros(n, bool)
    while True:
        y = x[alive]
        a, b, adev = _lad(y)
        # An independent check of the fit: linear programming finds the same least sum of |residuals|.
        assert adev * y.size == pytest.approx(_lad_optimum(y), rel=1e-9, abs=1e-12)
        s = 2 * adev * np.sqrt(1 + b * b)
        if 1 + s == 1:
            break
        fit = a + b * np.arange(y.size)
        new_low = rejection.clip_low & (y < fit) & ((fit - y) / s >= rejection.low)
        new_high = rejection.clip_high & (y >= fit) & ((y - fit) / s >= rejection.high)
        if not (new_low | new_high).any():
            break
        low[alive[new_low]] = True
        high[alive[new_high]] = True
        alive = alive[~(new_low | new_high)]
        if alive.size < 3:
            break
    return low, high


def _lad_optimum(y):
    m = y.size
    ranks = np.arange(m, dtype=np.float64)
    eye = np.eye(m)
    a_ub = np.vstack([np.column_stack([-np.ones(m), -ranks, -eye]), np.column_stack([np.ones(m), ranks, -eye])])
    b_ub = np.concatenate([-y, y])
    cost = np.concatenate([[0.0, 0.0], np.ones(m)])
    bounds = [(None, None), (None, None)] + [(0, None)] * m
    return scipy.optimize.linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs").fun


def _samples(n_frames, n_pixels, seed):
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(0.002, 0.004, n_frames)
    values = (0.1 + rng.normal(0, 1, (n_frames, n_pixels)) * sigma[:, None]).astype(np.float32)
    values[rng.uniform(size=values.shape) < 0.1] = 0
    values[rng.uniform(size=values.shape) < 0.04] += np.float32(0.04)
    values[rng.uniform(size=values.shape) < 0.03] -= np.float32(0.02)
    return values, rng.uniform(0.5, 2.0, n_frames)


def _peak_and_noise(n_pixels, seed):
    """A peak from none to several times the noise, and the noise, per pixel."""
    rng = np.random.default_rng(seed + 1000)
    peak = (rng.choice([0.0, 0.002, 0.01, 0.05], n_pixels) * rng.uniform(0.5, 1.0, n_pixels)).astype(np.float32)
    noise = rng.uniform(0.001, 0.005, n_pixels).astype(np.float32)
    return peak, noise


@pytest.mark.parametrize("method", [*METHODS, "auto"])
@pytest.mark.parametrize("n_frames", [4, 9, 16, 27])
def test_each_method_equals_a_direct_computation(method, n_frames):
    """Flags exactly, master within float32 rounding, for every method at several frame counts."""
    values, weights = _samples(n_frames, 48 if method == "linear" else 120, seed=n_frames)
    peak, noise = _peak_and_noise(values.shape[1], seed=n_frames)
    share = np.random.default_rng(n_frames).uniform(0.4, 2.5, n_frames)  # each frame's noise over the map's
    rejection = Rejection(method).resolve(n_frames)
    result = reject_combine(values, weights, rejection, peak=peak, noise=noise, noise_scale=share)
    for p in range(values.shape[1]):
        column = values[:, p]
        frames = [i for i in range(n_frames) if column[i] != 0]
        master, low, high = _direct_pixel(column[frames], frames, weights, rejection, peak[p], noise[p], share)
        assert result.coverage[p] == len(frames)
        assert set(np.flatnonzero(result.flags[:, p] == 1)) == low, (p, column)
        assert set(np.flatnonzero(result.flags[:, p] == 2)) == high, (p, column)
        assert result.low[p] == len(low) and result.high[p] == len(high)
        assert result.master[p] == pytest.approx(master, rel=2e-7, abs=1e-9)
    assert result.frame_low.sum() == result.low.sum() and result.frame_high.sum() == result.high.sum()
    if method != "none" and n_frames >= (16 if method == "linear" else 4 if method == "noise" else 9):
        assert result.high.sum() > 0  # the test exercises rejection, not just the average


@pytest.mark.parametrize("method", [*METHODS, "auto"])
def test_no_method_clips_a_pixel_of_one_or_two_samples(method):
    """Pixels that only one or two of the frames cover (a registration's borders) are not
    clipped, by any method, in the twin and in the kernel (host emulation), as a stack of one
    or two frames is not: of two samples neither can be told to be the outlier. Two samples
    12 % apart are one percentile clipping would reject alone (above its median by more than
    0.1 of it, below by less than 0.2); the other pixels have all five."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from emulation import EmulatedLauncher

    values, weights = _samples(5, 60, seed=7)
    values[values == 0] = np.float32(0.1)
    values[2:, :20] = 0  # frames 0 and 1 only
    values[1:, 20:30] = 0  # frame 0 only
    values[0, :20], values[1, :20] = np.float32(1.0), np.float32(1.25)
    values[1, 30:] += np.float32(0.5)  # an outlier where all five have data
    peak, noise = _peak_and_noise(values.shape[1], seed=7)
    settings = {"percentile": dict(low=0.2, high=0.1)}.get(method, {})
    rejection = Rejection(method, **settings).resolve(5)
    for launcher in (None, EmulatedLauncher(multiprocessors=2)):
        result = reject_combine(values, weights, rejection, peak=peak, noise=noise, launcher=launcher)
        assert not result.flags[:, :30].any() and not result.low[:30].any() and not result.high[:30].any()
        expected = (weights[0] * 1.0 + weights[1] * 1.25) / (weights[0] + weights[1])
        np.testing.assert_allclose(result.master[:20], expected, rtol=1e-6)
        np.testing.assert_allclose(result.master[20:30], values[0, 20:30], rtol=1e-6)
        if method == "percentile":
            assert result.high[30:].sum() > 0  # these settings do clip where five frames cover


@pytest.mark.parametrize(
    "rejection",
    [
        pytest.param(Rejection("sigma", low=2.0, high=1.8, clip_low=False), id="sigma-high-only"),
        pytest.param(Rejection("winsorized", low=3.0, high=3.0, cutoff=0.0), id="winsorized-no-cutoff"),
        pytest.param(Rejection("esd", esd_alpha=0.2, esd_outliers=0.5, esd_low_relaxation=1.5), id="esd-relaxed"),
        pytest.param(Rejection("linear", low=2.5, high=2.0, clip_high=False), id="linear-low-only"),
        pytest.param(Rejection("noise", low=2.0, high=1.5, signal_share=0.2, clip_low=False), id="noise-high-only"),
        pytest.param(Rejection("noise", signal_share=0.0), id="noise-sky-only"),
    ],
)
def test_options_equal_a_direct_computation(rejection):
    values, weights = _samples(14, 60, seed=99)
    peak, noise = _peak_and_noise(values.shape[1], seed=99)
    rejection = rejection.resolve(14)
    result = reject_combine(values, weights, rejection, peak=peak, noise=noise)
    for p in range(values.shape[1]):
        frames = [i for i in range(14) if values[i, p] != 0]
        master, low, high = _direct_pixel(values[frames, p], frames, weights, rejection, peak[p], noise[p])
        assert set(np.flatnonzero(result.flags[:, p] == 1)) == low
        assert set(np.flatnonzero(result.flags[:, p] == 2)) == high
        assert result.master[p] == pytest.approx(master, rel=2e-7, abs=1e-9)


def test_esd_critical_values_are_rosners():
    """Each test's critical value is the two-sided Grubbs value of the remaining sample size
    (published tables, alpha = 0.05: 2.822 for 25 values, 2.681 for 19, 2.290 for 10)."""
    table = esd_critical_values(25, 0.05, 0.3)
    assert table[25, 0] == pytest.approx(2.822, abs=0.001)
    assert table[25, 6] == pytest.approx(2.681, abs=0.001)  # 25 - 6 = 19 values
    assert table[10, 0] == pytest.approx(2.290, abs=0.001)
    assert np.all(np.diff(table[25, :7]) < 0) and table.shape == (26, 7)


@pytest.mark.parametrize(
    ("n_frames", "method"),
    [(1, "none"), (2, "none"), (3, "noise"), (7, "noise"), (8, "sigma"), (10, "sigma")]
    + [(11, "winsorized"), (19, "winsorized"), (20, "esd"), (500, "esd")],
)
def test_auto_rejection_follows_nsg_from_8_frames(n_frames, method):
    assert auto_rejection(n_frames)[0] == method
    resolved = Rejection().resolve(n_frames)
    assert resolved.method == "auto" and resolved.method_for(n_frames) == method and str(n_frames) in resolved.reason
    assert resolved.method_for(5) == "noise" and resolved.method_for(2) == "none"
    assert resolved.needs_noise(n_frames) == (n_frames >= 3)


def test_rejection_options_are_checked():
    with pytest.raises(ValueError, match="ESD takes no --low"):
        Rejection("esd", low=3).resolve(30)
    with pytest.raises(ValueError, match="choose it with --rejection"):
        Rejection(high=3).resolve(30)
    with pytest.raises(ValueError, match="above 0"):
        Rejection("sigma", low=0).resolve(9)
    with pytest.raises(ValueError, match="unknown rejection"):
        Rejection("median").resolve(9)
    with pytest.raises(ValueError, match="signal share -0.1"):
        Rejection("noise", signal_share=-0.1).resolve(5)
    with pytest.raises(ValueError, match="give the peak and noise"):
        reject_combine(np.ones((4, 3), np.float32), np.ones(4), Rejection().resolve(4))
    assert Rejection("percentile", low=0, high=0).resolve(4).low == 0
    assert parse_memory("1.5G") == 3 << 29 and parse_memory("512M") == 512 << 20 and parse_memory(100) == 100
    with pytest.raises(ValueError, match="not a size"):
        parse_memory("lots")


# -- frames with known truth ------------------------------------------------------------------------
@dataclass
class Scene:
    """Frames on disk and what made them."""

    paths: list[Path]
    truth: np.ndarray  # (channels, h, w)
    sigma: np.ndarray  # per frame
    covered: np.ndarray  # (frames, h, w) bool
    trail: np.ndarray  # (h, w) bool: the trail of frame 1
    hot: np.ndarray  # (h, w) bool: hot pixels of any frame

    def ideal_noise(self, mask=None) -> np.ndarray:
        """Noise of the weighted average at each pixel (weights 1/sigma^2 of the covering frames)."""
        inverse = np.tensordot(1 / self.sigma**2, self.covered.astype(float), axes=1)
        return np.where(inverse > 0, 1 / np.sqrt(np.maximum(inverse, 1e-300)), np.inf)


def write_scene(
    directory: Path,
    n_frames: int,
    *,
    seed: int = 1,
    channels: int = 1,
    borders: bool = True,
    keyword: str = "NWEIGHT",
    shape: tuple[int, int] = SHAPE,
) -> Scene:
    """Frames of a smooth truth with noise per frame, a trail in frame 1, hot pixels and borders."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = 0.1 + 0.02 * np.sin(xx / 17) * np.cos(yy / 11) + 0.05 * np.exp(-((xx - 60) ** 2 + (yy - 30) ** 2) / 80)
    truth = np.stack([base * (1 + 0.1 * c) for c in range(channels)]).astype(np.float32)
    sigma = rng.uniform(0.002, 0.0035, n_frames)
    covered = np.ones((n_frames, h, w), bool)
    trail = np.abs((yy - 12) - 0.4 * xx) < 1.0
    hot = np.zeros((h, w), bool)
    paths = []
    for k in range(n_frames):
        data = truth + rng.normal(0, sigma[k], (channels, h, w)).astype(np.float32)
        if k == 1:
            data[:, trail] += np.float32(0.08)
        # Hot pixels, never two on one pixel nor on the trail (dithered frames move them apart;
        # sigma clipping, like PixInsight's, can miss two outliers among 8-10 samples).
        for _ in range(12):
            y, x = rng.integers(0, h), rng.integers(0, w)
            if not hot[y, x] and not trail[y, x]:
                data[:, y, x] = rng.uniform(0.5, 1.0)
                hot[y, x] = True
        if borders and k:
            covered[k, :, : (k % 4) * 4] = False  # registration borders of different widths
            covered[k, h - (k % 3) * 5 :, :] = False
        data[:, ~covered[k]] = 0
        header = fits.Header()
        header["OBJECT"] = "SCENE"
        header["NSGREF"] = "frame_000.fits"
        header[keyword] = ((sigma[0] / sigma[k]) ** 2, "weight")
        for c in range(channels):
            header[f"NOISE0{c}"] = float(sigma[k])
        header.add_history("NSG.parameters of the normalization")
        if k == 0:
            header.add_history("NSG.reference")  # as nsg normalize marks its reference's output
        path = directory / f"frame_{k:03d}_nsg.fits"
        fits.PrimaryHDU(data[0] if channels == 1 else data, header=header).writeto(path)
        paths.append(path)
    return Scene(paths, truth, sigma, covered, trail, hot)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Scenes of 5, 9, 15 and 24 frames (noise, sigma, winsorized and ESD clipping by count)."""
    root = tmp_path_factory.mktemp("scenes")
    return {n: write_scene(root / f"n{n}", n, seed=n) for n in (5, 9, 15, 24)}


def _master(path: Path):
    with fits.open(path) as hdul:
        data = np.asarray(hdul[0].data, np.float32)
        maps = {h.name: np.asarray(h.data) for h in hdul[1:]}
        header = hdul[0].header.copy()
    return (data[None] if data.ndim == 2 else data), maps, header


#: Largest master noise over the ideal weighted average's, per method: NSG's thresholds reject
#: some clean samples (winsorized's 2.2 sigma high threshold about 2 %).
NOISE_EXCESS = {"noise": 1.03, "percentile": 1.03, "sigma": 1.03, "winsorized": 1.08, "esd": 1.04}


@pytest.mark.parametrize("n_frames", [5, 9, 15, 24])
def test_master_against_the_truth(scenes, n_frames, tmp_path):
    """Noise near the ideal average; the trail and hot pixels rejected to within the noise; the
    coverage exact and the borders at the truth's level."""
    scene = scenes[n_frames]
    result = stack(scene.paths, tmp_path / "master.fits", backend="numpy")
    master, maps, header = _master(tmp_path / "master.fits")
    assert result.rejection.method == "auto"
    method = result.rejection.method_for(n_frames)
    assert method == auto_rejection(n_frames)[0]
    assert master.dtype == np.float32 and master.shape == scene.truth.shape
    residual = master[0] - scene.truth[0]
    expected = scene.ideal_noise()
    everywhere = scene.covered.all(axis=0)
    clean = everywhere & ~scene.trail & ~scene.hot
    ratio = residual[clean].std() / expected[clean].mean()
    assert 0.97 < ratio < NOISE_EXCESS[method], ratio
    # The trail (about 30 sigma of a frame) and the hot pixels are gone wherever three or more
    # frames cover the pixel (of two samples neither can be told to be the outlier).
    for defect in (scene.trail, scene.hot):
        defect = defect & (scene.covered.sum(axis=0) >= 3)
        assert np.all(np.abs(residual[defect]) < 6 * expected[defect]), np.abs(residual / expected)[defect].max()
    trail_frame = result.frames[1]
    assert trail_frame.rejected_high == max(f.rejected_high for f in result.frames)
    assert trail_frame.rejected_high >= scene.trail.sum()
    # Coverage: the count of frames with data, exactly; borders: unbiased where fewer frames cover.
    np.testing.assert_array_equal(maps["COVERAGE"], scene.covered.sum(axis=0))
    partial = ~everywhere & ~scene.trail & ~scene.hot
    normalized = residual[partial] / expected[partial]
    assert partial.sum() > 500
    assert abs(normalized.mean()) < 0.12 and normalized.std() < NOISE_EXCESS[method] + 0.05
    assert header["NCOMBINE"] == n_frames and header["NSGSREJ"] == "auto"


def _starry_frames(directory: Path, n_frames: int, seed: int):
    """Frames of a sky, a nebula and 40 stars of one flux each, whose FWHM (2.0-2.8 px) and
    place (within 0.3 px) change from frame to frame as the seeing and a registration leave
    them; noise of a different level per frame, a trail and hot pixels in frame 1. Returns
    the paths, the stars' places and fluxes, the sky (nebula included) and the trail."""
    rng = np.random.default_rng(seed)
    h, w = 160, 200
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    sky = 0.05 + 0.03 * np.exp(-((xx - 120) ** 2 + (yy - 70) ** 2) / 300.0)
    trail = np.abs((yy - 20) - 0.6 * xx) < 1.0
    gy, gx = np.mgrid[0:5, 0:8]  # apart, so that each aperture holds one star
    x = 14 + 24.5 * gx.ravel() + rng.uniform(-3, 3, 40)
    y = 16 + 32 * gy.ravel() + rng.uniform(-3, 3, 40)
    flux = rng.uniform(2.0, 6.0, 40)
    near = np.zeros((h, w), bool)
    for xi, yi in zip(x, y):
        near |= (xx - xi) ** 2 + (yy - yi) ** 2 < 64
    hot = np.argwhere(~near & ~trail)[rng.choice(int((~near & ~trail).sum()), 20, replace=False)]
    sigma = rng.uniform(0.002, 0.003, n_frames)
    fwhms = np.linspace(2.0, 2.8, n_frames)[rng.permutation(n_frames)]
    paths = []
    for k in range(n_frames):
        stars = np.zeros((h, w))
        for xi, yi, fi in zip(x, y, flux):
            dx, dy = rng.uniform(-0.3, 0.3, 2)
            stars += integrated_gaussians((h, w), [xi + dx], [yi + dy], fwhms[k], fi)
        data = (sky + stars + rng.normal(0, sigma[k], (h, w))).astype(np.float32)
        if k == 1:
            data[trail] += np.float32(0.05)
            data[hot[:, 0], hot[:, 1]] += np.float32(0.8)
        header = fits.Header()
        header["NWEIGHT"] = (sigma[0] / sigma[k]) ** 2
        if k == 0:
            header.add_history("NSG.reference")
        path = directory / f"star_{k:02d}_nsg.fits"
        fits.PrimaryHDU(data, header).writeto(path)
        paths.append(path)
    return paths, x, y, flux, sky, trail


@pytest.mark.parametrize("n_frames", [3, 5, 7])
def test_noise_clipping_keeps_the_stars_light_that_percentile_clipping_takes(tmp_path, n_frames):
    """Below 8 frames auto clips against the sky's noise and each pixel's peak: the master's
    stars keep their flux (aperture sums against the known flux), while the trail goes; NSG's
    percentile clipping takes a share of the light of every star sharper in some frame than
    in the median one."""
    paths, x, y, flux, sky, trail = _starry_frames(tmp_path, n_frames, seed=40 + n_frames)
    fluxes = {}
    for method in ("auto", "percentile", "none"):
        result = stack(paths, tmp_path / f"{method}.fits", rejection=method, backend="numpy", maps="none")
        master = fits.getdata(tmp_path / f"{method}.fits").astype(np.float64) - sky
        yy, xx = np.mgrid[0 : master.shape[0], 0 : master.shape[1]]
        fluxes[method] = np.array([master[(xx - xi) ** 2 + (yy - yi) ** 2 <= 36].sum() for xi, yi in zip(x, y)])
        if method == "auto":
            assert result.rejection.method_for(n_frames) == "noise"
            residual = master[trail]
    far = np.array(
        [not trail[max(0, int(yi) - 7) : int(yi) + 8, max(0, int(xi) - 7) : int(xi) + 8].any() for xi, yi in zip(x, y)]
    )
    auto = fluxes["auto"][far] / flux[far] - 1
    # The broadest frame's far wings, 3-4 px out, can still exceed the noise where the median
    # frame shows little light: up to 0.2 % of the flux, 0.9 % of one star's (docs/stacking.md).
    assert abs(np.median(auto)) < 0.004 and np.abs(auto).max() < 0.015, auto
    lost = 1 - np.median(fluxes["percentile"][far] / flux[far])
    assert lost > 0.03, lost  # the test can tell: percentile clipping eats the cores
    # The trail (about 20 sigma of a frame) is gone, where without rejection it shows.
    on_stars = np.zeros_like(trail)
    for xi, yi in zip(x, y):
        on_stars[max(0, int(yi) - 5) : int(yi) + 6, max(0, int(xi) - 5) : int(xi) + 6] = True
    assert np.median(np.abs(residual[~on_stars[trail]])) < 0.003
    none = fits.getdata(tmp_path / "none.fits").astype(np.float64) - sky
    assert np.median(none[trail & ~on_stars]) > 0.05 / n_frames / 2


def test_the_noise_map_reads_each_frames_noise_through_a_nebula():
    """Two frames of one nebula (40 times the noise at its core) with noise of 0.002 and 0.003:
    the map reads the first's noise (0.002) within 3 % (median) and 12 % (everywhere; each of
    its boxes holds 256 pixels), the nebula cancelled, where
    the first frame's own scatter in the same boxes reads up to several times more; scaled to
    the frames' root mean square by the factor given. Read in any bands, the same values."""
    rng = np.random.default_rng(3)
    h, w = 150, 230
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    nebula = 0.1 + 0.08 * np.exp(-((xx - 100) ** 2 + (yy - 70) ** 2) / 900.0) + 0.0002 * xx
    first = (nebula + rng.normal(0, 0.002, (h, w))).astype(np.float32)[None]
    second = (nebula + rng.normal(0, 0.003, (h, w))).astype(np.float32)[None]
    first[0, :, :10] = 0  # a border without data: the nearest boxes' noise
    both = np.stack([first, second])
    noise_map = NoiseMap.measure(lambda y0, y1: both[:, :, y0:y1], (1, h, w), variance_ratio=[2.25])
    whole = noise_map.band(0, 0, h).reshape(h, w)
    assert abs(np.median(whole) / 0.002 - 1) < 0.03 and np.all(np.abs(whole / 0.002 - 1) < 0.12), whole
    own = NoiseMap.measure(lambda y0, y1: np.stack([first, np.zeros_like(first) + 1.0])[:, :, y0:y1], (1, h, w))
    assert own.noise.max() * np.sqrt(2) > 3 * 0.002  # one frame alone: the nebula reads as noise
    bands = np.concatenate([noise_map.band(0, y0, min(h, y0 + 37)) for y0 in range(0, h, 37)])
    np.testing.assert_array_equal(bands, whole.reshape(-1))
    # Bilinear between the boxes' centres, constant beyond the outer ones.
    centres = [np.arange(n) * noise_map.box + (noise_map.box - 1) / 2 for n in noise_map.noise.shape[1:]]
    bilinear = scipy.interpolate.RegularGridInterpolator(centres, noise_map.noise[0])
    inside = np.stack([np.clip(yy, centres[0][0], centres[0][-1]), np.clip(xx, centres[1][0], centres[1][-1])], -1)
    np.testing.assert_allclose(whole, bilinear(inside), rtol=1e-6)


def test_a_star_has_a_peak_a_nebula_and_one_frames_trail_none(monkeypatch):
    """peak_excess: a star of 2 px stands out by about its own height (less the average along
    the row and a noise); a broad nebula 25 times the noise a few noises on its flanks (its
    slope over 3 px), a gradient and a trail in one frame 0; the pixels asked for alone get
    the values the whole band gives them."""
    h, w, n = 40, 120, 5
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    sky = 0.1 + 0.05 * np.exp(-((xx - 80) ** 2 + (yy - 20) ** 2) / 400.0) + 0.0001 * xx
    star = 0.5 * np.exp(-((xx - 30.3) ** 2 + (yy - 20.1) ** 2) / (2 * 0.85**2))
    frames = np.repeat((sky + star)[None], n, axis=0).astype(np.float32)
    frames[2, 8, :] += np.float32(0.3)  # a trail along a row of frame 2
    frames[1, :, :4] = 0  # no data in a border of one frame
    noise = np.full(h * w, 0.002, np.float32)
    peak = peak_excess(frames.reshape(n, -1), w, noise=noise).reshape(h, w)
    core = peak[20, 30]
    smoothed = np.mean([sky[20, 29:32] + star[20, 29:32]]) - min(np.mean(sky[20, 26:29]), np.mean(sky[20, 32:35]))
    assert core == pytest.approx(smoothed - 0.002, rel=0.02) and core > 0.2
    assert peak[20, 28] > 0.05 and peak[20, 32] > 0.05  # the flanks
    far = np.abs(xx - 30.3) > 6
    assert peak[far].max() < 3 * 0.002  # the nebula's flanks
    assert not peak[:, :20].any()  # the border and the gradient
    np.testing.assert_array_equal(peak[8], peak[32])  # the trail's row as the row as far the other side
    needed = np.zeros(h * w, bool)
    needed[20 * w + 25 : 20 * w + 36] = True
    alone = peak_excess(frames.reshape(n, -1), w, needed, noise)
    np.testing.assert_array_equal(alone[needed], peak.reshape(-1)[needed])
    assert not alone[~needed].any()
    # In chunks of 3 rows on a pool of threads: the same values.
    monkeypatch.setattr(pixel_rejection, "PEAK_CHUNK_SAMPLES", 3 * w * n)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        pooled = peak_excess(frames.reshape(n, -1), w, noise=noise, run=pool.map)
    np.testing.assert_array_equal(pooled, peak.reshape(-1))


@pytest.mark.parametrize("frames", [1, 2, 3, 5, 8, 12, 13, 20])
def test_peaks_medians_are_numpys_of_the_samples_with_data(frames):
    """The medians the peaks are made of: NumPy's median of each pixel's samples with data (0
    and non-finite are none), bit for bit, whether a sorting network (up to NETWORK_FRAMES) or
    a sort puts them in order; NaN where a pixel has none."""
    rng = np.random.default_rng(frames)
    values = rng.normal(1.0, 0.2, (frames, 5000)).astype(np.float32)
    for bad, share in ((0.0, 0.3), (np.nan, 0.05), (np.inf, 0.02), (-np.inf, 0.02)):
        values[rng.random(values.shape) < share] = bad
    values[:, :7] = 0  # pixels without data
    values[:, 7:20] = values[:1, 7:20]  # ties
    expected = values.astype(np.float64)
    expected[~np.isfinite(expected) | (expected == 0)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        expected = np.nanmedian(expected, axis=0)
    given = values.copy()
    got = pixel_rejection._medians(given)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, expected)
    column = np.ascontiguousarray(values[:, 3:4])  # one pixel (no data): its transpose is no copy
    np.testing.assert_array_equal(pixel_rejection._medians(column), expected[3:4])
    np.testing.assert_array_equal(given, values)  # the samples are left as they were
    np.testing.assert_array_equal(column, values[:, 3:4])


@pytest.mark.parametrize("n", range(1, pixel_rejection.NETWORK_FRAMES + 1))
def test_sorting_network_sorts_every_input(n):
    """By the 0-1 principle a comparator network that sorts every sequence of 0s and 1s sorts
    every sequence: all 2^n of them here."""
    codes = np.arange(1 << n)
    block = ((codes[None, :] >> np.arange(n)[:, None]) & 1).astype(np.int8)  # (n, 2^n)
    for i, j in pixel_rejection.sorting_network(n):
        assert i < j < n
        low = np.minimum(block[i], block[j])
        block[j] = np.maximum(block[i], block[j])
        block[i] = low
    np.testing.assert_array_equal(block, np.sort(block, axis=0))


def test_without_rejection_the_trail_stays(scenes, tmp_path):
    """The same scene with --rejection none: the trail shows, so the test above can fail."""
    scene = scenes[9]
    stack(scene.paths, tmp_path / "master.fits", rejection="none", backend="numpy")
    master, maps, _ = _master(tmp_path / "master.fits")
    residual = master[0] - scene.truth[0]
    assert np.median(residual[scene.trail] / scene.ideal_noise()[scene.trail]) > 5
    assert not maps["REJLOW"].any() and not maps["REJHIGH"].any()


@pytest.mark.parametrize("method", ["linear", "esd", "sigma"])
def test_chosen_methods_reject_the_trail(scenes, method, tmp_path):
    scene = scenes[15]
    result = stack(scene.paths, tmp_path / "m.fits", rejection=method, backend="numpy")
    master, _, _ = _master(tmp_path / "m.fits")
    residual = master[0] - scene.truth[0]
    expected = scene.ideal_noise()
    trail = scene.trail & scene.covered.all(axis=0)  # a chosen method is used at the borders too
    assert np.all(np.abs(residual[trail]) < 6 * expected[trail])
    assert result.rejection.method == method


def test_the_masters_exposure_is_the_total_of_the_frames_combined(tmp_path):
    """The master copied the reference's EXPTIME (10 s for a stack of 80 s); now each exposure
    card every frame carries is their sum, and one that some frame lacks is left out."""
    scene = write_scene(tmp_path / "in", 4, seed=3)
    exposures = [10.0, 10.0, 20.0, 30.0]
    for path, exposure in zip(scene.paths, exposures, strict=True):
        with fits.open(path, mode="update") as hdul:
            hdul[0].header["EXPTIME"] = exposure
            hdul[0].header["EXPOSURE"] = exposure
            if path != scene.paths[2]:
                hdul[0].header["TOTALEXP"] = exposure
    result = stack(scene.paths, tmp_path / "m.fits", backend="numpy")
    assert len(result.used) == 4
    header = fits.getheader(tmp_path / "m.fits")
    assert header["EXPTIME"] == header["EXPOSURE"] == 70.0 and header["NCOMBINE"] == 4
    assert "TOTALEXP" not in header  # frame 2 has none: the total is unknown
    assert header.comments["EXPTIME"] == "[s] total of the 4 frames combined"


def test_same_bytes_whatever_the_memory_and_threads(scenes, tmp_path):
    """A few rows per band and one band, one thread and two: the same master, byte for byte."""
    scene = scenes[15]
    h, w = SHAPE
    small = PROCESS_RESERVE + 800_000
    rows = plan_bands(small, n_frames=15, channels=1, height=h, width=w, threads=2)
    assert 1 <= rows < h // 4
    first = stack(scene.paths, tmp_path / "a.fits", memory=small, threads=2, backend="numpy")
    second = stack(scene.paths, tmp_path / "b.fits", memory="2G", threads=1, backend="numpy")
    assert first.bands > 4 and second.bands == 1
    assert (tmp_path / "a.fits").read_bytes() == (tmp_path / "b.fits").read_bytes()


@pytest.mark.parametrize("marked", [True, False], ids=["reference-marked", "no-reference"])
def test_same_bytes_whatever_the_order_the_frames_are_given_in(tmp_path, marked):
    """Five frames of equal weight (noise clipping: its map read from the first two frames of
    equal weight), given in three orders: the same master and table, byte for byte, and
    the master's header is the reference's where it is among them."""
    scene = write_scene(tmp_path / "in", 5, seed=21)
    for k, path in enumerate(scene.paths):
        with fits.open(path, mode="update") as hdul:
            header = hdul[0].header
            header["DATE-OBS"] = f"2025-03-0{k + 1}T21:00:00"
            if not marked:
                history = [str(line) for line in header["HISTORY"] if str(line) != "NSG.reference"]
                del header["HISTORY"]
                for line in history:
                    header.add_history(line)
    orders = [scene.paths, scene.paths[::-1], [scene.paths[k] for k in (3, 0, 4, 2, 1)]]
    outputs = []
    for k, paths in enumerate(orders):
        out = tmp_path / f"o{k}"
        stack(paths, out / "master.fits", weights="equal", backend="numpy", report=False)
        outputs.append([(out / name).read_bytes() for name in ("master.fits", "master_stack.csv")])
        with fits.open(out / "master.fits") as hdul:
            assert hdul[0].header["NSGSREJ"] == "auto" and hdul["REJHIGH"].data.sum() > 0
            assert hdul[0].header["DATE-OBS"] == "2025-03-01T21:00:00"  # frame_000: the reference, or first by name
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]


def test_the_twin_and_the_emulated_kernel_give_the_same_master(scenes, tmp_path, monkeypatch):
    """The whole stack with the kernel (host emulation) instead of the twin: identical bytes."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from emulation import EmulatedLauncher

    from nsg_gpu import kernels

    scene = scenes[24]
    stack(scene.paths, tmp_path / "twin.fits", backend="numpy", maps="none")
    launcher = EmulatedLauncher(multiprocessors=2)
    monkeypatch.setattr(kernels, "launcher_for", lambda on_gpu: launcher)
    stack(scene.paths, tmp_path / "kernel.fits", backend="numpy", maps="none")
    assert launcher.launches and launcher.launches[0][0] == "reject_combine_f32"
    assert (tmp_path / "twin.fits").read_bytes() == (tmp_path / "kernel.fits").read_bytes()


def test_colour_frames_and_noise_weights(tmp_path):
    """Three channels; --weights noise from the NOISE00 cards or, without them, measured."""
    scene = write_scene(tmp_path / "in", 6, seed=3, channels=3)
    result = stack(scene.paths, tmp_path / "m.fits", weights="noise", backend="numpy")
    master, maps, _ = _master(tmp_path / "m.fits")
    assert master.shape == (3, *SHAPE) and maps["COVERAGE"].shape == (3, *SHAPE)
    expected = (scene.sigma[0] / scene.sigma) ** 2
    relative = np.array([f.relative_weight for f in result.frames])
    np.testing.assert_allclose(relative, expected / expected.max(), rtol=1e-6)  # the cards
    # Without the cards the noise is measured: on frames of a size where its estimate is
    # sure to a few per cent (the second wavelet layer's samples are correlated over 2-4 px).
    large = write_scene(tmp_path / "large", 6, seed=3, channels=3, shape=(400, 600))
    for path in large.paths:
        with fits.open(path, mode="update") as hdul:
            for c in range(3):
                del hdul[0].header[f"NOISE0{c}"]
    measured = stack(large.paths, tmp_path / "m2.fits", weights="noise", backend="numpy")
    relative = np.array([f.relative_weight for f in measured.frames])
    truth = (large.sigma[0] / large.sigma) ** 2
    np.testing.assert_allclose(relative, truth / truth.max(), rtol=0.05)
    clean = scene.covered.all(axis=0) & ~scene.trail & ~scene.hot
    for c in range(3):
        assert np.abs(master[c] - scene.truth[c])[clean].std() < 1.05 * scene.ideal_noise()[clean].mean()


def test_noise_weights_from_noise_cards_follow_the_outputs_scale(tmp_path):
    """An output of nsg normalize keeps its input's NOISE0n (the calibration's noise, before
    the scale): a frame dimmed by cloud to transmission 0.5 is scaled by 2, and so is its
    noise, but --weights noise took the card as it was and gave it 4 times its weight."""
    scene = write_scene(tmp_path / "in", 4, seed=5)
    transmissions = [1.0, 0.5, 0.8, 1.25]
    for path, t, sigma in zip(scene.paths, transmissions, scene.sigma, strict=True):
        with fits.open(path, mode="update") as hdul:
            hdul[0].header["NSGS0"] = t
            hdul[0].header["NOISE00"] = float(sigma * t)  # the input's noise, before the scale 1 / t
    result = stack(scene.paths, tmp_path / "m.fits", weights="noise", backend="numpy")
    relative = np.array([f.relative_weight for f in result.frames])
    truth = (scene.sigma[0] / scene.sigma) ** 2  # the outputs' own noise
    np.testing.assert_allclose(relative, truth / truth.max(), rtol=1e-9)


def test_noise_weights_are_not_fooled_by_a_registrations_resampling(tmp_path):
    """Two frames of the same noise before registration, one resampled by a cubic spline at
    half a pixel in both axes (its pixel noise smoothed to about 0.7 of it): ``--weights noise``
    without NOISExx cards gave it twice the other's weight (a per-pixel estimate); it reads the
    noise as NWEIGHT does, where the interpolation keeps it, and the weights agree."""
    from scipy import ndimage

    rng = np.random.default_rng(8)
    shape, sigma = (600, 800), 0.01
    paths = []
    for k in range(2):
        data = 0.2 + rng.normal(0, sigma, shape)
        if k == 1:
            data = ndimage.shift(data, (0.5, 0.5), order=3, mode="nearest")
        header = fits.Header()
        header["NWEIGHT"] = 1.0
        if k == 0:
            header.add_history("NSG.reference")
        paths.append(tmp_path / f"f{k}_nsg.fits")
        fits.PrimaryHDU(data.astype(np.float32), header).writeto(paths[-1])
    assert np.std(fits.getdata(paths[1])) < 0.8 * np.std(fits.getdata(paths[0]))  # smoothed
    result = stack(paths, tmp_path / "m.fits", weights="noise", backend="numpy")
    relative = sorted(f.relative_weight for f in result.frames)
    assert relative[0] > 0.93 and relative[1] == 1.0, relative


def test_equal_and_keyword_weights(tmp_path):
    scene = write_scene(tmp_path / "in", 4, seed=4, keyword="MYWEIGHT")
    equal = stack(scene.paths, tmp_path / "e.fits", weights="equal", backend="numpy")
    assert {f.weight for f in equal.frames} == {(1.0,)}
    keyword = stack(scene.paths, tmp_path / "k.fits", weights="myweight", backend="numpy")
    assert [f.weight[0] for f in keyword.frames] == pytest.approx((scene.sigma[0] / scene.sigma) ** 2, rel=1e-6)
    with pytest.raises(StackError, match="no frame can be stacked: .*has no NWEIGHT card") as caught:
        stack(scene.paths, tmp_path / "n.fits", backend="numpy")
    # The reason once, with the frames it holds for (it was repeated for every frame).
    assert str(caught.value).count("has no NWEIGHT card") == 1 and "and 3 other frame(s)" in str(caught.value)


# -- inputs -----------------------------------------------------------------------------------------
def test_a_directory_means_the_accepted_outputs(tmp_path):
    """weights.csv's files (never rejected/); without it every frame file but a master."""
    scene = write_scene(tmp_path / "out", 5, seed=5)
    (tmp_path / "out" / "rejected").mkdir()
    rejected = tmp_path / "out" / "rejected" / "bad_nsg.fits"
    fits.PrimaryHDU(np.ones(SHAPE, np.float32), fits.Header([("NWEIGHT", 1.0)])).writeto(rejected)
    listed = [p.name for p in scene.paths[:4]]
    (tmp_path / "out" / "weights.csv").write_text("file,weight\n" + "".join(f"{n},1\n" for n in listed))
    result = stack(tmp_path / "out", tmp_path / "out" / "master.fits", backend="numpy")
    assert [f.path.name for f in result.frames] == listed
    (tmp_path / "out" / "weights.csv").unlink()
    again = stack(tmp_path / "out", tmp_path / "out" / "master2.fits", backend="numpy")
    # All five frames; not the master written beside them, nor rejected/.
    assert [f.path.name for f in again.frames] == [p.name for p in scene.paths]
    with pytest.raises(StackError, match="would overwrite an input"):
        stack(scene.paths, scene.paths[2], backend="numpy")


def test_bad_frames_are_left_out_with_their_reason(tmp_path):
    scene = write_scene(tmp_path / "in", 6, seed=6)
    fits.PrimaryHDU(np.ones((10, 10), np.float32), fits.Header([("NWEIGHT", 1.0)])).writeto(tmp_path / "a_small.fits")
    fits.PrimaryHDU(np.ones(SHAPE, np.float32)).writeto(tmp_path / "noweight.fits")
    (tmp_path / "garbage.fits").write_bytes(b"not a fits file" * 300)
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(scene.paths[2].read_bytes()[:-4000])
    # An empty frame marked as the reference (it would have been the noise map's first frame),
    # and a weight card astropy cannot parse.
    header = fits.getheader(scene.paths[0])
    assert "NSG.reference" in header["HISTORY"]
    fits.PrimaryHDU(np.zeros(SHAPE, np.float32), header).writeto(tmp_path / "zero.fits")
    unparsable = fits.PrimaryHDU(fits.getdata(scene.paths[1]), fits.getheader(scene.paths[1])).copy()
    unparsable.writeto(tmp_path / "unparsable.fits")
    raw = (tmp_path / "unparsable.fits").read_bytes()
    start = raw.index(b"NWEIGHT =")
    (tmp_path / "unparsable.fits").write_bytes(
        raw[:start] + b"NWEIGHT =                  NAN".ljust(80) + raw[start + 80 :]
    )
    # The wrong shape first in the stack's order (by name): the stack's shape is still the
    # reference's (the first so marked: the empty copy is last).
    bad = [tmp_path / "noweight.fits", tmp_path / "garbage.fits", truncated, tmp_path / "zero.fits"]
    inputs = [tmp_path / "a_small.fits", *scene.paths, *bad, tmp_path / "unparsable.fits"]
    result = stack(inputs, tmp_path / "m.fits", backend="numpy")
    errors = {f.path.name: f.error for f in result.skipped}
    shape_text = "is 10x10 mono but the stack's frames are 96x64 mono (the reference frame_000_nsg.fits's)"
    assert shape_text in errors["a_small.fits"]
    assert "has no NWEIGHT card" in errors["noweight.fits"]
    assert "cannot be read as FITS" in errors["garbage.fits"]
    assert "is truncated" in errors["truncated.fits"]
    assert "has no data (every sample is 0 or not finite)" in errors["zero.fits"]
    assert "its NWEIGHT card cannot be read" in errors["unparsable.fits"]
    assert all(str(tmp_path) in e for e in errors.values())  # every message names its file
    assert len(result.used) == 6 and fits.getheader(tmp_path / "m.fits")["NCOMBINE"] == 6
    assert result.rejection.reason.endswith("where all 6 frames cover")  # not the empty one's 7
    rows = list(csv.DictReader((tmp_path / "m_stack.csv").read_text().splitlines()))
    assert [r["status"] for r in rows] == ["skipped"] + ["used"] * 6 + ["skipped"] * 5
    # The good frames alone give the same master (the empty frame was not the noise map's).
    stack(scene.paths, tmp_path / "alone.fits", backend="numpy")
    np.testing.assert_array_equal(_master(tmp_path / "m.fits")[0], _master(tmp_path / "alone.fits")[0])
    # A frame given twice (through a link too) is stacked once.
    (tmp_path / "link.fits").symlink_to(scene.paths[2])
    twice = stack([*scene.paths, tmp_path / "link.fits"], tmp_path / "m4.fits", backend="numpy")
    assert len(twice.used) == 6 and "given twice (also as" in twice.skipped[0].error
    # Without a reference among them, the most frames' shape.
    mixed = [tmp_path / "a_small.fits", *scene.paths[1:4]]
    errors = {f.path.name: f.error for f in stack(mixed, tmp_path / "m3.fits", backend="numpy").skipped}
    assert "but the stack's frames are 96x64 mono (3 of the 4 frames')" in errors["a_small.fits"]
    with pytest.raises(StackError, match="garbage.fits"):  # the frames are read (by name), then their shapes compared
        stack(inputs, tmp_path / "m2.fits", backend="numpy", stop_on_error=True)
    with pytest.raises(StackError, match="a_small.fits"):
        stack(inputs[:7], tmp_path / "new" / "folder" / "m2.fits", backend="numpy", stop_on_error=True)
    assert not (tmp_path / "new").exists()  # nor the folders it made
    for extra, name in ((scene.paths[0], "given twice"), (tmp_path / "zero.fits", "has no data")):
        with pytest.raises(StackError, match=name):
            stack([*scene.paths, extra], tmp_path / "m5.fits", backend="numpy", stop_on_error=True)
    assert not (tmp_path / "m5.fits").exists()


def test_a_frame_in_other_units_is_left_out_named(tmp_path):
    """A frame in counts (65535 times) among frames in [0, 1], marked or not as the
    reference's: left out with its reason (it made a master of counts), the master that of
    the others; --stop-on-error stops on it."""
    scene = write_scene(tmp_path / "in", 4, seed=16)
    counts = tmp_path / "counts.fits"
    with fits.open(scene.paths[2]) as hdul:
        header = hdul[0].header.copy()
        fits.PrimaryHDU((hdul[0].data * 65535).astype(np.float32), header).writeto(counts)
    result = stack([*scene.paths, counts], tmp_path / "m.fits", backend="numpy", report=False)
    errors = {f.path.name: f.error for f in result.skipped}
    assert list(errors) == ["counts.fits"] and "units unlike the stack's" in errors["counts.fits"]
    assert "times the reference frame_000_nsg.fits's" in errors["counts.fits"]
    stack(scene.paths, tmp_path / "alone.fits", backend="numpy", report=False)
    np.testing.assert_array_equal(_master(tmp_path / "m.fits")[0], _master(tmp_path / "alone.fits")[0])
    unmarked = stack([*scene.paths[1:], counts], tmp_path / "u.fits", backend="numpy", report=False)
    assert [f.path.name for f in unmarked.skipped] == ["counts.fits"]
    assert "times the median frame's" in unmarked.skipped[0].error
    with pytest.raises(StackError, match="counts.fits: units unlike"):
        stack([*scene.paths, counts], tmp_path / "s.fits", backend="numpy", stop_on_error=True)


def test_what_names_no_frame_is_left_out_named(tmp_path):
    """A directory without frames, a path to nothing, a broken link and a device: each left
    out with its reason; the frames stacked."""
    scene = write_scene(tmp_path / "in", 3, seed=15)
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.fits").symlink_to(tmp_path / "gone.fits")
    named = [tmp_path / "empty", tmp_path / "nothing", tmp_path / "broken.fits", Path("/dev/null")]
    result = stack([*scene.paths, *named], tmp_path / "m.fits", backend="numpy")
    errors = [f.error for f in result.skipped]
    assert len(result.used) == 3 and errors == [  # in the stack's order: by name
        f"{tmp_path / 'broken.fits'}: is a link to nothing",
        f"{tmp_path / 'empty'}: is a directory holding no FITS or XISF frame (nor a weights.csv)",
        f"{tmp_path / 'nothing'}: no such file or directory",
        "/dev/null: is not a regular file",
    ]


def test_outputs_never_overwrite_inputs_or_each_other(tmp_path):
    """--csv, map files and the master are checked against the inputs (frames and an input
    directory's weights.csv) and each other before anything is read; a master of an earlier
    run in an input directory is not an input and may be replaced."""
    scene = write_scene(tmp_path / "in", 4, seed=12)
    victim = scene.paths[0]
    before = victim.read_bytes()
    cases = [
        (dict(output=tmp_path / "a" / "m.fits", csv_path=victim), "the --csv table would overwrite an input frame"),
        (dict(output=tmp_path / "b" / "m.fits", csv_path=tmp_path / "b" / "m.fits"), "would be the same file"),
        (dict(output=tmp_path / "in" / "frame_000_nsg.fits"), "the master would overwrite an input frame"),
    ]
    for options, message in cases:
        with pytest.raises(StackError, match=message):
            stack(scene.paths, backend="numpy", **options)
    with pytest.raises(ParameterError, match="the master is written as plain FITS; name it .fits"):
        stack(scene.paths, tmp_path / "m.xisf", backend="numpy")
    coverage = tmp_path / "c" / "m_coverage.fits"
    coverage.parent.mkdir()
    coverage.write_bytes(before)
    with pytest.raises(StackError, match="the coverage map would overwrite an input frame"):
        stack([coverage, *scene.paths[1:]], tmp_path / "c" / "m.fits", maps="files", backend="numpy")
    (tmp_path / "in" / "weights.csv").write_text("file,weight\n" + "".join(f"{p.name},1\n" for p in scene.paths))
    with pytest.raises(StackError, match="would overwrite the frame list of an input directory"):
        stack(tmp_path / "in", tmp_path / "in" / "weights.csv", backend="numpy")
    assert victim.read_bytes() == before and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # Into the input directory, twice: the first master (and its map files) is not an input.
    (tmp_path / "in" / "weights.csv").unlink()
    first = stack(tmp_path / "in", tmp_path / "in" / "master.fits", maps="files", backend="numpy")
    again = stack(tmp_path / "in", tmp_path / "in" / "master.fits", maps="files", backend="numpy")
    assert len(first.used) == len(again.used) == 4 and not again.skipped


def test_the_outputs_are_written_all_or_none(tmp_path):
    """A per-frame table that cannot be written (a folder of that name): no master and no maps."""
    scene = write_scene(tmp_path / "in", 4, seed=13)
    (tmp_path / "out" / "m_stack.csv").mkdir(parents=True)
    with pytest.raises(OutputError, match="m_stack.csv: cannot be written"):
        stack(scene.paths, tmp_path / "out" / "m.fits", maps="files", backend="numpy")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m_stack.csv"]
    # A master's name taken by a folder, its table into new folders: none of them left.
    (tmp_path / "taken" / "m.fits").mkdir(parents=True)
    csv_path = tmp_path / "new" / "deep" / "stack.csv"
    with pytest.raises(OutputError, match="m.fits: cannot be written"):
        stack(scene.paths, tmp_path / "taken" / "m.fits", csv_path=csv_path, backend="numpy")
    assert not (tmp_path / "new").exists() and sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["m.fits"]


def test_a_weights_csv_from_a_spreadsheet_or_not_a_csv(tmp_path):
    """A byte-order mark, CRLF and spaces around the names are read; bytes that are not text
    get one clear error naming the file."""
    scene = write_scene(tmp_path / "in", 4, seed=14)
    rows = "".join(f" {p.name} ,1\r\n" for p in scene.paths[:3])
    (tmp_path / "in" / "weights.csv").write_bytes(("\ufefffile,weight\r\n" + rows).encode())
    result = stack(tmp_path / "in", tmp_path / "m.fits", backend="numpy")
    assert [f.path.name for f in result.used] == [p.name for p in scene.paths[:3]]
    (tmp_path / "in" / "weights.csv").write_bytes(bytes(range(128, 256)) * 3)
    with pytest.raises(StackError, match=r"weights.csv: not a text CSV"):
        stack(tmp_path / "in", tmp_path / "m2.fits", backend="numpy")
    (tmp_path / "in" / "weights.csv").write_text("name,weight\nx,1\n")
    with pytest.raises(StackError, match=r"weights.csv: has no 'file' column"):
        stack(tmp_path / "in", tmp_path / "m2.fits", backend="numpy")


def test_compressed_integer_and_xisf_inputs_give_the_same_master(tmp_path):
    """.fits.gz, tile-compressed .fz and XISF are decompressed once; 16-bit data are scaled."""
    from nsg_gpu.io import read_frame, write_frame

    scene = write_scene(tmp_path / "in", 5, seed=7)
    plain = stack(scene.paths, tmp_path / "plain.fits", backend="numpy", maps="none")
    other = []
    for k, path in enumerate(scene.paths):
        frame = read_frame(path)
        header = frame.header.copy()
        if k == 0:
            target = tmp_path / "f0.fits.gz"
            fits.PrimaryHDU(frame.data[0], header).writeto(target)
        elif k == 1:
            target = tmp_path / "f1.fz"
            hdu = fits.CompImageHDU(frame.data[0], header, compression_type="GZIP_1", quantize_level=0.0)
            fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(target)
        elif k == 2:
            target = tmp_path / "f2.xisf"
            write_frame(target, frame.data, header)
        else:
            target = path
        other.append(target)
    mixed = stack(other, tmp_path / "mixed.fits", backend="numpy", maps="none")
    assert [f.spooled for f in mixed.frames] == [True, True, True, False, False]
    np.testing.assert_array_equal(fits.getdata(tmp_path / "mixed.fits"), fits.getdata(tmp_path / "plain.fits"))
    assert not list(tmp_path.glob(".nsg-stack-*"))  # the spool folder is gone
    # 16-bit integers with BZERO: the band reader gives read_frame's values.
    ints = []
    for k, path in enumerate(scene.paths):
        data = np.round(fits.getdata(path) * 60000).astype(np.uint16)
        target = tmp_path / f"int{k}.fits"
        fits.PrimaryHDU(data, fits.getheader(path)).writeto(target)
        ints.append(target)
    stack(ints, tmp_path / "ints.fits", rejection="none", weights="equal", backend="numpy", maps="none")
    frames = np.stack([read_frame(p).data[0].astype(np.float64) for p in ints])
    covered = frames != 0
    expected = (frames * covered).sum(axis=0) / np.maximum(covered.sum(axis=0), 1)
    np.testing.assert_allclose(fits.getdata(tmp_path / "ints.fits"), expected, rtol=1e-6)
    assert plain.band_rows >= 1


def test_the_open_file_limit_is_respected(tmp_path):
    """With fewer file descriptors than frames the frames are opened per read: same master."""
    scene = write_scene(tmp_path / "in", 40, seed=8, borders=False)
    stack(scene.paths, tmp_path / "free.fits", backend="numpy", maps="none", memory=PROCESS_RESERVE + 3_000_000)
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))\n"
        "from nsg_gpu.stack_inputs import ensure_open_files\n"
        "from nsg_gpu.stacking import stack\n"
        "assert not ensure_open_files(104)\n"
        f"r = stack(sys.argv[1:], {str(tmp_path / 'limited.fits')!r}, backend='numpy', maps='none', "
        f"memory={PROCESS_RESERVE + 3_000_000})\n"
        "assert r.bands > 1, r.bands\n"
    )
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code, *map(str, scene.paths)], capture_output=True, text=True,
                          env=environment)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "free.fits").read_bytes() == (tmp_path / "limited.fits").read_bytes()


def test_memory_budget(tmp_path):
    scene = write_scene(tmp_path / "in", 3, seed=9)
    with pytest.raises(StackError, match="too small"):
        stack(scene.paths, tmp_path / "m.fits", memory="100M", backend="numpy")
    rows = plan_bands(parse_memory("24G"), n_frames=500, channels=1, height=4176, width=6248, threads=16)
    assert rows >= 100  # 500 frames of 26 MP in bands of at least 100 rows on a 24 GB machine
    assert plan_bands(parse_memory("24G"), n_frames=500, channels=1, height=4176, width=6248, gpu=True) >= 100
    # Noise clipping's peaks: a chunk of samples' working set per thread, and a band row of peaks
    # and noise.
    frames = dict(n_frames=5, channels=1, height=4176, width=6248, threads=2)
    plain = plan_bands(parse_memory("2G"), **frames)
    clipped = plan_bands(parse_memory("2G"), **frames, noise_clipping=True)
    budget = parse_memory("2G") - PROCESS_RESERVE - 4176 * 6248 * 10 - 2 * 96 * (1 << 20) - 2 * PEAK_BYTES
    assert clipped == min(4176, budget // (2 * 5 * 6248 * 4 + 8 * 6248 + 8 * 6248)) < plain


def test_outputs_cards_maps_and_progress(tmp_path):
    scene = write_scene(tmp_path / "in", 9, seed=10)
    seen = []
    result = stack(
        scene.paths,
        tmp_path / "out" / "m.fits",
        maps="files",
        memory=PROCESS_RESERVE + 1_000_000,
        backend="numpy",
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(k + 1, result.bands) for k in range(result.bands)] and result.bands > 1
    data, maps, header = _master(tmp_path / "out" / "m.fits")
    assert maps == {} and sorted(p.name for p in (tmp_path / "out").glob("m_*.fits")) == [
        "m_coverage.fits",
        "m_rejhigh.fits",
        "m_rejlow.fits",
    ]
    assert header["NSGSTACK"].startswith("nsg-gpu") and header["OBJECT"] == "SCENE"
    assert "NWEIGHT" not in header and "NSGREF" not in header and "NOISE00" not in header
    history = [str(h) for h in header["HISTORY"]]
    assert "NSG.parameters of the normalization" not in history
    assert "NSG.stack weights: NWEIGHT" in history
    assert "NSG.stack rejection: auto, by the frames with data at each pixel:" in history
    assert "NSG.stack   8-10 frames: sigma clipping low 3.5 high 2.5 sigma" in history
    assert all(len(h) <= 72 for h in history)  # one card each
    assert sum(h.startswith("NSG.stack frame ") for h in history) == 9
    assert "frame_008_nsg.fits weight" in history[-1]
    rows = list(csv.DictReader((tmp_path / "out" / "m_stack.csv").read_text().splitlines()))
    assert [Path(r["file"]).name for r in rows] == [p.name for p in scene.paths]
    shares = [float(r["rejected_share"]) for r in rows]
    assert shares[1] == max(shares)  # the trail's frame
    assert float(rows[0]["covered_share"]) == 1.0 and float(rows[3]["covered_share"]) < 1.0
    assert header["NSGSRJH"] == pytest.approx(result.rejected_high_share, rel=1e-5)


def test_library_export():
    assert nsg_gpu.stack is stack


# -- command line and report ------------------------------------------------------------------------
def test_cli_stack(tmp_path):
    scene = write_scene(tmp_path / "in", 5, seed=11)
    fits.PrimaryHDU(np.ones(SHAPE, np.float32)).writeto(tmp_path / "in" / "zz_noweight.fits")
    out = tmp_path / "out" / "master.fits"
    result = runner.invoke(app, ["stack", str(tmp_path / "in"), "-o", str(out), "--backend", "numpy"])
    assert result.exit_code == 3, result.output  # a frame was left out
    assert "stacked 5 frames into" in result.stdout and "noise clipping" in result.stdout
    assert "zz_noweight.fits: has no NWEIGHT card" in result.stderr
    page = (tmp_path / "out" / "master_report.html").read_text()  # the master's own page
    assert '<h2 id="stack">Stack</h2>' in page and "frame_004_nsg.fits" in page
    for name in ("stack_master.png", "stack_coverage.png", "stack_rejection.png"):
        assert (tmp_path / "out" / "plots" / f"master_report_{name}").stat().st_size > 1000
        assert f'src="plots/master_report_{name}"' in page
    lines = runner.invoke(
        app,
        ["stack", *map(str, scene.paths), "-o", str(out), "--json", "--rejection", "sigma", "--high", "2", "--backend", "numpy"],
    )  # fmt: skip
    assert lines.exit_code == 0, lines.output
    events = [json.loads(line) for line in lines.stdout.splitlines()]
    assert events[-1]["event"] == "stack" and events[-1]["rejection"] == "sigma" and events[-1]["frames"] == 5
    assert all(e["event"] == "band" for e in events[:-1]) and events[-2]["done"] == events[-2]["total"]
    bad = runner.invoke(app, ["stack", str(tmp_path / "in"), "-o", str(out), "--rejection", "esd", "--low", "3"])
    assert bad.exit_code == 1 and "generalized ESD takes no --low" in bad.output


def test_report_section_replaces_itself_and_joins_a_run_report(tmp_path):
    from nsg_gpu.htmlreport import add_stack_section

    scene = write_scene(tmp_path / "in", 4, seed=12)
    result = stack(scene.paths, tmp_path / "m.fits", backend="numpy")
    page = tmp_path / "report.html"
    page.write_text('<html><body><h1>run</h1><h2 id="parameters">Parameters</h2></body></html>')
    add_stack_section(page, result)
    add_stack_section(page, result)
    text = page.read_text()
    assert text.count('<h2 id="stack">') == 1
    assert text.index('<h2 id="stack">') < text.index('<h2 id="parameters">') and "<h1>run</h1>" in text
    assert 'src="plots/stack_master.png"' in text and 'href="m_stack.csv"' in text


def test_two_masters_in_one_folder_keep_their_own_table_and_page(tmp_path):
    """Two masters stacked into one folder (a filter each) shared stack.csv, report.html and its
    images: the second replaced the first's. Each now has ``<stem>_stack.csv`` and
    ``<stem>_report.html`` with its own images."""
    red = write_scene(tmp_path / "red", 4, seed=21)
    blue = write_scene(tmp_path / "blue", 5, seed=22)
    stack(red.paths, tmp_path / "masters" / "R.fits", backend="numpy", report=True)
    stack(blue.paths, tmp_path / "masters" / "B.fits", backend="numpy", report=True)
    folder = tmp_path / "masters"
    for stem, count in (("R", 4), ("B", 5)):
        rows = list(csv.DictReader((folder / f"{stem}_stack.csv").read_text().splitlines()))
        assert len(rows) == count
        page = (folder / f"{stem}_report.html").read_text()
        assert f"{count} stacked" in page and f'href="{stem}_stack.csv"' in page
        assert f'src="plots/{stem}_report_stack_master.png"' in page
        assert (folder / "plots" / f"{stem}_report_stack_master.png").is_file()
    assert not (folder / "stack.csv").exists() and not (folder / "report.html").exists()


def test_the_master_gets_the_mode_the_umask_gives(tmp_path):
    scene = write_scene(tmp_path / "in", 3, seed=12, borders=False)
    previous = os.umask(0o022)
    try:
        stack(scene.paths, tmp_path / "master.fits", backend="numpy", maps="files")
    finally:
        os.umask(previous)
    written = [p for p in tmp_path.iterdir() if p.suffix in (".fits", ".csv")]
    assert written and all(p.stat().st_mode & 0o777 == 0o644 for p in written), [oct(p.stat().st_mode) for p in written]


@pytest.mark.parametrize("n_frames", [1, 2])
def test_a_method_asked_on_one_or_two_frames_says_it_rejects_nothing(tmp_path, n_frames):
    """Sigma clipping chosen by name on two frames: the plain weighted average (neither sample
    can be told to be the outlier), and the summary, header and results say none, and why."""
    scene = write_scene(tmp_path / "in", n_frames, seed=3, borders=False)
    out = tmp_path / "master.fits"
    run = runner.invoke(app, ["stack", *map(str, scene.paths), "-o", str(out), "--rejection", "sigma"])
    assert run.exit_code == 0, run.output
    assert f"sigma clipping asked, but {n_frames} frame(s) are too few to reject pixels: none" in run.output
    master, maps, header = _master(out)
    assert header["NSGSREJ"] == "none" and "rejection: none" in str(header["HISTORY"])
    data = []
    for path in scene.paths:
        with fits.open(path) as hdul:
            data.append((np.asarray(hdul[0].data, np.float64), hdul[0].header["NWEIGHT"]))
    expected = sum(w * d for d, w in data) / sum(w for _, w in data)
    np.testing.assert_allclose(master[0], expected, rtol=1e-6, atol=1e-8)
    assert not maps["REJLOW"].any() and not maps["REJHIGH"].any()
    assert "0 % of the samples low, 0 % high" in run.output


def test_noise_clipping_measures_each_frame_against_its_own_noise(tmp_path):
    """Five frames, one three times as noisy (a ninth of the weight): its clean samples stay
    (about the 0.14 % beyond 3 sigma of a normal draw, not the 5 % beyond the frames' mean
    noise), and outliers of 4.5 of a clean frame's sigma go (the mean noise would hide them)."""
    rng = np.random.default_rng(21)
    h, w = 96, 128
    sigma = np.array([1.0, 1.0, 1.0, 1.0, 3.0]) * 0.002
    yy, xx = np.mgrid[0:h, 0:w]
    truth = 0.1 + 0.01 * np.sin(xx / 13.0) * np.cos(yy / 9.0)
    outliers = np.zeros((h, w), bool)
    outliers[rng.integers(0, h, 300), rng.integers(0, w, 300)] = True
    paths = []
    for k, s in enumerate(sigma):
        data = truth + rng.normal(0, s, (h, w))
        if k == 1:
            data[outliers] += 4.5 * s
        header = fits.Header()
        header["NWEIGHT"] = (sigma[0] / s) ** 2
        if k == 0:
            header.add_history("NSG.reference")
        path = tmp_path / f"frame_{k}_nsg.fits"
        fits.PrimaryHDU(data.astype(np.float32), header=header).writeto(path)
        paths.append(path)
    result = stack(paths, tmp_path / "master.fits", backend="numpy", rejection="noise")
    noisy = result.frames[4]
    assert (noisy.rejected_low + noisy.rejected_high) / (h * w) < 0.006
    caught = result.frames[1].rejected_high / outliers.sum()
    assert caught > 0.8, caught
    master, _, _ = _master(tmp_path / "master.fits")
    ideal = 1 / np.sqrt(np.sum(1 / sigma**2))
    clean = ~outliers
    assert (master[0] - truth)[clean].std() / ideal < 1.03


def test_a_frame_of_absurd_weight_leaves_the_others_clipped(tmp_path):
    """NWEIGHT 1e-300 on one frame of five (no real frame's, but a header can say it): that
    frame takes no part in the average and is never clipped, and the others' trail and hot
    pixels still go (the frames' mean noise, which it made 1e150 times the others', once
    turned their clipping off)."""
    scene = write_scene(tmp_path / "in", 5, seed=8, borders=False)
    with fits.open(scene.paths[3], mode="update") as hdul:
        hdul[0].header["NWEIGHT"] = 1e-300
    result = stack(scene.paths, tmp_path / "master.fits", backend="numpy")
    master, _, _ = _master(tmp_path / "master.fits")
    assert result.frames[3].rejected_low + result.frames[3].rejected_high == 0
    residual = master[0] - scene.truth[0]
    sigma = np.delete(scene.sigma, 3)
    ideal = 1 / np.sqrt(np.sum(1 / sigma**2))
    for defect in (scene.trail, scene.hot):
        assert np.all(np.abs(residual[defect]) < 6 * ideal), np.abs(residual[defect]).max() / ideal
    assert result.frames[1].rejected_high >= scene.trail.sum()


def test_one_normalized_frame_written_twice_is_stacked_once(tmp_path):
    """Outputs of one input, reference and settings (one NSGHASH: a second run with another
    --postfix, a copy in another folder) are left out after the first, named, and the master
    is the stack of the frames without them."""
    scene = write_scene(tmp_path / "in", 4, seed=12, borders=False)
    for k, path in enumerate(scene.paths):
        with fits.open(path, mode="update") as hdul:
            hdul[0].header["NSGHASH"] = f"{k:032x}"
    copy = tmp_path / "again" / "frame_002_nsg_b.fits"
    copy.parent.mkdir()
    shutil.copy(scene.paths[2], copy)
    result = stack([tmp_path / "in", copy], tmp_path / "master.fits", backend="numpy")
    assert [f.error is None for f in result.frames] == [True, True, True, False, True]  # by name
    assert result.frames[3].error == (
        f"{copy}: is the same normalized frame as {scene.paths[2]} (one NSGHASH and the same pixels: the same "
        "input, reference and settings, written twice); stacked once"
    )
    stack(scene.paths, tmp_path / "alone.fits", backend="numpy")
    np.testing.assert_array_equal(_master(tmp_path / "master.fits")[0], _master(tmp_path / "alone.fits")[0])
    with pytest.raises(StackError, match="same normalized frame"):
        stack([*scene.paths, copy], tmp_path / "stopped.fits", backend="numpy", stop_on_error=True)
    # One NSGHASH but other pixels or another transmission: not one normalization (inputs of
    # one name, size and time from two nights), so both are stacked.
    with fits.open(copy, mode="update") as hdul:
        hdul[0].data *= np.float32(1.01)
    both = stack([*scene.paths, copy], tmp_path / "both.fits", backend="numpy")
    assert all(f.error is None for f in both.frames)
    shutil.copy(scene.paths[2], copy)  # the same pixels again
    with fits.open(copy, mode="update") as hdul:
        hdul[0].header["NSGS0"] = 0.9
    both = stack([*scene.paths, copy], tmp_path / "both2.fits", backend="numpy")
    assert all(f.error is None for f in both.frames)


@pytest.mark.parametrize(
    ("cards", "weights"),
    [
        ({0: 1e-170}, "NWEIGHT"),  # the reference 1e330 times lighter than the others
        ({1: 1e300, 2: 1e-300}, "NWEIGHT"),
        ({0: 1e-170}, "noise"),  # NOISE00 of the reference: 1/noise^2 overflows
        ({1: 1e170}, "noise"),  # 1/noise^2 underflows
    ],
    ids=["tiny-reference", "both-ends", "noise-overflow", "noise-underflow"],
)
def test_weights_at_the_ends_of_the_range_stack_or_name_the_frame(tmp_path, cards, weights):
    """Weights no real frame has: the stack still finishes, each frame's noise clipping scaled
    without a NaN, and a noise whose weight is not a finite positive number leaves its frame
    out with that said."""
    scene = write_scene(tmp_path / "in", 4, seed=6, borders=False)
    for k, value in cards.items():
        with fits.open(scene.paths[k], mode="update") as hdul:
            hdul[0].header["NWEIGHT" if weights == "NWEIGHT" else "NOISE00"] = value
    result = stack(scene.paths, tmp_path / "master.fits", backend="numpy", weights=weights)
    master, _, _ = _master(tmp_path / "master.fits")
    assert np.all(np.isfinite(master))
    if weights == "noise":
        (k,) = cards
        assert result.frames[k].error == (
            f"{scene.paths[k]}: its noise {cards[k]:g} gives no finite positive weight 1/noise^2"
        )
        assert sum(f.error is None for f in result.frames) == 3
    else:
        assert all(f.error is None for f in result.frames)


def test_a_killed_stacks_temporaries_are_removed_by_the_next(tmp_path):
    """The half-written files a killed stack leaves beside its outputs (the master, its table,
    a map file, its page) are removed by the next stack there; other files are not."""
    scene = write_scene(tmp_path / "in", 3, seed=17)
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / f".{name}.abc123.tmp" for name in ("m.fits", "m_stack.csv", "m_coverage.fits", "m_report.html")]
    for path in stale:
        path.write_text("half-written")
    kept = out / ".notes.txt.abc123.tmp"
    kept.write_text("not ours")
    stack(scene.paths, out / "m.fits", backend="numpy", maps="files")
    assert not any(path.exists() for path in stale) and kept.exists()
