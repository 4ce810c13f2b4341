"""Resuming a run: which outputs of an earlier run are complete and still up to date.

Every output carries an ``NSGHASH`` card: a fingerprint of the input file (name, size and
modification time), the reference file (the same) and every parameter that shapes the output
(all but the rejection thresholds). A rerun keeps an output when the file is complete (it
reads, and is as long as its header says), its ``NSGREF`` names this run's reference and its
``NSGHASH`` matches; such a frame is not read again, and its results row is rebuilt from the
output's header cards and marked ``resumed``. Anything else (another reference, a changed
parameter, an input touched since, a truncated or foreign file) is redone. The output may sit
in the output directory or in its ``rejected/`` subfolder.

In the flow: at the start of a run (:func:`nsg_gpu.run.normalize`), reading the cards that
:mod:`nsg_gpu.keywords` wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from astropy.io import fits

from .errors import FrameError, OutputError
from .io import meta_from_header, read_output_header
from .keywords import FINGERPRINT, REFERENCE, card_name, read_nsg_cards
from .params import Parameters
from .rejection import REJECTED_DIR
from .results import FrameResult

__all__ = [
    "frame_fingerprint",
    "find_complete_output",
    "result_from_header",
    "check_clearable",
    "clear_outputs",
    "output_locations",
]


def _identity(path: Path) -> list:
    stat = path.stat()
    return [path.name, stat.st_size, stat.st_mtime_ns]


def frame_fingerprint(path: str | os.PathLike, *, reference: str | os.PathLike, params: Parameters) -> str | None:
    """The ``NSGHASH`` of the output made from ``path`` against ``reference`` with ``params``.

    Returns None when either file cannot be examined (the frame will then fail on reading).
    """
    try:
        document = {
            "frame": _identity(Path(path)),
            "reference": _identity(Path(reference)),
            "parameters": params.normalization_items(),
        }
    except OSError:
        return None
    text = json.dumps(document, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def output_locations(output: str | os.PathLike) -> list[Path]:
    """Where a frame's output may be: the output directory, then its ``rejected/`` subfolder."""
    output = Path(output)
    return [output, output.parent / REJECTED_DIR / output.name]


def find_complete_output(
    output: str | os.PathLike, *, reference_name: str, fingerprint: str | None
) -> tuple[Path, fits.Header] | None:
    """The complete, up-to-date output and its header, or None when the frame must be redone."""
    if fingerprint is None:
        return None
    for candidate in output_locations(output):
        if not candidate.is_file():
            continue
        try:
            header = read_output_header(candidate)
        except FrameError:
            continue
        if header.get(FINGERPRINT) == fingerprint and header.get(REFERENCE) == card_name(reference_name):
            return candidate, header
    return None


#: Why a frame's output cannot be written where a folder has its name.
_FOLDER_IN_THE_WAY = "a folder has the name of this frame's output; move it away"


def check_clearable(output: str | os.PathLike) -> None:
    """Raise :class:`OutputError` where :func:`clear_outputs` could not clear a frame's
    outputs (a folder of their name, a folder that cannot be written); removes nothing."""
    for candidate in output_locations(output):
        if candidate.is_dir():
            raise OutputError(f"{candidate}: {_FOLDER_IN_THE_WAY}")
        if candidate.exists() and not os.access(candidate.parent, os.W_OK):
            raise OutputError(f"{candidate}: cannot be removed to redo the frame (its folder is not writable)")


def clear_outputs(output: str | os.PathLike) -> None:
    """Remove a frame's outputs, in the output directory and in ``rejected/``, before redoing it."""
    for candidate in output_locations(output):
        try:
            candidate.unlink()
        except (FileNotFoundError, NotADirectoryError):  # absent, or its folder is not one
            pass
        except IsADirectoryError:
            raise OutputError(f"{candidate}: {_FOLDER_IN_THE_WAY}") from None
        except OSError as exc:
            raise OutputError(f"{candidate}: cannot be removed to redo the frame ({exc.strerror or exc})") from exc


def result_from_header(
    path: str | os.PathLike, output: Path, header: fits.Header, *, weight_keyword: str = "NWEIGHT"
) -> FrameResult:
    """The results row of a kept output, from its NSG cards and the input's header facts."""
    started = time.perf_counter()
    cards = read_nsg_cards(header, weight_keyword=weight_keyword)
    return FrameResult(
        path=str(path),
        output=str(output),
        status="ok",
        scale=[1.0 / t if t else None for t in cards.transmission],
        transmission=cards.transmission,
        transmission_error=cards.transmission_error,
        snr=cards.snr,
        weight=cards.weight,
        weight_source=cards.weight_source or None,
        star_pairs=cards.star_pairs,
        samples=cards.samples,
        noise=cards.noise,
        fwhm=cards.fwhm,
        photometry=cards.photometry,
        beta=cards.beta,
        ellipticity=cards.ellipticity,
        elongation_angle=cards.elongation_angle,
        high=cards.high,
        meta=meta_from_header(header),
        resumed=True,
        seconds=time.perf_counter() - started,
    )
