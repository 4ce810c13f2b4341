"""``report.html``: one static page per run, opened from disk in any browser.

The page holds the run summary (reference and why, frames normalized, failed and rejected),
the table of frames (its row colours explained by a legend, a rejected frame's reason under
its status), the run chart (transmission and weight per frame in time order, with the
rejection thresholds), the diagnostic plots of the chosen frames (highest, median and lowest
weight) and of every frame plotted with ``--plots`` (a frame kept from an earlier run shows
the plots that run drew of it), and the parameters as resolved. Images are PNG files under
``plots/`` beside it, linked by relative paths, so the output directory can be moved or
archived whole. No script, no network access. The page uses the window's width, and the
table wraps its text columns rather than scroll.

In the flow: the last thing a run writes (:func:`nsg_gpu.run.normalize`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .atomic import write_text
from .diagnostics import (
    FRAME_PLOTS,
    existing_frame_plots,
    new_figure,
    rejection_thresholds,
    save_figure,
    write_run_plots,
)
from .progress import format_seconds
from .version import __version__

__all__ = ["REPORT_FILE", "write_report", "stack_section", "add_stack_section", "write_stack_plots"]

#: The report's name in the output directory.
REPORT_FILE = "report.html"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: right; white-space: nowrap; vertical-align: top; }
th { background: #f3f3f3; white-space: normal; vertical-align: bottom; } .nowrap { white-space: nowrap; } td.text { text-align: left; } td.wrap { white-space: normal; }
td.file, td.note { overflow-wrap: anywhere; } td.file { min-width: 8em; } td.status { min-width: 9em; } td.note { min-width: 10em; }
.state { font-weight: 600; } .reason { display: block; font-size: 0.92em; }
tr.failed td, .swatch.failed { background: #fde0dd; } tr.rejected td, .swatch.rejected { background: #fff3cd; }
tr.reference td, .swatch.reference { background: #e7f1fb; } .swatch.ok { background: #fff; }
.tag { display: inline-block; margin-left: 0.4em; padding: 0 0.35em; border: 1px solid #5b8a5b; border-radius: 0.3em;
       color: #2f5f2f; background: #eef6ee; font-size: 0.85em; font-weight: normal; }
.legend { list-style: none; padding: 0; margin: 0.4em 0 0.8em; font-size: 0.85em; display: flex; flex-wrap: wrap;
          gap: 0.3em 1.6em; }
.swatch { display: inline-block; width: 1.6em; height: 0.95em; border: 1px solid #bbb; vertical-align: -0.1em;
          margin-right: 0.35em; }
.summary td { text-align: left; white-space: normal; } .frames { overflow-x: auto; }
.figures { display: flex; flex-wrap: wrap; gap: 0 1.5em; align-items: flex-start; }
figure { margin: 0.6em 0; min-width: 0; } figcaption { font-size: 0.85em; color: #555; max-width: 60em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
details { margin: 0.6em 0; } summary { cursor: pointer; font-weight: 600; }
.muted { color: #777; font-size: 0.85em; }
"""

#: The table's row kinds and what they mean, in the legend's order.
_LEGEND = (
    ("ok", "normalized"),
    ("reference", "the reference: the frame the others are brought to"),
    (
        "rejected",
        "rejected: relative weight or transmission at or below its threshold (why: under the status); "
        "output in rejected/",
    ),
    ("failed", "failed: not normalized (why: in the note)"),
)
_KEPT = "kept from an earlier run: its output was complete and up to date, so it was not normalized again"


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _number(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " / ".join(_number(v, digits) for v in value)
    try:
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return _e(value)


#: A frame whose fitted PSF is drawn out by this much (``1 - b/a``) or more says so in its
#: note: well-tracked frames read 0.02-0.12 (StarGate's), a trailed one 0.2-0.3.
DRAWN_OUT_NOTE = 0.15


def _drawn_out(frame) -> str | None:
    """The note of a frame whose stars are drawn out (a trailing mount, wind), or None."""
    e = getattr(frame, "ellipticity", None)
    if e is None or e < DRAWN_OUT_NOTE:
        return None
    angle = getattr(frame, "elongation_angle", None)
    return f"stars drawn out: 1 - b/a {e:.2f}" + (f" at {angle:.0f}° from x" if angle is not None else "")


def _transmission(frame) -> str:
    """Each channel's transmission with its standard error where the fit gave one."""
    errors = list(frame.transmission_error or [])
    parts = []
    for c, value in enumerate(frame.transmission or []):
        error = errors[c] if c < len(errors) else None
        text = _number(value)
        if error is not None and math.isfinite(error):  # None where the fit gave none
            text += f" ± {_number(error, 2)}"
        parts.append(text)
    return " / ".join(parts)


def _relative(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _kind(frame) -> str:
    if frame.status == "failed":
        return "failed"
    return "rejected" if getattr(frame, "rejected", None) else frame.status


def _status_cell(frame) -> str:
    kind = _kind(frame)
    parts = [f'<span class="state">{_e(kind)}</span>']
    if frame.resumed:
        parts.append(f'<span class="tag" title="{_e(_KEPT)}">kept</span>')
    if kind == "rejected":
        parts.append(f'<span class="reason">{_e(frame.rejected)}</span>')
    return f'<td class="text wrap status">{"".join(parts)}</td>'


def _date(value) -> str:
    """DATE-OBS, breakable between the date and the time only."""
    if not value:
        return ""
    date, sep, time = str(value).partition("T")
    return f'<span class="nowrap">{_e(date)}{_e(sep)}</span><wbr><span class="nowrap">{_e(time)}</span>'


def _note(frame) -> str:
    """The error and the warning; an error's leading file path is the file column's already."""
    error = frame.error
    if error and error.startswith(f"{frame.path}: "):
        error = error[len(frame.path) + 2 :]
    doubt = f"scale in doubt: {frame.scale_flag}" if getattr(frame, "scale_flag", None) else None
    notes = (error, getattr(frame, "warning", None), doubt, _drawn_out(frame))
    return _e("; ".join(text for text in notes if text))


def _seconds(frame) -> str:
    if frame.resumed:
        return f'<td class="muted" title="{_e(_KEPT)}">kept</td>'
    return f"<td>{_number(frame.seconds, 2)}</td>"


def _cell(value: str, kind: str = "") -> str:
    return f'<td class="{kind}">{value}</td>' if kind else f"<td>{value}</td>"


#: The table's columns: heading, the cell of a frame, and the header fact that a column shows
#: (left out where no frame has it, so that the table keeps to the window's width).
_COLUMNS = (
    ("file", lambda f: _cell(_e(Path(f.path).name), "text wrap file"), None),
    ("status", _status_cell, None),
    ("transmission ± 1σ", lambda f: _cell(_transmission(f)), None),
    ("weight", lambda f: _cell(_number(f.weight)), None),
    ("SNR", lambda f: _cell(_number(f.snr)), None),
    ("star pairs", lambda f: _cell(_e(f.star_pairs)), None),
    ("samples", lambda f: _cell(_e(f.samples)), None),
    ("FWHM (px)", lambda f: _cell(_number(f.fwhm, 3)), None),
    ("photometry", lambda f: _cell(_e(f.photometry or ""), "text"), "photometry"),
    ("noise", lambda f: _cell(_number(f.noise, 3)), None),
    ("altitude (deg)", lambda f: _cell(_number(f.altitude, 3)), "altitude"),
    ("exposure (s)", lambda f: _cell(_number(f.exposure, 4)), "exposure"),
    ("filter", lambda f: _cell(_e(f.filter), "text"), "filter"),
    ("DATE-OBS", lambda f: _cell(_date(f.date_obs), "text wrap"), "date_obs"),
    ("time (s)", _seconds, None),
    ("note", lambda f: _cell(_note(f), "text wrap note"), None),
)


def _columns(frames) -> list:
    return [c for c in _COLUMNS if c[2] is None or any(getattr(f, c[2]) is not None for f in frames)]


def _frame_row(frame, columns) -> str:
    classes = _kind(frame) + (" kept" if frame.resumed else "")
    return f'<tr class="{classes}">' + "".join(cell(frame) for _, cell, _ in columns) + "</tr>"


def _legend() -> str:
    items = [f'<li><span class="swatch {kind}"></span>{_e(text)}</li>' for kind, text in _LEGEND]
    items.append(f'<li><span class="tag">kept</span> {_e(_KEPT)}</li>')
    return '<ul class="legend" id="legend">' + "".join(items) + "</ul>"


def _figures(paths: Sequence[Path], base: Path, caption: str | None = None) -> str:
    captions = dict(FRAME_PLOTS)
    parts = ['<div class="figures">']
    for path in paths:
        key = next((k for k in captions if path.stem.endswith("_" + k)), None)
        text = caption or captions.get(key, path.stem)
        parts.append(
            f'<figure><img src="{_e(_relative(path, base))}" alt="{_e(text)}" loading="lazy">'
            f"<figcaption>{_e(text)}</figcaption></figure>"
        )
    parts.append("</div>")
    return "\n".join(parts)


def write_report(
    run,
    output_dir: str | os.PathLike,
    *,
    frame_plots: Mapping[str, Sequence[Path]] | None = None,
    chosen: Mapping[str, object] | None = None,
    stack=None,
) -> Path:
    """Write ``output_dir/report.html`` (and the run chart under ``plots/``) for a run.

    Parameters
    ----------
    run : RunResult

    output_dir : path

    frame_plots : mapping, optional
        Frame path to its plot files (:func:`nsg_gpu.diagnostics.write_frame_plots`). A frame
        kept from an earlier run that is not in it shows the plots that run drew of it, where
        they are still its own (:func:`nsg_gpu.diagnostics.existing_frame_plots`).

    chosen : mapping, optional
        Label (e.g. "highest weight") to the frame shown first under that label.

    stack : StackResult, optional
        A stack of the run's outputs (:func:`nsg_gpu.stacking.stack`): its section goes before
        the parameters.

    Returns
    -------
    Path
        The report.

    Raises
    ------
    OutputError
        The report or a plot cannot be written.
    """
    output_dir = Path(output_dir)
    frame_plots = dict(frame_plots or {})
    chosen = dict(chosen or {})
    run_plots = write_run_plots(run, output_dir / "plots")
    frames = run.frames
    for frame in frames:
        if frame.resumed and frame.path not in frame_plots:
            existing = existing_frame_plots(frame, output_dir / "plots")
            if existing:
                frame_plots[frame.path] = existing
    n_failed = sum(f.status == "failed" for f in frames)
    n_rejected = sum(bool(getattr(f, "rejected", None)) for f in frames)
    n_kept = sum(f.resumed for f in frames)
    n_done = len(frames) - n_failed
    kept = f" ({n_kept} kept from an earlier run)" if n_kept else ""
    min_weight, min_transmission = rejection_thresholds(run.parameters)
    summary_rows = [
        ("reference", Path(run.reference).name),
        ("why this reference", run.reference_reason or "given with --reference"),
        ("frames", f"{len(frames)}: {n_done} normalized{kept}, {n_failed} failed, {n_rejected} rejected"),
        (
            "rejection thresholds",
            f"weight {min_weight:g}, transmission {min_transmission:g} (relative to the best frame whose mean "
            "transmission is not in doubt)",
        ),
        ("time per frame", _time_per_frame(frames)),
        ("results", "results.csv, results.json"),
        ("written", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("program", f"nsg-gpu {__version__}"),
    ]
    parameters = dataclasses.asdict(run.parameters) if run.parameters else {}
    columns = _columns(frames)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>nsg-gpu report: {_e(Path(run.reference).name)}</title>",
        # An empty icon: without one a browser asks the disk for favicon.ico and logs an error.
        '<link rel="icon" href="data:,">',
        f"<style>{_STYLE}</style></head><body>",
        "<h1>NormalizeScaleGradient report</h1>",
        f'<p class="muted">{_e(len(frames))} frames normalized to {_e(Path(run.reference).name)}</p>',
        '<h2 id="summary">Summary</h2><table class="summary">',
        *[f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in summary_rows],
        "</table>",
    ]
    # The table first: why a frame was rejected or failed is read there.
    parts += [
        '<h2 id="frames">Frames</h2>',
        _legend(),
        '<div class="frames"><table>',
        "<tr>" + "".join(f"<th>{_e(heading)}</th>" for heading, _, _ in columns) + "</tr>",
        *[_frame_row(f, columns) for f in frames],
        "</table></div>",
    ]
    if run_plots:
        caption = (
            "Per frame in time order, relative to the best frame whose mean transmission is not in doubt "
            "(squares: in doubt); dashed: rejection thresholds. Transmission is the mean over channels, "
            "per second of exposure where every frame states its exposure (EXPOSURE, EXPTIME or ELAPTIME)."
        )
        parts += ['<h2 id="run">Transmission and weight</h2>', _figures(run_plots, output_dir, caption)]
    if frame_plots:
        parts.append('<h2 id="diagnostics">Diagnostics</h2>')
        shown = set()
        for label, frame in chosen.items():
            if frame.path in frame_plots:
                shown.add(frame.path)
                parts.append(_frame_section(f"{label}: ", frame, frame_plots[frame.path], output_dir, open_=True))
        for frame in frames:  # the others, in the table's order
            if frame.path not in shown and frame.path in frame_plots:
                parts.append(_frame_section("", frame, frame_plots[frame.path], output_dir, open_=False))
    if stack is not None:
        parts.append(stack_section(stack, output_dir))
    else:
        parts += _earlier_stack(output_dir, frames)
    parts += [
        '<h2 id="parameters">Parameters</h2><table class="summary">',
        *[f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in parameters.items()],
        "</table>",
        "</body></html>",
    ]
    path = output_dir / REPORT_FILE
    write_text(path, "\n".join(parts) + "\n")
    return path


#: Said in an earlier Stack section that a run of nsg normalize keeps.
_EARLIER_STACK = (
    "From nsg stack before this run of nsg normalize, which kept every output as it was; if "
    "frames moved between the output directory and rejected/ (other thresholds), stack again."
)


def _earlier_stack(output_dir: Path, frames) -> list[str]:
    """The Stack section of the page a run replaces, where this run kept every frame's output as
    it was (all resumed): the master still stands for them. Where any frame was normalized
    anew the master no longer does: the section goes, and so do its images."""
    page = output_dir / REPORT_FILE
    try:
        text = page.read_text() if page.is_file() else ""
    except (OSError, UnicodeDecodeError):
        text = ""
    if _STACK_BEGIN in text and _STACK_END in text and frames and all(f.resumed for f in frames):
        section = _STACK_BEGIN + text.split(_STACK_BEGIN, 1)[1].split(_STACK_END, 1)[0] + _STACK_END
        if _EARLIER_STACK not in section:
            section = section.replace(
                '<h2 id="stack">Stack</h2>', f'<h2 id="stack">Stack</h2><p class="muted">{_e(_EARLIER_STACK)}</p>', 1
            )
        return [section]
    for stem, _ in STACK_PLOTS:
        with contextlib.suppress(OSError):
            (output_dir / "plots" / f"{stem}.png").unlink()
    return []


def _time_per_frame(frames) -> str:
    """Seconds of the frames normalized in this run; those kept from an earlier run (whose
    seconds are the time to read their output's header) are counted, not timed."""
    kept = sum(f.resumed and f.status != "reference" for f in frames)
    seconds = [
        f.seconds for f in frames if f.status not in ("failed", "reference") and not f.resumed and f.seconds is not None
    ]
    if not seconds:
        return f"no frame normalized in this run: {kept} kept from an earlier run" if kept else "-"
    text = (
        f"median {float(sorted(seconds)[len(seconds) // 2]):.2f} s, total {sum(seconds):.1f} s over the "
        f"{len(seconds)} frame(s) normalized in this run (read, normalize, write)"
    )
    return text + (f"; {kept} kept from an earlier run" if kept else "")


def _frame_section(prefix: str, frame, plots: Sequence[Path], base: Path, *, open_: bool) -> str:
    heading = (
        f"{prefix}{Path(frame.path).name}: transmission {_number(frame.transmission)}, weight "
        f"{_number(frame.weight)}, {_e(frame.star_pairs)} star pairs, {_e(frame.samples)} samples"
    )
    if getattr(frame, "rejected", None):
        heading += f"; rejected: {frame.rejected}"
    if frame.resumed:
        heading += "; kept from an earlier run, plots drawn by that run"
    return f"<details{' open' if open_ else ''}><summary>{_e(heading)}</summary>\n{_figures(plots, base)}\n</details>"


# -- the Stack section (nsg stack) ----------------------------------------------------------------
_STACK_BEGIN = "<!-- nsg stack -->"
_STACK_END = "<!-- /nsg stack -->"
#: The Stack section's images, under ``plots/``: file stem and caption.
STACK_PLOTS = (
    ("stack_master", "The master (block means, asinh stretch between its 0.5 and 99.5 percentiles)"),
    ("stack_coverage", "Coverage: frames with data at each pixel"),
    ("stack_rejection", "Samples rejected low and high per pixel (block means)"),
)


def write_stack_plots(result, directory: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Draw the previews of a :class:`~nsg_gpu.stack_results.StackResult` as
    ``directory/<prefix>stack_*.png``."""
    import numpy as np

    directory = Path(directory)
    previews = result.previews
    paths = []
    if "master" in previews:
        master = np.asarray(previews["master"], np.float64)
        covered = master != 0
        values = master[covered] if covered.any() else master.reshape(-1)
        lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
        span = max(hi - lo, 1e-12)
        stretched = np.arcsinh(np.clip((master - lo) / span, 0, 1) * 10) / np.arcsinh(10)
        image = stretched[0] if stretched.shape[0] == 1 else np.moveaxis(stretched, 0, -1)
        height, width = image.shape[:2]
        figure = new_figure(8, 8 * height / max(width, 1) + 0.1, left=0, right=1, bottom=0, top=1)
        axes = figure.add_subplot(1, 1, 1)
        axes.imshow(image, cmap="gray", origin="lower", interpolation="nearest", vmin=0, vmax=1)
        axes.set_axis_off()
        paths.append(save_figure(figure, directory / f"{prefix}stack_master.png"))
    if "coverage" in previews:
        figure = new_figure(8, 4.2, left=0.06, right=0.95, bottom=0.08, top=0.92)
        axes = figure.add_subplot(1, 1, 1)
        shown = axes.imshow(previews["coverage"], origin="lower", interpolation="nearest", cmap="viridis")
        figure.colorbar(shown, ax=axes, label="frames")
        axes.set_title("coverage")
        paths.append(save_figure(figure, directory / f"{prefix}stack_coverage.png"))
    if "rejlow" in previews and "rejhigh" in previews:
        figure = new_figure(12, 4.2, left=0.04, right=0.97, bottom=0.08, top=0.9, wspace=0.15)
        for k, (key, title) in enumerate((("rejlow", "rejected low"), ("rejhigh", "rejected high"))):
            axes = figure.add_subplot(1, 2, k + 1)
            shown = axes.imshow(previews[key], origin="lower", interpolation="nearest", cmap="magma")
            figure.colorbar(shown, ax=axes, label="samples per pixel")
            axes.set_title(title)
        paths.append(save_figure(figure, directory / f"{prefix}stack_rejection.png"))
    return paths


def stack_section(result, base: str | os.PathLike, *, plots: bool = True, prefix: str = "") -> str:
    """The Stack section of report.html for a :class:`~nsg_gpu.stack_results.StackResult`.

    Its images are drawn into ``base/plots/`` (unless ``plots`` is false), their names led by
    ``prefix``, and linked relatively; the section is wrapped in markers so that
    :func:`add_stack_section` can replace it.
    """
    base = Path(base)
    used, skipped = result.used, result.skipped
    per_frame = max(1, result.samples_per_frame)
    full = result.coverage_counts.get(len(used), 0)
    none = result.coverage_counts.get(0, 0)
    pixels = max(1, result.shape[1] * result.shape[2] * result.shape[0])
    maps = ", ".join(f"{name}: {where}" for name, where in result.maps.items()) or "not written"
    rows = [
        ("master", _link(result.output, base)),
        ("frames", f"{len(used)} stacked, {len(skipped)} left out"),
        ("weights", _e(result.weights)),
        ("rejection", _e(result.rejection.describe())),
        ("why this rejection", _e(result.rejection.reason)),
        (
            "rejected samples",
            f"{100 * result.rejected_low_share:.3g} % low, {100 * result.rejected_high_share:.3g} % high",
        ),
        (
            "coverage",
            f"{100 * full / pixels:.4g} % of the pixels covered by every frame, {100 * none / pixels:.3g} % by none",
        ),
        ("maps", _e(maps)),
        ("per frame", _link(result.csv, base) if result.csv else ""),
        (
            "streaming",
            _e(
                f"{result.bands} band(s) of {result.band_rows} rows within --memory "
                f"{result.memory / 2**30:.2f} GiB, on {result.backend}"
            ),
        ),
        (
            "time",
            _e(
                f"{format_seconds(result.seconds)} in all: headers and spooling {result.scan_seconds:.1f} s, "
                f"reading {result.read_seconds:.1f} s (beside the combining), combining {result.combine_seconds:.1f} s, "
                f"writing {result.write_seconds:.1f} s"
            ),
        ),
    ]
    parts = [
        _STACK_BEGIN,
        '<h2 id="stack">Stack</h2><table class="summary">',
        *[f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows],
        "</table>",
    ]
    if plots and result.previews:
        paths = write_stack_plots(result, base / "plots", prefix)
        captions = {f"{prefix}{stem}": caption for stem, caption in STACK_PLOTS}
        parts += [
            f'<figure><img src="{_e(_relative(path, base))}" alt="{_e(captions.get(path.stem, path.stem))}" '
            f'loading="lazy"><figcaption>{_e(captions.get(path.stem, path.stem))}</figcaption></figure>'
            for path in paths
        ]
    headings = ("file", "status", "weight", "relative weight", "covered", "rejected low", "rejected high", "note")
    parts += [
        '<div class="frames"><table>',
        "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in headings) + "</tr>",
    ]
    for frame in result.frames:
        kind = "failed" if frame.status != "used" else "ok"
        covered = frame.covered or 1
        cells = [
            f'<td class="text">{_e(Path(frame.path).name)}</td>',
            f'<td class="text">{_e(frame.status)}</td>',
            f"<td>{_number(frame.weight)}</td>",
            f"<td>{_number(frame.relative_weight)}</td>",
            f"<td>{100 * frame.covered / per_frame:.4g} %</td>" if frame.status == "used" else "<td></td>",
            f"<td>{100 * frame.rejected_low / covered:.3g} %</td>" if frame.status == "used" else "<td></td>",
            f"<td>{100 * frame.rejected_high / covered:.3g} %</td>" if frame.status == "used" else "<td></td>",
            f'<td class="text">{_e(frame.error)}</td>',
        ]
        parts.append(f'<tr class="{kind}">' + "".join(cells) + "</tr>")
    parts += ["</table></div>", _STACK_END]
    return "\n".join(parts)


def _link(path, base: Path) -> str:
    return f'<a href="{_e(_relative(Path(path), base))}">{_e(Path(path).name)}</a>'


def add_stack_section(path: str | os.PathLike, result) -> Path:
    """Put the Stack section of ``result`` into the report page at ``path``.

    An earlier Stack section there is replaced; a run's report (``nsg normalize``) gets it
    before its parameters; without a page at ``path`` a page of its own is written. The
    page is written atomically.

    Raises
    ------
    OutputError
        The page or an image cannot be written.
    """
    path = Path(path)
    # A run's report.html draws plots/stack_*.png; a master's own page, its own names.
    section = stack_section(result, path.parent, prefix="" if path.name == REPORT_FILE else f"{path.stem}_")
    text = path.read_text() if path.is_file() else None
    if text and _STACK_BEGIN in text and _STACK_END in text:
        head, rest = text.split(_STACK_BEGIN, 1)
        text = head + section + rest.split(_STACK_END, 1)[1]
    elif text and '<h2 id="parameters">' in text:
        text = text.replace('<h2 id="parameters">', section + '\n<h2 id="parameters">', 1)
    elif text and "</body>" in text:
        text = text.replace("</body>", section + "\n</body>", 1)
    else:
        text = "\n".join(
            [
                "<!DOCTYPE html>",
                '<html lang="en"><head><meta charset="utf-8">',
                '<meta name="viewport" content="width=device-width, initial-scale=1">',
                f"<title>nsg-gpu stack: {_e(Path(result.output).name)}</title>",
                '<link rel="icon" href="data:,">',
                f"<style>{_STYLE}</style></head><body>",
                "<h1>Stack report</h1>",
                f'<p class="muted">{len(result.used)} frames integrated into {_e(Path(result.output).name)} by '
                f"nsg-gpu {_e(__version__)}</p>",
                section,
                "</body></html>",
                "",
            ]
        )
    write_text(path, text)
    return path
