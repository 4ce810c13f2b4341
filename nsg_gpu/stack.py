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

import concurrent.futures
import contextlib
import csv
import dataclasses
import functools
import io
import math
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from . import __version__, kernels
from .backend import Backend, get_backend, select_backend
from .errors import FrameDataError, FrameError, FrameReadError, FrameShapeError, NSGError, OutputError

__all__ = [
    "METHODS",
    "METHOD_TITLES",
    "THRESHOLDS",
    "STACK_COLUMNS",
    "Rejection",
    "BandResult",
    "StackFrame",
    "StackResult",
    "StackError",
    "auto_rejection",
    "esd_critical_values",
    "reject_combine",
    "stack",
    "stack_inputs",
    "plan_bands",
    "parse_memory",
    "default_memory",
    "write_stack_csv",
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
_CODES = {**{name: code for code, name in enumerate(METHODS)}, "auto": len(METHODS)}
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
CHUNK_SAMPLES = 1 << 20
#: Bytes per sample of the CPU twin's working set at its peak (sort keys, sorted values in
#: double, masks and temporaries; measured with tracemalloc: 40-80 for the methods, with the
#: chunk's copy of the samples).
TWIN_BYTES_PER_SAMPLE = 96
#: Memory set aside for the interpreter and the libraries within a --memory budget.
PROCESS_RESERVE = 256 << 20
#: Rows of the middle of a frame read to measure its noise for --weights noise.
NOISE_ROWS = 512
#: Name of the card that marks a master written by nsg stack (such files are never stacked).
MASTER_CARD = "NSGSTACK"

STACK_COLUMNS = (
    "file",
    "status",
    "error",
    "weight",
    "relative_weight",
    "covered",
    "covered_share",
    "rejected_low",
    "rejected_high",
    "rejected_share",
    "spooled",
)


class StackError(NSGError):
    """The stack cannot be made (no usable frame, a bad option, an output it cannot write)."""


# -- rejection settings -----------------------------------------------------------------------------
def auto_rejection(n_frames: int) -> tuple[str, str]:
    """The method NSG sets ImageIntegration up with for ``n_frames``, and why.

    ``rejection="auto"`` applies it pixel by pixel to the frames that have data there, so a
    pixel in a registration border covered by 5 frames of a 24-frame stack is clipped as NSG
    clips 5 frames (sigma clipping cannot reject one outlier among 6 or fewer samples).
    """
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
        ``"auto"`` (by the number of frames with data at each pixel, NSG's rule:
        :func:`auto_rejection`, with the default thresholds) or one of :data:`METHODS`.

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
            everywhere, _ = auto_rejection(n_frames)
            reason = (
                f"auto, by the frames with data at each pixel (NSG's rule by frame count): "
                f"{METHOD_TITLES[everywhere]} where all {n_frames} frames cover"
            )
            self._check_options()
            return dataclasses.replace(self, method="auto", reason=reason)
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
        self._check_options()
        return dataclasses.replace(self, method=method, low=low, high=high, reason=reason)

    def _check_options(self) -> None:
        if not (self.cutoff == 0 or self.cutoff > 1.5):
            raise ValueError(f"winsorization cut-off {self.cutoff:g}: use 0 (off) or a value above 1.5 sigma")
        if not 0 < self.esd_alpha < 1:
            raise ValueError(f"ESD significance {self.esd_alpha:g}: it must be between 0 and 1")
        if not 0 < self.esd_outliers <= 1:
            raise ValueError(f"ESD outliers share {self.esd_outliers:g}: it must be in (0, 1]")
        if not self.esd_low_relaxation >= 1:
            raise ValueError(f"ESD low relaxation {self.esd_low_relaxation:g}: it must be at least 1")

    def short(self) -> str:
        """The method and its thresholds in a few words (a HISTORY line; resolved settings)."""
        method = self.method
        if method in ("none", "auto"):
            return method
        if method == "percentile":
            return f"percentile low {self.low:g} high {self.high:g} x median"
        if method == "esd":
            return (
                f"ESD alpha {self.esd_alpha:g} outliers {self.esd_outliers:g} "
                f"low relaxation {self.esd_low_relaxation:g}"
            )
        name = {"sigma": "sigma clipping", "winsorized": "winsorized", "linear": "linear fit"}[method]
        text = f"{name} low {self.low:g} high {self.high:g} sigma"
        if method == "winsorized":
            text += f", cut-off {self.cutoff:g}"
        return text

    def history(self) -> list[str]:
        """Lines for the master's HISTORY, each short enough for one card."""
        if self.method == "auto":
            spans = (("percentile", "3-7"), ("sigma", "8-10"), ("winsorized", "11-19"), ("esd", "20+"))
            lines = ["rejection: auto, by the frames with data at each pixel:"]
            lines += [f"  {span} frames: {self.concrete(method).short()}" for method, span in spans]
        else:
            lines = [f"rejection: {self.short()}"]
        if not self.clip_low:
            lines.append("rejection: low side kept")
        if not self.clip_high:
            lines.append("rejection: high side kept")
        return lines

    def method_for(self, n: int) -> str:
        """The method a pixel with ``n`` samples gets (resolved settings)."""
        return auto_rejection(n)[0] if self.method == "auto" else self.method

    def concrete(self, method: str) -> Rejection:
        """These settings for one method, with its thresholds (the defaults under ``auto``)."""
        if method == self.method:
            return self
        low, high = THRESHOLDS.get(method, (None, None))
        return dataclasses.replace(self, method=method, low=low, high=high)

    def thresholds(self) -> np.ndarray:
        """(low, high) of every method in kernel-code order, flattened: the kernel's table."""
        table = np.zeros(2 * len(METHODS))
        for code, method in enumerate(METHODS):
            settings = self.concrete(method)
            table[2 * code] = settings.low or 0.0
            table[2 * code + 1] = settings.high or 0.0
        return table

    def describe(self) -> str:
        """One line naming the method and its thresholds (resolved settings)."""
        method = self.method
        if method == "auto":
            parts = [
                f"{self.concrete(m).describe()} ({span})"
                for m, span in (
                    ("percentile", "3-7 frames"),
                    ("sigma", "8-10"),
                    ("winsorized", "11-19"),
                    ("esd", "20 or more"),
                )
            ]
            return "auto by the frames with data at each pixel: " + "; ".join(parts)
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
    summed in frame order, rounded to float32 (0 where no frame has data). All
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
    if rejection.method not in _CODES or (rejection.method in THRESHOLDS and rejection.low is None):
        raise ValueError("resolve the rejection settings first (Rejection.resolve)")
    if launcher is None:
        return _reject_combine_twin(np.asarray(values, np.float32), weights, rejection)
    xp = be.xp
    values = xp.ascontiguousarray(values, dtype=xp.float32)
    table = None
    stride = 0
    if rejection.method in ("esd", "auto"):
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
                xp.asarray(rejection.thresholds()),
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
    # One sort of 64-bit keys, pixel by pixel: the float bits mapped to an unsigned order
    # (sign bit flipped for positive values, every bit for negative ones; no data last), then
    # the frame: the kernel's (value, frame) order.
    bits = values.view(np.uint32)
    ordered = bits ^ ((values.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000))
    ordered[~data] = 0xFFFFFFFF
    keys = np.ascontiguousarray(ordered.T, dtype=np.uint64)  # (pixels, frames)
    del ordered
    keys <<= np.uint64(32)
    keys |= np.arange(n_frames, dtype=np.uint64)
    keys.sort(axis=1)
    top = (keys >> np.uint64(32)).astype(np.uint32)
    top ^= ((~top).view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000)
    xs = np.ascontiguousarray(top.view(np.float32).T, dtype=np.float64)
    del top
    rows = np.arange(n_frames)[:, None]
    xs[rows >= n] = 0.0
    lo = np.zeros(n_pixels, np.int64)
    hi = n.copy()
    extra_low = np.zeros(n_pixels, np.int64)
    extra_high = np.zeros(n_pixels, np.int64)
    flags = np.zeros((n_frames, n_pixels), np.uint8)
    if rejection.method == "auto":
        codes = np.select([n <= 2, n < 8, n <= 10, n < 20], [0, 1, 2, 3], 4)
    else:
        codes = np.full(n_pixels, _CODES[rejection.method])
    compacted = np.zeros(n_pixels, bool)  # linear fit: kept samples moved to the front
    for code, method in enumerate(METHODS):
        settings = rejection.concrete(method)
        mine = codes == code
        if method == "percentile":
            cols = np.flatnonzero(mine & (n >= 2))
            centre = _median(xs, lo[cols], hi[cols], cols)
            keep = (1.0 + centre) != 1.0
            cols, centre = cols[keep], centre[keep]
            _clip_ends(xs, lo, hi, cols, centre, centre, settings)
        elif method in ("sigma", "winsorized"):
            _iterative_clip(xs, lo, hi, np.flatnonzero(mine & (n >= 3)), settings)
        elif method == "esd":
            _esd(xs, n, lo, hi, np.flatnonzero(mine & (n >= 3)), settings)
        elif method == "linear":
            cols = np.flatnonzero(mine & (n >= 5))
            if cols.size:
                order = np.zeros((n_frames, n_pixels), np.int32)  # the frame of each sorted sample
                order[:, cols] = (keys[cols] & np.uint64(0xFFFFFFFF)).astype(np.int32).T
                rejected_low, rejected_high, kept = _linear_fit(xs, order, flags, n, cols, settings)
                extra_low[cols] = rejected_low
                extra_high[cols] = rejected_high
                hi[cols] = kept
                compacted[cols] = True
    # A method never rejects every sample of a pixel: such a pixel keeps them all.
    emptied = (hi <= lo) & ~compacted
    lo[emptied] = 0
    hi[emptied] = n[emptied]
    coverage = n.copy()
    n_kept_range = np.where(compacted, hi, n)  # compacted columns end at the kept count
    # Flags of the contiguous methods, by frame: a sample is rejected low when its (value,
    # frame) key is below the first kept one's, high when above the last kept one's.
    contiguous = np.flatnonzero(~compacted & ((lo > 0) | (hi < n)))
    if contiguous.size:
        first = keys[contiguous, lo[contiguous]]
        last = keys[contiguous, hi[contiguous] - 1]
        frame_keys = _frame_keys(values[:, contiguous])
        valid = data[:, contiguous]
        sub = flags[:, contiguous]
        sub[valid & (frame_keys < first)] = 1
        sub[valid & (frame_keys > last)] = 2
        flags[:, contiguous] = sub
        del frame_keys
    del keys
    # The average in frame order (the kernel's), over the samples with data not rejected.
    kept = data & (flags == 0)
    weighted = np.zeros(n_pixels)
    total = np.zeros(n_pixels)
    for i in range(n_frames):
        weighted += np.where(kept[i], weights[i] * values[i].astype(np.float64), 0.0)
        total += np.where(kept[i], weights[i], 0.0)
    del kept
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


def _frame_keys(values: np.ndarray) -> np.ndarray:
    """The (value, frame) sort keys of ``values`` (frames, pixels), unsorted (data or not)."""
    ordered = values.view(np.uint32) ^ ((values.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000))
    keys = ordered.astype(np.uint64)
    keys <<= np.uint64(32)
    keys |= np.arange(values.shape[0], dtype=np.uint64)[:, None]
    return keys


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
    kept = np.arange(mu.size)  # the columns block/inside hold
    live = np.ones(mu.size, bool)  # which of them still iterate
    for k in range(HUBER_ITERATIONS):
        live &= (1.0 + sigma[kept]) != 1.0
        if not live.any():
            break
        if live.sum() < 0.5 * kept.size:  # drop finished columns from the working matrices
            block, inside, kept, live = block[:, live], inside[:, live], kept[live], live[live]
        m, s = mu[kept], sigma[kept]
        s = np.where(live, s, 1.0)  # finished columns compute harmless values, kept below
        t0, t1 = m - 1.5 * s, m + 1.5 * s
        if cutoff > 0:
            below = np.where(block <= m - cutoff * s, m, t0)
            above = np.where(block >= m + cutoff * s, m, t1)
            v = np.where(block < t0, below, np.where(block > t1, above, block))
        else:
            v = np.minimum(np.maximum(block, t0), t1)
        mean = _rows_sum(np.where(inside, v, 0.0)) / count[kept]
        d = v - mean
        new_sigma = 1.134 * np.sqrt(_rows_sum(np.where(inside, d * d, 0.0)) / (count[kept] - 1))
        sigma[kept] = np.where(live, new_sigma, sigma[kept])
        mu[kept] = np.where(live, mean, mu[kept])
        if k >= 1:
            live &= ~(np.abs(s - new_sigma) / s < 0.0005)
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
    del inside, y
    # Every column steps in lockstep, full width (masks rather than shrinking index sets):
    # a column leaves for good when its tests are done or its samples are all equal.
    flat = np.ascontiguousarray(block).reshape(-1)
    width = cols.size
    index = np.arange(width)
    limits = table[count]  # (columns, tests)
    low_end, high_end = zero.copy(), count.copy()
    best_low, best_high = zero.copy(), count.copy()
    live = np.ones(width, bool)
    relaxation = float(rejection.esd_low_relaxation)
    for i in range(int(tests.max())):
        live &= tests > i
        size = (high_end - low_end).astype(np.float64)
        mean = s1 / size
        variance = (s2 - s1 * mean) / (size - 1.0)
        live &= variance > 0.0
        if not live.any():
            break
        sd = np.sqrt(np.where(live, variance, 1.0))
        y_low = flat[low_end * width + index] - shift
        y_high = flat[(high_end - 1) * width + index] - shift
        d_low = (mean - y_low) / (sd * relaxation)
        d_high = (y_high - mean) / sd
        take_high = d_high >= d_low
        statistic = np.where(take_high, d_high, d_low)
        y = np.where(take_high, y_high, y_low)
        high_end -= take_high & live
        low_end += ~take_high & live
        s1 = np.where(live, s1 - y, s1)
        s2 = np.where(live, s2 - y * y, s2)
        exceed = live & (statistic > limits[:, i])
        best_low = np.where(exceed, low_end, best_low)
        best_high = np.where(exceed, high_end, best_high)
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


# -- inputs ---------------------------------------------------------------------------------------
_FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fz", ".fits.gz", ".fit.gz", ".fts.gz")
_XISF_SUFFIXES = (".xisf",)
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"PK\x03\x04")
#: Header cards of a frame that do not describe the master.
_PER_FRAME = re.compile(r"^(NSG.*|NOISE\d\d|NOISEA\d\d|NOISEF\d\d)$")
_STRUCTURAL = re.compile(
    r"^(SIMPLE|BITPIX|NAXIS\d*|EXTEND|XTENSION|PCOUNT|GCOUNT|BZERO|BSCALE|BLANK|CHECKSUM|DATASUM|Z[A-Z0-9]*)$"
)


def _is_frame_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and not name.startswith(".") and name.endswith(_FITS_SUFFIXES + _XISF_SUFFIXES)


def stack_inputs(inputs: Sequence[str | os.PathLike]) -> list[tuple[Path, bool]]:
    """The frames named by ``inputs``: files as given, directories expanded.

    A directory means the accepted outputs of ``nsg normalize``: the files its ``weights.csv``
    lists (reference first) when it has one, else its FITS and XISF files (sorted by name; not
    those of ``rejected/`` or any other subfolder). Returns ``(path, from_directory)`` pairs.

    Raises
    ------
    StackError
        An input is neither a file nor a directory, or a directory holds no frame.
    """
    found: list[tuple[Path, bool]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            listing = path / "weights.csv"
            if listing.is_file():
                rows = list(csv.DictReader(io.StringIO(listing.read_text())))
                names = [row.get("file", "") for row in rows if row.get("file")]
                files = [path / name for name in names]
            else:
                files = sorted(p for p in path.iterdir() if _is_frame_file(p))
            if not files:
                raise StackError(f"{path}: no frames in this directory (FITS or XISF files, or a weights.csv)")
            found += [(f, True) for f in files]
        elif path.exists() or path.suffix:
            found.append((path, False))
        else:
            raise StackError(f"{path}: no such file or directory")
    seen: set[Path] = set()
    unique = []
    for path, from_directory in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((path, from_directory))
    return unique


@dataclass
class _Rows:
    """Where a frame's pixels are: a plain image at ``offset`` of ``file``, ``(channels,
    height, width)`` of ``dtype`` (big-endian FITS, or native float32 in a spool file)."""

    file: Path
    offset: int
    dtype: np.dtype
    shape: tuple[int, int, int]
    bscale: float = 1.0
    bzero: float = 0.0
    blank: int | None = None

    def read(self, handle: int, y0: int, y1: int, out: np.ndarray, raw: bytearray) -> None:
        """Rows ``y0:y1`` of every channel into ``out`` (channels, rows, width) float32."""
        channels, height, width = self.shape
        item = self.dtype.itemsize
        count = (y1 - y0) * width
        view = memoryview(raw)[: count * item]
        for c in range(channels):
            position = self.offset + ((c * height + y0) * width) * item
            done = 0
            while done < len(view):
                got = _pread_into(handle, view[done:], position + done)
                if got <= 0:
                    raise FrameReadError(self.file, f"is shorter than its header says (rows {y0}-{y1 - 1})")
                done += got
            block = np.frombuffer(view, dtype=self.dtype, count=count).reshape(y1 - y0, width)
            target = out[c]
            if self.dtype.kind == "f":
                np.copyto(target, block, casting="unsafe")
                np.nan_to_num(target, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
            else:
                scaled = block.astype(np.float64)
                if self.bscale != 1.0:
                    scaled *= self.bscale
                if self.bzero != 0.0:
                    scaled += self.bzero
                if self.blank is not None:
                    scaled[block == self.blank] = 0.0
                np.copyto(target, scaled, casting="unsafe")


def _pread_into(handle: int, view: memoryview, position: int) -> int:
    """Read into ``view`` from ``position`` of an open file without moving its offset."""
    if hasattr(os, "preadv"):
        return os.preadv(handle, [view], position)
    chunk = os.pread(handle, len(view), position)  # platforms without preadv: one copy more
    view[: len(chunk)] = chunk
    return len(chunk)


@dataclass
class _Input:
    path: Path
    rows: _Rows | None = None
    header: fits.Header | None = None
    shape: tuple[int, int, int] | None = None
    weight: np.ndarray | None = None
    spooled: bool = False
    error: str | None = None


class _Handles:
    """File descriptors of the frames: all held open where the open-file limit allows (raised
    towards its hard limit if needed), else each opened for one read and closed."""

    def __init__(self, files: Sequence[Path]):
        self.files = list(files)
        self.keep = _ensure_open_files(len(self.files) + 64)
        self.open: dict[int, int] = {}

    @contextlib.contextmanager
    def handle(self, index: int):
        if self.keep:
            if index not in self.open:
                self.open[index] = os.open(self.files[index], os.O_RDONLY)
            yield self.open[index]
            return
        fd = os.open(self.files[index], os.O_RDONLY)
        try:
            yield fd
        finally:
            os.close(fd)

    def close(self) -> None:
        for fd in self.open.values():
            os.close(fd)
        self.open.clear()


def _ensure_open_files(needed: int) -> bool:
    """True when ``needed`` files can be open at once, after raising the soft limit if need be."""
    try:
        import resource
    except ImportError:  # not Unix: assume the C runtime's default suffices for modest stacks
        return needed <= 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return True
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return False
    return target >= needed


def _image_shape(header: fits.Header, path: Path) -> tuple[int, int, int]:
    naxis = int(header.get("NAXIS", 0))
    axes = [int(header.get(f"NAXIS{k}", 0)) for k in range(1, naxis + 1)]
    if naxis == 2:
        return 1, axes[1], axes[0]
    if naxis == 3 and axes[2] in (1, 3):
        return axes[2], axes[1], axes[0]
    shape = tuple(reversed(axes))
    raise FrameShapeError(path, f"has shape {shape}; frames must be 2-D mono or 3-D colour with 3 planes")


def _open_fits(path: Path) -> tuple[fits.Header, _Rows | None]:
    """The image header of an uncompressed FITS file and where its pixels are, or
    ``(header, None)`` for a file that must be decompressed (tile-compressed or gzipped)."""
    from astropy.utils.exceptions import AstropyUserWarning

    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise FrameReadError(path, f"cannot be read ({exc.strerror or exc})") from exc
    if magic.startswith(_COMPRESSED_MAGIC):
        return None, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyUserWarning)
            with open(path, "rb") as handle, fits.open(handle, memmap=False, lazy_load_hdus=True) as hdul:
                for index, hdu in enumerate(hdul):
                    if hdu.header.get("NAXIS", 0) < 2:
                        continue
                    header = hdu.header.copy()
                    if isinstance(hdu, fits.CompImageHDU):
                        return header, None
                    if not isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU)):
                        continue
                    offset = int(hdul.fileinfo(index)["datLoc"])
                    break
                else:
                    raise FrameReadError(path, "holds no image (no HDU with two or more axes)")
    except FrameError:
        raise
    except Exception as exc:
        raise FrameReadError(
            path, f"cannot be read as FITS: not a FITS file, or truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from exc
    shape = _image_shape(header, path)
    bitpix = int(header.get("BITPIX", -32))
    kinds = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
    if bitpix not in kinds:
        raise FrameReadError(path, f"has BITPIX {bitpix}, which FITS does not define")
    dtype = np.dtype(kinds[bitpix])
    size = path.stat().st_size
    end = offset + int(np.prod(shape)) * dtype.itemsize
    if end > size:
        raise FrameReadError(path, f"is truncated: its data end at byte {end} of {size}")
    blank = header.get("BLANK") if bitpix > 0 else None
    return header, _Rows(
        path,
        offset,
        dtype,
        shape,
        float(header.get("BSCALE", 1.0)),
        float(header.get("BZERO", 0.0)),
        int(blank) if blank is not None else None,
    )


def parse_memory(text: str | int | float) -> int:
    """Bytes from ``"4G"``, ``"1500M"``, ``"512MiB"`` or a number of bytes.

    Raises
    ------
    ValueError
        Not a size.
    """
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not match:
        raise ValueError(f"--memory {text!r} is not a size (e.g. 4G, 1500M)")
    factor = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match.group(2).lower()]
    return int(float(match.group(1)) * factor)


def default_memory() -> int:
    """Half of the memory available now, at most 8 GiB and at least 1 GiB."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 4 << 30
    return int(min(8 << 30, max(1 << 30, available // 2)))


def plan_bands(
    memory: int, *, n_frames: int, channels: int, height: int, width: int, threads: int = 1, gpu: bool = False
) -> int:
    """Rows per band so that a stack fits in ``memory`` bytes; what the budget holds:

    - :data:`PROCESS_RESERVE` for the interpreter and libraries;
    - the results, kept whole until written: the master (float32) and three count maps
      (uint16), ``channels x height x width x 10`` bytes;
    - two bands of every frame (one read while the other is combined), float32, and the
      reader's buffer for one frame's band;
    - the CPU twin's working set, :data:`CHUNK_SAMPLES` samples per thread (on the GPU,
      one band's kernel outputs on the host instead).

    Raises
    ------
    StackError
        Not even one row fits.
    """
    results = channels * height * width * 10
    fixed = PROCESS_RESERVE + results
    band_row = 2 * channels * n_frames * width * 4 + 8 * width  # two bands of every frame, a read buffer
    if gpu:
        # The kernel's outputs of one band on the host: counts and master (int32/float32).
        rows = (memory - fixed) // (band_row + 16 * width)
    else:
        # The twin works on min(CHUNK_SAMPLES, band samples of a channel) per thread.
        working = max(1, threads) * TWIN_BYTES_PER_SAMPLE
        rows = (memory - fixed - working * CHUNK_SAMPLES) // band_row
        if rows * n_frames * width < CHUNK_SAMPLES:
            rows = (memory - fixed) // (band_row + working * n_frames * width)
    if rows < 1:
        working = max(1, threads) * TWIN_BYTES_PER_SAMPLE * min(CHUNK_SAMPLES, n_frames * width)
        need = fixed + band_row + (16 * width if gpu else working)
        raise StackError(
            f"--memory {memory / 2**30:.2f} GiB is too small for {n_frames} frames of {width} x {height}"
            f"{' x 3' if channels == 3 else ''}: at least {math.ceil(need / 2**30 * 100) / 100:.2f} GiB is needed"
        )
    return int(min(rows, height))


# -- results ------------------------------------------------------------------------------------------
@dataclass
class StackFrame:
    """One input of a stack: the weight it got, what of it was used and rejected, or why not."""

    path: Path
    status: str = "used"  # "used" or "skipped"
    error: str | None = None
    weight: tuple[float, ...] | None = None  # per channel
    relative_weight: float | None = None  # mean weight over the best frame's
    covered: int = 0  # samples with data, all channels
    rejected_low: int = 0
    rejected_high: int = 0
    spooled: bool = False  # decompressed once into a spool file

    @property
    def rejected_share(self) -> float | None:
        """Share of the frame's samples with data that were rejected."""
        if not self.covered:
            return None
        return (self.rejected_low + self.rejected_high) / self.covered

    def row(self, samples_per_frame: int) -> dict:
        """The frame's ``stack.csv`` row."""
        weight = None if self.weight is None else " ".join(f"{w:.6g}" for w in self.weight)
        share = self.rejected_share
        return {
            "file": str(self.path),
            "status": self.status,
            "error": self.error or "",
            "weight": weight or "",
            "relative_weight": "" if self.relative_weight is None else f"{self.relative_weight:.6g}",
            "covered": self.covered,
            "covered_share": f"{self.covered / samples_per_frame:.6g}" if samples_per_frame else "",
            "rejected_low": self.rejected_low,
            "rejected_high": self.rejected_high,
            "rejected_share": "" if share is None else f"{share:.6g}",
            "spooled": "yes" if self.spooled else "",
        }


@dataclass
class StackResult:
    """What :func:`stack` did and wrote."""

    output: Path
    frames: list[StackFrame]
    shape: tuple[int, int, int]
    weights: str
    rejection: Rejection
    backend: str
    memory: int
    band_rows: int
    bands: int
    maps: dict[str, str] = field(default_factory=dict)  # map name -> file, or "HDU <name>"
    csv: Path | None = None
    report: Path | None = None
    report_error: str | None = None
    seconds: float = 0.0
    read_seconds: float = 0.0  # reading bands (in the reader thread, beside the combining)
    combine_seconds: float = 0.0
    write_seconds: float = 0.0
    scan_seconds: float = 0.0  # headers, weights, spooling of compressed inputs
    coverage_counts: dict[int, int] = field(default_factory=dict)  # frames covering -> pixels
    rejected_low_share: float = 0.0
    rejected_high_share: float = 0.0
    previews: dict[str, np.ndarray] = field(default_factory=dict)  # small images for the report

    @property
    def used(self) -> list[StackFrame]:
        return [f for f in self.frames if f.status == "used"]

    @property
    def skipped(self) -> list[StackFrame]:
        return [f for f in self.frames if f.status != "used"]

    @property
    def samples_per_frame(self) -> int:
        return int(np.prod(self.shape))

    def summary(self) -> dict:
        """A JSON-able summary (``nsg stack --json``)."""
        return {
            "event": "stack",
            "output": str(self.output),
            "frames": len(self.used),
            "skipped": [{"file": str(f.path), "error": f.error} for f in self.skipped],
            "shape": list(self.shape),
            "weights": self.weights,
            "rejection": self.rejection.method,
            "rejection_settings": self.rejection.describe(),
            "rejection_reason": self.rejection.reason,
            "rejected_low_share": self.rejected_low_share,
            "rejected_high_share": self.rejected_high_share,
            "backend": self.backend,
            "memory_bytes": self.memory,
            "band_rows": self.band_rows,
            "bands": self.bands,
            "maps": self.maps,
            "csv": None if self.csv is None else str(self.csv),
            "report": None if self.report is None else str(self.report),
            "report_error": self.report_error,
            "seconds": self.seconds,
            "read_seconds": self.read_seconds,
            "combine_seconds": self.combine_seconds,
            "write_seconds": self.write_seconds,
            "scan_seconds": self.scan_seconds,
        }


def write_stack_csv(result: StackResult, path: str | os.PathLike) -> Path:
    """Write ``stack.csv``: one row per input frame (:data:`STACK_COLUMNS`), atomically."""
    from .report import _atomic_write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=STACK_COLUMNS)
    writer.writeheader()
    for frame in result.frames:
        writer.writerow(frame.row(result.samples_per_frame))
    path = Path(path)
    _atomic_write_text(path, buffer.getvalue())
    return path


# -- the stack ----------------------------------------------------------------------------------------
def stack(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    output: str | os.PathLike,
    *,
    weights: str = "NWEIGHT",
    rejection: Rejection | str = "auto",
    low: float | None = None,
    high: float | None = None,
    memory: int | str | None = None,
    backend: Backend | str = "auto",
    maps: str = "hdus",
    csv_path: str | os.PathLike | None = None,
    report: bool | str | os.PathLike = False,
    spool_dir: str | os.PathLike | None = None,
    stop_on_error: bool = False,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> StackResult:
    """Integrate registered, normalized frames into a master, streaming them in row bands.

    Parameters
    ----------
    inputs : path or sequence of paths
        Frames (FITS or XISF) and directories (the accepted outputs of ``nsg normalize``:
        :func:`stack_inputs`).

    output : path
        The master, a FITS file (float32); written atomically.

    weights : str
        ``"NWEIGHT"`` (the frames' NSG weight card, the default), ``"equal"``, ``"noise"``
        (``1 / sigma^2`` per channel, from the ``NOISE0n`` cards where a frame has them, else
        the k-sigma noise of its middle :data:`NOISE_ROWS` rows), or any other header keyword
        holding a weight.

    rejection : Rejection or str
        The settings, or a method name (``"auto"`` by the frame count, as NSG sets up
        ImageIntegration); ``low`` and ``high`` then set its thresholds.

    memory : int or str, optional
        Budget in bytes (or ``"4G"``) for the whole process (:func:`plan_bands` says what it
        holds); :func:`default_memory` when not given.

    backend : Backend or str
        ``"auto"`` (CuPy where a GPU is usable), ``"numpy"`` or ``"cupy"``.

    maps : {"hdus", "files", "none"}
        Coverage and low/high rejection-count maps (uint16 per channel) as image extensions
        ``COVERAGE``, ``REJLOW``, ``REJHIGH`` of the master, as ``<stem>_coverage.fits``,
        ``<stem>_rejlow.fits`` and ``<stem>_rejhigh.fits`` beside it, or not at all.

    csv_path : path, optional
        Where ``stack.csv`` goes; beside the master by default.

    report : bool or path
        Add a Stack section to a report page: True for ``report.html`` beside the master
        (inserted into a run's report when one is there, else a page of its own), a path for
        that page. Off by default.

    spool_dir : path, optional
        Where compressed (``.fz``, ``.gz``) and XISF inputs are decompressed once (native
        float32, one frame's size each); a temporary folder beside the master by default,
        removed at the end.

    stop_on_error : bool
        Stop at the first bad frame instead of leaving it out.

    threads : int, optional
        CPU threads combining pixel chunks (the number of cores by default); the result does
        not depend on it.

    progress : callable, optional
        Called as ``progress(bands_done, bands_total)`` after every band.

    Returns
    -------
    StackResult

    Raises
    ------
    StackError
        No usable frame, a bad option, a frame that fails with ``stop_on_error``, or an
        output that would overwrite an input.

    OutputError
        An output cannot be written (it is then absent, never partial).

    Notes
    -----
    Every input file is read once: uncompressed FITS images band by band straight from their
    data (``os.preadv``, no memory map, so the resident memory does not grow with the files),
    compressed FITS and XISF whole, one at a time, into the spool file they are then read
    from. A frame that cannot be used (unreadable, another shape than the first frame's,
    no or a non-positive weight) is left out with its reason in ``stack.csv`` and the
    result; the stack goes on unless ``stop_on_error``. Results do not depend on the
    memory budget (the band height), the pixel chunks or the threads.
    """
    started = time.perf_counter()
    output = Path(output)
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if maps not in ("hdus", "files", "none"):
        raise ValueError(f"maps={maps!r}: choose hdus, files or none")
    if isinstance(rejection, str):
        rejection = Rejection(method=rejection, low=low, high=high)
    elif low is not None or high is not None:
        low = rejection.low if low is None else low
        high = rejection.high if high is None else high
        rejection = dataclasses.replace(rejection, low=low, high=high)
    rejection.resolve(max(len(inputs), 3))  # options checked before any file is read
    chosen = select_backend(backend) if isinstance(backend, str) else backend
    budget = default_memory() if memory is None else parse_memory(memory)
    threads = max(1, int(threads or os.cpu_count() or 1))
    weight_mode = _weight_mode(weights)

    listed = stack_inputs(inputs)
    output_key = output.resolve()
    for path, _ in listed:
        if path.resolve() == output_key:
            raise StackError(f"{output}: the master would overwrite an input frame; choose another -o")
    spool_parent = Path(spool_dir) if spool_dir is not None else output.parent
    try:
        spool_parent.mkdir(parents=True, exist_ok=True)
        spool_root = tempfile.mkdtemp(prefix=".nsg-stack-", dir=spool_parent)
    except OSError as exc:
        raise OutputError(f"{spool_parent}: cannot hold the stack's spool folder ({exc.strerror or exc})") from exc
    try:
        frames, sources = _scan(listed, weight_mode, Path(spool_root), stop_on_error=stop_on_error)
        scan_seconds = time.perf_counter() - started
        used = [s for s in sources if s.error is None]
        if not used:
            reasons = "; ".join(f.error for f in frames if f.error) or "no frames"
            raise StackError(f"no frame can be stacked: {reasons}")
        rejection = rejection.resolve(len(used))
        channels, height, width = used[0].shape
        rows = plan_bands(
            budget,
            n_frames=len(used),
            channels=channels,
            height=height,
            width=width,
            threads=threads,
            gpu=chosen.is_gpu,
        )
        result = StackResult(
            output=output,
            frames=frames,
            shape=(channels, height, width),
            weights=weight_mode,
            rejection=rejection,
            backend=chosen.name,
            memory=budget,
            band_rows=rows,
            bands=-(-height // rows),
            scan_seconds=scan_seconds,
        )
        products = _combine(used, result, chosen, threads=threads, progress=progress)
        _finish_frames(frames, sources, used, products)
        written = time.perf_counter()
        _write_outputs(result, used, products, maps=maps)
        result.csv = write_stack_csv(result, csv_path if csv_path is not None else output.parent / "stack.csv")
        result.write_seconds = time.perf_counter() - written
        result.previews = _previews(products)
    finally:
        shutil.rmtree(spool_root, ignore_errors=True)
    result.seconds = time.perf_counter() - started
    if report:
        from .htmlreport import add_stack_section

        target = output.parent / "report.html" if report is True else Path(report)
        try:
            result.report = add_stack_section(target, result)
        except (OutputError, OSError) as exc:
            result.report_error = str(exc)
    return result


def _weight_mode(weights: str) -> str:
    mode = str(weights).strip()
    if mode.lower() in ("equal", "noise"):
        return mode.lower()
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,8}", mode):
        raise ValueError(f"--weights {weights!r}: use equal, noise or a FITS keyword (up to 8 letters, digits, - or _)")
    return mode.upper()


def _scan(listed, weight_mode: str, spool_root: Path, *, stop_on_error: bool):
    """Open every input once: header, shape, weight; decompress what cannot be read in bands."""
    frames: list[StackFrame] = []
    sources: list[_Input] = []
    reference_shape = None
    for path, from_directory in listed:
        source = _Input(path)
        try:
            try:
                _prepare(source, weight_mode, spool_root, len(sources))
            except _MasterFile:
                if from_directory:
                    continue  # a master of an earlier stack in the directory: never an input
                raise FrameDataError(path, "is a master written by nsg stack, not a frame") from None
            if reference_shape is None:
                reference_shape = source.shape
            elif source.shape != reference_shape:
                raise FrameShapeError(
                    path,
                    f"is {_shape_text(source.shape)} but the first frame is {_shape_text(reference_shape)}; "
                    "frames must be registered to the same reference",
                )
        except FrameError as exc:
            if stop_on_error:
                raise StackError(str(exc)) from exc
            source.error = str(exc)
        sources.append(source)
        weight = None if source.weight is None else tuple(float(w) for w in source.weight)
        frames.append(
            StackFrame(
                path,
                status="used" if source.error is None else "skipped",
                error=source.error,
                weight=weight if source.error is None else None,
                spooled=source.spooled,
            )
        )
    return frames, sources


def _shape_text(shape) -> str:
    channels, height, width = shape
    return f"{width}x{height}" + (f"x{channels}" if channels > 1 else "")


class _MasterFile(Exception):
    """The file is a master written by nsg stack."""


def _prepare(source: _Input, weight_mode: str, spool_root: Path, index: int) -> None:
    path = source.path
    if not path.is_file():
        raise FrameReadError(path, "no such file")
    data = None
    if path.name.lower().endswith(_XISF_SUFFIXES):
        header, rows = None, None
    else:
        header, rows = _open_fits(path)
        if header is not None and MASTER_CARD in header:
            raise _MasterFile(path)
    if rows is None:
        # Compressed FITS or XISF: read whole once and spooled as native float32 for the bands.
        from .io import read_frame

        frame = read_frame(path)
        data = frame.data
        header = frame.header
        if MASTER_CARD in header:
            raise _MasterFile(path)
        spool = spool_root / f"{index:05d}.f32"
        try:
            data.tofile(spool)
        except OSError as exc:
            raise StackError(f"{spool}: cannot spool {path.name} ({exc.strerror or exc}); set --spool-dir") from exc
        rows = _Rows(spool, 0, np.dtype(np.float32), tuple(int(v) for v in data.shape))
        source.spooled = True
    source.header = header
    source.rows = rows
    source.shape = rows.shape
    source.weight = _frame_weight(source, weight_mode, data)


def _frame_weight(source: _Input, mode: str, data: np.ndarray | None) -> np.ndarray:
    channels = source.shape[0]
    path = source.path
    if mode == "equal":
        return np.ones(channels)
    if mode == "noise":
        noise = [source.header.get(f"NOISE0{c}") for c in range(channels)]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in noise):
            noise = _measure_noise(source, data)
        noise = np.asarray(noise, np.float64)
        if not np.all(np.isfinite(noise) & (noise > 0)):
            raise FrameDataError(path, "its noise cannot be measured (too few pixels with data); use another --weights")
        return 1.0 / noise**2
    value = source.header.get(mode)
    if value is None:
        hint = "stack the outputs of nsg normalize, or choose --weights equal|noise|KEYWORD"
        raise FrameDataError(path, f"has no {mode} card; {hint}")
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise FrameDataError(path, f"its {mode} card is {value!r}, not a number") from None
    if not (math.isfinite(weight) and weight > 0):
        raise FrameDataError(path, f"its {mode} card is {weight:g}; weights must be positive")
    return np.full(channels, weight)


def _measure_noise(source: _Input, data: np.ndarray | None) -> list[float]:
    from .noise import ksigma_noise

    channels, height, width = source.shape
    if data is None:
        # The middle rows only: the one place where a frame's pixels are read twice.
        count = min(height, NOISE_ROWS)
        y0 = (height - count) // 2
        data = np.empty((channels, count, width), np.float32)
        fd = os.open(source.rows.file, os.O_RDONLY)
        try:
            source.rows.read(fd, y0, y0 + count, data, bytearray(count * width * source.rows.dtype.itemsize))
        finally:
            os.close(fd)
    return [ksigma_noise(data[c]) for c in range(channels)]


@dataclass
class _Products:
    master: np.ndarray
    coverage: np.ndarray
    low: np.ndarray
    high: np.ndarray
    covered: np.ndarray  # per used frame
    frame_low: np.ndarray
    frame_high: np.ndarray


def _combine(used: list[_Input], result: StackResult, chosen: Backend, *, threads: int, progress) -> _Products:
    """Read the frames band by band (a reader thread one band ahead) and combine each band."""
    channels, height, width = result.shape
    n = len(used)
    rows = result.band_rows
    count_type = np.uint16 if n <= np.iinfo(np.uint16).max else np.uint32
    products = _Products(
        master=np.zeros((channels, height, width), np.float32),
        coverage=np.zeros((channels, height, width), count_type),
        low=np.zeros((channels, height, width), count_type),
        high=np.zeros((channels, height, width), count_type),
        covered=np.zeros(n, np.int64),
        frame_low=np.zeros(n, np.int64),
        frame_high=np.zeros(n, np.int64),
    )
    weights = np.stack([s.weight for s in used])  # (n, channels)
    bands = [(y0, min(height, y0 + rows)) for y0 in range(0, height, rows)]
    buffers: queue.Queue = queue.Queue()
    for _ in range(2):
        buffers.put(np.empty(channels * n * rows * width, np.float32))
    ready: queue.Queue = queue.Queue(maxsize=1)
    handles = _Handles([s.rows.file for s in used])
    stop = threading.Event()
    read_seconds = [0.0]
    covered = products.covered  # written by the reader only

    def reader():
        raw = bytearray(rows * width * max(s.rows.dtype.itemsize for s in used))
        try:
            for y0, y1 in bands:
                flat = buffers.get()
                if stop.is_set():
                    return
                started = time.perf_counter()
                band = flat[: channels * n * (y1 - y0) * width].reshape(channels, n, y1 - y0, width)
                for i, source in enumerate(used):
                    with handles.handle(i) as fd:
                        source.rows.read(fd, y0, y1, band[:, i], raw)
                    for c in range(channels):  # samples with data (no temporary without an axis)
                        covered[i] += np.count_nonzero(band[c, i])
                read_seconds[0] += time.perf_counter() - started
                ready.put((y0, y1, flat, band))
            ready.put(None)
        except BaseException as exc:  # handed to the combining thread, which raises it
            ready.put(exc)

    thread = threading.Thread(target=reader, name="nsg-stack-reader", daemon=True)
    thread.start()
    pool = concurrent.futures.ThreadPoolExecutor(threads) if threads > 1 and not chosen.is_gpu else None
    combine_seconds = 0.0
    try:
        done = 0
        while True:
            item = ready.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            y0, y1, flat, band = item
            started = time.perf_counter()
            for c in range(channels):
                values = band[c].reshape(n, (y1 - y0) * width)
                out = {
                    name: getattr(products, name)[c, y0:y1].reshape(-1)  # views: rows are contiguous
                    for name in ("master", "coverage", "low", "high")
                }
                _combine_values(values, weights[:, c], result.rejection, chosen, pool, threads, out, products)
            combine_seconds += time.perf_counter() - started
            buffers.put(flat)
            done += 1
            if progress is not None:
                progress(done, len(bands))
    finally:
        stop.set()
        while thread.is_alive():  # unblock the reader wherever it waits, then let it end
            with contextlib.suppress(queue.Empty):
                ready.get_nowait()
            buffers.put(np.empty(0, np.float32))
            thread.join(0.05)
        handles.close()
        if pool is not None:
            pool.shutdown()
    result.read_seconds = read_seconds[0]
    result.combine_seconds = combine_seconds
    return products


def _combine_values(
    values: np.ndarray,
    weights: np.ndarray,
    rejection: Rejection,
    chosen: Backend,
    pool,
    threads,
    out: dict,
    products: _Products,
) -> None:
    """One channel of one band into ``out`` (flat views of the band's rows of the master and
    maps): on the GPU in device-sized chunks, on the CPU in pixel chunks spread over the
    threads, a wave of ``threads`` chunks at a time so that their outputs stay small. The
    chunks do not change the result."""
    n, pixels = values.shape

    def store(start: int, part: BandResult, host) -> None:
        end = start + int(part.master.shape[0])
        for name in ("master", "coverage", "low", "high"):
            out[name][start:end] = host(getattr(part, name))
        products.frame_low += host(part.frame_low)
        products.frame_high += host(part.frame_high)

    if chosen.is_gpu:
        xp = chosen.xp
        free = _device_free_bytes()
        per_pixel = n * (4 + 4 + 4 + 1 + (8 if rejection.method == "linear" else 0)) + 16
        step = max(1024, int(free * 0.5) // per_pixel)
        for start in range(0, pixels, step):
            device = xp.asarray(values[:, start : start + step])
            store(start, reject_combine(device, weights, rejection), chosen.to_host)
        return
    step = max(1, CHUNK_SAMPLES // max(1, n))
    starts = list(range(0, pixels, step))

    def run(start: int) -> BandResult:
        return reject_combine(np.ascontiguousarray(values[:, start : start + step]), weights, rejection)

    for wave in range(0, len(starts), threads):
        batch = starts[wave : wave + threads]
        parts = pool.map(run, batch) if pool is not None and len(batch) > 1 else map(run, batch)
        for start, part in zip(batch, parts):
            store(start, part, np.asarray)


def _device_free_bytes() -> int:
    import cupy

    free, _ = cupy.cuda.runtime.memGetInfo()
    return int(free) + int(cupy.get_default_memory_pool().free_bytes())


def _finish_frames(frames: list[StackFrame], sources: list[_Input], used: list[_Input], products: _Products) -> None:
    by_source = {id(s): k for k, s in enumerate(used)}
    best = max(float(np.mean(s.weight)) for s in used)
    for frame, source in zip(frames, sources):
        k = by_source.get(id(source))
        if k is None:
            continue
        frame.covered = int(products.covered[k])
        frame.rejected_low = int(products.frame_low[k])
        frame.rejected_high = int(products.frame_high[k])
        frame.relative_weight = float(np.mean(source.weight)) / best


def _master_header(first: fits.Header, result: StackResult, used: list[_Input]) -> fits.Header:
    """The first frame's cards (WCS, target, optics) without per-frame NSG cards, plus the stack's."""
    header = fits.Header()
    for card in first.cards:
        key = card.keyword or ""
        if _STRUCTURAL.match(key) or _PER_FRAME.match(key) or key in (result.weights, "NWEIGHT", "NCOMBINE"):
            continue
        if key == "HISTORY" and str(card.value).startswith("NSG."):
            continue
        header.append(card, end=True)
    rejection = result.rejection
    header[MASTER_CARD] = (f"nsg-gpu {__version__}", "master integrated by nsg stack")
    header["NCOMBINE"] = (len(used), "frames combined")
    header["NSGSWGT"] = (result.weights, "nsg stack weights")
    header["NSGSREJ"] = (rejection.method, "nsg stack pixel rejection")
    if rejection.low is not None:
        header["NSGSRLO"] = (float(rejection.low), "nsg stack low rejection threshold")
        header["NSGSRHI"] = (float(rejection.high), "nsg stack high rejection threshold")
    header["NSGSRJL"] = (float(f"{result.rejected_low_share:.6g}"), "share of samples rejected low")
    header["NSGSRJH"] = (float(f"{result.rejected_high_share:.6g}"), "share of samples rejected high")
    header.add_history(f"NSG.stack nsg-gpu {__version__}: weighted average of {len(used)} frames, 0 = no data")
    header.add_history(f"NSG.stack weights: {result.weights}")
    for line in rejection.history():
        header.add_history(f"NSG.stack {line}")
    for k, source in enumerate(used):
        weight = "/".join(f"{w:.6g}" for w in source.weight)
        header.add_history(f"NSG.stack frame {k + 1}: {source.path.name} weight {weight}")
    return header


def _write_outputs(result: StackResult, used: list[_Input], products: _Products, *, maps: str) -> None:
    result.rejected_low_share = float(products.low.sum(dtype=np.int64)) / max(
        1, int(products.coverage.sum(dtype=np.int64))
    )
    result.rejected_high_share = float(products.high.sum(dtype=np.int64)) / max(
        1, int(products.coverage.sum(dtype=np.int64))
    )
    counts = np.bincount(products.coverage.reshape(-1).astype(np.int64), minlength=len(used) + 1)
    result.coverage_counts = {k: int(v) for k, v in enumerate(counts) if v}
    header = _master_header(used[0].header, result, used)
    mono = result.shape[0] == 1

    def image(array):
        return array[0] if mono else array

    map_arrays = {"coverage": products.coverage, "rejlow": products.low, "rejhigh": products.high}
    titles = {
        "coverage": "frames with data per pixel",
        "rejlow": "samples rejected low",
        "rejhigh": "samples rejected high",
    }
    primary = fits.PrimaryHDU(data=image(products.master), header=header)
    hdus = [primary]
    if maps == "hdus":
        for name, array in map_arrays.items():
            extension = fits.ImageHDU(data=image(array), name=name.upper())
            extension.header["COMMENT"] = f"nsg stack: {titles[name]}"
            hdus.append(extension)
            result.maps[name] = f"HDU {name.upper()}"
    elif maps == "files":
        stem = result.output.name
        for suffix in (".fits", ".fit", ".fts"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
        for name, array in map_arrays.items():
            path = result.output.parent / f"{stem}_{name}.fits"
            map_header = fits.Header()
            map_header["COMMENT"] = f"nsg stack: {titles[name]} of {result.output.name}"
            _write_fits(path, fits.HDUList([fits.PrimaryHDU(data=image(array), header=map_header)]))
            result.maps[name] = str(path)
    _write_fits(result.output, fits.HDUList(hdus))


def _write_fits(path: Path, hdul: fits.HDUList) -> None:
    """Write ``hdul`` to a temporary file beside ``path``, sync it and rename it into place."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            hdul.writeto(handle, output_verify="silentfix")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise OutputError(f"{path}: cannot be written ({exc.strerror or exc})") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _previews(products: _Products, width: int = 800) -> dict[str, np.ndarray]:
    """Block means of the master and maps, at most ``width`` pixels wide, for the report
    (reduced in double through views: no full-size temporaries)."""
    channels, height, full = products.master.shape
    factor = max(1, -(-full // width))
    h, w = height // factor, full // factor
    if h == 0 or w == 0:
        factor, h, w = 1, height, full

    def shrink(array):
        blocks = array[..., : h * factor, : w * factor].reshape(*array.shape[:-2], h, factor, w, factor)
        return blocks.mean(axis=(-3, -1), dtype=np.float64).astype(np.float32)

    return {
        "master": shrink(products.master),
        "coverage": shrink(products.coverage[0]),
        "rejlow": sum(shrink(products.low[c]) for c in range(channels)),
        "rejhigh": sum(shrink(products.high[c]) for c in range(channels)),
    }
