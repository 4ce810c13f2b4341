"""Integration of normalized frames: weights, pixel rejection, coverage, streamed in row bands.

``nsg stack`` is the step after ``nsg normalize``: the weighted average of the frames, pixel by
pixel, over the samples that have data (0 means none) and survive a rejection chosen, like
NSG's set-up of ImageIntegration, by the number of frames. The frames never have to fit in
memory: they are read in bands of rows, every file once (uncompressed FITS directly from its
data, compressed FITS and XISF decompressed once into a spool file), and a band of every frame
is combined while the next is read. The per-pixel work is :func:`reject_combine`: the CUDA
kernel ``reject_combine_f32`` (``kernels/stack.cu``) for CuPy arrays, and its NumPy twin,
vectorized over pixels, on the CPU; the two agree bit for bit, and the result does not depend
on the band height, the pixel chunks or the number of threads.

The rejection methods follow PixInsight ImageIntegration's definitions (our own code); where
ours differ, the docstring of :func:`reject_combine` says how and why.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import kernels
from .backend import get_backend
from .errors import NSGError

__all__ = [
    "METHODS",
    "METHOD_TITLES",
    "THRESHOLDS",
    "Rejection",
    "BandResult",
    "StackError",
    "auto_rejection",
    "esd_critical_values",
    "reject_combine",
]

#: Rejection methods, in the order of their kernel codes.
METHODS = ("none", "percentile", "sigma", "winsorized", "esd", "linear")
METHOD_TITLES = {
    "none": "no rejection",
    "percentile": "percentile clipping",
    "sigma": "sigma clipping",
    "winsorized": "winsorized sigma clipping",
    "esd": "generalized extreme studentized deviate (ESD)",
    "linear": "linear fit clipping",
}
_CODES = {name: code for code, name in enumerate(METHODS)}
#: Default (low, high) thresholds: NSG's set-up of ImageIntegration, PixInsight's for linear fit.
THRESHOLDS = {"percentile": (0.2, 0.1), "sigma": (3.5, 2.5), "winsorized": (3.5, 2.2), "linear": (5.0, 4.0)}
#: Winsorization cut-off (sigma) of the first iteration: NSG's set-up.
WINSORIZATION_CUTOFF = 3.5
#: Generalized ESD: significance, largest share of outliers, low relaxation (PixInsight's defaults).
ESD_ALPHA, ESD_OUTLIERS, ESD_LOW_RELAXATION = 0.05, 0.3, 1.0
#: Huber iterations of one winsorization at most, and bisection steps of the LAD line fit
#: (``HUBER_ITERATIONS`` and ``LAD_STEPS`` in kernels/stack.cu).
HUBER_ITERATIONS = 100
LAD_STEPS = 48
#: Samples (frames x pixels) the CPU twin works on at a time: bounds its temporaries.
CHUNK_SAMPLES = 1 << 21


class StackError(NSGError):
    """The stack cannot be made (no usable frame, a bad option, an output it cannot write)."""


# -- rejection settings -----------------------------------------------------------------------------
def auto_rejection(n_frames: int) -> tuple[str, str]:
    """The method NSG sets ImageIntegration up with for ``n_frames``, and why."""
    if n_frames <= 2:
        return "none", f"{n_frames} frame(s): too few to reject pixels"
    if n_frames < 8:
        return "percentile", f"{n_frames} frames: percentile clipping below 8 frames"
    if n_frames <= 10:
        return "sigma", f"{n_frames} frames: sigma clipping from 8 to 10 frames"
    if n_frames < 20:
        return "winsorized", f"{n_frames} frames: winsorized sigma clipping from 11 to 19 frames"
    return "esd", f"{n_frames} frames: generalized ESD from 20 frames"


@dataclass(frozen=True)
class Rejection:
    """How pixels are rejected before the average.

    Parameters
    ----------
    method : str
        ``"auto"`` (by the frame count, as NSG does: :func:`auto_rejection`) or one of
        :data:`METHODS`.

    low, high : float, optional
        Thresholds below and above the centre: fractions of the median for ``percentile``,
        sigmas for ``sigma``, ``winsorized`` and ``linear``; :data:`THRESHOLDS` when not
        given. ``esd`` takes none.

    clip_low, clip_high : bool
        Reject on that side at all.

    cutoff : float
        Winsorized clipping: in its first iteration, samples farther than ``cutoff`` sigma
        are set to the centre instead of to the winsorization bound; 0 turns that off.

    esd_alpha, esd_outliers, esd_low_relaxation : float
        Generalized ESD: significance of the test, largest share of the samples that may be
        outliers, and the factor low deviations are divided by (1: symmetric).

    reason : str
        Why this method (filled in by :meth:`resolve`).
    """

    method: str = "auto"
    low: float | None = None
    high: float | None = None
    clip_low: bool = True
    clip_high: bool = True
    cutoff: float = WINSORIZATION_CUTOFF
    esd_alpha: float = ESD_ALPHA
    esd_outliers: float = ESD_OUTLIERS
    esd_low_relaxation: float = ESD_LOW_RELAXATION
    reason: str = ""

    def resolve(self, n_frames: int) -> Rejection:
        """This setting with the method and thresholds made concrete for ``n_frames`` frames.

        Raises
        ------
        ValueError
            An unknown method, or thresholds out of range for the method.
        """
        method = str(self.method).lower()
        reason = self.reason or "chosen"
        if method == "auto":
            if self.low is not None or self.high is not None:
                raise ValueError("--low/--high set the thresholds of one method: choose it with --rejection")
            method, reason = auto_rejection(n_frames)
        if method not in METHODS:
            raise ValueError(f"unknown rejection method {self.method!r}; choose auto or one of {', '.join(METHODS)}")
        low, high = self.low, self.high
        if method in THRESHOLDS:
            default_low, default_high = THRESHOLDS[method]
            low = default_low if low is None else float(low)
            high = default_high if high is None else float(high)
            least = 0.0 if method == "percentile" else None
            for name, value in (("low", low), ("high", high)):
                if not math.isfinite(value) or (value < 0 if least == 0.0 else value <= 0):
                    bound = "at least 0" if least == 0.0 else "above 0"
                    raise ValueError(f"--{name} {value:g} for {METHOD_TITLES[method]}: it must be {bound}")
        elif low is not None or high is not None:
            if method == "esd":
                raise ValueError(
                    "generalized ESD takes no --low/--high: set --esd-alpha, --esd-outliers and --esd-low-relaxation"
                )
            raise ValueError("--low/--high need a rejection method; --rejection none has no thresholds")
        if not (self.cutoff == 0 or self.cutoff > 1.5):
            raise ValueError(f"winsorization cut-off {self.cutoff:g}: use 0 (off) or a value above 1.5 sigma")
        if not 0 < self.esd_alpha < 1:
            raise ValueError(f"ESD significance {self.esd_alpha:g}: it must be between 0 and 1")
        if not 0 < self.esd_outliers <= 1:
            raise ValueError(f"ESD outliers share {self.esd_outliers:g}: it must be in (0, 1]")
        if not self.esd_low_relaxation >= 1:
            raise ValueError(f"ESD low relaxation {self.esd_low_relaxation:g}: it must be at least 1")
        return dataclasses.replace(self, method=method, low=low, high=high, reason=reason)

    def describe(self) -> str:
        """One line naming the method and its thresholds (resolved settings)."""
        method = self.method
        if method == "auto":
            return "auto (by the frame count)"
        if method == "none":
            return "none"
        if method == "percentile":
            text = f"percentile clipping, low {self.low:g}, high {self.high:g} (fractions of the median)"
        elif method == "esd":
            text = (
                f"generalized ESD, significance {self.esd_alpha:g}, outliers up to {self.esd_outliers:g} of the "
                f"samples, low relaxation {self.esd_low_relaxation:g}"
            )
        else:
            text = f"{METHOD_TITLES[method]}, low {self.low:g} sigma, high {self.high:g} sigma"
            if method == "winsorized":
                text += f", cut-off {self.cutoff:g} sigma" if self.cutoff else ", no cut-off"
        if not self.clip_low:
            text += "; low side kept"
        if not self.clip_high:
            text += "; high side kept"
        return text


@functools.lru_cache(maxsize=16)
def esd_critical_values(n_frames: int, alpha: float, outliers: float) -> np.ndarray:
    """Rosner's critical values ``lambda[n, i]`` of the generalized ESD test.

    Row ``n`` (0 to ``n_frames``) holds, for a sample of ``n`` values and test ``i`` (0-based,
    ``i < k(n) = clip(floor(outliers * n), 1, n - 2)``),
    ``(n-i-1) t / sqrt((n-i-2 + t^2)(n-i))`` with ``t`` the upper ``alpha / (2 (n-i))``
    point of Student's t with ``n-i-2`` degrees of freedom. Rows below 3 are 0.
    """
    import scipy.stats

    k_max = max([1] + [_esd_tests(n, outliers) for n in range(3, n_frames + 1)])
    table = np.zeros((n_frames + 1, k_max), np.float64)
    for n in range(3, n_frames + 1):
        k = _esd_tests(n, outliers)
        i = np.arange(k, dtype=np.float64)
        t = scipy.stats.t.isf(alpha / (2.0 * (n - i)), n - i - 2)
        table[n, :k] = t * (n - i - 1) / np.sqrt((n - i - 2 + t * t) * (n - i))
    table.setflags(write=False)
    return table


def _esd_tests(n: int, outliers: float) -> int:
    # The kernel's k: floor(outliers * n) in double, clamped to [1, n - 2].
    return min(max(int(outliers * float(n)), 1), n - 2)


# -- the per-pixel work: kernel and twin --------------------------------------------------------------
@dataclass
class BandResult:
    """What :func:`reject_combine` returns for ``n_pixels`` pixels of ``n_frames`` frames.

    Arrays are on the backend of the input.
    """

    master: Any  # float32 (n_pixels,)
    coverage: Any  # int32 (n_pixels,): samples with data
    low: Any  # int32 (n_pixels,): samples rejected low
    high: Any  # int32 (n_pixels,): samples rejected high
    flags: Any  # uint8 (n_frames, n_pixels): 1 rejected low, 2 rejected high, else 0
    frame_low: Any  # int64 (n_frames,): per frame, samples rejected low
    frame_high: Any  # int64 (n_frames,)


def reject_combine(values, weights, rejection: Rejection, *, launcher=None) -> BandResult:
    """Reject outlying samples and average the rest, pixel by pixel.

    Parameters
    ----------
    values : float32 array (n_frames, n_pixels)
        Frame ``i``'s sample of pixel ``p`` at ``[i, p]``; 0 and non-finite samples are no
        data. NumPy or CuPy.

    weights : sequence of float (n_frames,)
        Positive weight of each frame.

    rejection : Rejection
        Resolved settings (:meth:`Rejection.resolve`).

    launcher : optional
        Runs the ``reject_combine_f32`` kernel (:data:`nsg_gpu.kernels.DEVICE`, or the
        tests' host emulation); CuPy arrays always do.

    Returns
    -------
    BandResult

    Notes
    -----
    For each pixel the ``n`` samples with data are sorted by value (ties by frame); a
    method rejects some, and the master is ``sum(w x) / sum(w)`` over the rest, in double,
    summed in sorted order, rounded to float32 (0 where no frame has data). All
    statistics are in double. With ``c`` the centre and ``s`` the scale of a method, a sample
    ``x`` is rejected low when ``(c - x) / s > low`` and high when ``(x - c) / s > high``:

    - ``percentile`` (``n >= 2``): one pass, ``c = s = `` the median (skipped where
      ``1 + median == 1``).
    - ``sigma`` (``n >= 3``): ``c`` the median, ``s`` the sample standard deviation of the
      remaining samples (PixInsight's: robustness comes from the median centre and the
      iteration), repeated until nothing is rejected or fewer than 3 remain.
    - ``winsorized`` (``n >= 3``): as ``sigma`` with ``c, s`` from a Huber winsorization of
      the remaining samples: start from the median and ``1.4826 MAD``, clamp the samples to
      ``c +- 1.5 s`` (in the first outer iteration, those beyond ``cutoff`` sigma are set to
      ``c``), ``c = `` their mean, ``s = 1.134 x`` their standard deviation; repeat until
      ``s`` changes by less than 0.05 % (from the second step; at most
      :data:`HUBER_ITERATIONS`). PixInsight starts from ``1.1926 Sn`` and clamps the
      clamped values again each step; MAD costs O(n) on sorted samples, Sn O(n^2), and
      clamping the original samples each step is Huber's definition.
    - ``esd`` (``n >= 3``): Rosner's generalized ESD: up to ``k = clip(floor(outliers n),
      1, n - 2)`` times, the sample farthest from the mean of the remaining samples in units
      of their standard deviation (low deviations divided by the low relaxation) is removed,
      its statistic ``R_i`` kept; the outliers are the first ``r`` removed, ``r`` the largest
      ``i`` with ``R_i > lambda_i`` (:func:`esd_critical_values`). (PixInsight centres on a
      trimmed mean and stops at the first ``R_i <= lambda_i``.)
    - ``linear`` (``n >= 5``): the sorted samples ``y_j`` against their rank ``j`` are fitted
      by a least-absolute-deviation line ``a + b j`` (bisection of ``b`` in
      ``[0, y_max - y_min]`` on the sign of ``sum j sign(y_j - a - b j)``, ``a`` the median
      of ``y_j - b j``, :data:`LAD_STEPS` steps); ``s = 2 mean|residual| sqrt(1 + b^2)``,
      and a sample is rejected when its distance below (above) the line is at least
      ``low`` (``high``) times ``s``; repeated on the ranks of the remaining samples until
      nothing is rejected or fewer than 3 remain.

    A side with ``clip_low`` (``clip_high``) off is never rejected.
    """
    be = get_backend(values)
    launcher = launcher or kernels.launcher_for(be.is_gpu)
    n_frames, n_pixels = values.shape
    weights = np.asarray(weights, np.float64).reshape(-1)
    if weights.size != n_frames:
        raise ValueError(f"{weights.size} weights for {n_frames} frames")
    if rejection.method not in METHODS:
        raise ValueError("resolve the rejection settings first (Rejection.resolve)")
    if launcher is None:
        return _reject_combine_twin(np.asarray(values, np.float32), weights, rejection)
    xp = be.xp
    values = xp.ascontiguousarray(values, dtype=xp.float32)
    table = None
    stride = 0
    if rejection.method == "esd":
        host_table = esd_critical_values(n_frames, float(rejection.esd_alpha), float(rejection.esd_outliers))
        table = xp.asarray(np.ascontiguousarray(host_table))
        stride = host_table.shape[1]
    sorted_values = xp.empty((n_frames, n_pixels), xp.float32)
    order = xp.empty((n_frames, n_pixels), xp.int32)
    work = xp.empty((n_frames, n_pixels), xp.float64) if rejection.method == "linear" else None
    master = xp.empty(n_pixels, xp.float32)
    coverage = xp.empty(n_pixels, xp.int32)
    low = xp.empty(n_pixels, xp.int32)
    high = xp.empty(n_pixels, xp.int32)
    flags = xp.empty((n_frames, n_pixels), xp.uint8)
    if n_pixels:
        launcher(
            "reject_combine_f32",
            launcher.config("reject_combine_f32", n_pixels),
            (
                values,
                xp.asarray(weights),
                n_frames,
                n_pixels,
                _CODES[rejection.method],
                float(rejection.low or 0.0),
                float(rejection.high or 0.0),
                int(bool(rejection.clip_low)),
                int(bool(rejection.clip_high)),
                float(rejection.cutoff),
                table,
                stride,
                float(rejection.esd_outliers),
                float(rejection.esd_low_relaxation),
                sorted_values,
                order,
                work,
                master,
                coverage,
                low,
                high,
                flags,
            ),
        )
    return BandResult(
        master,
        coverage,
        low,
        high,
        flags,
        (flags == 1).sum(axis=1, dtype=xp.int64),
        (flags == 2).sum(axis=1, dtype=xp.int64),
    )


def _ordered_bits(values: np.ndarray) -> np.ndarray:
    """float32 bits mapped to uint32 so that their order is the floats' order."""
    bits = values.view(np.uint32)
    return np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))


def _float_of_ordered(ordered: np.ndarray) -> np.ndarray:
    bits = np.where(ordered & np.uint32(0x80000000), ordered & np.uint32(0x7FFFFFFF), ~ordered)
    return bits.view(np.float32)


def _reject_combine_twin(values: np.ndarray, weights: np.ndarray, rejection: Rejection) -> BandResult:
    """The NumPy twin of ``reject_combine_f32``, in chunks of pixels."""
    n_frames, n_pixels = values.shape
    step = max(1, CHUNK_SAMPLES // max(1, n_frames))
    parts = [
        _twin_chunk(np.ascontiguousarray(values[:, start : start + step]), weights, rejection)
        for start in range(0, n_pixels, step)
    ] or [_twin_chunk(values, weights, rejection)]
    if len(parts) == 1:
        return parts[0]
    return BandResult(
        np.concatenate([p.master for p in parts]),
        np.concatenate([p.coverage for p in parts]),
        np.concatenate([p.low for p in parts]),
        np.concatenate([p.high for p in parts]),
        np.concatenate([p.flags for p in parts], axis=1),
        sum(p.frame_low for p in parts),
        sum(p.frame_high for p in parts),
    )


def _twin_chunk(values: np.ndarray, weights: np.ndarray, rejection: Rejection) -> BandResult:
    n_frames, n_pixels = values.shape
    data = np.isfinite(values) & (values != 0)
    n = data.sum(axis=0).astype(np.int64)
    # One sort of 64-bit keys (ordered value bits, frame index): the kernel's (value, frame) order.
    ordered = np.where(data, _ordered_bits(values), np.uint32(0xFFFFFFFF))
    keys = (ordered.astype(np.uint64) << np.uint64(32)) | np.arange(n_frames, dtype=np.uint64)[:, None]
    keys = np.ascontiguousarray(np.sort(keys.T, axis=1).T)
    order = (keys & np.uint64(0xFFFFFFFF)).astype(np.int32)
    xs = _float_of_ordered((keys >> np.uint64(32)).astype(np.uint32)).astype(np.float64)
    del keys
    rows = np.arange(n_frames)[:, None]
    xs[rows >= n] = 0.0
    lo = np.zeros(n_pixels, np.int64)
    hi = n.copy()
    extra_low = np.zeros(n_pixels, np.int64)
    extra_high = np.zeros(n_pixels, np.int64)
    flags = np.zeros((n_frames, n_pixels), np.uint8)
    method = rejection.method
    if method == "percentile":
        cols = np.flatnonzero(n >= 2)
        centre = _median(xs, lo[cols], hi[cols], cols)
        keep = (1.0 + centre) != 1.0
        cols, centre = cols[keep], centre[keep]
        _clip_ends(xs, lo, hi, cols, centre, centre, rejection)
    elif method in ("sigma", "winsorized"):
        _iterative_clip(xs, lo, hi, np.flatnonzero(n >= 3), rejection)
    elif method == "esd":
        _esd(xs, n, lo, hi, np.flatnonzero(n >= 3), rejection)
    elif method == "linear":
        cols = np.flatnonzero(n >= 5)
        if cols.size:
            rejected_low, rejected_high, kept = _linear_fit(xs, order, flags, n, cols, rejection)
            extra_low[cols] = rejected_low
            extra_high[cols] = rejected_high
            hi[cols] = kept
    if method != "linear":
        # A method never rejects every sample of a pixel: such a pixel keeps them all.
        emptied = hi <= lo
        lo[emptied] = 0
        hi[emptied] = n[emptied]
    coverage = n.copy()
    n_kept_range = hi.copy() if method == "linear" else n  # compacted columns end at the kept count
    ranks = np.arange(n_frames)[:, None]
    for mask, flag in ((ranks < lo, 1), ((ranks >= hi) & (ranks < n_kept_range), 2)):
        j, p = np.nonzero(mask)
        flags[order[j, p], p] = flag
    top = int(hi.max(initial=0))
    inside = (ranks[:top] >= lo) & (ranks[:top] < hi)
    w = weights[order[:top]]
    weighted = _rows_sum(np.where(inside, w * xs[:top], 0.0))
    total = _rows_sum(np.where(inside, w, 0.0))
    del inside, w
    mean = np.zeros(n_pixels)
    np.divide(weighted, total, out=mean, where=total > 0)
    low_count = (lo + extra_low).astype(np.int32)
    high_count = (n_kept_range - hi + extra_high).astype(np.int32)
    return BandResult(
        mean.astype(np.float32),
        coverage.astype(np.int32),
        low_count,
        high_count,
        flags,
        (flags == 1).sum(axis=1, dtype=np.int64),
        (flags == 2).sum(axis=1, dtype=np.int64),
    )


def _median(xs, lo, hi, cols):
    return (xs[(lo + hi - 1) // 2, cols] + xs[(lo + hi) // 2, cols]) * 0.5


def _rows_sum(matrix: np.ndarray) -> np.ndarray:
    """Column sums of ``matrix`` added row after row (the kernel's order; no pairwise sums)."""
    total = np.zeros(matrix.shape[1])
    for row in matrix:
        total += row
    return total


def _window(xs, lo, hi, cols):
    """The sorted samples of columns ``cols`` up to their largest ``hi``, and which of them
    lie in ``[lo, hi)``."""
    top = int(hi.max(initial=0))
    block = xs[:top] if cols.size == xs.shape[1] else xs[:top, cols]
    ranks = np.arange(top)[:, None]
    return block, (ranks >= lo) & (ranks < hi)


def _sigma(block, inside, count):
    mean = _rows_sum(np.where(inside, block, 0.0)) / count
    d = block - mean
    return np.sqrt(_rows_sum(np.where(inside, d * d, 0.0)) / (count - 1))


def _clip_ends(xs, lo, hi, cols, centre, scale, rejection: Rejection) -> None:
    """Move ``lo`` up and ``hi`` down over the samples beyond the thresholds (in place)."""
    last = xs.shape[0] - 1
    for side in ("low", "high"):
        if not (rejection.clip_low if side == "low" else rejection.clip_high):
            continue
        threshold = rejection.low if side == "low" else rejection.high
        active = np.arange(cols.size)
        while active.size:
            c = cols[active]
            if side == "low":
                x = xs[np.minimum(lo[c], last), c]
                move = (lo[c] < hi[c]) & ((centre[active] - x) / scale[active] > threshold)
            else:
                x = xs[np.maximum(hi[c] - 1, 0), c]
                move = (hi[c] > lo[c]) & ((x - centre[active]) / scale[active] > threshold)
            active = active[move]
            if side == "low":
                lo[cols[active]] += 1
            else:
                hi[cols[active]] -= 1


def _iterative_clip(xs, lo, hi, cols, rejection: Rejection) -> None:
    """Sigma or winsorized sigma clipping, every column in lockstep until it is done."""
    iteration = 0
    while cols.size:
        l0, h0 = lo[cols].copy(), hi[cols].copy()
        block, inside = _window(xs, l0, h0, cols)
        count = (h0 - l0).astype(np.float64)
        if rejection.method == "sigma":
            scale = _sigma(block, inside, count)
            centre = _median(xs, l0, h0, cols)
        else:
            cutoff = rejection.cutoff if iteration == 0 else 0.0
            centre, scale = _winsorize(block, inside, count, _median(xs, l0, h0, cols), cutoff)
        del block, inside
        live = (1.0 + scale) != 1.0
        cols, centre, scale, l0, h0 = cols[live], centre[live], scale[live], l0[live], h0[live]
        _clip_ends(xs, lo, hi, cols, centre, scale, rejection)
        changed = (lo[cols] != l0) | (hi[cols] != h0)
        cols = cols[changed & ((hi[cols] - lo[cols]) >= 3)]
        iteration += 1


def _mad(block, inside, count, mu):
    distance = np.where(inside, np.abs(block - mu), np.inf)
    distance.sort(axis=0)
    index = np.arange(mu.size)
    return (distance[(count - 1) // 2, index] + distance[count // 2, index]) * 0.5


def _winsorize(block, inside, count, mu, cutoff: float):
    """Huber winsorization of each column's samples in ``inside``: (centre, sigma)."""
    mu = mu.copy()
    sigma = 1.4826 * _mad(block, inside, (count + 0.5).astype(np.int64), mu)
    live = np.arange(mu.size)  # columns still iterating
    kept = live  # the columns block/inside currently hold
    for k in range(HUBER_ITERATIONS):
        live = live[(1.0 + sigma[live]) != 1.0]
        if not live.size:
            break
        if live.size != kept.size:  # drop finished columns from the working matrices
            position = np.searchsorted(kept, live)
            block, inside, kept = block[:, position], inside[:, position], live
        x, mask = block, inside
        m, s = mu[live], sigma[live]
        t0, t1 = m - 1.5 * s, m + 1.5 * s
        if cutoff > 0:
            below = np.where(x <= m - cutoff * s, m, t0)
            above = np.where(x >= m + cutoff * s, m, t1)
            v = np.where(x < t0, below, np.where(x > t1, above, x))
        else:
            v = np.minimum(np.maximum(x, t0), t1)
        mean = _rows_sum(np.where(mask, v, 0.0)) / count[live]
        d = v - mean
        s = 1.134 * np.sqrt(_rows_sum(np.where(mask, d * d, 0.0)) / (count[live] - 1))
        previous = sigma[live]
        sigma[live] = s
        mu[live] = mean
        if k >= 1:
            live = live[~(np.abs(previous - s) / previous < 0.0005)]
    return mu, sigma


def _esd(xs, n, lo, hi, cols, rejection: Rejection) -> None:
    if not cols.size:
        return
    table = esd_critical_values(xs.shape[0], float(rejection.esd_alpha), float(rejection.esd_outliers))
    count = n[cols]
    tests = np.minimum(np.maximum((rejection.esd_outliers * count.astype(np.float64)).astype(np.int64), 1), count - 2)
    zero = np.zeros(cols.size, np.int64)
    shift = _median(xs, zero, count, cols)
    block, inside = _window(xs, zero, count, cols)
    y = block - shift
    s1 = _rows_sum(np.where(inside, y, 0.0))
    s2 = _rows_sum(np.where(inside, y * y, 0.0))
    del block, inside, y
    low_end, high_end = zero.copy(), count.copy()
    best_low, best_high = zero.copy(), count.copy()
    live = np.arange(cols.size)
    for i in range(int(tests.max())):
        live = live[tests[live] > i]
        if not live.size:
            break
        size = (high_end[live] - low_end[live]).astype(np.float64)
        mean = s1[live] / size
        variance = (s2[live] - s1[live] * mean) / (size - 1.0)
        ok = variance > 0.0
        live, mean, variance = live[ok], mean[ok], variance[ok]
        if not live.size:
            break
        sd = np.sqrt(variance)
        c = cols[live]
        y_low = xs[low_end[live], c] - shift[live]
        y_high = xs[high_end[live] - 1, c] - shift[live]
        d_low = (mean - y_low) / (sd * rejection.esd_low_relaxation)
        d_high = (y_high - mean) / sd
        take_high = d_high >= d_low
        statistic = np.where(take_high, d_high, d_low)
        y = np.where(take_high, y_high, y_low)
        high_end[live] -= take_high
        low_end[live] += ~take_high
        s1[live] = s1[live] - y
        s2[live] = s2[live] - y * y
        exceed = live[statistic > table[count[live], i]]
        best_low[exceed] = low_end[exceed]
        best_high[exceed] = high_end[exceed]
    lo[cols] = best_low if rejection.clip_low else 0
    hi[cols] = best_high if rejection.clip_high else count


def _lad_intercept(z, inside, m, slope, ranks):
    residual = np.where(inside, z - slope * ranks, np.inf)
    residual.sort(axis=0)
    index = np.arange(m.size)
    return (residual[(m - 1) // 2, index] + residual[m // 2, index]) * 0.5


def _lad_fit(z, m):
    """Least-absolute-deviation lines through the first ``m`` values of each column."""
    ranks = np.arange(z.shape[0], dtype=np.float64)[:, None]
    inside = ranks < m
    index = np.arange(m.size)
    spread = z[m - 1, index] - z[0, index]
    bl, bh = np.zeros(m.size), spread.copy()
    for _ in range(LAD_STEPS):
        bm = (bl + bh) * 0.5
        am = _lad_intercept(z, inside, m, bm, ranks)
        residual = (z - bm * ranks) - am
        g = np.where(inside, np.where(residual > 0, ranks, np.where(residual < 0, -ranks, 0.0)), 0.0).sum(axis=0)
        positive = g > 0
        bl = np.where(positive, bm, bl)
        bh = np.where(positive, bh, bm)
    slope = np.where(spread > 0, (bl + bh) * 0.5, 0.0)
    intercept = _lad_intercept(z, inside, m, slope, ranks)
    adev = np.zeros(m.size)
    for j in range(z.shape[0]):
        adev += np.where(inside[j], np.abs((z[j] - slope * float(j)) - intercept), 0.0)
    return intercept, slope, adev / m


def _linear_fit(xs, order, flags, n, cols, rejection: Rejection):
    """Linear fit clipping of the columns ``cols``; the kept samples are compacted to the
    front of ``xs``/``order`` and rejected ones flagged. Returns (low, high, kept counts)."""
    n_frames = xs.shape[0]
    z = xs[:, cols].copy()
    frames = order[:, cols].copy()
    m = n[cols].copy()
    rejected_low = np.zeros(cols.size, np.int64)
    rejected_high = np.zeros(cols.size, np.int64)
    ranks = np.arange(n_frames)[:, None]
    live = np.arange(cols.size)
    while live.size:
        a, b, adev = _lad_fit(z[:, live], m[live])
        s = (2.0 * adev) * np.sqrt(1.0 + b * b)
        go = (1.0 + s) != 1.0
        live, a, b, s = live[go], a[go], b[go], s[go]
        if not live.size:
            break
        zl, fl, ml = z[:, live], frames[:, live], m[live]
        inside = ranks < ml
        fit = a + b * ranks.astype(np.float64)
        below = zl < fit
        low = inside & below & rejection.clip_low & ((fit - zl) / s >= rejection.low)
        high = inside & ~below & rejection.clip_high & ((zl - fit) / s >= rejection.high)
        for mask, flag in ((low, 1), (high, 2)):
            j, k = np.nonzero(mask)
            flags[fl[j, k], cols[live[k]]] = flag
        rejected_low[live] += low.sum(axis=0)
        rejected_high[live] += high.sum(axis=0)
        kept = inside & ~(low | high)
        new_m = kept.sum(axis=0)
        permutation = np.argsort(np.where(kept, ranks, n_frames + ranks), axis=0, kind="stable")
        z[:, live] = np.take_along_axis(zl, permutation, axis=0)
        frames[:, live] = np.take_along_axis(fl, permutation, axis=0)
        changed = new_m != ml
        m[live] = new_m
        live = live[changed & (new_m >= 3)]
    xs[:, cols] = z
    order[:, cols] = frames
    return rejected_low, rejected_high, m
