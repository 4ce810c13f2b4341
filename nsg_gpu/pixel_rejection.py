"""Pixel rejection for stacking: the methods, their thresholds, and NSG's choice by frame count.

Below the per-pixel kernel (:mod:`nsg_gpu.combine`) and the stack (:mod:`nsg_gpu.stacking`):
what :class:`Rejection` holds is what the kernel and its twin run. The methods follow
PixInsight ImageIntegration's definitions (our own code).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

from .errors import ParameterError

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
METHOD_CODES = {**{name: code for code, name in enumerate(METHODS)}, "auto": len(METHODS)}
#: Default (low, high) thresholds: NSG's set-up of ImageIntegration, PixInsight's for linear fit.
THRESHOLDS = {"percentile": (0.2, 0.1), "sigma": (3.5, 2.5), "winsorized": (3.5, 2.2), "linear": (5.0, 4.0)}
#: Winsorization cut-off (sigma) of the first iteration: NSG's set-up.
WINSORIZATION_CUTOFF = 3.5
#: Generalized ESD: significance, largest share of outliers, low relaxation (PixInsight's defaults).
ESD_ALPHA, ESD_OUTLIERS, ESD_LOW_RELAXATION = 0.05, 0.3, 1.0


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
                raise ParameterError("--low/--high set the thresholds of one method: choose it with --rejection")
            everywhere, _ = auto_rejection(n_frames)
            reason = (
                f"auto, by the frames with data at each pixel (NSG's rule by frame count): "
                f"{METHOD_TITLES[everywhere]} where all {n_frames} frames cover"
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
