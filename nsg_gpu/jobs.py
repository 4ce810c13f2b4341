"""Jobs: one target's read, compute and write, the unit of work every executor runs.

Below the executors (:mod:`nsg_gpu.executors`, :mod:`nsg_gpu.cluster`) and above the one-frame
pipeline (:mod:`nsg_gpu.pipeline`). A :class:`FrameJob` says where a target is read from,
where its output goes and which cards it gets; :func:`process_frame` reads it, normalizes it
and writes it with NSG's cards (:mod:`nsg_gpu.keywords`), atomically (:mod:`nsg_gpu.io`). A
problem with the frame itself becomes its failed result, never an exception, so that the run
goes on; so does an exception nobody foresaw in one of its stages (a defect, memory running
out: :class:`~nsg_gpu.errors.UnforeseenFrameError`), unless ``NSG_DEBUG`` is set.
:func:`write_reference` writes the reference's own copy.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import get_backend
from .errors import FrameError, NSGError, OutputError, UnforeseenFrameError
from .io import Frame, read_frame, write_frame
from .keywords import NSGCards, set_nsg_keywords
from .pipeline import normalize_frame
from .reference import Reference
from .results import FrameResult, failed_result

__all__ = [
    "FrameJob",
    "read_job",
    "compute_job",
    "write_job",
    "process_frame",
    "reference_result",
    "write_reference",
]


@dataclass(frozen=True)
class FrameJob:
    """One target of a run: where to read it, where its output goes, and the header's history.

    ``fingerprint`` goes into the output's ``NSGHASH`` card (see :mod:`nsg_gpu.resume`).
    """

    path: Path
    output: Path
    reference_name: str
    history: tuple[str, ...] = ()
    fingerprint: str | None = None
    diagnostics: bool = False  # keep what the fits used, for plots


@contextlib.contextmanager
def _one_frames_stage(path: Path):
    """Raise an exception that nsg-gpu does not raise on purpose as that frame's
    :class:`~nsg_gpu.errors.UnforeseenFrameError`, so that every executor records it
    against the frame and goes on; as it is where ``NSG_DEBUG`` is set."""
    try:
        yield
    except NSGError:
        raise
    except Exception as exc:
        if os.environ.get("NSG_DEBUG"):
            raise
        raise UnforeseenFrameError(path, exc) from exc


def read_job(job: FrameJob) -> Frame:
    """The read stage of :func:`process_frame`: the target's frame from disk.

    Raises
    ------
    FrameError
        The frame cannot be read.
    """
    with _one_frames_stage(job.path):
        return read_frame(job.path)


def compute_job(reference: Reference, job: FrameJob, frame: Frame) -> FrameResult:
    """The compute stage of :func:`process_frame`: the normalized data in ``result.data``.

    Raises
    ------
    FrameError
        Shape mismatch, no data, too few stars or samples.
    """
    with _one_frames_stage(job.path):
        return normalize_frame(reference, frame, diagnostics=job.diagnostics)


def _cards(result: FrameResult, *, reference_name: str, history, fingerprint: str | None) -> NSGCards:
    return NSGCards(
        reference_name=reference_name,
        transmission=result.transmission,
        snr=result.snr,
        weight=result.weight,
        weight_source=result.weight_source or "",
        high=result.high,
        star_pairs=result.star_pairs,
        samples=result.samples,
        fwhm=result.fwhm,
        photometry=result.photometry,
        beta=result.beta,
        ellipticity=result.ellipticity,
        elongation_angle=result.elongation_angle,
        fingerprint=fingerprint,
        noise=result.noise,
        transmission_error=result.transmission_error,
        history=[*history, *_noise_history(result)],
    )


def _noise_history(result: FrameResult) -> list[str]:
    """NSG's ``<noiseType>[c]: <sigma>`` lines of a target: the noise its weight came from,
    per channel (none for the reference)."""
    if result.status == "reference" or not result.weight_source:
        return []
    return [f"{result.weight_source}[{c}]: {float(sigma)!r}" for c, sigma in enumerate(result.noise or [])]


def write_job(reference: Reference, job: FrameJob, frame: Frame, result: FrameResult) -> FrameResult:
    """The write stage of :func:`process_frame`: the output with NSG's keywords, atomically.

    ``result.data`` is released once written and ``result.output`` set.

    Raises
    ------
    OutputError
        The output cannot be written; nothing is left behind.
    FrameError
        A cause nobody foresaw (:class:`~nsg_gpu.errors.UnforeseenFrameError`); nothing is
        left behind either.
    """
    with _one_frames_stage(job.path):
        cards = _cards(result, reference_name=job.reference_name, history=job.history, fingerprint=job.fingerprint)
        header = set_nsg_keywords(frame.header, cards, weight_keyword=reference.params.weight_keyword)
        write_frame(job.output, get_backend(result.data).to_host(result.data), header, properties=frame.properties)
    result.output = str(job.output)
    result.data = None
    return result


def process_frame(reference: Reference, job: FrameJob) -> FrameResult:
    """Read, normalize and write one target: the composition of :func:`read_job`,
    :func:`compute_job` and :func:`write_job`.

    A problem with the frame itself (unreadable, unregistered, no stars, disk full) becomes
    the frame's failed result rather than an exception, so that the run goes on.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        frame = read_job(job)
        timings["read"] = time.perf_counter() - started
        result = compute_job(reference, job, frame)
        timings.update(result.timings)
        mark = time.perf_counter()
        write_job(reference, job, frame, result)
        timings["write"] = time.perf_counter() - mark
    except (FrameError, OutputError) as exc:
        result = failed_result(job.path, exc, timings)
    result.timings = timings
    result.seconds = time.perf_counter() - started
    return result


def reference_result(reference: Reference, output: Path | None) -> FrameResult:
    """The reference's row: scale, transmission, SNR and weight 1, its own stars and samples."""
    frame = reference.frame
    channels = frame.data.shape[0]
    own = reference.own_psf()
    return FrameResult(
        path=str(frame.path),
        output=str(output) if output else None,
        status="reference",
        scale=[1.0] * channels,
        transmission=[1.0] * channels,
        snr=[1.0] * channels,
        weight=1.0,
        weight_source="reference",
        star_pairs=len(reference.stars),
        samples=int(np.count_nonzero(get_backend(reference.valid).to_host(reference.valid) & ~reference.rejected)),
        noise=[float(v) for v in reference.noise],
        fwhm=own.fwhm if own is not None else reference.stars.fwhm,
        beta=own.beta if own is not None else None,
        ellipticity=own.ellipticity if own is not None else None,
        elongation_angle=own.elongation_angle if own is not None else None,
        # The maximum of the data as read: the pedestal a negative sky was measured with taken out.
        high=float(get_backend(frame.data).to_host(frame.data.max())) - float(reference.pedestal),
        meta=frame.meta,
    )


def write_reference(reference: Reference, output: Path, *, fingerprint: str | None = None) -> FrameResult:
    """Write the reference's own copy with NSG's keywords (scale 1, weight 1); return its row."""
    frame = reference.frame
    result = reference_result(reference, output)
    cards = _cards(
        result,
        reference_name=frame.path.name,
        history=["reference", *reference.params.history()],
        fingerprint=fingerprint,
    )
    header = set_nsg_keywords(frame.header, cards, weight_keyword=reference.params.weight_keyword)
    # A reference measured otherwise than read (reference.as_measured) is copied as it was read.
    data = read_frame(frame.path).data if reference.altered else get_backend(frame.data).to_host(frame.data)
    write_frame(output, data, header, properties=frame.properties)
    return result
