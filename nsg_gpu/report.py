"""Results of a run as files: ``results.csv`` and ``results.json`` in the output directory.

One row per frame (the reference first) with the file, status and error, why it was rejected,
warnings, whether its output was kept from an earlier run, scale and transmission per channel with the
transmission's standard error and whether the scale is in doubt,
weight (absolute and relative to the best frame) and SNR, star pairs, samples, noise, FWHM, and
the header's altitude, exposure, filter and time. ``weights.csv`` lists the outputs a stacker
should use (the reference and every accepted frame) with their weight. All are written
atomically.

In the flow: at the end of a run (:func:`nsg_gpu.run.normalize`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from pathlib import Path

from .atomic import write_text
from .errors import OutputError

__all__ = ["write_results", "write_weights", "RESULT_COLUMNS"]

RESULT_COLUMNS = (
    "file",
    "output",
    "status",
    "error",
    "rejected",
    "warning",
    "scale_flag",
    "resumed",
    "relative_weight",
    "relative_transmission",
    "weight",
    "weight_source",
    "scale_0",
    "scale_1",
    "scale_2",
    "transmission_0",
    "transmission_1",
    "transmission_2",
    "transmission_error_0",
    "transmission_error_1",
    "transmission_error_2",
    "snr_0",
    "snr_1",
    "snr_2",
    "noise_0",
    "noise_1",
    "noise_2",
    "star_pairs",
    "samples",
    "fwhm",
    "photometry",
    "beta",
    "ellipticity",
    "elongation_angle",
    "high",
    "altitude",
    "airmass",
    "exposure",
    "filter",
    "date_obs",
    "seconds",
)


#: The files that describe a run as a whole, written once every frame is done.
SUMMARY_FILES = ("results.csv", "results.json", "weights.csv")


def clear_summaries(output_dir: str | os.PathLike) -> None:
    """Remove an earlier run's :data:`SUMMARY_FILES` before any of its outputs is redone: a
    run stopped midway then leaves no list of outputs that are gone or were made otherwise
    (``nsg stack`` stacks the folder's outputs as they are)."""
    for name in SUMMARY_FILES:
        path = Path(output_dir) / name
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:
            if not os.path.lexists(path):  # nothing to remove: a folder that cannot be written
                raise OutputError(
                    f"{output_dir}: the output directory cannot be written ({exc.strerror or exc})"
                ) from exc
            raise OutputError(f"{path}: the earlier run's summary cannot be removed ({exc.strerror or exc})") from exc


def write_results(run, output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``results.csv`` and ``results.json`` for a :class:`~nsg_gpu.results.RunResult`."""
    output_dir = Path(output_dir)
    rows = [frame.row() for frame in run.frames]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    csv_path = output_dir / "results.csv"
    json_path = output_dir / "results.json"
    write_text(csv_path, buffer.getvalue())
    document = {
        "reference": run.reference,
        "reference_reason": run.reference_reason,
        "parameters": dataclasses.asdict(run.parameters) if run.parameters else None,
        "frames": rows,
    }
    write_text(json_path, json.dumps(document, indent=2, allow_nan=False, default=_json_default))
    return csv_path, json_path


def write_weights(run, output_dir: str | os.PathLike) -> Path:
    """Write ``weights.csv``: ``file,weight`` for the reference and every accepted frame.

    ``file`` is the output's name relative to the output directory, so the list stays valid
    wherever the directory is moved; rejected and failed frames are left out.
    """
    output_dir = Path(output_dir)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "weight"])
    for frame in run.frames:
        if frame.status in ("ok", "reference") and not frame.rejected and frame.output and frame.weight is not None:
            writer.writerow([os.path.relpath(frame.output, output_dir), repr(float(frame.weight))])
    path = output_dir / "weights.csv"
    write_text(path, buffer.getvalue())
    return path


def _json_default(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
