"""The diagnostic plots' own pieces: the reference preview, the gradient plot's lines, the
sample plot drawn over the reference, and which earlier plots a kept frame may show."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nsg_gpu.diagnostics import (
    FRAME_PLOTS,
    FrameDiagnostics,
    PhotometryPairs,
    existing_frame_plots,
    gradient_lines,
    write_frame_plots,
)
from nsg_gpu.preview import PREVIEW_BACKGROUND, ReferencePreview, reference_preview
from nsg_gpu.results import FrameResult
from nsg_gpu.samples import make_grid

HEIGHT, WIDTH, SIZE = 480, 720, 40


def _reference(data: np.ndarray) -> SimpleNamespace:
    """What reference_preview reads of a prepared reference: ``reference.frame.data``."""
    return SimpleNamespace(frame=SimpleNamespace(data=data))


def _plane(x, y):
    return 0.01 + 2e-5 * np.asarray(x, float) - 1e-5 * np.asarray(y, float)


def _diagnostics(outliers=(), lonely=None) -> FrameDiagnostics:
    """A frame's record on a 12x18 grid whose samples lie on a plane (the spline), but for
    ``outliers`` ((row, col, offset), used) and a ``lonely`` (row, offset): that row keeps a
    single used sample, offset."""
    grid = make_grid(HEIGHT, WIDTH, SIZE)
    xx, yy = np.meshgrid(grid.centre_x, grid.centre_y)
    rng = np.random.default_rng(3)
    difference = (_plane(xx, yy) + rng.normal(0, 1e-6, xx.shape))[None]
    used = np.ones(xx.shape, bool)
    star = np.zeros_like(used)
    star[2, 3] = star[7, 11] = True
    used &= ~star
    for row, col, offset in outliers:
        difference[0, row, col] += offset
    if lonely is not None:
        row, offset = lonely
        used[row] = False
        used[row, 0] = True
        difference[0, row, 0] += offset
    flux = rng.uniform(0.1, 2.0, 60)
    pairs = PhotometryPairs(flux, 1.1 * flux, np.arange(60) % 10 != 0, 1.1, 0.0)
    return FrameDiagnostics(
        height=HEIGHT,
        width=WIDTH,
        photometry=[pairs],
        grid=grid,
        covered=np.ones_like(used),
        star_rejected=star,
        used=used,
        difference=difference,
        samples=None,
        splines=[_plane],
        circles=np.array([[grid.centre_x[3], grid.centre_y[2], 15.0], [grid.centre_x[11], grid.centre_y[7], 12.0]]),
    )


def test_reference_preview_is_small_and_stretched():
    """Block means to at most 800 columns; the background lands at the stretch's level, stars
    above it, no data at 0."""
    rng = np.random.default_rng(1)
    height, width = 1200, 3000
    data = rng.normal(1000.0, 10.0, (3, height, width)).astype(np.float32)
    data[:, 600:612, 1500:1512] = 30000.0  # a bright star, 4x4 preview pixels
    data[:, :, :300] = 0  # no data along the left edge
    preview = reference_preview(_reference(data))
    assert isinstance(preview, ReferencePreview) and preview.image.dtype == np.uint8
    assert preview.step == 4 and preview.image.shape == (300, 750)
    assert preview.extent == (0.0, 3000.0, 1200.0, 0.0)
    image = preview.image.astype(float)
    assert (image[:, :75] == 0).all()  # 300 px of no data are 75 preview columns
    background = np.median(image[:, 80:])
    assert background == pytest.approx(255 * PREVIEW_BACKGROUND, abs=4)
    assert image[150:153, 375:378].min() == 255  # the star's blocks
    assert image[:, 80:].std() > 3  # the noise is visible: the stretch is not flat


@pytest.mark.gpu
def test_reference_preview_on_the_gpu_matches_numpy():
    """The block sums run where the reference is; only the preview comes to the host."""
    import cupy

    rng = np.random.default_rng(2)
    data = rng.normal(500.0, 5.0, (3, 900, 2500)).astype(np.float32)
    on_gpu = reference_preview(_reference(cupy.asarray(data)))
    on_cpu = reference_preview(_reference(data))
    assert isinstance(on_gpu.image, np.ndarray) and on_gpu.step == on_cpu.step
    np.testing.assert_allclose(on_gpu.image.astype(int), on_cpu.image.astype(int), atol=1)


def test_reference_preview_of_a_blank_reference_is_black():
    assert not reference_preview(_reference(np.zeros((1, 40, 50), np.float32))).image.any()


def test_gradient_lines_pick_the_samples_farthest_from_the_spline():
    """The row and column through an outlier sample, not the fullest line nor a line whose
    only sample strays."""
    row, col = gradient_lines(_diagnostics(outliers=[(8, 13, 4e-4)]))
    assert (row[0], col[0]) == (8, 13)
    assert row[1] == pytest.approx(4e-4 / np.sqrt(17), rel=0.05)  # one of the row's 17 used samples
    # A stray sample alone on its row: that row is too empty to be shown.
    row, col = gradient_lines(_diagnostics(outliers=[(8, 13, 4e-4)], lonely=(3, 1e-2)))
    assert row[0] == 8


def test_gradient_plot_is_labelled_with_its_lines():
    """Titles name the row and column drawn, axes carry units, and a sample dropped as an
    outlier far off the scale does not flatten the samples the spline was fitted to."""
    from nsg_gpu.diagnostics import _gradient_figure

    d = _diagnostics(outliers=[(8, 13, 4e-4)])
    d.used[8, 2] = False  # dropped as an outlier: covered, not near a star
    d.difference[0, 8, 2] += 1.0
    figure = _gradient_figure(d, "light_7.fits")
    row_axes, col_axes = figure.axes
    assert row_axes.get_title().startswith("row 9 of 12 (y = 340 px)")
    assert col_axes.get_title().startswith("column 14 of 18 (x = 540 px)")
    assert (row_axes.get_xlabel(), col_axes.get_xlabel()) == ("x (px)", "y (px)")
    assert "m*T - R" in row_axes.get_ylabel() and "m*T - R" in col_axes.get_ylabel()
    labels = [text.get_text() for text in row_axes.get_legend().get_texts()]
    assert labels == ["samples used", "spline", "dropped as an outlier"]
    low, high = row_axes.get_ylim()
    used = d.difference[0, 8][d.used[8]]
    assert low < used.min() and used.max() < high < used.max() + 0.5 * np.ptp(used)


def test_samples_plot_draws_the_reference_behind_the_grid(tmp_path):
    """The preview shows through the sample grid: a reference bright on its right half gives a
    plot bright on the right, the same plot without the preview does not."""
    from matplotlib.image import imread

    image = np.zeros((HEIGHT // 4, WIDTH // 4), np.uint8)
    image[:, image.shape[1] // 2 :] = 255
    preview = ReferencePreview(image, 4)
    result = FrameResult(path="light_7.fits")
    d = _diagnostics(outliers=[(8, 13, 4e-4)])

    def halves(directory, preview):
        paths = write_frame_plots(result, d, directory, preview=preview)
        assert [p.name for p in paths] == [f"light_7_{key}.png" for key, _ in FRAME_PLOTS]
        pixels = imread(paths[2])[..., :3].mean(axis=2)  # the samples plot
        # Inside the axes: the middle of the figure, away from the legend at the top right.
        h, w = pixels.shape
        band = pixels[int(0.55 * h) : int(0.85 * h)]
        return band[:, int(0.2 * w) : int(0.45 * w)].mean(), band[:, int(0.6 * w) : int(0.85 * w)].mean()

    left, right = halves(tmp_path / "over", preview)
    assert right - left > 0.4, (left, right)
    left, right = halves(tmp_path / "blank", None)
    assert abs(right - left) < 0.1, (left, right)


def test_existing_plots_belong_to_the_output_they_are_newer_than(tmp_path):
    """A kept frame shows the earlier plots only when all exist and none predates its output."""
    output = tmp_path / "light_7_nsg.fits"
    output.write_bytes(b"")
    result = FrameResult(path="/in/light_7.fits", output=str(output), resumed=True)
    plots = [tmp_path / "plots" / f"light_7_{key}.png" for key, _ in FRAME_PLOTS]
    assert existing_frame_plots(result, tmp_path / "plots") is None  # none drawn
    plots[0].parent.mkdir()
    made = output.stat().st_mtime_ns
    for path in plots:
        path.write_bytes(b"png")
        os.utime(path, ns=(made + 10**9, made + 10**9))
    assert existing_frame_plots(result, tmp_path / "plots") == plots
    # The output redone after the plots were drawn: they are another output's.
    os.utime(output, ns=(made + 2 * 10**9, made + 2 * 10**9))
    assert existing_frame_plots(result, tmp_path / "plots") is None
    os.utime(output, ns=(made, made))
    plots[1].unlink()
    assert existing_frame_plots(result, tmp_path / "plots") is None
    assert existing_frame_plots(FrameResult(path="/in/light_7.fits"), Path(tmp_path / "plots")) is None
