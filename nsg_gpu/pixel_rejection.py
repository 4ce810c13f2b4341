"""Pixel rejection for stacking: the methods, their thresholds, and NSG's choice by frame count.

Below the per-pixel kernel (:mod:`nsg_gpu.combine`) and the stack (:mod:`nsg_gpu.stacking`):
what :class:`Rejection` holds is what the kernel and its twin run. The methods follow
PixInsight ImageIntegration's definitions (our own code), except ``noise``: clipping against
the sky's noise (:class:`NoiseMap`) and a share of what stands out at a star's scale
(:func:`peak_excess`), like IRAF
imcombine's ``ccdclip`` with its sensitivity noise, which ``auto`` uses below 8 frames
instead of NSG's percentile clipping (that clips the cores of every star sharper than the
median frame: docs/stacking.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

from .errors import ParameterError

#: Rejection methods, in the order of their kernel codes.
METHODS = ("none", "percentile", "sigma", "winsorized", "esd", "linear", "noise")
METHOD_TITLES = {
    "none": "no rejection",
    "percentile": "percentile clipping",
    "sigma": "sigma clipping",
    "winsorized": "winsorized sigma clipping",
    "esd": "generalized extreme studentized deviate (ESD)",
    "linear": "linear fit clipping",
    "noise": "noise clipping",
}
METHOD_CODES = {**{name: code for code, name in enumerate(METHODS)}, "auto": len(METHODS)}
#: Default (low, high) thresholds: NSG's set-up of ImageIntegration, PixInsight's for linear fit,
#: sigmas of the noise model for noise clipping.
THRESHOLDS = {
    "percentile": (0.2, 0.1),
    "sigma": (3.5, 2.5),
    "winsorized": (3.5, 2.2),
    "linear": (5.0, 4.0),
    "noise": (4.0, 3.0),
}
#: Noise clipping: the share of a pixel's peak (:func:`peak_excess`) by which frames may differ
#: there without being outliers. A star's pixels change with the seeing and, where it is a
#: pixel or two wide, with where in the pixel each frame caught it: on 4 real colour frames of
#: one night (stars of 1.3-1.6 px) a share of 0.5 took 3-14 % of the light of a tenth of the
#: stars out of the master, 1 took 1-3 %, 1.5 0.3-0.7 % (docs/stacking.md).
SIGNAL_SHARE = 1.5
#: Noise clipping: the distance (pixels) along a row at which a pixel's peak is measured.
PEAK_REACH = 3
#: Noise clipping: the medians are averaged over ``2 PEAK_SMOOTH + 1`` pixels along the row
#: before their difference is taken (the difference of two single medians of 3 frames has about
#: one sigma of noise: on the sky its tail loosened the clipping, and 7-9 sigma trails went
#: through), and ``PEAK_NOISE`` sigmas of the sky's noise are taken off the peak: on frames of
#: noise alone the peak is then 0 on 95 % of the pixels at 3 frames, 99.5 % at 7.
PEAK_SMOOTH = 1
PEAK_NOISE = 1.0
#: Noise clipping: samples (frames x pixels) of whole rows whose peaks are found at a time, and
#: the bytes that takes at most (the samples sorted, and a few double arrays per pixel).
PEAK_CHUNK_SAMPLES = 1 << 20
PEAK_BYTES = PEAK_CHUNK_SAMPLES * 6 + (PEAK_CHUNK_SAMPLES // 3) * 72
#: Pixels of a band whose noise :meth:`NoiseMap.band` interpolates at a time.
BAND_CHUNK_PIXELS = 1 << 16
#: Noise clipping: the side of the boxes in which the sky's noise is read (pixels).
NOISE_BOX = 16
#: The median absolute deviation of a normal distribution cut at 3 sigma over the uncut one's.
MAD_CUT_FACTOR = 0.99685
#: Winsorization cut-off (sigma) of the first iteration: NSG's set-up.
WINSORIZATION_CUTOFF = 3.5
#: Generalized ESD: significance, largest share of outliers, low relaxation (PixInsight's defaults).
ESD_ALPHA, ESD_OUTLIERS, ESD_LOW_RELAXATION = 0.05, 0.3, 1.0


def auto_rejection(n_frames: int) -> tuple[str, str]:
    """The method ``auto`` uses for ``n_frames``, and why: NSG's set-up of ImageIntegration
    from 8 frames, noise clipping below.

    ``rejection="auto"`` applies it pixel by pixel to the frames that have data there, so a
    pixel in a registration border covered by 5 frames of a 24-frame stack is clipped as 5
    frames are (sigma clipping cannot reject one outlier among 6 or fewer samples). Below 8
    frames NSG uses percentile clipping (0.2 / 0.1 of the median), which takes 6-10 % of the
    stars' light out of a master of 4 real frames; noise clipping rejects what exceeds the
    sky's noise and a share of each pixel's peak, so the stars keep theirs (docs/stacking.md).
    """
    if n_frames <= 2:
        return "none", f"{n_frames} frame(s): too few to reject pixels"
    if n_frames < 8:
        return "noise", f"{n_frames} frames: noise clipping below 8 frames"
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
        ``"auto"`` (by the number of frames with data at each pixel: :func:`auto_rejection`,
        with the default thresholds) or one of :data:`METHODS`.

    low, high : float, optional
        Thresholds below and above the centre: fractions of the median for ``percentile``,
        sigmas for ``sigma``, ``winsorized``, ``linear`` and ``noise``; :data:`THRESHOLDS`
        when not given. ``esd`` takes none.

    clip_low, clip_high : bool
        Reject on that side at all.

    cutoff : float
        Winsorized clipping: in its first iteration, samples farther than ``cutoff`` sigma
        are set to the centre instead of to the winsorization bound; 0 turns that off.

    esd_alpha, esd_outliers, esd_low_relaxation : float
        Generalized ESD: significance of the test, largest share of the samples that may be
        outliers, and the factor low deviations are divided by (1: symmetric).

    signal_share : float
        Noise clipping: the share of a pixel's peak (:func:`peak_excess`) by which frames may
        differ there (:data:`SIGNAL_SHARE`); 0 clips against the sky's noise alone.

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
    signal_share: float = SIGNAL_SHARE
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
                raise ParameterError("--low/--high set the thresholds of one method: choose it with --rejection")
            everywhere, _ = auto_rejection(n_frames)
            reason = (
                f"auto, by the frames with data at each pixel (NSG's rule by frame count from 8 frames, "
                f"noise clipping below): {METHOD_TITLES[everywhere]} where all {n_frames} frames cover"
            )
            self._check_options()
            return dataclasses.replace(self, method="auto", reason=reason)
        if method not in METHODS:
            raise ParameterError(
                f"unknown rejection method {self.method!r}; choose auto or one of {', '.join(METHODS)}"
            )
        low, high = self.low, self.high
        if method in THRESHOLDS:
            default_low, default_high = THRESHOLDS[method]
            low = default_low if low is None else float(low)
            high = default_high if high is None else float(high)
            least = 0.0 if method == "percentile" else None
            for name, value in (("low", low), ("high", high)):
                if not math.isfinite(value) or (value < 0 if least == 0.0 else value <= 0):
                    bound = "at least 0" if least == 0.0 else "above 0"
                    raise ParameterError(f"--{name} {value:g} for {METHOD_TITLES[method]}: it must be {bound}")
        elif low is not None or high is not None:
            if method == "esd":
                raise ParameterError(
                    "generalized ESD takes no --low/--high: set --esd-alpha, --esd-outliers and --esd-low-relaxation"
                )
            raise ParameterError("--low/--high need a rejection method; --rejection none has no thresholds")
        self._check_options()
        return dataclasses.replace(self, method=method, low=low, high=high, reason=reason)

    def _check_options(self) -> None:
        if not (self.cutoff == 0 or self.cutoff > 1.5):
            raise ParameterError(f"winsorization cut-off {self.cutoff:g}: use 0 (off) or a value above 1.5 sigma")
        if not 0 < self.esd_alpha < 1:
            raise ParameterError(f"ESD significance {self.esd_alpha:g}: it must be between 0 and 1")
        if not 0 < self.esd_outliers <= 1:
            raise ParameterError(f"ESD outliers share {self.esd_outliers:g}: it must be in (0, 1]")
        if not self.esd_low_relaxation >= 1:
            raise ParameterError(f"ESD low relaxation {self.esd_low_relaxation:g}: it must be at least 1")
        if not 0 <= self.signal_share <= 10:
            raise ParameterError(f"signal share {self.signal_share:g}: it must be between 0 and 10")

    def for_stack(self, n_frames: int) -> Rejection:
        """These resolved settings for a stack of ``n_frames`` frames: a method chosen by name
        turns into none below 3 frames (of one or two samples none can be told to be the
        outlier; ImageIntegration too leaves rejection out there), with the reason said."""
        if self.method in ("none", "auto") or n_frames > 2:
            return self
        reason = f"{METHOD_TITLES[self.method]} asked, but {n_frames} frame(s) are too few to reject pixels: none"
        return dataclasses.replace(
            self, method="none", low=None, high=None, clip_low=True, clip_high=True, reason=reason
        )

    def needs_noise(self, n_frames: int) -> bool:
        """Whether some pixel of ``n_frames`` frames is noise-clipped (resolved settings): the
        stack then reads the sky's noise first (:class:`NoiseMap`)."""
        return self.method in ("noise", "auto") and n_frames >= 3

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
        name = {"sigma": "sigma clipping", "winsorized": "winsorized", "linear": "linear fit", "noise": "noise"}
        text = f"{name[method]} low {self.low:g} high {self.high:g} sigma"
        if method == "winsorized":
            text += f", cut-off {self.cutoff:g}"
        if method == "noise":
            text += f", share {self.signal_share:g}"
        return text

    def history(self) -> list[str]:
        """Lines for the master's HISTORY, each short enough for one card."""
        if self.method == "auto":
            spans = (("noise", "3-7"), ("sigma", "8-10"), ("winsorized", "11-19"), ("esd", "20+"))
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
                    ("noise", "3-7 frames"),
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
        elif method == "noise":
            text = (
                f"noise clipping, low {self.low:g} sigma, high {self.high:g} sigma of the sky's noise and "
                f"{self.signal_share:g} of the peak"
            )
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


def peak_excess(
    values: np.ndarray,
    width: int,
    needed: np.ndarray | None = None,
    noise: np.ndarray | None = None,
    *,
    noise_factor: float = 1.0,
    run=map,
) -> np.ndarray:
    """How far each pixel's median over the frames stands above its row's at :data:`PEAK_REACH`
    pixels on either side, beyond what the noise makes of it:
    ``max(0, m(x) - min(m(x - r), m(x + r)) - PEAK_NOISE * noise_factor * noise(x))``, float32.

    ``values`` is a band of ``(frames, rows * width)`` samples (0 and non-finite: no data);
    ``c`` the median of each pixel's samples with data and ``m`` its mean over
    ``x - PEAK_SMOOTH .. x + PEAK_SMOOTH`` along the row (over the pixels with data there; a
    side without data or beyond the row's end is left out; a pixel with neither side, or
    without data, gets 0); ``noise`` the sky's noise of one frame at each pixel (0 when not
    given). Only the pixels in ``needed`` (all when not given) get a value, the others 0,
    the same as the whole band gives them. ``run`` maps a function over the chunks of rows
    (a thread pool's ``map`` runs them side by side; the chunks are fixed, so the result is
    the same). A star of a few pixels, whose
    pixels the seeing and the sub-pixel place change from frame to frame, stands out at its
    core and on its flanks (against the sky on its far side); the sky, a nebula, a gradient
    and one frame's trail or hot pixel (not in the median) hardly do.
    """
    frames, pixels = values.shape
    rows = pixels // width if width else 0
    excess = np.zeros(pixels, np.float32)
    step = max(1, PEAK_CHUNK_SAMPLES // max(1, width * frames))  # rows at a time: each row is its own
    needed = None if needed is None else np.asarray(needed, bool)
    noise = None if noise is None else np.asarray(noise)

    def chunk(r0: int) -> None:
        part = slice(r0 * width, min(rows, r0 + step) * width)
        excess[part] = _row_peaks(
            values[:, part],
            width,
            None if needed is None else needed[part],
            None if noise is None else noise[part],
            noise_factor,
        )

    for _ in run(chunk, range(0, rows, step)):
        pass
    return excess


def _row_peaks(values: np.ndarray, width: int, needed, noise, noise_factor: float = 1.0) -> np.ndarray:
    """:func:`peak_excess` of whole rows."""
    frames, pixels = values.shape
    reach, smooth = PEAK_REACH, PEAK_SMOOTH
    rows = pixels // width if width else 0
    excess = np.zeros(pixels, np.float32)
    if needed is None:
        at = None
    else:
        needed = np.asarray(needed, bool).reshape(rows, width)
        if not needed.any():
            return excess
        mark = needed.copy()  # the medians the wanted pixels' values are made of
        for d in range(1, reach + smooth + 1):
            mark[:, d:] |= needed[:, :-d]
            mark[:, :-d] |= needed[:, d:]
        at = np.flatnonzero(mark)
        if at.size == pixels:
            at = None
    centre = np.full(pixels, np.nan)
    if frames:
        centre[slice(None) if at is None else at] = _medians(values if at is None else values[:, at])
    centre = centre.reshape(rows, width)
    # Their mean over 2 smooth + 1 pixels along the row (over those with data), then the peak.
    present = np.isfinite(centre)
    level = np.where(present, centre, 0.0)
    sums, counts = level.copy(), present.astype(np.int8)
    for d in range(1, smooth + 1):
        sums[:, d:] += level[:, :-d]
        counts[:, d:] += present[:, :-d]
        sums[:, :-d] += level[:, d:]
        counts[:, :-d] += present[:, d:]
    del level
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.divide(sums, counts, out=sums)  # NaN where no pixel around has data
    del counts
    # The lower of the means at reach on either side (fmin: a side without data is left out).
    side = np.full((rows, width), np.nan)
    side[:, reach:] = mean[:, :-reach]
    np.fmin(side[:, :-reach], mean[:, reach:], out=side[:, :-reach])
    value = np.subtract(mean, side, out=side)
    del mean
    if noise is not None:
        value -= PEAK_NOISE * noise_factor * np.asarray(noise, np.float64).reshape(rows, width)
    keep = present & np.isfinite(value) & (value > 0)
    if needed is not None:
        keep &= needed
    excess[keep.reshape(-1)] = value[keep]
    return excess


#: Up to this many frames each pixel's samples are put in order by a sorting network (minima and
#: maxima of whole rows of pixels, no transposed copy), beyond it by NumPy's sort.
NETWORK_FRAMES = 12


@functools.cache
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """The compare-exchange pairs ``(i, j)``, ``i < j``, of Batcher's odd-even merge sort that put
    ``n`` values in ascending order: the network of the next power of two, without the pairs
    that reach beyond ``n`` (values there would be +inf, which those pairs leave in place)."""
    size = 1 << max(0, n - 1).bit_length()
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        pairs.append((a, b))
            k //= 2
        p *= 2
    return tuple(pairs)


def _medians(values: np.ndarray) -> np.ndarray:
    """The median of each column's samples with data (0 and non-finite: none), float64; NaN
    where a column has none. The middle one or two of the sorted samples, so the same bits
    whichever way they are sorted."""
    frames, pixels = values.shape
    data = np.isfinite(values) & (values != 0)
    columns = np.arange(pixels)
    if frames <= NETWORK_FRAMES:  # counts of at most 12 in bytes: no cast per sample
        count = np.add.reduce(data.view(np.uint8), axis=0, dtype=np.uint8).astype(np.intp)
        block = np.where(data, values, np.inf)
        del data
        smaller = np.empty(pixels, block.dtype)
        for i, j in sorting_network(frames):
            np.minimum(block[i], block[j], out=smaller)
            np.maximum(block[i], block[j], out=block[j])
            block[i] = smaller
        del smaller
        flat, first = block.reshape(-1), columns
        stride = pixels
    else:
        count = np.count_nonzero(data, axis=0)
        block = np.array(values.T, order="C")  # (pixels, frames), a copy even of one column
        block[~data.T] = np.inf
        del data
        block.sort(axis=1)
        flat, first = block.reshape(-1), columns * frames
        stride = 1
    low = flat[first + (np.maximum(count - 1, 0) // 2) * stride].astype(np.float64)
    high = flat[first + np.minimum(count // 2, frames - 1) * stride].astype(np.float64)
    return np.where(count > 0, (low + high) * 0.5, np.nan)


@dataclass(frozen=True)
class NoiseMap:
    """The sky's noise per channel in boxes of a frame: what noise clipping measures each
    pixel's samples against.

    It is read from the difference of two frames, in which the sky's structure (a nebula, a
    gradient) cancels and the noise of both adds: in every box of ``box`` x ``box`` pixels
    where both frames have data on at least a quarter of them, ``1.4826 x`` the median
    absolute deviation of the difference from its median, over ``sqrt(1 + v)`` with ``v``
    the second frame's noise variance over the first's (from inverse-variance weights: the
    first frame's noise), a star's few pixels left out by the median (:func:`_clipped_mad`).
    Boxes with less data take the nearest box's value; each box then the mean of the 3 x 3
    boxes around it (a box's own estimate scatters by about 7 %, the mean by about 2.5 %).
    It is read at each pixel bilinearly between the boxes' centres (constant beyond the outer
    ones), so that a value depends on the pixel's place only, not on the band it is read in.

    Attributes
    ----------
    noise : float64 array (channels, boxes down, boxes across)
    box : int
    height, width : int
    """

    noise: np.ndarray
    box: int
    height: int
    width: int

    @classmethod
    def measure(cls, read_rows, shape, *, box: int = NOISE_BOX, variance_ratio=None) -> NoiseMap:
        """Measure two frames read ``box`` rows at a time.

        Parameters
        ----------
        read_rows : callable
            ``read_rows(y0, y1)`` gives rows ``[y0, y1)`` of both frames, float32
            (2, channels, rows, width); 0 and non-finite pixels are no data.
        shape : (channels, height, width)
        variance_ratio : sequence of float, optional
            Per channel, the second frame's noise variance over the first's; 1 when not given.
        """
        import scipy.ndimage

        channels, height, width = (int(v) for v in shape)
        ratio = np.ones(channels) if variance_ratio is None else np.asarray(variance_ratio, np.float64)
        rows_of_boxes, columns = -(-height // box), -(-width // box)
        noise = np.full((channels, rows_of_boxes, columns), np.nan)
        full = width // box
        for k in range(rows_of_boxes):
            y0, y1 = k * box, min(height, (k + 1) * box)
            first, second = np.asarray(read_rows(y0, y1), np.float32)
            for c in range(channels):
                a, b = first[c].astype(np.float64), second[c].astype(np.float64)
                valid = np.isfinite(a) & (a != 0) & np.isfinite(b) & (b != 0)
                plane = np.where(valid, a - b, 0.0)
                partial: list[int] = []
                if full:
                    blocks = plane[:, : full * box].reshape(y1 - y0, full, box).transpose(1, 0, 2).reshape(full, -1)
                    whole = valid[:, : full * box].reshape(y1 - y0, full, box).all(axis=(0, 2))
                    if whole.any():
                        noise[c, k, :full][whole] = _clipped_mad(blocks[whole])
                    partial = np.flatnonzero(~whole).tolist()
                for j in [*partial, *range(full, columns)]:
                    x0, x1 = j * box, min(width, (j + 1) * box)
                    values = plane[:, x0:x1][valid[:, x0:x1]]
                    if values.size >= max(16, (y1 - y0) * (x1 - x0) // 4):
                        noise[c, k, j] = _clipped_mad(values[None])[0]
        for c in range(channels):
            missing = np.isnan(noise[c])
            if missing.all():
                noise[c] = 0.0
            elif missing.any():
                _, (iy, ix) = scipy.ndimage.distance_transform_edt(missing, return_indices=True)
                noise[c] = noise[c][iy, ix]
            noise[c] = scipy.ndimage.uniform_filter(noise[c], size=3, mode="nearest")
            noise[c] *= 1.0 / math.sqrt(1.0 + ratio[c])
        return cls(noise, box, height, width)

    def band(self, channel: int, y0: int, y1: int) -> np.ndarray:
        """The noise of rows ``[y0, y1)`` of ``channel``, float32, flattened row by row."""
        grid = self.noise[channel]

        def axis(positions: np.ndarray, size: int):
            place = np.clip((positions + 0.5) / self.box - 0.5, 0.0, size - 1.0)
            first = np.minimum(np.floor(place).astype(np.int64), max(size - 2, 0))
            return first, np.minimum(first + 1, size - 1), place - first

        top, bottom, ty = axis(np.arange(y0, y1, dtype=np.float64), grid.shape[0])
        left, right, tx = axis(np.arange(self.width, dtype=np.float64), grid.shape[1])
        rows = grid[top] * (1.0 - ty)[:, None] + grid[bottom] * ty[:, None]
        out = np.empty((y1 - y0, self.width), np.float32)
        step = max(1, BAND_CHUNK_PIXELS // max(1, self.width))
        for r in range(0, y1 - y0, step):  # a few rows at a time: the gathers stay in cache
            values = np.take(rows[r : r + step], left, axis=1)
            values *= 1.0 - tx
            values += np.take(rows[r : r + step], right, axis=1) * tx
            out[r : r + step] = values
        return out.reshape(-1)


def _clipped_mad(rows: np.ndarray) -> np.ndarray:
    """``1.4826 x`` the median absolute deviation of each row from its median, again over the
    deviations within 3 such sigma, over :data:`MAD_CUT_FACTOR` (a quarter of a box 10 sigma
    high, a trail or a star's residual, raises the first estimate by about half, the second
    by a tenth)."""
    centre = np.median(rows, axis=1, keepdims=True)
    distance = np.sort(np.abs(rows - centre), axis=1)
    size = distance.shape[1]
    index = np.arange(distance.shape[0])
    first = 1.4826 * (distance[:, (size - 1) // 2] + distance[:, size // 2]) * 0.5
    kept = np.maximum(np.count_nonzero(distance <= 3.0 * first[:, None], axis=1), 1)
    middle = (distance[index, (kept - 1) // 2] + distance[index, kept // 2]) * 0.5
    return 1.4826 * middle / MAD_CUT_FACTOR
