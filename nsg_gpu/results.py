"""Results: what a run says about each frame, and about the whole run.

:class:`FrameResult` is one frame's row (scale, transmission, weight, what the fits used, its
header facts as a :class:`~nsg_gpu.io.FrameMeta`, its timings, why it failed or was rejected);
:class:`RunResult` holds them all, the reference first. The jobs fill them
(:mod:`nsg_gpu.jobs`), a resumed run rebuilds them from the outputs' cards
(:mod:`nsg_gpu.resume`), and the results files, plots and report read them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FrameError
from .io import FrameMeta, read_meta
from .params import Parameters
from .scalefit import scale_doubt

__all__ = ["FrameResult", "RunResult", "failed_result", "STAGES"]

#: The stages of one target, in order, as keys of :attr:`FrameResult.timings`.
STAGES = ("read", "detect", "photometry", "sampling", "spline_fit", "spline_eval", "apply", "noise", "write")


@dataclass
class FrameResult:
    """The outcome for one frame: numbers for the results table, and the data when kept."""

    path: str
    output: str | None = None
    status: str = "ok"  # ok | reference | failed
    error: str | None = None
    scale: list[float] = field(default_factory=list)
    transmission: list[float] = field(default_factory=list)
    #: One-sigma standard error of each transmission (NSGSERRn), from the scale fit.
    transmission_error: list[float] = field(default_factory=list)
    snr: list[float] = field(default_factory=list)
    weight: float | None = None
    weight_source: str | None = None
    star_pairs: int | None = None
    samples: int | None = None
    noise: list[float] = field(default_factory=list)
    fwhm: float | None = None
    photometry: str | None = None  # what measured the star fluxes (ScaleMeasurement.photometry)
    beta: float | None = None  # Moffat index of the fitted PSF
    ellipticity: float | None = None  # 1 - b/a of the fitted PSF (stars drawn out)
    elongation_angle: float | None = None  # its major axis, degrees from the x axis
    high: float | None = None
    meta: FrameMeta = field(default_factory=FrameMeta)  # the frame's header facts
    seconds: float | None = None
    resumed: bool = False  # the output of an earlier run was complete and up to date, and kept
    rejected: str | None = None  # why the frame was rejected (its output is in rejected/)
    relative_weight: float | None = None  # weight / best weight (per unit exposure when known)
    relative_transmission: float | None = None
    warning: str | None = None
    data: object = None  # normalized data, only for in-memory use
    diagnostics: object = None  # FrameDiagnostics, only when asked for (plots)
    #: Wall seconds per stage of :data:`STAGES` (those the frame reached).
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def scale_flag(self) -> str | None:
        """Why the scale is in doubt (:func:`nsg_gpu.scalefit.scale_doubt`), or None."""
        return scale_doubt(self.transmission, self.transmission_error, star_pairs=self._fitted_pairs)

    @property
    def transmission_doubt(self) -> str | None:
        """Why the mean transmission over the channels, which rejection compares between frames,
        is in doubt (:func:`nsg_gpu.scalefit.scale_doubt` of the mean), or None: such a frame
        does not set the bar the others are measured against (:mod:`nsg_gpu.rejection`)."""
        return scale_doubt(self.transmission, self.transmission_error, star_pairs=self._fitted_pairs, mean=True)

    @property
    def _fitted_pairs(self) -> int | None:
        """The star pairs of the scale fit; the reference's count is its stars, not a fit's."""
        return None if self.status == "reference" else self.star_pairs

    @property
    def exposure(self) -> float | None:
        return self.meta.exposure

    @property
    def altitude(self) -> float | None:
        return self.meta.altitude

    @property
    def airmass(self) -> float | None:
        return self.meta.airmass

    @property
    def filter(self) -> str | None:
        return self.meta.filter

    @property
    def date_obs(self) -> str | None:
        return self.meta.date_obs

    def row(self) -> dict:
        """A flat dict for results.csv / results.json."""
        out = {
            "file": self.path,
            "output": self.output,
            "status": self.status,
            "error": self.error,
            "rejected": self.rejected,
            "warning": self.warning,
            "scale_flag": self.scale_flag,
            "resumed": self.resumed,
            "relative_weight": self.relative_weight,
            "relative_transmission": self.relative_transmission,
            "weight": self.weight,
            "weight_source": self.weight_source,
            "star_pairs": self.star_pairs,
            "samples": self.samples,
            "fwhm": self.fwhm,
            "photometry": self.photometry,
            "beta": self.beta,
            "ellipticity": self.ellipticity,
            "elongation_angle": self.elongation_angle,
            "high": self.high,
            "altitude": self.altitude,
            "airmass": self.airmass,
            "exposure": self.exposure,
            "filter": self.filter,
            "date_obs": self.date_obs,
            "seconds": self.seconds,
        }
        for c in range(3):
            out[f"scale_{c}"] = self.scale[c] if c < len(self.scale) else None
            out[f"transmission_{c}"] = self.transmission[c] if c < len(self.transmission) else None
            out[f"transmission_error_{c}"] = self.transmission_error[c] if c < len(self.transmission_error) else None
            out[f"snr_{c}"] = self.snr[c] if c < len(self.snr) else None
            out[f"noise_{c}"] = self.noise[c] if c < len(self.noise) else None
        return out


@dataclass
class RunResult:
    """All frames of a run, the reference first."""

    reference: str
    frames: list[FrameResult]
    parameters: Parameters | None = None
    reference_reason: str | None = None
    report: str | None = None  # report.html, when written
    report_error: str | None = None  # why it was not
    not_tried: int = 0  # frames left when --stop-on-error stopped the run

    @property
    def failed(self) -> list[FrameResult]:
        return [f for f in self.frames if f.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed


def failed_result(path: str | os.PathLike, error: Exception | str, timings: dict | None = None) -> FrameResult:
    """A failed frame's row: the error, and the header facts where the header can be read."""
    try:
        meta = read_meta(Path(path))
    except FrameError:
        meta = FrameMeta()
    return FrameResult(path=str(path), status="failed", error=str(error), meta=meta, timings=dict(timings or {}))
