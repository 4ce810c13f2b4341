"""A whole run from files: plan, prepare the reference, run the jobs, reject, and report.

The top of the data flow. :func:`plan_run` chooses the reference (:mod:`nsg_gpu.select`),
drops duplicates and names every output before any pixel is read; :func:`normalize` keeps the
outputs an earlier run left complete and up to date (:mod:`nsg_gpu.resume`), prepares the
reference once (:mod:`nsg_gpu.reference`), hands the other targets to an executor
(:mod:`nsg_gpu.executors`, :mod:`nsg_gpu.cluster`), rejects frames as NSG does
(:mod:`nsg_gpu.rejection`) and writes the results files (:mod:`nsg_gpu.report`), the plots
(:mod:`nsg_gpu.diagnostics`) and ``report.html`` (:mod:`nsg_gpu.htmlreport`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .atomic import remove_stale_temporaries
from .backend import NUMPY, Backend, select_backend
from .diagnostics import chosen_frames, existing_frame_plots, write_frame_plots
from .errors import FrameError, NSGError, OutputError, ParameterError, ReferenceFrameError
from .executors import InProcessExecutor
from .htmlreport import REPORT_FILE, write_report
from .io import (
    MASTER_REASON,
    OUTPUT_FORMATS,
    expand_frames,
    frame_stem,
    is_stack_master,
    output_path,
    read_frame,
    read_output_header,
)
from .jobs import FrameJob, reference_result, write_reference
from .keywords import FINGERPRINT
from .params import Parameters
from .pipeline import normalize_frame
from .preview import reference_preview
from .reference import Reference, prepare_reference
from .rejection import reject_frames
from .report import SUMMARY_FILES, clear_summaries, write_results, write_weights
from .results import FrameResult, RunResult
from .resume import check_clearable, clear_outputs, find_complete_output, frame_fingerprint, result_from_header
from .select import choose_reference

__all__ = ["RunPlan", "plan_run", "normalize", "check_output_dir"]


@dataclass
class RunPlan:
    """What a run will do, decided before any pixel is read: reference, targets, outputs."""

    reference_path: Path
    reference_output: Path
    targets: list[Path]
    outputs: dict[Path, Path]
    duplicates: list[FrameResult]
    reference_reason: str | None = None

    def jobs(
        self, history: Sequence[str] = (), *, fingerprints: dict | None = None, diagnostics: bool = False
    ) -> list[FrameJob]:
        """One job per target, in input order."""
        fingerprints = fingerprints or {}
        return [
            FrameJob(
                path=p,
                output=self.outputs[p],
                reference_name=self.reference_path.name,
                history=tuple(history),
                fingerprint=fingerprints.get(p),
                diagnostics=diagnostics,
            )
            for p in self.targets
        ]


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """``output_dir`` as a path, after checking that it can be a directory.

    Raises
    ------
    OutputError
        It exists and is not a directory.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"{output_dir}: the output directory is a file; choose another --output-dir")
    for above in output_dir.absolute().parents:
        if above.exists() and not above.is_dir():
            raise OutputError(f"{output_dir}: {above} is a file, not a folder; choose another --output-dir")
    rejected = output_dir / "rejected"
    if rejected.exists() and not rejected.is_dir():
        raise OutputError(f"{rejected}: is a file, where rejected frames' outputs go; move it away")
    return output_dir


def _without_earlier_outputs(frames, output_dir: Path) -> list[Path]:
    """The frames ``frames`` name (:func:`~nsg_gpu.io.expand_frames`), less the outputs of an
    earlier run that a directory given as frames holds where it is the output directory
    itself (``nsg normalize lights -o lights``: each rerun would normalize the last one's
    outputs again). An output named on its own stays, to be normalized as the user asks."""
    paths: list[Path] = []
    target = output_dir.resolve()
    for item in map(Path, frames):
        listed = expand_frames([item])
        if item.is_dir() and item.resolve() == target:
            listed = [p for p in listed if not _is_output(p)]
            if not listed:
                raise NSGError(
                    f"{item}: the output folder holds only outputs of nsg normalize, no frames; "
                    "to normalize those again, write into another --output-dir"
                )
        paths.extend(listed)
    return paths


def _is_output(path: Path) -> bool:
    """Whether ``path`` is an output of ``nsg normalize`` (its ``NSGHASH`` card)."""
    try:
        return FINGERPRINT in read_output_header(path)
    except FrameError:  # unreadable or cut short: its reading as a frame says why
        return False


def _reference_among(reference: Path, frames: list[Path]) -> Path:
    """The reference frame ``reference`` names: a file, or where no file has that path, the
    one frame given whose file name or stem (``frame_stem``) it is (``-r frame_0005`` with
    ``lights/`` as the frames).

    Raises
    ------
    ReferenceFrameError
        It is a directory, names no file and no frame given, or more than one frame given.
    """
    if reference.is_dir():
        raise ReferenceFrameError(reference, "is a directory; give the reference frame itself")
    if reference.is_file():
        if is_stack_master(reference):
            raise ReferenceFrameError(reference, MASTER_REASON)
        return reference
    if reference.parent == Path("."):
        named = sorted({p for p in frames if reference.name in (p.name, frame_stem(p))}, key=str)
        if len(named) == 1 and named[0].is_file():
            return named[0]
        if len(named) > 1:
            listed = ", ".join(str(p) for p in named[:4]) + (", ..." if len(named) > 4 else "")
            raise ReferenceFrameError(
                reference, f"names {len(named)} of the frames given ({listed}); give the reference's path"
            )
    if reference.exists():
        raise ReferenceFrameError(reference, "is not a regular file (a pipe or a device?); give the reference frame")
    if reference.is_symlink():
        raise ReferenceFrameError(reference, "is a link to nothing; give the reference frame itself")
    if reference.parent == Path("."):
        raise ReferenceFrameError(reference, "no such file, nor a frame of that name among the frames given")
    raise ReferenceFrameError(reference, "the reference frame does not exist")


def plan_run(
    frames: Sequence[str | os.PathLike],
    *,
    reference: str | os.PathLike = "auto",
    output_dir: str | os.PathLike = "nsg",
    params: Parameters | None = None,
    postfix: str = "_nsg",
    output_format: str = "fits",
) -> RunPlan:
    """Choose the reference, drop duplicates and name every output; nothing is written.

    ``frames`` may name directories: each stands for its FITS and XISF files.

    Raises
    ------
    ReferenceFrameError
        The reference does not exist.
    OutputError
        The output directory is a file, or an output would overwrite an input.
    """
    params = params or Parameters()
    if "/" in postfix or "\\" in postfix or os.sep in postfix:
        raise NSGError(f"--postfix {postfix!r}: a postfix names files in the output directory; no / or \\")
    if output_format not in OUTPUT_FORMATS:
        raise NSGError(f"--output-format must be one of {', '.join(OUTPUT_FORMATS)}, not {output_format!r}")
    output_dir = check_output_dir(output_dir)
    paths = _without_earlier_outputs(frames, output_dir)
    masters = [
        FrameResult(path=str(p), status="failed", error=f"{p}: {MASTER_REASON}") for p in paths if is_stack_master(p)
    ]
    if masters:
        named = {r.path for r in masters}
        paths = [p for p in paths if str(p) not in named]
    reason = None
    if str(reference) == "auto":
        if not paths:
            raise NSGError("no frames given")
        # A frame given twice is measured once: it counts once among the frames compared.
        once: dict[Path, Path] = {}
        for p in paths:
            once.setdefault(p.resolve(), p)
        reference_path, reason = choose_reference(list(once.values()), detection_sigma=params.detection_sigma)
    else:
        if not str(reference).strip():
            raise ParameterError("--reference is empty: give the reference frame's path or name, or auto")
        reference_path = _reference_among(Path(reference), paths)
    seen: dict[Path, Path] = {}
    targets: list[Path] = []
    duplicates: list[FrameResult] = list(masters)
    ref_resolved = reference_path.resolve()
    seen_reference = False
    for p in paths:
        key = p.resolve()
        if key == ref_resolved and not seen_reference:
            seen_reference = True
            seen[key] = p
            continue
        if key in seen:
            duplicates.append(
                FrameResult(
                    path=str(p), status="failed", error=f"{p}: given twice (also as {seen[key]}); processed once"
                )
            )
            continue
        seen[key] = p
        targets.append(p)
    inputs = {ref_resolved, *seen.keys()}
    outputs = {}
    named: dict[Path, Path] = {}  # each output, and the frame it is of
    for p in [reference_path, *targets]:
        out = output_path(p, output_dir, postfix, output_format=output_format)
        if out.resolve() in inputs:
            raise OutputError(
                f"{out}: the output would overwrite an input frame; choose another --output-dir or postfix"
            )
        other = named.get(out.resolve())
        if other is not None:  # frames of one name in two folders
            duplicates.append(
                FrameResult(
                    path=str(p),
                    status="failed",
                    error=f"{p}: its output {out.name} would be {other}'s as well; rename one of the two frames",
                )
            )
            targets.remove(p)
            continue
        named[out.resolve()] = p
        outputs[p] = out
    return RunPlan(reference_path, outputs[reference_path], targets, outputs, duplicates, reason)


def normalize(
    frames: Sequence[str | os.PathLike],
    *,
    reference: str | os.PathLike = "auto",
    output_dir: str | os.PathLike = "nsg",
    params: Parameters | None = None,
    backend: Backend | str | None = None,
    postfix: str = "_nsg",
    stop_on_error: bool = False,
    progress: Callable[[FrameResult, int, int], None] | None = None,
    executor=None,
    overwrite: bool = False,
    output_format: str = "fits",
    plots: bool = False,
    report: bool = False,
) -> RunResult:
    """Normalize frames on disk to a reference and write ``<stem><postfix>.fits`` for each.

    A rerun keeps every output that is complete and was made from the same input, reference
    and parameters (its ``NSGHASH`` card, :mod:`nsg_gpu.resume`) and redoes the others. After
    the run, frames whose relative weight or transmission is at or below
    ``params.min_weight`` / ``params.min_transmission`` are marked rejected and their outputs
    moved into ``<output_dir>/rejected/`` (:mod:`nsg_gpu.rejection`).

    Parameters
    ----------
    frames : sequence of paths
        Registered FITS or XISF frames. The reference may be among them.

    reference : path or "auto"
        The reference frame, or "auto" to choose one (see :func:`nsg_gpu.select.choose_reference`).

    output_dir : path
        Created if needed; outputs, ``results.csv`` and ``results.json`` go there.

    params : Parameters, optional

    backend : Backend or {"auto", "numpy", "cupy"}, optional
        NumPy by default; a name is chosen as ``nsg normalize --backend`` chooses it.

    stop_on_error : bool
        Stop at the first frame that fails instead of going on.

    progress : callable, optional
        Called as ``progress(result, done, total)`` after each frame.

    executor : optional
        Runs :func:`nsg_gpu.jobs.process_frame` over the targets (:mod:`nsg_gpu.executors`);
        in-process by default.

    overwrite : bool
        Redo every frame, even those whose output is complete and up to date.

    output_format : {"fits", "xisf"}
        Format of the normalized frames (``.fits`` or ``.xisf``).

    plots : bool
        Write the diagnostic plots of every frame to ``output_dir/plots`` as it completes
        (:mod:`nsg_gpu.diagnostics`). Without it, only a few chosen frames are plotted.

    report : bool
        Write ``report.html`` with the run charts and the chosen frames' diagnostics
        (:mod:`nsg_gpu.htmlreport`); ``nsg normalize`` does by default. A report that cannot be
        written leaves the run done, with the reason in ``RunResult.report_error``.

    Returns
    -------
    RunResult
        The reference first, then the targets in input order; failed frames carry their error,
        kept outputs are marked ``resumed``, rejected frames carry the reason in ``rejected``.

    Raises
    ------
    ReferenceFrameError
        The reference is missing or unusable (nothing can be normalized).
    OutputError
        An output would overwrite an input.
    """
    params = params or Parameters()
    be = select_backend(backend) if isinstance(backend, str) else backend or NUMPY
    executor = executor or InProcessExecutor()
    plan = plan_run(
        frames, reference=reference, output_dir=output_dir, params=params, postfix=postfix, output_format=output_format
    )
    remove_stale_temporaries(
        [*plan.outputs.values(), *(Path(output_dir) / name for name in (*SUMMARY_FILES, REPORT_FILE))],
        folders=[Path(output_dir) / "plots"],
    )
    # Resume: outputs made from the same input, reference and parameters are kept.
    ref_name = plan.reference_path.name
    fingerprints = {
        p: frame_fingerprint(p, reference=plan.reference_path, params=params)
        for p in [plan.reference_path, *plan.targets]
    }
    complete = {}
    if not overwrite:
        for p in [plan.reference_path, *plan.targets]:
            found = find_complete_output(plan.outputs[p], reference_name=ref_name, fingerprint=fingerprints[p])
            if found is not None:
                complete[p] = found
    for p, out in plan.outputs.items():  # outputs that could not be cleared: before anything is done
        if p not in complete:
            check_clearable(out)
    try:
        ref_frame = read_frame(plan.reference_path)
    except FrameError as exc:
        raise ReferenceFrameError(plan.reference_path, exc.reason) from exc
    prepared = prepare_reference(ref_frame, params, backend=be)
    preview = reference_preview(prepared) if plots or report else None  # drawn behind the sample grids
    if len(complete) < len(plan.outputs):  # some frame is redone: the earlier summary goes first
        clear_summaries(output_dir)
    if plan.reference_path in complete:
        reference_row = reference_result(prepared, complete.pop(plan.reference_path)[0])
        reference_row.resumed = True
    else:
        clear_outputs(plan.reference_output)
        reference_row = write_reference(prepared, plan.reference_output, fingerprint=fingerprints[plan.reference_path])
    total = len(plan.targets) + 1
    if progress:
        progress(reference_row, 1, total)
    by_path: dict[Path, FrameResult] = {}
    for p, (out, header) in complete.items():
        by_path[p] = result_from_header(p, out, header, weight_keyword=prepared.params.weight_keyword)
        if progress:
            progress(by_path[p], len(by_path) + 1, total)
    # Every frame records its diagnostics (a few hundred kB); with --plots each is plotted and
    # dropped at once, otherwise only the highest- and lowest-weight frames' records are kept.
    jobs = [
        job
        for job in plan.jobs(prepared.params.history(), fingerprints=fingerprints, diagnostics=plots or report)
        if job.path not in complete
    ]
    for job in jobs:
        clear_outputs(job.output)  # a frame redone has no output until its new one is complete
    frame_plots: dict[str, list[Path]] = {}
    plot_error = None
    kept: dict[str, tuple] = {}
    results_iter = executor.run(prepared, jobs, stop_on_error=stop_on_error)
    # Results first: zip then runs the executor to its end (its threads joined, its cluster
    # futures released) before it looks at the jobs.
    for result, job in zip(results_iter, jobs):
        if result.diagnostics is not None:
            if plots:
                try:
                    frame_plots[result.path] = write_frame_plots(
                        result, result.diagnostics, Path(output_dir) / "plots", preview=preview
                    )
                except OutputError as exc:
                    plots = False  # the disk is full or gone: the next frames' plots would fail too
                    plot_error = str(exc)
            else:
                _keep_extremes(kept, result)
            result.diagnostics = None
        by_path[job.path] = result
        if progress:
            progress(result, len(by_path) + 1, total)
    results = [reference_row, *plan.duplicates, *(by_path[p] for p in plan.targets if p in by_path)]
    _filter_warnings(results)
    _mosaic_warnings(results)
    reject_frames(
        results,
        min_weight=params.min_weight,
        min_transmission=params.min_transmission,
        max_scale_error=params.max_scale_error,
        output_dir=output_dir,
    )
    run = RunResult(str(plan.reference_path), results, prepared.params, plan.reference_reason)
    run.not_tried = sum(1 for p in plan.targets if p not in by_path)
    run.report_error = plot_error
    write_results(run, output_dir)
    write_weights(run, output_dir)
    if report:
        try:
            run.report = str(_write_report(prepared, run, output_dir, frame_plots, kept, preview))
        except OutputError as exc:  # the frames and results are written; the report is extra
            run.report_error = str(exc)
    return run


def _filter_warnings(results: list[FrameResult]) -> None:
    """Warn on every frame whose FILTER differs from the reference's (the first result)."""
    reference = results[0]
    if not reference.filter:
        return
    for result in results[1:]:
        if result.status == "failed" or not result.filter:
            continue
        if result.filter.strip().casefold() != reference.filter.strip().casefold():
            message = (
                f"FILTER {result.filter!r} differs from the reference's {reference.filter!r}: "
                "frames of different filters should not be normalized to one reference"
            )
            result.warning = f"{result.warning}; {message}" if result.warning else message


def _mosaic_warnings(results: list[FrameResult]) -> None:
    """Warn on every mono frame whose header names a colour camera's cells (BAYERPAT): a
    one-shot-colour frame not debayered, whose red, green and blue pixels are normalized
    together by one scale and one sky surface, where each colour has its own."""
    for result in results:
        pattern = result.meta.bayer_pattern
        if result.status == "failed" or not pattern or len(result.scale) != 1:
            continue
        message = (
            f"a colour camera's frame (BAYERPAT {pattern}) not debayered: its colours are normalized "
            "as one; debayer before registering and normalizing"
        )
        result.warning = f"{result.warning}; {message}" if result.warning else message


def _keep_extremes(kept: dict, result: FrameResult) -> None:
    """Keep ``result``'s diagnostics if it has the highest or lowest weight so far."""
    record = (result, result.diagnostics)
    for key, better in (("high", lambda a, b: a > b), ("low", lambda a, b: a < b)):
        if key not in kept or better(result.weight, kept[key][0].weight):
            kept[key] = record


def _write_report(prepared: Reference, run: RunResult, output_dir, frame_plots: dict, kept: dict, preview=None) -> Path:
    """report.html, with the diagnostics of the chosen frames; one kept from an earlier run
    shows the plots that run drew of it, and one whose record was not kept during the run (the
    median-weight frame, or a kept frame without plots) is normalized again in memory."""
    records = {result.path: diagnostics for result, diagnostics in kept.values()}
    chosen = chosen_frames(run.frames)
    for result in chosen.values():
        if result.path in frame_plots:
            continue
        existing = existing_frame_plots(result, Path(output_dir) / "plots") if result.resumed else None
        if existing:
            frame_plots[result.path] = existing
            continue
        diagnostics = records.get(result.path)
        if diagnostics is None:
            try:
                diagnostics = normalize_frame(prepared, read_frame(result.path), diagnostics=True).diagnostics
            except FrameError:  # changed on disk since; the report goes without its plots
                continue
        frame_plots[result.path] = write_frame_plots(result, diagnostics, Path(output_dir) / "plots", preview=preview)
    return write_report(run, output_dir, frame_plots=frame_plots, chosen=chosen)
