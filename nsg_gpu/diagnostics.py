"""Diagnostic plots: what the photometry and the gradient fits saw, as PNG images.

NSG earns its users' trust by showing its fits. The same graphs here, headless (matplotlib's
Agg canvas, no display, no global pyplot state):

- **photometry**: reference against target flux of the star pairs, the fitted line, and the
  pairs the fit rejected; beside it the flux ratio against flux, where the scale is a line;
- **gradient**: the background differences ``m*T - R`` along one row and one column of the
  sample grid, with the fitted spline along the same line;
- **samples**: the sample grid over the frame, used and rejected squares, and the circles of
  the stars that reject samples;
- **gradient image**: the fitted spline over the whole frame;

and, for the run, transmission and weight per frame in time order, relative to the best frame,
with the rejection thresholds. A frame's :class:`FrameDiagnostics` comes from
:func:`nsg_gpu.pipeline.normalize_frame` with ``diagnostics=True``.

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
from .rejection import relative_quality

__all__ = [
    "PhotometryPairs",
    "FrameDiagnostics",
    "FRAME_PLOTS",
    "rejection_thresholds",
    "chosen_frames",
    "write_frame_plots",
    "write_run_plots",
    "gradient_preview",
    "relative_figures",
    "time_order",
]

#: The frame plots, in the order the report shows them: (file suffix, caption).
FRAME_PLOTS = (
    ("photometry", "Star photometry: reference against target flux, the fitted scale, rejected pairs"),
    ("gradient", "Background difference m*T - R along a row and a column of samples, and the fitted spline"),
    ("samples", "Sample grid over the frame: used and rejected squares, star rejection circles"),
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
    star_rejected: np.ndarray  # (rows, cols) bool, near a reference star
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
    # Frames kept from an earlier run are left out: their diagnostics would mean normalizing
    # them again.
    targets = [f for f in frames if f.status not in ("failed", "reference") and f.weight is not None and not f.resumed]
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
def _figure(width: float, height: float, **margins):
    """A figure with fixed margins (fractions of the figure); constrained layout would double
    the drawing time."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    figure.subplots_adjust(**margins)
    return figure


def _save(figure, path: Path) -> Path:
    """Render to PNG in memory, then write atomically."""

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes(path, buffer.getvalue())
    return path


def write_frame_plots(result, diagnostics: FrameDiagnostics, directory: str | os.PathLike) -> list[Path]:
    """Write the four plots of :data:`FRAME_PLOTS` for one frame as ``<stem>_<plot>.png``.

    Parameters
    ----------
    result : FrameResult
        The frame's numbers, for titles.

    diagnostics : FrameDiagnostics

    directory : path
        Created if needed.

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
        "samples": _samples_figure,
        "gradient_image": _gradient_image_figure,
    }
    return [_save(makers[key](diagnostics, name), directory / f"{stem}_{key}.png") for key, _ in FRAME_PLOTS]


def _photometry_figure(d: FrameDiagnostics, name: str):
    from matplotlib.ticker import NullFormatter

    figure = _figure(10, 4.2, left=0.07, right=0.98, bottom=0.12, top=0.92, wspace=0.22)
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


def _busiest(used: np.ndarray, axis: int) -> int:
    """The grid row (axis=1) or column (axis=0) with the most used samples, centre first on ties."""
    counts = used.sum(axis=axis)
    centre = counts.size // 2
    order = np.argsort(np.abs(np.arange(counts.size) - centre), kind="stable")
    return int(order[np.argmax(counts[order])])


def _gradient_figure(d: FrameDiagnostics, name: str):
    grid = d.grid
    figure = _figure(10, 4.2, left=0.08, right=0.98, bottom=0.12, top=0.92, wspace=0.2)
    row_axes, col_axes = figure.subplots(1, 2)
    row = _busiest(d.used, axis=1)
    col = _busiest(d.used, axis=0)
    xs = np.linspace(0, d.width - 1, 400)
    ys = np.linspace(0, d.height - 1, 400)
    y_row = float(grid.centre_y[row])
    x_col = float(grid.centre_x[col])
    for c, spline in enumerate(d.splines):
        colour = _CHANNEL_COLOURS[c] if d.channels > 1 else "#1f77b4"
        label = f"channel {c} " if d.channels > 1 else ""
        used_r = d.used[row]
        row_axes.scatter(
            grid.centre_x[used_r], d.difference[c, row, used_r], s=10, color=colour, label=f"{label}samples"
        )
        row_axes.plot(xs, spline(xs, np.full_like(xs, y_row)), color=colour, lw=1.5, label=f"{label}spline")
        used_c = d.used[:, col]
        col_axes.scatter(grid.centre_y[used_c], d.difference[c, used_c, col], s=10, color=colour)
        col_axes.plot(ys, spline(np.full_like(ys, x_col), ys), color=colour, lw=1.5)
        unused_r = d.covered[row] & ~used_r
        if unused_r.any():
            row_axes.scatter(
                grid.centre_x[unused_r],
                d.difference[c, row, unused_r],
                s=10,
                color="0.6",
                marker="o",
                facecolors="none",
                label="rejected (near a star)" if c == 0 else None,
            )
        unused_c = d.covered[:, col] & ~used_c
        if unused_c.any():
            col_axes.scatter(
                grid.centre_y[unused_c], d.difference[c, unused_c, col], s=10, color="0.6", facecolors="none"
            )
    row_axes.set_title(f"{name}: along row y = {y_row:.0f} px")
    row_axes.set_xlabel("x (px)")
    row_axes.set_ylabel("m*T - R")
    row_axes.legend(fontsize=8)
    col_axes.set_title(f"along column x = {x_col:.0f} px")
    col_axes.set_xlabel("y (px)")
    return figure


def _samples_figure(d: FrameDiagnostics, name: str):
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Circle, Patch

    grid = d.grid
    aspect = d.height / max(d.width, 1)
    figure = _figure(8, max(3.0, 6.6 * aspect + 0.9), left=0.1, right=0.97, bottom=0.1, top=0.92)
    axes = figure.subplots()
    # 0 no data, 1 rejected near a star, 2 used, 3 covered but unusable (NaN difference)
    category = np.zeros(d.used.shape, np.int8)
    category[d.covered] = 3
    category[d.covered & d.star_rejected] = 1
    category[d.used] = 2
    colours = ListedColormap(["#bbbbbb", "#f4a582", "#92c5de", "#fddbc7"])
    extent = (grid.x0, grid.x0 + grid.n_cols * grid.size, grid.y0 + grid.n_rows * grid.size, grid.y0)
    axes.imshow(category, cmap=colours, vmin=-0.5, vmax=3.5, extent=extent, interpolation="nearest")
    if d.circles is not None and len(d.circles):
        patches = [Circle((x, y), r) for x, y, r in d.circles[:2000]]
        axes.add_collection(PatchCollection(patches, facecolor="none", edgecolor="#b2182b", linewidth=0.6))
    axes.set_xlim(0, d.width)
    axes.set_ylim(d.height, 0)
    axes.set_xlabel("x (px)")
    axes.set_ylabel("y (px)")
    n_used, n_star, n_none = int(d.used.sum()), int((d.covered & d.star_rejected).sum()), int((~d.covered).sum())
    axes.set_title(f"{name}: {n_used} samples used, {d.grid.size} px squares")
    axes.legend(
        handles=[
            Patch(color="#92c5de", label=f"used ({n_used})"),
            Patch(color="#f4a582", label=f"rejected near a star ({n_star})"),
            Patch(color="#bbbbbb", label=f"no data in a frame ({n_none})"),
            Patch(facecolor="none", edgecolor="#b2182b", label="star rejection circle"),
        ],
        fontsize=8,
        loc="upper right",
        framealpha=0.9,
    )
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
    figure = _figure(
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
    """Frames (not failed) in time order, their weight and transmission relative to the best.

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
    figure = _figure(11, height, left=0.08, right=0.84, bottom=below / height, top=1 - 0.4 / height, hspace=0.08)
    t_axes, w_axes = figure.subplots(2, 1, sharex=True)
    index = np.arange(len(done))
    rejected = np.array([bool(getattr(f, "rejected", None)) for f in done])
    is_reference = np.array([f.status == "reference" for f in done])
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
        axes.scatter(
            index[is_reference],
            values[is_reference],
            s=60,
            facecolors="none",
            edgecolors="black",
            zorder=3,
            label="reference",
        )
        axes.axhline(threshold, color="#d62728", ls="--", lw=1, label=f"threshold {threshold:g}")
        axes.set_ylabel(f"{label}\nrelative to best")
        axes.set_ylim(0, 1.08)
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    w_axes.set_xlabel("frame, in time order (DATE-OBS)" if by_time else "frame, in input order (no DATE-OBS)")
    if labels:
        w_axes.set_xticks(index, labels, rotation=90, fontsize=7)
    t_axes.set_title(f"{len(done)} frames: transmission and weight relative to the best frame")
    return [_save(figure, Path(directory) / "run_transmission_weight.png")]
