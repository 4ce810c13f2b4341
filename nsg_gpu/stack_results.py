"""What a stack says about itself: :class:`StackResult`, one :class:`StackFrame` per frame,
and the per-frame table (``<stem>_stack.csv``). Filled by :mod:`nsg_gpu.stacking`; the report's Stack section reads it.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from .atomic import AtomicGroup
from .io import MASTER_CARD, STRUCTURAL_CARDS, float_card, frame_stem
from .keywords import add_nsg_history
from .pixel_rejection import Rejection
from .stack_inputs import StackInput
from .version import __version__

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
        """The frame's row of the per-frame table."""
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


def write_stack_csv(result: StackResult, path: str | os.PathLike, group: AtomicGroup) -> Path:
    """Write the per-frame table (``<stem>_stack.csv`` by default): one row per input frame (:data:`STACK_COLUMNS`), as one of
    ``group``'s files."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=STACK_COLUMNS)
    writer.writeheader()
    for frame in result.frames:
        writer.writerow(frame.row(result.samples_per_frame))
    path = Path(path)
    data = buffer.getvalue().encode()
    group.write(path, lambda handle, _: handle.write(data))
    return path


#: Header cards of a frame that do not describe the master.
_PER_FRAME = re.compile(r"^(NSG.*|NOISE\d\d|NOISEA\d\d|NOISEF\d\d)$")


@dataclass
class StackProducts:
    master: np.ndarray
    coverage: np.ndarray
    low: np.ndarray
    high: np.ndarray
    covered: np.ndarray  # per used frame
    frame_low: np.ndarray
    frame_high: np.ndarray


def _master_header(result: StackResult, used: list[StackInput]) -> fits.Header:
    """The cards (WCS, target, optics) of the reference of ``nsg normalize`` where it is among
    the frames, else of the first frame in the stack's order, without per-frame NSG cards;
    plus the stack's."""
    header = fits.Header()
    source = next((s for s in used if s.is_reference), used[0])
    for card in source.header.cards:
        key = card.keyword or ""
        if STRUCTURAL_CARDS.match(key) or _PER_FRAME.match(key) or key in (result.weights, "NWEIGHT", "NCOMBINE"):
            continue
        if key == "HISTORY" and str(card.value).startswith("NSG."):
            continue
        header.append(card, end=True)
    rejection = result.rejection
    header[MASTER_CARD] = (f"nsg-gpu {__version__}", "master integrated by nsg stack")
    header["NCOMBINE"] = (len(used), "frames combined")
    totals = _total_exposures(used)
    for key in EXPOSURE_CARDS:
        if key in totals:
            header[key] = (totals[key], f"[s] total of the {len(used)} frames combined")
        elif key in header:  # one frame's exposure, where the total is not known
            del header[key]
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
        add_nsg_history(header, f"NSG.stack frame {k + 1}: {source.path.name} weight {weight}")
    return header


#: Exposure cards that the master carries as the sum over the frames combined.
EXPOSURE_CARDS = ("EXPTIME", "EXPOSURE", "TOTALEXP", "ELAPTIME")


def _total_exposures(used: list[StackInput]) -> dict[str, float]:
    """Each exposure card that every frame combined carries as a number: its sum (a master
    of 6 frames of 10 s is 60 s of light, where the reference's card said 10 s). A card that
    some frame lacks has no total, and the master goes without it."""
    totals = {}
    for key in EXPOSURE_CARDS:
        values = [float_card(s.header, key) for s in used]
        if all(v is not None for v in values):
            totals[key] = math.fsum(values)
    return totals


def map_paths(output: Path) -> dict[str, Path]:
    """The map files beside the master ``output`` (``--maps files``)."""
    stem = frame_stem(output)
    return {name: output.parent / f"{stem}_{name}.fits" for name in ("coverage", "rejlow", "rejhigh")}


def write_outputs(
    result: StackResult, used: list[StackInput], products: StackProducts, *, maps: str, group: AtomicGroup
) -> None:
    """The master and its maps, as ``group``'s files."""
    result.rejected_low_share = float(products.low.sum(dtype=np.int64)) / max(
        1, int(products.coverage.sum(dtype=np.int64))
    )
    result.rejected_high_share = float(products.high.sum(dtype=np.int64)) / max(
        1, int(products.coverage.sum(dtype=np.int64))
    )
    counts = np.bincount(products.coverage.reshape(-1).astype(np.int64), minlength=len(used) + 1)
    result.coverage_counts = {k: int(v) for k, v in enumerate(counts) if v}
    header = _master_header(result, used)
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
        paths = map_paths(result.output)
        for name, array in map_arrays.items():
            path = paths[name]
            map_header = fits.Header()
            map_header["COMMENT"] = f"nsg stack: {titles[name]} of {result.output.name}"
            map_header[MASTER_CARD] = (f"nsg-gpu {__version__}", "a map written by nsg stack")
            _write_fits(group, path, fits.HDUList([fits.PrimaryHDU(data=image(array), header=map_header)]))
            result.maps[name] = str(path)
    _write_fits(group, result.output, fits.HDUList(hdus))


def _write_fits(group: AtomicGroup, path: Path, hdul: fits.HDUList) -> None:
    group.write(path, lambda handle, _: hdul.writeto(handle, output_verify="silentfix"))


def stack_previews(products: StackProducts, width: int = 800) -> dict[str, np.ndarray]:
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
