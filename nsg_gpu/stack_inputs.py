"""The inputs of a stack: which frames, read once, in bands of rows, within a memory budget.

Uncompressed FITS are read directly from their data, compressed FITS and XISF decompressed
once into a spool file; :func:`plan_bands` sizes the bands from ``--memory``. Used by
:mod:`nsg_gpu.stacking`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from .combine import CHUNK_SAMPLES, TWIN_BYTES_PER_SAMPLE
from .errors import FrameError, FrameReadError, FrameShapeError, ParameterError, StackError, quiet_warnings
from .io import FRAME_SUFFIXES, shape_problem
from .keywords import HISTORY_PREFIX
from .pixel_rejection import PEAK_BYTES

#: Memory set aside for the interpreter and the libraries within a --memory budget.
PROCESS_RESERVE = 256 << 20


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"PK\x03\x04")


def _is_frame_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and not name.startswith(".") and name.endswith(FRAME_SUFFIXES)


def _listed_names(listing: Path) -> list[str]:
    """The ``file`` column of an ``nsg normalize`` output directory's ``weights.csv`` (a
    spreadsheet's byte-order mark and spaces around the names allowed)."""
    try:
        text = listing.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise StackError(f"{listing}: not a text CSV (not UTF-8); remove it to stack the directory's frames") from None
    except OSError as exc:
        raise StackError(f"{listing}: cannot be read ({exc.strerror or exc})") from exc
    reader = csv.DictReader(io.StringIO(text))
    columns = [name.strip() for name in reader.fieldnames or []]
    if "file" not in columns:
        raise StackError(f"{listing}: has no 'file' column (columns: {', '.join(columns) or 'none'})")
    reader.fieldnames = columns
    names = [(row.get("file") or "").strip() for row in reader]
    names = [name for name in names if name]
    if not names:
        raise StackError(f"{listing}: lists no frames")
    return names


def stack_inputs(inputs: Sequence[str | os.PathLike]) -> list[tuple[Path, bool]]:
    """The frames named by ``inputs``: files as given, directories expanded.

    A directory means the accepted outputs of ``nsg normalize``: the files its ``weights.csv``
    lists (reference first) when it has one, else its FITS and XISF files (sorted by name; not
    those of ``rejected/`` or any other subfolder). Returns ``(path, from_directory)`` pairs,
    a file named twice (as given, through a link or a directory) twice.

    A directory without frames, and a path that names nothing, are kept as given: the stack
    leaves them out with their reason. :func:`in_stack_order` puts them in one order.

    Raises
    ------
    StackError
        A directory's ``weights.csv`` cannot be read.
    """
    found: list[tuple[Path, bool]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            listing = path / "weights.csv"
            if listing.is_file():
                files = [path / name for name in _listed_names(listing)]
            else:
                files = sorted(p for p in path.iterdir() if _is_frame_file(p))
            found += [(f, True) for f in files] if files else [(path, False)]  # none: left out, named
        else:
            found.append((path, False))
    return found


def in_stack_order(listed: Sequence[tuple[Path, bool]]) -> list[tuple[Path, bool]]:
    """The frames of :func:`stack_inputs` by file name, then path: one order whatever the
    order the frames were given in, so that the same frames give the same master (its sums,
    every first of equals) and the same per-frame table."""
    return sorted(listed, key=lambda item: (item[0].name, str(item[0]), item[1]))


@dataclass
class BandRows:
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
class StackInput:
    path: Path
    rows: BandRows | None = None
    header: fits.Header | None = None
    shape: tuple[int, int, int] | None = None
    weight: np.ndarray | None = None
    spooled: bool = False
    error: str | None = None
    level: float | None = None  # the typical magnitude of its samples with data (units check)

    @property
    def is_reference(self) -> bool:
        """Whether this is the reference of ``nsg normalize`` (its ``NSG.reference`` history line)."""
        return self.header is not None and f"{HISTORY_PREFIX}reference" in self.header.get("HISTORY", [])


class FileHandles:
    """File descriptors of the frames: all held open where the open-file limit allows (raised
    towards its hard limit if needed), else each opened for one read and closed."""

    def __init__(self, files: Sequence[Path]):
        self.files = list(files)
        self.keep = ensure_open_files(len(self.files) + 64)
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


def ensure_open_files(needed: int) -> bool:
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
    raise FrameShapeError(path, shape_problem(shape))


def open_fits(path: Path) -> tuple[fits.Header, BandRows | None]:
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
        with quiet_warnings(AstropyUserWarning):
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
    return header, BandRows(
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
        raise ParameterError(f"--memory {text!r} is not a size (e.g. 4G, 1500M)")
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
    memory: int,
    *,
    n_frames: int,
    channels: int,
    height: int,
    width: int,
    threads: int = 1,
    gpu: bool = False,
    noise_clipping: bool = False,
) -> int:
    """Rows per band so that a stack fits in ``memory`` bytes; what the budget holds:

    - :data:`PROCESS_RESERVE` for the interpreter and libraries;
    - the results, kept whole until written: the master (float32) and three count maps
      (uint16), ``channels x height x width x 10`` bytes;
    - two bands of every frame (one read while the other is combined), float32, and the
      reader's buffer for one frame's band;
    - the CPU twin's working set, :data:`CHUNK_SAMPLES` samples per thread (on the GPU,
      one band's kernel outputs on the host instead);
    - with ``noise_clipping``, the peaks' working set (:data:`PEAK_BYTES` per thread) and one
      channel's band of peaks and noise (float32).

    Raises
    ------
    StackError
        Not even one row fits.
    """
    results = channels * height * width * 10
    fixed = PROCESS_RESERVE + results
    band_row = 2 * channels * n_frames * width * 4 + 8 * width  # two bands of every frame, a read buffer
    if noise_clipping:
        band_row += 8 * width
    # Working sets of at most a chunk's bytes, fewer where a band holds less: (bytes per band row,
    # bytes of a whole chunk).
    chunks = []
    if gpu:
        band_row += 16 * width  # the kernel's outputs of one band on the host: counts and master
    else:
        working = max(1, threads) * TWIN_BYTES_PER_SAMPLE  # the twin: CHUNK_SAMPLES per thread at most
        chunks.append((working * n_frames * width, working * CHUNK_SAMPLES))
    if noise_clipping:
        chunks.append((width * (6 * n_frames + 72), max(1, threads) * PEAK_BYTES))
    rows = (memory - fixed - sum(whole for _, whole in chunks)) // band_row
    small = [(per_row, whole) for per_row, whole in chunks if rows * per_row < whole]
    if small:  # bands smaller than those chunks: their working sets by the row
        rows = (memory - fixed - sum(w for p, w in chunks if (p, w) not in small)) // (
            band_row + sum(per_row for per_row, _ in small)
        )
    if rows < 1:
        need = fixed + band_row + sum(min(per_row, whole) for per_row, whole in chunks)
        raise StackError(
            f"--memory {memory / 2**30:.2f} GiB is too small for {n_frames} frames of {width} x {height}"
            f"{' x 3' if channels == 3 else ''}: at least {math.ceil(need / 2**30 * 100) / 100:.2f} GiB is needed"
        )
    return int(min(rows, height))
