"""``report.html``: one static page per run, opened from disk in any browser.

The page holds the run summary (reference and why, frames normalized, failed and rejected),
the parameters as resolved, the table of frames, the run chart (transmission and weight per
frame in time order, with the rejection thresholds) and the diagnostic plots of the chosen
frames (highest, median and lowest weight) and of every frame plotted with ``--plots``.
Images are PNG files under ``plots/`` beside it, linked by relative paths, so the output
directory can be moved or archived whole. No script, no network access.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import __version__
from .diagnostics import FRAME_PLOTS, rejection_thresholds, write_run_plots
from .report import _atomic_write_text

__all__ = ["write_report", "stack_section", "add_stack_section", "write_stack_plots"]

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td.text { text-align: left; }
tr.failed td { background: #fde0dd; } tr.rejected td { background: #fff3cd; } tr.reference td { background: #e7f1fb; }
.summary td { text-align: left; white-space: normal; } .frames { overflow-x: auto; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
details { margin: 0.6em 0; } summary { cursor: pointer; font-weight: 600; }
.muted { color: #777; font-size: 0.85em; }
"""


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


def _relative(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _frame_row(frame) -> str:
    rejected = getattr(frame, "rejected", None)
    kind = "failed" if frame.status == "failed" else ("rejected" if rejected else frame.status)
    note = frame.error or (f"rejected: {rejected}" if rejected else "")
    cells = [
        f'<td class="text">{_e(Path(frame.path).name)}</td>',
        f'<td class="text">{_e(frame.status)}</td>',
        f"<td>{_number(frame.transmission)}</td>",
        f"<td>{_number(frame.weight)}</td>",
        f"<td>{_number(frame.snr)}</td>",
        f"<td>{_e(frame.star_pairs)}</td>",
        f"<td>{_e(frame.samples)}</td>",
        f"<td>{_number(frame.fwhm, 3)}</td>",
        f"<td>{_number(frame.noise, 3)}</td>",
        f"<td>{_number(frame.altitude, 3)}</td>",
        f"<td>{_number(frame.exposure, 4)}</td>",
        f'<td class="text">{_e(frame.filter)}</td>',
        f'<td class="text">{_e(frame.date_obs)}</td>',
        f"<td>{_number(frame.seconds, 2)}</td>",
        f'<td class="text">{_e(note)}</td>',
    ]
    return f'<tr class="{kind}">' + "".join(cells) + "</tr>"


_HEADINGS = (
    "file",
    "status",
    "transmission",
    "weight",
    "SNR",
    "star pairs",
    "samples",
    "FWHM (px)",
    "noise",
    "altitude",
    "exposure (s)",
    "filter",
    "DATE-OBS",
    "time (s)",
    "note",
)


def _figures(paths: Sequence[Path], base: Path, caption: str | None = None) -> str:
    captions = dict(FRAME_PLOTS)
    parts = []
    for path in paths:
        key = next((k for k in captions if path.stem.endswith("_" + k)), None)
        text = caption or captions.get(key, path.stem)
        parts.append(
            f'<figure><img src="{_e(_relative(path, base))}" alt="{_e(text)}" loading="lazy">'
            f"<figcaption>{_e(text)}</figcaption></figure>"
        )
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
        Frame path to its plot files (:func:`nsg_gpu.diagnostics.write_frame_plots`).

    chosen : mapping, optional
        Label (e.g. "highest weight") to the frame shown first under that label.

    stack : StackResult, optional
        A stack of the run's outputs (:func:`nsg_gpu.stack.stack`): its section goes before
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
    n_failed = sum(f.status == "failed" for f in frames)
    n_rejected = sum(bool(getattr(f, "rejected", None)) for f in frames)
    n_done = len(frames) - n_failed
    min_weight, min_transmission = rejection_thresholds(run.parameters)
    summary_rows = [
        ("reference", Path(run.reference).name),
        ("why this reference", run.reference_reason or "given with --reference"),
        ("frames", f"{len(frames)}: {n_done} normalized, {n_failed} failed, {n_rejected} rejected"),
        (
            "rejection thresholds",
            f"weight {min_weight:g}, transmission {min_transmission:g} (relative to the best frame)",
        ),
        ("time per frame", _time_per_frame(frames)),
        ("results", "results.csv, results.json"),
        ("written", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("program", f"nsg-gpu {__version__}"),
    ]
    parameters = dataclasses.asdict(run.parameters) if run.parameters else {}
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
    if run_plots:
        caption = (
            "Per frame in time order, relative to the best frame; dashed: rejection thresholds. Transmission "
            "is the mean over channels, per second of exposure where every frame has EXPTIME."
        )
        parts += ['<h2 id="run">Transmission and weight</h2>', _figures(run_plots, output_dir, caption)]
    parts += [
        '<h2 id="frames">Frames</h2><div class="frames"><table>',
        "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in _HEADINGS) + "</tr>",
        *[_frame_row(f) for f in frames],
        "</table></div>",
    ]
    if frame_plots:
        parts.append('<h2 id="diagnostics">Diagnostics</h2>')
        by_path = {f.path: f for f in frames}
        shown = set()
        for label, frame in chosen.items():
            if frame.path in frame_plots:
                shown.add(frame.path)
                parts.append(_frame_section(f"{label}: ", frame, frame_plots[frame.path], output_dir, open_=True))
        for path, plots in frame_plots.items():
            if path not in shown and path in by_path:
                parts.append(_frame_section("", by_path[path], plots, output_dir, open_=False))
    if stack is not None:
        parts.append(stack_section(stack, output_dir))
    parts += [
        '<h2 id="parameters">Parameters</h2><table class="summary">',
        *[f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in parameters.items()],
        "</table>",
        "</body></html>",
    ]
    path = output_dir / "report.html"
    _atomic_write_text(path, "\n".join(parts) + "\n")
    return path


def _time_per_frame(frames) -> str:
    seconds = [f.seconds for f in frames if f.status != "failed" and f.seconds is not None]
    if not seconds:
        return "-"
    return (
        f"median {float(sorted(seconds)[len(seconds) // 2]):.2f} s, total {sum(seconds):.1f} s (read, normalize, write)"
    )


def _frame_section(prefix: str, frame, plots: Sequence[Path], base: Path, *, open_: bool) -> str:
    heading = (
        f"{prefix}{Path(frame.path).name}: transmission {_number(frame.transmission)}, weight "
        f"{_number(frame.weight)}, {_e(frame.star_pairs)} star pairs, {_e(frame.samples)} samples"
    )
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


def write_stack_plots(result, directory: str | os.PathLike) -> list[Path]:
    """Draw the previews of a :class:`~nsg_gpu.stack.StackResult` as ``directory/stack_*.png``."""
    import numpy as np

    from .diagnostics import _figure, _save

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
        figure = _figure(8, 8 * height / max(width, 1) + 0.1, left=0, right=1, bottom=0, top=1)
        axes = figure.add_subplot(1, 1, 1)
        axes.imshow(image, cmap="gray", origin="lower", interpolation="nearest", vmin=0, vmax=1)
        axes.set_axis_off()
        paths.append(_save(figure, directory / "stack_master.png"))
    if "coverage" in previews:
        figure = _figure(8, 4.2, left=0.06, right=0.95, bottom=0.08, top=0.92)
        axes = figure.add_subplot(1, 1, 1)
        shown = axes.imshow(previews["coverage"], origin="lower", interpolation="nearest", cmap="viridis")
        figure.colorbar(shown, ax=axes, label="frames")
        axes.set_title("coverage")
        paths.append(_save(figure, directory / "stack_coverage.png"))
    if "rejlow" in previews and "rejhigh" in previews:
        figure = _figure(12, 4.2, left=0.04, right=0.97, bottom=0.08, top=0.9, wspace=0.15)
        for k, (key, title) in enumerate((("rejlow", "rejected low"), ("rejhigh", "rejected high"))):
            axes = figure.add_subplot(1, 2, k + 1)
            shown = axes.imshow(previews[key], origin="lower", interpolation="nearest", cmap="magma")
            figure.colorbar(shown, ax=axes, label="samples per pixel")
            axes.set_title(title)
        paths.append(_save(figure, directory / "stack_rejection.png"))
    return paths


def stack_section(result, base: str | os.PathLike, *, plots: bool = True) -> str:
    """The Stack section of report.html for a :class:`~nsg_gpu.stack.StackResult`.

    Its images are drawn into ``base/plots/`` (unless ``plots`` is false) and linked
    relatively; the section is wrapped in markers so that :func:`add_stack_section` can
    replace it.
    """
    from .progress import format_seconds

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
        paths = write_stack_plots(result, base / "plots")
        captions = dict(STACK_PLOTS)
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
    section = stack_section(result, path.parent)
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
    _atomic_write_text(path, text)
    return path
