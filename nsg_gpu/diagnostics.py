"""Diagnostic plots: what the photometry and the gradient fits saw, as PNG images.

NSG earns its users' trust by showing its fits. The same graphs here, headless (matplotlib's
Agg canvas, no display, no global pyplot state):

- **photometry**: reference against target flux of the star pairs, the fitted line, and the
  pairs the fit rejected; beside it the flux ratio against flux, where the scale is a line;
- **gradient**: the background differences ``m*T - R`` along the row and the column of the
  sample grid whose samples sit farthest from the fitted spline, with the spline along the
  same lines;
- **samples**: the sample grid over the reference image (a small stretched preview, made once
  per run by :func:`reference_preview`), used and rejected squares, and the circles of the
  stars that reject samples, as NSG draws them;
- **gradient image**: the fitted spline over the whole frame;

and, for the run, transmission and weight per frame in time order, relative to the best frame
whose mean transmission is not in doubt, with the rejection thresholds. A frame's
:class:`FrameDiagnostics` comes from :func:`nsg_gpu.pipeline.normalize_frame` with
``diagnostics=True``.

In the flow: fed by :func:`nsg_gpu.pipeline.normalize_frame` with ``diagnostics=True``, drawn
during and at the end of a run (:mod:`nsg_gpu.run`).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import write_bytes
from .io import frame_stem
from .preview import ReferencePreview
from .rejection import relative_quality

__all__ = [
    "PhotometryPairs",
    "FrameDiagnostics",
    "ReferencePreview",
    "FRAME_PLOTS",
    "rejection_thresholds",
    "chosen_frames",
    "gradient_lines",
    "write_frame_plots",
    "new_figure",
    "save_figure",
    "existing_frame_plots",
    "write_run_plots",
    "gradient_preview",
    "relative_figures",
    "time_order",
]

#: The frame plots, in the order the report shows them: (file suffix, caption).
FRAME_PLOTS = (
    ("photometry", "Star photometry: reference against target flux, the fitted scale, rejected pairs"),
    (
        "gradient",
        "Background difference m*T - R and the fitted spline along the row and the column of samples "
        "farthest from the spline",
    ),
    ("samples", "Sample grid over the reference: used and rejected squares, star rejection circles"),
    ("gradient_image", "The fitted gradient over the frame"),
)
#: Largest side (px) of the grid the gradient image is evaluated on.
GRADIENT_PREVIEW = 80
_CHANNEL_COLOURS = ("#d62728", "#2ca02c", "#1f77b4")


@dataclass
class PhotometryPairs:
    """One channel's star pairs as fitted: fluxes, the pairs kept, and the fitted line."""

    target_flux: np.ndarray
    reference_flux: np.ndarray  # seeing-corrected, as the fit saw it
    used: np.ndarray  # bool, pairs that survived the tolerance and outlier rejection
    scale: float
    intercept: float


@dataclass
class FrameDiagnostics:
    """What one frame's fits used: star pairs, background samples and splines (host arrays)."""

    height: int
    width: int
    photometry: list[PhotometryPairs]
    grid: object  # SampleGrid
    covered: np.ndarray  # (rows, cols) bool, data in both frames
    star_rejected: np.ndarray  # (rows, cols) bool, near a reference star or across its trail
    used: np.ndarray  # (rows, cols) bool, samples given to the spline
    difference: np.ndarray  # (channels, rows, cols) m*T - R medians
    samples: object  # SampleSet the spline was fitted to (after merging)
    splines: list  # SurfaceSpline per channel
    circles: np.ndarray | None = None  # (n, 3) x, y, radius

    @property
    def channels(self) -> int:
        return len(self.photometry)


def rejection_thresholds(params) -> tuple[float, float]:
    """``(min_weight, min_transmission)`` relative to the best frame, as the run used them."""
    return float(params.min_weight), float(params.min_transmission)


def chosen_frames(frames: Sequence) -> dict[str, object]:
    """The targets always plotted: highest, median and lowest weight (distinct frames).

    Returns
    -------
    dict
        Label to :class:`~nsg_gpu.results.FrameResult`, at most three entries.
    """
    # Frames kept from an earlier run are chosen too: the report links the plots the earlier
    # run drew of them (existing_frame_plots).
    targets = [f for f in frames if f.status not in ("failed", "reference") and f.weight is not None]
    if not targets:
        return {}
    ordered = sorted(targets, key=lambda f: f.weight, reverse=True)
    picks = {"highest weight": ordered[0], "median weight": ordered[len(ordered) // 2], "lowest weight": ordered[-1]}
    out, seen = {}, set()
    for label, frame in picks.items():
        if frame.path not in seen:
            seen.add(frame.path)
            out[label] = frame
    return out


# -- writing ------------------------------------------------------------------------------------
def new_figure(width: float, height: float, **margins):
    """A figure with fixed margins (fractions of the figure); constrained layout would double
    the drawing time."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    figure.subplots_adjust(**margins)
    return figure


def save_figure(figure, path: Path) -> Path:
    """Render to PNG in memory, then write atomically."""

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes(path, buffer.getvalue())
    return path


def write_frame_plots(
    result, diagnostics: FrameDiagnostics, directory: str | os.PathLike, *, preview: ReferencePreview | None = None
) -> list[Path]:
    """Write the four plots of :data:`FRAME_PLOTS` for one frame as ``<stem>_<plot>.png``.

    Parameters
    ----------
    result : FrameResult
        The frame's numbers, for titles.

    diagnostics : FrameDiagnostics

    directory : path
        Created if needed.

    preview : ReferencePreview, optional
        The reference drawn behind the sample grid (:func:`reference_preview`, once per run);
        without it the grid is drawn on a blank canvas.

    Returns
    -------
    list of Path
        In the order of :data:`FRAME_PLOTS`.
    """
    directory = Path(directory)
    stem = frame_stem(result.path)
    name = Path(result.path).name
    makers = {
        "photometry": _photometry_figure,
        "gradient": _gradient_figure,
        "samples": lambda d, n: _samples_figure(d, n, preview),
        "gradient_image": _gradient_image_figure,
    }
    return [save_figure(makers[key](diagnostics, name), directory / f"{stem}_{key}.png") for key, _ in FRAME_PLOTS]


def existing_frame_plots(result, directory: str | os.PathLike) -> list[Path] | None:
    """The plots an earlier run drew of a frame whose output this run kept, or None.

    They are the frame's when every plot of :data:`FRAME_PLOTS` exists and none is older than
    the frame's output: a run writes the output before it plots the frame (and moving an
    output into ``rejected/`` keeps its time), so an older plot is of an output since redone.

    Returns
    -------
    list of Path or None
        In the order of :data:`FRAME_PLOTS`.
    """
    if not result.output:
        return None
    directory = Path(directory)
    stem = frame_stem(result.path)
    paths = [directory / f"{stem}_{key}.png" for key, _ in FRAME_PLOTS]
    try:
        made = Path(result.output).stat().st_mtime_ns
        if all(path.stat().st_mtime_ns >= made for path in paths):
            return paths
    except OSError:  # the output or a plot is missing
        pass
    return None


def _photometry_figure(d: FrameDiagnostics, name: str):
    from matplotlib.ticker import NullFormatter

    figure = new_figure(10, 4.2, left=0.07, right=0.98, bottom=0.12, top=0.92, wspace=0.22)
    line_axes, ratio_axes = figure.subplots(1, 2)
    n_rejected = 0
    for c, pairs in enumerate(d.photometry):
        colour = _CHANNEL_COLOURS[c] if d.channels > 1 else "#1f77b4"
        label = f"channel {c}: " if d.channels > 1 else ""
        x, y, used = pairs.target_flux, pairs.reference_flux, pairs.used
        n_rejected += int((~used).sum())
        line_axes.scatter(x[used], y[used], s=6, color=colour, alpha=0.6, label=f"{label}{int(used.sum())} pairs used")
        ratio_axes.scatter(x[used], y[used] / x[used], s=6, color=colour, alpha=0.6)
        if (~used).any():
            line_axes.scatter(x[~used], y[~used], s=22, marker="x", color=colour)
            ratio_axes.scatter(x[~used], y[~used] / x[~used], s=22, marker="x", color=colour)
        top = float(np.max(x)) if x.size else 1.0
        line_axes.plot(
            [0, top], [0, pairs.scale * top], color=colour, lw=1.2, label=f"{label}scale m = {pairs.scale:.4f}"
        )
        ratio_axes.axhline(pairs.scale, color=colour, lw=1.2)
    if n_rejected:
        line_axes.scatter([], [], s=22, marker="x", color="black", label=f"rejected by the fit ({n_rejected})")
    line_axes.set_xlabel("target flux")
    line_axes.set_ylabel("reference flux")
    line_axes.set_title(f"{name}: photometry")
    line_axes.legend(fontsize=8, loc="upper left")
    ratio_axes.set_xscale("log")
    ratio_axes.xaxis.set_minor_formatter(NullFormatter())
    ratio_axes.set_xlabel("target flux")
    ratio_axes.set_ylabel("reference / target flux")
    ratio_axes.set_title("flux ratio; the line is the scale m")
    values = np.concatenate([p.reference_flux[p.used] / p.target_flux[p.used] for p in d.photometry])
    if values.size:
        low, high = np.percentile(values, [1, 99])
        pad = 0.5 * (high - low) + 1e-3 * abs(high)
        ratio_axes.set_ylim(low - pad, high + pad)
    return figure


def _line_residuals(d: FrameDiagnostics) -> np.ndarray:
    """Squared distance of every used sample from its channel's spline, summed over channels
    (rows, cols); 0 where no sample was used."""
    rows, cols = np.nonzero(d.used)
    squares = np.zeros(d.used.shape)
    if rows.size:
        x, y = d.grid.centre_x[cols], d.grid.centre_y[rows]
        for c, spline in enumerate(d.splines):
            squares[rows, cols] += (d.difference[c, rows, cols] - np.asarray(spline(x, y), float)) ** 2
    return squares


def _worst_line(squares: np.ndarray, used: np.ndarray, axis: int) -> tuple[int, float]:
    """The row (axis=1) or column (axis=0) with the largest RMS distance from the spline among
    those holding at least half as many used samples as the fullest; centre first on ties."""
    counts = used.sum(axis=axis)
    rms = np.sqrt(squares.sum(axis=axis) / np.maximum(counts, 1))
    score = np.where((counts > 0) & (2 * counts >= counts.max()), rms, -1.0)
    centre = counts.size // 2
    order = np.argsort(np.abs(np.arange(counts.size) - centre), kind="stable")
    line = int(order[np.argmax(score[order])])
    return line, float(rms[line])


def gradient_lines(d: FrameDiagnostics) -> tuple[tuple[int, float], tuple[int, float]]:
    """The sample-grid row and column that the gradient plot draws, and their RMS misfit.

    Each is the line whose used samples sit farthest from the fitted spline (root mean square
    of ``m*T - R`` minus the spline, over the line's samples and the channels), among the
    lines holding at least half as many used samples as the fullest, so that one stray sample
    on a nearly empty line does not choose it. Where the spline follows the samples there, it
    follows them everywhere.

    Returns
    -------
    (row, rms), (column, rms)
        Indices into the sample grid; RMS in the frame's pixel units.
    """
    squares = _line_residuals(d)
    return _worst_line(squares, d.used, axis=1), _worst_line(squares, d.used, axis=0)


def _left_out(axes, x: np.ndarray, d: FrameDiagnostics, line) -> None:
    """Open markers for a line's samples not given to the spline: near a reference star
    (circles), and dropped as outliers or unusable (crosses)."""
    covered, used, near = d.covered[line], d.used[line], d.star_rejected[line]
    for mask, marker, label in (
        (covered & ~used & near, "o", "rejected near a star"),
        (covered & ~used & ~near, "x", "dropped as an outlier"),
    ):
        if mask.any():
            for c in range(d.channels):
                values = d.difference[c][line][mask]
                style = {"facecolors": "none", "edgecolors": "0.55"} if marker == "o" else {"color": "#d95f02"}
                axes.scatter(x[mask], values, s=14, marker=marker, label=label if c == 0 else None, **style)


def _limits(axes, values: np.ndarray) -> None:
    """y limits from the used samples and the spline, so that a far outlier (a trail) does not
    flatten them; it is drawn only when it falls inside."""
    lines = [line.get_ydata() for line in axes.get_lines()]
    finite = np.concatenate([np.ravel(values), *map(np.ravel, lines)])
    finite = finite[np.isfinite(finite)]
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
        pad = 0.08 * (high - low) or 1e-6 * max(abs(high), 1.0)
        axes.set_ylim(low - pad, high + pad)


def _gradient_figure(d: FrameDiagnostics, name: str):
    grid = d.grid
    figure = new_figure(10, 4.4, left=0.085, right=0.985, bottom=0.12, top=0.86, wspace=0.25)
    row_axes, col_axes = figure.subplots(1, 2)
    (row, row_rms), (col, col_rms) = gradient_lines(d)
    xs = np.linspace(0, d.width - 1, 400)
    ys = np.linspace(0, d.height - 1, 400)
    y_row = float(grid.centre_y[row])
    x_col = float(grid.centre_x[col])
    for c, spline in enumerate(d.splines):
        colour = _CHANNEL_COLOURS[c] if d.channels > 1 else "#1f77b4"
        label = f"channel {c} " if d.channels > 1 else ""
        used_r = d.used[row]
        row_axes.scatter(
            grid.centre_x[used_r], d.difference[c, row, used_r], s=10, color=colour, label=f"{label}samples used"
        )
        row_axes.plot(xs, spline(xs, np.full_like(xs, y_row)), color=colour, lw=1.5, label=f"{label}spline")
        used_c = d.used[:, col]
        col_axes.scatter(grid.centre_y[used_c], d.difference[c, used_c, col], s=10, color=colour)
        col_axes.plot(ys, spline(np.full_like(ys, x_col), ys), color=colour, lw=1.5)
        if c == 0:
            for axes, x, line in (
                (row_axes, grid.centre_x, np.s_[row, :]),
                (col_axes, grid.centre_y, np.s_[:, col]),
            ):
                _left_out(axes, x, d, line)
    for axes, values in (
        (row_axes, d.difference[:, row][:, d.used[row]]),
        (col_axes, d.difference[:, :, col][:, d.used[:, col]]),
    ):
        _limits(axes, values)
    figure.suptitle(
        f"{name}: background difference and spline along the row and the column of samples farthest from the spline",
        fontsize=10,
    )
    row_axes.set_title(f"row {row + 1} of {grid.n_rows} (y = {y_row:.0f} px): RMS off the spline {row_rms:.3g}")
    row_axes.set_xlabel("x (px)")
    row_axes.set_ylabel("m*T - R (frame pixel units)")
    row_axes.legend(fontsize=8)
    col_axes.set_title(f"column {col + 1} of {grid.n_cols} (x = {x_col:.0f} px): RMS off the spline {col_rms:.3g}")
    col_axes.set_xlabel("y (px)")
    col_axes.set_ylabel("m*T - R (frame pixel units)")
    for axes in (row_axes, col_axes):
        axes.title.set_fontsize(9)
    return figure


def _samples_figure(d: FrameDiagnostics, name: str, preview: ReferencePreview | None = None):
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import to_rgba
    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle, Patch

    grid = d.grid
    aspect = d.height / max(d.width, 1)
    figure = new_figure(8, max(3.0, 6.6 * aspect + 0.9), left=0.1, right=0.97, bottom=0.1, top=0.92)
    axes = figure.subplots()
    # Over the reference the squares are tints that let it show through; without it, solid.
    over = preview is not None
    if over:
        axes.imshow(preview.image, cmap="gray", vmin=0, vmax=255, extent=preview.extent, interpolation="antialiased")
    kinds = (  # colour, tint over the reference, legend label
        ("#2166ac" if over else "#92c5de", 0.18, "used"),
        ("#f46d43" if over else "#f4a582", 0.5, "rejected near a star"),
        ("#202020" if over else "#bbbbbb", 0.65, "no data in a frame"),
        ("#fee08b" if over else "#fddbc7", 0.6, "dropped as an outlier"),
    )
    # 0 used, 1 rejected near a star, 2 no data, 3 covered but dropped (an outlier, or no median)
    category = np.full(d.used.shape, 3, np.int8)
    category[~d.covered] = 2
    category[d.covered & d.star_rejected] = 1
    category[d.used] = 0
    palette = np.array([to_rgba(colour, alpha if over else 1.0) for colour, alpha, _ in kinds])
    extent = (grid.x0, grid.x0 + grid.n_cols * grid.size, grid.y0 + grid.n_rows * grid.size, grid.y0)
    axes.imshow(palette[category], extent=extent, interpolation="nearest")
    edge = "#ff2d2d" if over else "#b2182b"
    if d.circles is not None and len(d.circles):
        patches = [Circle((x, y), r) for x, y, r in d.circles[:2000]]
        axes.add_collection(PatchCollection(patches, facecolor="none", edgecolor=edge, linewidth=0.6))
    (row, _), (col, _) = gradient_lines(d)
    line_colour = "#ffd400" if over else "#333333"
    axes.axhline(grid.centre_y[row], color=line_colour, lw=0.9, ls="--")
    axes.axvline(grid.centre_x[col], color=line_colour, lw=0.9, ls="--")
    axes.set_xlim(0, d.width)
    axes.set_ylim(d.height, 0)
    axes.set_xlabel("x (px)")
    axes.set_ylabel("y (px)")
    counts = [int((category == k).sum()) for k in range(len(kinds))]
    where = "over the reference" if over else "over the frame"
    axes.set_title(f"{name}: {counts[0]} samples used, {d.grid.size} px squares {where}", fontsize=10)
    handles = [
        Patch(facecolor=to_rgba(colour, alpha if over else 1.0), edgecolor="0.3", lw=0.4, label=f"{label} ({count})")
        for (colour, alpha, label), count in zip(kinds, counts)
        if count or label != "dropped as an outlier"
    ]
    handles += [
        Patch(facecolor="none", edgecolor=edge, label="star rejection circle"),
        Line2D([], [], color=line_colour, lw=0.9, ls="--", label="row and column of the gradient plot"),
    ]
    axes.legend(handles=handles, fontsize=7, loc="upper right", framealpha=0.85)
    return figure


def gradient_preview(d: FrameDiagnostics) -> np.ndarray:
    """The splines on a coarse grid of at most :data:`GRADIENT_PREVIEW` px a side, (channels, ny, nx)."""
    step = max(d.width, d.height) / GRADIENT_PREVIEW
    nx = max(2, int(math.ceil(d.width / step)))
    ny = max(2, int(math.ceil(d.height / step)))
    xx, yy = np.meshgrid(np.linspace(0, d.width - 1, nx), np.linspace(0, d.height - 1, ny))
    return np.stack([spline(xx, yy) for spline in d.splines])


def _gradient_image_figure(d: FrameDiagnostics, name: str):
    preview = gradient_preview(d)
    aspect = d.height / max(d.width, 1)
    width = 5.5 * d.channels + 1
    figure = new_figure(
        width, max(3.0, 4.5 * aspect + 1.0), left=0.9 / width, right=0.96, bottom=0.14, top=0.9, wspace=0.3
    )
    axes = np.atleast_1d(figure.subplots(1, d.channels))
    for c, ax in enumerate(axes):
        image = ax.imshow(preview[c], extent=(0, d.width, d.height, 0), cmap="viridis", interpolation="bilinear")
        figure.colorbar(image, ax=ax, shrink=0.8, label="G (frame units)")
        ax.set_title(f"{name}: gradient" + (f", channel {c}" if d.channels > 1 else ""))
        ax.set_xlabel("x (px)")
    axes[0].set_ylabel("y (px)")
    return figure


# -- the run --------------------------------------------------------------------------------------
def time_order(frames: Sequence) -> tuple[list, bool]:
    """Frames by DATE-OBS where every frame has a readable one, else in the given order.

    Returns
    -------
    frames : list
    by_time : bool
        Whether the order is by time.
    """
    stamps = []
    for f in frames:
        try:
            stamps.append(np.datetime64(f.date_obs))
        except (TypeError, ValueError):
            return list(frames), False
        if np.isnat(stamps[-1]):
            return list(frames), False
    order = np.argsort(np.array(stamps), kind="stable")
    return [frames[i] for i in order], True


def relative_figures(frames: Sequence) -> tuple[list, np.ndarray, np.ndarray, bool, bool]:
    """Frames (not failed) in time order, their weight and transmission relative to the best
    frame whose mean transmission is not in doubt.

    The values the rejection uses (:func:`nsg_gpu.rejection.relative_quality`): transmission
    is the mean over channels, and both are per unit exposure when every frame has one.

    Returns
    -------
    frames, weight, transmission, per_exposure, by_time
    """
    done, by_time = time_order([f for f in frames if f.status != "failed" and f.weight is not None and f.transmission])
    if not done:
        return [], np.zeros(0), np.zeros(0), False, False
    per_exposure = relative_quality(done)
    weight = np.array([f.relative_weight for f in done], float)
    transmission = np.array([f.relative_transmission for f in done], float)
    return done, weight, transmission, per_exposure, by_time


def write_run_plots(run, directory: str | os.PathLike) -> list[Path]:
    """Write ``run_transmission_weight.png``: both per frame in time order, with the thresholds.

    Returns
    -------
    list of Path
        Empty when no frame was normalized.
    """
    done, weight, transmission, per_exposure, by_time = relative_figures(run.frames)
    if not done:
        return []
    min_weight, min_transmission = rejection_thresholds(run.parameters)
    labels = [frame_stem(f.path) for f in done] if len(done) <= 40 else None
    # Room below the axes for the names, written vertically.
    below = 0.6 + (0.06 * max(len(label) for label in labels) if labels else 0.0)
    height = 5.2 + below
    figure = new_figure(11, height, left=0.08, right=0.84, bottom=below / height, top=1 - 0.4 / height, hspace=0.08)
    t_axes, w_axes = figure.subplots(2, 1, sharex=True)
    index = np.arange(len(done))
    rejected = np.array([bool(getattr(f, "rejected", None)) for f in done])
    is_reference = np.array([f.status == "reference" for f in done])
    in_doubt = np.array([bool(getattr(f, "transmission_doubt", None)) for f in done])
    for axes, values, threshold, label in (
        (t_axes, transmission, min_transmission, "transmission" + (" per second" if per_exposure else "")),
        (w_axes, weight, min_weight, "weight"),
    ):
        axes.plot(index, values, color="0.7", lw=0.8, zorder=1)
        axes.scatter(index[~rejected], values[~rejected], s=18, color="#1f77b4", zorder=2, label="frame")
        if rejected.any():
            axes.scatter(
                index[rejected], values[rejected], s=30, marker="x", color="#d62728", zorder=3, label="rejected"
            )
        rings = (
            (is_reference, 60, "black", "o", "reference"),
            (in_doubt, 90, "#ff7f0e", "s", "transmission in doubt"),
        )
        for mask, size, colour, marker, name in rings:
            if mask.any():
                axes.scatter(
                    index[mask],
                    values[mask],
                    s=size,
                    facecolors="none",
                    edgecolors=colour,
                    marker=marker,
                    zorder=3,
                    label=name,
                )
        axes.axhline(threshold, color="#d62728", ls="--", lw=1, label=f"threshold {threshold:g}")
        axes.set_ylabel(f"{label}\nrelative to best")
        # Frames in doubt may stand above the best of the others (rejection.relative_quality).
        axes.set_ylim(0, max(1.08, 1.05 * float(np.nanmax(values))))
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    w_axes.set_xlabel("frame, in time order (DATE-OBS)" if by_time else "frame, in input order (no DATE-OBS)")
    if labels:
        w_axes.set_xticks(index, labels, rotation=90, fontsize=7)
    t_axes.set_title(
        f"{len(done)} frames: transmission and weight relative to the best frame whose transmission is sure"
    )
    return [save_figure(figure, Path(directory) / "run_transmission_weight.png")]
