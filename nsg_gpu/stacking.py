"""Integration of normalized frames: weights, pixel rejection, coverage, streamed in row bands.

``nsg stack`` is the step after ``nsg normalize``: the weighted average of the frames, pixel by
pixel, over the samples that have data (0 means none) and survive a rejection chosen by the
number of frames (:mod:`nsg_gpu.pixel_rejection`: NSG's set-up of ImageIntegration from 8
frames, noise clipping below, whose noise map is read before the bands).
The frames never have to fit in memory: they are read in bands of rows, every file once
(:mod:`nsg_gpu.stack_inputs`), and a band of every frame is combined
(:mod:`nsg_gpu.combine`) while the next is read. The top of the stacking rooms; the command
line and the run (``nsg normalize --stack``) call :func:`stack`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from astropy.io.fits.verify import VerifyError

from .atomic import AtomicGroup, remove_stale_temporaries
from .backend import Backend, select_backend
from .combine import CHUNK_SAMPLES, BandResult, reject_combine
from .errors import FrameDataError, FrameError, FrameReadError, FrameShapeError, OutputError, ParameterError, StackError
from .htmlreport import add_stack_section
from .io import MASTER_CARD, MASTER_REASON, XISF_SUFFIXES, float_card, frame_stem, is_stack_master, read_frame
from .keywords import FINGERPRINT, TRANSMISSION
from .noise import multiscale_noise
from .pixel_rejection import NOISE_BOX, NoiseMap, Rejection, peak_excess
from .stack_inputs import (
    BandRows,
    FileHandles,
    StackInput,
    default_memory,
    in_stack_order,
    open_fits,
    parse_memory,
    plan_bands,
    stack_inputs,
)
from .stack_results import (
    StackFrame,
    StackProducts,
    StackResult,
    map_paths,
    stack_previews,
    write_outputs,
    write_stack_csv,
)

#: Rows of the middle of a frame read to measure its noise for --weights noise.
NOISE_ROWS = 512

#: Where the coverage and rejection maps go: image extensions of the master, files of their
#: own beside it, or nowhere.
MAPS = ("hdus", "files", "none")
#: Where the rows lie (shares of the height) that are read from each frame to tell an empty one
#: (no sample with data) before noise clipping: three short reads a frame, not a scan.
PROBE_ROWS = (0.25, 0.5, 0.75)
#: Frames whose samples' typical magnitude (the median of |x| over the samples with data of
#: the PROBE_ROWS) is this many times the stack's, or this share of it, are in other units
#: (counts against data in [0, 1]: 4096-65535 times): normalized frames share the
#: reference's level, and raw frames' skies differ by a few times at most.
UNITS_RATIO = 100.0


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
        (``1 / sigma^2`` per channel, from the ``NOISE0n`` cards where a frame has them,
        divided by its transmission ``NSGSn`` where it is an output of nsg normalize, else
        the noise of its middle :data:`NOISE_ROWS` rows, as NWEIGHT's), or any other header keyword
        holding a weight.

    rejection : Rejection or str
        The settings, or a method name (``"auto"`` by the frame count:
        :func:`~nsg_gpu.pixel_rejection.auto_rejection`); ``low`` and ``high`` then set its
        thresholds.

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
        Where the per-frame table goes; ``<stem>_stack.csv`` beside the master by default.

    report : bool or path
        Add a Stack section to a report page: True for a page of its own,
        ``<stem>_report.html`` beside the master; a path for that page (a run's report.html:
        the section goes before its parameters). Off by default.

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
    from. A frame that cannot be used (unreadable, another shape than the reference's or most
    frames', no or a non-positive weight, no sample with data, given twice, or the same
    normalized frame as another: one ``NSGHASH``) is left out with
    its reason in the per-frame table and the result; the stack goes on unless ``stop_on_error``.
    Results do not depend on the memory budget (the band height), the pixel chunks, the
    threads or the order of ``inputs``: the frames are stacked in the order of their file
    names (:func:`~nsg_gpu.stack_inputs.in_stack_order`).
    """
    started = time.perf_counter()
    output = Path(output)
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    check_master_name(output)
    if maps not in MAPS:
        raise ParameterError(f"maps={maps!r}: choose {', '.join(MAPS)}")
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

    listed = in_stack_order(stack_inputs(inputs))
    csv_path = Path(csv_path) if csv_path is not None else stack_csv_path(output)
    _check_outputs(inputs, listed, output, csv_path, maps)
    # What a killed stack left half-written beside its outputs (never a complete file).
    page = (stack_page_path(output) if report is True else Path(report)) if report else None
    own = [stack_page_path(output), *([page] if page else [])]
    remove_stale_temporaries([output, csv_path, *map_paths(output).values(), *own])
    spool_parent = Path(spool_dir) if spool_dir is not None else output.parent
    folders = {output.parent.absolute(): "the master's folder", csv_path.parent.absolute(): "the --csv table's folder"}
    folders.setdefault(spool_parent.absolute(), "the spool folder's place")
    made = {above for folder in folders for above in [folder, *folder.parents] if not above.exists()}
    made = sorted(made, key=lambda p: len(p.parts), reverse=True)  # deepest first
    try:
        for folder, role in folders.items():
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"{folder}: {role} cannot be made ({exc.strerror or exc})") from exc
        try:
            spool_root = tempfile.mkdtemp(prefix=".nsg-stack-", dir=spool_parent)
        except OSError as exc:
            role = "the master's folder" if spool_dir is None else "the spool folder's place"
            raise OutputError(f"{spool_parent}: {role} cannot be written ({exc.strerror or exc})") from exc
    except OutputError:
        _remove_folders(made)
        raise
    done = False
    try:
        frames, sources = _scan(listed, weight_mode, Path(spool_root), stop_on_error=stop_on_error)
        scan_seconds = time.perf_counter() - started
        used = [s for s in sources if s.error is None]
        if not used:
            raise StackError(_none_stacked(frames))
        rejection = rejection.resolve(len(used)).for_stack(len(used))
        channels, height, width = used[0].shape
        rows = plan_bands(
            budget,
            n_frames=len(used),
            channels=channels,
            height=height,
            width=width,
            threads=threads,
            gpu=chosen.is_gpu,
            noise_clipping=rejection.needs_noise(len(used)),
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
        noise_map = _noise_map(used, weight_mode) if rejection.needs_noise(len(used)) else None
        products = _combine(used, result, chosen, noise_map, threads=threads, progress=progress)
        used = _finish_frames(frames, sources, used, products)
        if stop_on_error and any(f.error for f in frames):
            raise StackError(next(f.error for f in frames if f.error))
        if not used:
            raise StackError(_none_stacked(frames))
        if rejection.method == "auto":  # its reason counts the frames stacked, not those read
            result.rejection = rejection.resolve(len(used))
        written = time.perf_counter()
        with AtomicGroup() as group:  # the master, its maps and its table: all or none
            write_outputs(result, used, products, maps=maps, group=group)
            result.csv = write_stack_csv(result, csv_path, group)
        result.write_seconds = time.perf_counter() - written
        result.previews = stack_previews(products)
        done = True
    finally:
        shutil.rmtree(spool_root, ignore_errors=True)
        if not done:
            _remove_folders(made)  # a stack that failed leaves no folder it made
    result.seconds = time.perf_counter() - started
    if page is not None:
        try:
            result.report = add_stack_section(page, result)
        except (OutputError, OSError) as exc:
            result.report_error = str(exc)
    return result


def stack_csv_path(output: str | os.PathLike) -> Path:
    """The per-frame table beside the master ``output``: ``<stem>_stack.csv``, one per master
    (a second master in the folder replaced a shared ``stack.csv``)."""
    output = Path(output)
    return output.parent / f"{frame_stem(output)}_stack.csv"


def stack_page_path(output: str | os.PathLike) -> Path:
    """The report page of a master whose frames are not one run's directory:
    ``<stem>_report.html`` beside it, one per master."""
    output = Path(output)
    return output.parent / f"{frame_stem(output)}_report.html"


def _remove_folders(folders: list[Path]) -> None:
    """Remove these folders (deepest first) where they are empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def check_master_name(output: str | os.PathLike) -> None:
    """Raise :class:`ParameterError` where ``output`` names a format the master is not
    written in (it is plain FITS)."""
    if Path(output).name.lower().endswith(XISF_SUFFIXES + (".fz", ".gz")):
        raise ParameterError(f"{output}: the master is written as plain FITS; name it .fits")


def _check_outputs(inputs, listed, output: Path, csv_path: Path, maps: str) -> None:
    """Refuse, before anything is read, outputs that would overwrite an input (a frame, or an
    input directory's ``weights.csv``) or each other. A master or map of an earlier stack
    found in an input directory is not an input (it is never stacked) and may be replaced."""
    outputs = {"the master": output, "the --csv table": csv_path}
    if maps == "files":
        outputs.update({f"the {name} map": path for name, path in map_paths(output).items()})
    seen: dict[Path, str] = {}
    for role, path in outputs.items():
        key = path.resolve()
        if key in seen:
            raise StackError(f"{path}: {role} and {seen[key]} would be the same file; choose other paths")
        seen[key] = role
    taken = {}
    for path, from_directory in listed:
        key = path.resolve()
        if key in seen and not (from_directory and is_stack_master(path)):  # headers read only where it matters
            taken[key] = "an input frame"
    for item in inputs:
        listing = Path(item) / "weights.csv"
        if Path(item).is_dir() and listing.is_file():
            taken[listing.resolve()] = "the frame list of an input directory"
    for key, role in seen.items():
        if key in taken:
            option = "-o" if role == "the master" or role.endswith(" map") else "--csv"
            raise StackError(f"{outputs[role]}: {role} would overwrite {taken[key]}; choose another {option}")


def _weight_mode(weights: str) -> str:
    mode = str(weights).strip()
    if mode.lower() in ("equal", "noise"):
        return mode.lower()
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,8}", mode):
        raise ParameterError(
            f"--weights {weights!r}: use equal, noise or a FITS keyword (up to 8 letters, digits, - or _)"
        )
    return mode.upper()


def _scan(listed, weight_mode: str, spool_root: Path, *, stop_on_error: bool):
    """Open every input once: header, shape, weight; decompress what cannot be read in bands."""
    frames: list[StackFrame] = []
    sources: list[StackInput] = []
    seen: dict[Path, Path] = {}
    made: dict[str, StackInput] = {}  # NSGHASH: the output of one input, reference and settings
    for path, from_directory in listed:
        source = StackInput(path)
        key = path.resolve()
        if key in seen:
            source.error = f"{path}: given twice (also as {seen[key]}); stacked once"
            if stop_on_error:
                raise StackError(source.error)
            sources.append(source)
            continue
        try:
            try:
                _prepare(source, weight_mode, spool_root, len(sources))
            except _MasterFile:
                if from_directory:
                    continue  # a master of an earlier stack in the directory: never an input
                raise FrameDataError(path, MASTER_REASON) from None
            fingerprint = _fingerprint(source)
            twin = made.get(fingerprint) if fingerprint else None
            if twin is not None and _same_rows(source, twin):
                raise FrameDataError(
                    path,
                    f"is the same normalized frame as {twin.path} (one NSGHASH and the same pixels: the same "
                    "input, reference and settings, written twice); stacked once",
                )
        except FrameError as exc:
            if stop_on_error:
                raise StackError(str(exc)) from exc
            source.error = str(exc)
        if source.error is None:
            source.level = _level(source)
        if source.error is None and fingerprint:
            made.setdefault(fingerprint, source)
        seen[key] = path
        sources.append(source)
    shape, whose = _stack_shape([s for s in sources if s.error is None])
    for source in sources:
        if source.error is None and source.shape != shape:
            error = FrameShapeError(
                source.path,
                f"is {_shape_text(source.shape)} but the stack's frames are {_shape_text(shape)} ({whose}); "
                "frames must be registered to the same reference",
            )
            if stop_on_error:
                raise StackError(str(error))
            source.error = str(error)
    _check_units([s for s in sources if s.error is None], stop_on_error=stop_on_error)
    for source in sources:
        path = source.path
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


def _level(source: StackInput) -> float | None:
    """The median of |x| over the samples with data of the :data:`PROBE_ROWS` rows, or None
    where they hold none."""
    rows = np.concatenate([row.reshape(-1) for row in _read_rows(source, _probe_spans(source))])
    values = np.abs(rows[np.isfinite(rows) & (rows != 0)])
    return float(np.median(values)) if values.size else None


def _check_units(usable: list[StackInput], *, stop_on_error: bool) -> None:
    """Leave out the frames whose samples' typical magnitude is :data:`UNITS_RATIO` times the
    reference's (its ``NSG.reference`` history line) or more, or that share of it or less;
    without the reference among them, the median frame's."""
    measured = [s for s in usable if s.level is not None]  # a median of |x| over x != 0: above 0
    if not measured:
        return
    reference = next((s for s in measured if s.is_reference), None)
    level = reference.level if reference is not None else float(np.median([s.level for s in measured]))
    whose = f"the reference {reference.path.name}'s" if reference is not None else "the median frame's"
    for source in measured:
        ratio = source.level / level
        if 1.0 / UNITS_RATIO < ratio < UNITS_RATIO:
            continue
        error = FrameDataError(
            source.path,
            f"units unlike the stack's: its samples' typical magnitude {source.level:.4g} is {ratio:.3g} times "
            f"{whose} ({level:.4g}); stack frames in the same units (normalized with one reference, or all "
            "in [0, 1] or all in ADU)",
        )
        if stop_on_error:
            raise StackError(str(error))
        source.error = str(error)


def _stack_shape(readable: list[StackInput]) -> tuple[tuple | None, str]:
    """The frames' shape, and whose it is: the reference's of ``nsg normalize`` where it is
    among them (its ``NSG.reference`` history line), else the most frames' (the first
    frame's among equals)."""
    for source in readable:
        if source.is_reference:
            return source.shape, f"the reference {source.path.name}'s"
    shapes = [source.shape for source in readable]
    if not shapes:
        return None, ""
    shape = max(shapes, key=lambda s: (shapes.count(s), -shapes.index(s)))
    count = shapes.count(shape)
    return shape, ("the first frame's" if count == 1 else f"{count} of the {len(shapes)} frames'")


def _shape_text(shape) -> str:
    channels, height, width = shape
    return f"{width}x{height}" + (" colour" if channels > 1 else " mono")


class _MasterFile(Exception):
    """The file is a master written by nsg stack."""


def _same_rows(first: StackInput, second: StackInput) -> bool:
    """Whether two frames of one fingerprint hold the same pixels in the :data:`PROBE_ROWS`
    rows (inputs of one name, size and time from two nights give one ``NSGHASH``)."""
    if first.shape != second.shape:
        return False
    spans = _probe_spans(first)
    return all(
        np.array_equal(a, b, equal_nan=True) for a, b in zip(_read_rows(first, spans), _read_rows(second, spans))
    )


def _fingerprint(source: StackInput) -> str | None:
    """The ``NSGHASH`` that ``nsg normalize`` wrote into the frame, with its transmissions (one
    normalization of one input gives the same), if any."""
    try:
        header = source.header
        value = None if header is None else header.get(FINGERPRINT)
        if not (isinstance(value, str) and value.strip()):
            return None
        return " ".join([value, *(repr(header.get(f"NSGS{c}")) for c in range(3))])
    except (VerifyError, ValueError):
        return None


def _prepare(source: StackInput, weight_mode: str, spool_root: Path, index: int) -> None:
    path = source.path
    if path.is_dir():
        raise FrameReadError(path, "is a directory holding no FITS or XISF frame (nor a weights.csv)")
    if not path.exists():
        raise FrameReadError(path, "is a link to nothing" if path.is_symlink() else "no such file or directory")
    if not path.is_file():
        raise FrameReadError(path, "is not a regular file")
    data = None
    if path.name.lower().endswith(XISF_SUFFIXES):
        header, rows = None, None
    else:
        header, rows = open_fits(path)
        if header is not None and MASTER_CARD in header:
            raise _MasterFile(path)
    if rows is None:
        # Compressed FITS or XISF: read whole once and spooled as native float32 for the bands.
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
        rows = BandRows(spool, 0, np.dtype(np.float32), tuple(int(v) for v in data.shape))
        source.spooled = True
    source.header = header
    source.rows = rows
    source.shape = rows.shape
    source.weight = _frame_weight(source, weight_mode, data)


def _frame_weight(source: StackInput, mode: str, data: np.ndarray | None) -> np.ndarray:
    channels = source.shape[0]
    path = source.path
    if mode == "equal":
        return np.ones(channels)
    if mode == "noise":
        noise = [float_card(source.header, f"NOISE0{c}") for c in range(channels)]
        if all(v is not None and v > 0 for v in noise):
            # The calibration's noise of the input: an output of nsg normalize is the input
            # times its scale (1 / NSGSn), and so is its noise.
            transmission = [float_card(source.header, f"{TRANSMISSION}{c}") for c in range(channels)]
            if all(t is not None and t > 0 for t in transmission):
                noise = [v / t for v, t in zip(noise, transmission)]
        else:
            noise = _measure_noise(source, data)
        noise = np.asarray(noise, np.float64)
        if not np.all(np.isfinite(noise) & (noise > 0)):
            raise FrameDataError(path, "its noise cannot be measured (too few pixels with data); use another --weights")
        with np.errstate(over="ignore", under="ignore", divide="ignore"):
            weight = 1.0 / noise**2
        if not np.all(np.isfinite(weight) & (weight > 0)):
            listed = ", ".join(f"{v:g}" for v in noise)
            raise FrameDataError(path, f"its noise {listed} gives no finite positive weight 1/noise^2")
        return weight
    try:
        value = source.header.get(mode)
    except (VerifyError, ValueError) as exc:  # astropy parses a card when it is asked for
        raise FrameDataError(path, f"its {mode} card cannot be read ({exc})") from None
    if value is None:
        hint = "stack the outputs of nsg normalize, or choose --weights equal|noise|KEYWORD"
        raise FrameDataError(path, f"has no {mode} card; {hint}")
    try:
        if isinstance(value, bool):
            raise TypeError
        weight = float(value)
    except (TypeError, ValueError):
        raise FrameDataError(path, f"its {mode} card is {value!r}, not a number") from None
    if not (math.isfinite(weight) and weight > 0):
        raise FrameDataError(path, f"its {mode} card is {weight:g}; weights must be positive")
    return np.full(channels, weight)


def _none_stacked(frames) -> str:
    """Why no frame can be stacked: each reason once, with the frames it holds for (the first
    named, the others counted), where every frame said the same at length."""
    reasons: dict[str, list[str]] = {}
    for frame in frames:
        if frame.error:
            name = str(frame.path)
            reason = frame.error[len(name) + 2 :] if frame.error.startswith(f"{name}: ") else frame.error
            reasons.setdefault(reason, []).append(name)
    if not reasons:
        return "no frame can be stacked: no frames"
    parts = []
    for reason, names in reasons.items():
        more = f" and {len(names) - 1} other frame(s)" if len(names) > 1 else ""
        parts.append(f"{names[0]}{more}: {reason}")
    return "no frame can be stacked: " + "; ".join(parts)


def _measure_noise(source: StackInput, data: np.ndarray | None) -> list[float]:
    if data is None:
        data = _middle_rows(source)  # the middle rows only
    # As nsg normalize reads a target's noise for NWEIGHT: the second wavelet layer, which a
    # registration's interpolation does not smooth (a per-pixel estimate takes a resampled
    # frame for cleaner than the frame registered onto, by up to 2x in weight).
    return [multiscale_noise(data[c]) for c in range(source.shape[0])]


def _middle_rows(source: StackInput) -> np.ndarray:
    """The middle :data:`NOISE_ROWS` rows of a frame, float32 (channels, rows, width)."""
    height = source.shape[1]
    count = min(height, NOISE_ROWS)
    return _read_rows(source, [((height - count) // 2, (height - count) // 2 + count)])[0]


def _probe_spans(source: StackInput) -> list[tuple[int, int]]:
    """The :data:`PROBE_ROWS` rows of a frame, as spans for :func:`_read_rows`."""
    height = source.shape[1]
    return [(y, y + 1) for y in sorted({min(height - 1, int(share * height)) for share in PROBE_ROWS})]


def _read_rows(source: StackInput, spans: list[tuple[int, int]]) -> list[np.ndarray]:
    """Rows ``[y0, y1)`` of a frame for each span, float32 (channels, rows, width), through
    one file descriptor."""
    channels, _, width = source.shape
    raw = bytearray(max(y1 - y0 for y0, y1 in spans) * width * source.rows.dtype.itemsize)
    fd = os.open(source.rows.file, os.O_RDONLY)
    try:
        out = []
        for y0, y1 in spans:
            data = np.empty((channels, y1 - y0, width), np.float32)
            source.rows.read(fd, y0, y1, data, raw)
            out.append(data)
        return out
    finally:
        os.close(fd)


def _noise_map(used: list[StackInput], weight_mode: str) -> tuple[NoiseMap, np.ndarray]:
    """The sky's noise for noise clipping (:class:`NoiseMap`), and each used frame's noise over
    the map's per channel (float64 (frames, channels)). The map is the noise of the first of
    two frames, read from their difference: the reference of ``nsg normalize`` where it is
    among them (its ``NSG.reference`` history line; it covers the grid), else the frame of the
    highest weight, and the frame of the highest weight among the others (the first of
    equals), among the frames with data in their :data:`PROBE_ROWS` (``level``, read at the scan). Where the weights are inverse
    variances (NWEIGHT, noise) they give the second frame's noise relative to the first's and
    each frame's, ``sqrt(w_first / w_i)``; otherwise the frames are taken as equally noisy."""
    weights = np.stack([s.weight for s in used]).astype(np.float64)  # (frames, channels)
    with_data = [k for k, s in enumerate(used) if s.level is not None] or list(range(len(used)))
    mean = weights.mean(axis=1)
    order = sorted(
        with_data, key=lambda k: (not used[k].is_reference, -mean[k])
    )  # stable: the first of equals; an empty frame shows no noise
    first, second = (order + order)[:2]
    pair = (used[first], used[second])
    channels, height, width = pair[0].shape
    ratio = None
    relative = np.ones_like(weights)
    if weight_mode in ("NWEIGHT", "noise"):
        ratio = weights[first] / weights[second]
        # As a ratio of square roots: above 0 and not NaN for any finite positive weights (a
        # weight of 1e-300 among weights of 1 makes its frame's noise 1e150 times theirs).
        with np.errstate(over="ignore"):
            relative = np.sqrt(weights[first]) / np.sqrt(weights)
    handles = [os.open(source.rows.file, os.O_RDONLY) for source in pair]
    try:
        raw = bytearray(NOISE_BOX * width * max(source.rows.dtype.itemsize for source in pair))

        def read_rows(y0: int, y1: int) -> np.ndarray:
            data = np.empty((2, channels, y1 - y0, width), np.float32)
            for k, source in enumerate(pair):
                source.rows.read(handles[k], y0, y1, data[k], raw)
            return data

        return NoiseMap.measure(read_rows, pair[0].shape, box=NOISE_BOX, variance_ratio=ratio), relative
    finally:
        for fd in handles:
            os.close(fd)


def _combine(
    used: list[StackInput],
    result: StackResult,
    chosen: Backend,
    noise_map: tuple[NoiseMap, np.ndarray] | None,
    *,
    threads: int,
    progress,
) -> StackProducts:
    """Read the frames band by band (a reader thread one band ahead) and combine each band;
    ``noise_map`` the sky's noise and each frame's share of it (:func:`_noise_map`)."""
    channels, height, width = result.shape
    n = len(used)
    rows = result.band_rows
    count_type = np.uint16 if n <= np.iinfo(np.uint16).max else np.uint32
    products = StackProducts(
        master=np.zeros((channels, height, width), np.float32),
        coverage=np.zeros((channels, height, width), count_type),
        low=np.zeros((channels, height, width), count_type),
        high=np.zeros((channels, height, width), count_type),
        covered=np.zeros(n, np.int64),
        frame_low=np.zeros(n, np.int64),
        frame_high=np.zeros(n, np.int64),
    )
    weights = np.stack([s.weight for s in used])  # (n, channels)
    if noise_map is not None:
        sky, relative = noise_map
        # The peaks are the frames' median's: the noise of the frames' harmonic mean share (the
        # frames' noise where they are equal; a frame of absurd noise adds nothing to the sum
        # of inverses, but counts as one of n).
        typical = len(relative) / np.sum(1.0 / relative, axis=0)
    bands = [(y0, min(height, y0 + rows)) for y0 in range(0, height, rows)]
    buffers: queue.Queue = queue.Queue()
    for _ in range(2):
        buffers.put(np.empty(channels * n * rows * width, np.float32))
    ready: queue.Queue = queue.Queue(maxsize=1)
    handles = FileHandles([s.rows.file for s in used])
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
    on_host = not chosen.is_gpu or noise_map is not None  # the twin's chunks, or the peaks'
    pool = concurrent.futures.ThreadPoolExecutor(threads) if threads > 1 and on_host else None
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
                maps = (None, None, None)
                if noise_map is not None:
                    noise = sky.band(c, y0, y1)
                    peaks = _peaks(values, width, result.rejection, noise, float(typical[c]), pool)
                    maps = (peaks, noise, relative[:, c])  # shares all 1: reject_combine's equal frames
                _combine_values(values, weights[:, c], result.rejection, maps, chosen, pool, out, products)
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
    maps: tuple,
    chosen: Backend,
    pool,
    out: dict,
    products: StackProducts,
) -> None:
    """One channel of one band into ``out`` (flat views of the band's rows of the master and
    maps): on the GPU in device-sized chunks, on the CPU in pixel chunks spread over the
    threads, each written into ``out`` by the thread that combined it, so that no output
    waits. The chunks do not change the result."""
    n, pixels = values.shape
    peak, noise, noise_scale = maps

    def cut(start: int, end: int) -> dict:
        if peak is None:
            return {}
        return {"peak": peak[start:end], "noise": noise[start:end], "noise_scale": noise_scale}

    def store(start: int, part: BandResult, host) -> tuple[np.ndarray, np.ndarray]:
        """A chunk's pixels into ``out`` (chunks are disjoint); its per-frame counts."""
        end = start + int(part.master.shape[0])
        for name in ("master", "coverage", "low", "high"):
            out[name][start:end] = host(getattr(part, name))
        return host(part.frame_low), host(part.frame_high)

    def count(counts) -> None:
        for low, high in counts:  # integers: any order gives the same sums
            products.frame_low += low
            products.frame_high += high

    if chosen.is_gpu:
        xp = chosen.xp
        free = _device_free_bytes()
        per_pixel = n * (4 + 4 + 4 + 1 + (8 if rejection.method == "linear" else 0)) + 16 + 8
        step = max(1024, int(free * 0.5) // per_pixel)
        for start in range(0, pixels, step):
            device = xp.asarray(values[:, start : start + step])
            on_device = {k: v if k == "noise_scale" else xp.asarray(v) for k, v in cut(start, start + step).items()}
            count([store(start, reject_combine(device, weights, rejection, **on_device), chosen.to_host)])
        return
    step = max(1, CHUNK_SAMPLES // max(1, n))
    starts = list(range(0, pixels, step))

    def run(start: int) -> tuple[np.ndarray, np.ndarray]:
        part = reject_combine(
            np.ascontiguousarray(values[:, start : start + step]), weights, rejection, **cut(start, start + step)
        )
        return store(start, part, np.asarray)  # on the worker: a chunk's outputs never wait

    count(pool.map(run, starts) if pool is not None and len(starts) > 1 else map(run, starts))


def _peaks(
    values: np.ndarray, width: int, rejection: Rejection, noise: np.ndarray, noise_factor: float, pool=None
) -> np.ndarray:
    """:func:`peak_excess` of a band at the pixels that are noise-clipped (under ``auto``, those
    with as many samples as noise clipping is chosen for), its chunks of rows on ``pool``."""
    run = map if pool is None else pool.map
    if rejection.method == "noise":
        return peak_excess(values, width, noise=noise, noise_factor=noise_factor, run=run)
    frames, pixels = values.shape
    chosen = np.array([rejection.method_for(k) == "noise" for k in range(frames + 1)])
    needed = np.empty(pixels, bool)
    step = max(1, CHUNK_SAMPLES // max(1, frames))
    for start in range(0, pixels, step):  # samples with data (the reader made non-finite ones 0)
        needed[start : start + step] = chosen[np.count_nonzero(values[:, start : start + step], axis=0)]
    return peak_excess(values, width, needed, noise, noise_factor=noise_factor, run=run)


def _device_free_bytes() -> int:
    import cupy

    free, _ = cupy.cuda.runtime.memGetInfo()
    return int(free) + int(cupy.get_default_memory_pool().free_bytes())


def _finish_frames(
    frames: list[StackFrame], sources: list[StackInput], used: list[StackInput], products: StackProducts
) -> list[StackInput]:
    """Each used frame's counts; a frame without a sample with data is left out (it took no
    part in the master). The frames used."""
    by_source = {id(s): k for k, s in enumerate(used)}
    with_data = [s for k, s in enumerate(used) if products.covered[k]]
    best = max((float(np.mean(s.weight)) for s in with_data), default=1.0)
    for frame, source in zip(frames, sources):
        k = by_source.get(id(source))
        if k is None:
            continue
        if not products.covered[k]:
            source.error = frame.error = f"{source.path}: has no data (every sample is 0 or not finite)"
            frame.status, frame.weight = "skipped", None
            continue
        frame.covered = int(products.covered[k])
        frame.rejected_low = int(products.frame_low[k])
        frame.rejected_high = int(products.frame_high[k])
        frame.relative_weight = float(np.mean(source.weight)) / best
    return with_data
