"""Results of a run as files: ``results.csv`` and ``results.json`` in the output directory.

One row per frame (the reference first) with the file, status and error, scale and
transmission per channel, weight and SNR, star pairs, samples, noise, FWHM, and the header's
altitude, exposure, filter and time. Both files are written atomically.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import tempfile
from pathlib import Path

from .errors import OutputError

__all__ = ["write_results", "RESULT_COLUMNS"]

RESULT_COLUMNS = (
    "file",
    "output",
    "status",
    "error",
    "weight",
    "weight_source",
    "scale_0",
    "scale_1",
    "scale_2",
    "transmission_0",
    "transmission_1",
    "transmission_2",
    "snr_0",
    "snr_1",
    "snr_2",
    "noise_0",
    "noise_1",
    "noise_2",
    "star_pairs",
    "samples",
    "fwhm",
    "high",
    "altitude",
    "airmass",
    "exposure",
    "filter",
    "date_obs",
    "seconds",
)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot be written ({exc.strerror or exc})") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_results(run, output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``results.csv`` and ``results.json`` for a :class:`~nsg_gpu.pipeline.RunResult`."""
    output_dir = Path(output_dir)
    rows = [frame.row() for frame in run.frames]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    csv_path = output_dir / "results.csv"
    json_path = output_dir / "results.json"
    _atomic_write_text(csv_path, buffer.getvalue())
    document = {
        "reference": run.reference,
        "reference_reason": run.reference_reason,
        "parameters": dataclasses.asdict(run.parameters) if run.parameters else None,
        "frames": rows,
    }
    _atomic_write_text(json_path, json.dumps(document, indent=2, allow_nan=False, default=_json_default))
    return csv_path, json_path


def _json_default(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
