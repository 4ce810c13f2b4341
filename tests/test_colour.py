"""Colour frames: detection on the intensity, keywords per channel, a FILTER mismatch and a
mosaic not debayered as warnings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from nsg_gpu.cli import app
from nsg_gpu.stars import detect_stars
from nsg_gpu.synthetic import write_synthetic_set


def test_colour_stars_are_detected_on_min_max_intensity():
    """A star only in red stands at half its height in (min + max) / 2 (a mean would give a third)."""
    rng = np.random.default_rng(5)
    size, sigma, amplitude, sky = 240, 3 / 2.3548, 0.2, 0.1
    yy, xx = np.mgrid[0:size, 0:size]
    data = np.full((3, size, size), sky, np.float32) + rng.normal(0, 0.001, (3, size, size)).astype(np.float32)
    red_only = (120, 120)
    for x in range(40, 201, 40):
        for y in range(40, 201, 40):
            star = amplitude * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / sigma**2)
            if (x, y) == red_only:
                data[0] += star
            else:
                data += star
    catalog = detect_stars(data)
    assert len(catalog) == 25
    k = int(np.argmin(np.hypot(catalog.x - red_only[0], catalog.y - red_only[1])))
    white = np.arange(len(catalog)) != k
    assert catalog.peak[k] == pytest.approx(sky + amplitude / 2, abs=0.003)
    assert np.median(catalog.peak[white]) == pytest.approx(sky + amplitude, abs=0.003)
    assert catalog.flux[k] / np.median(catalog.flux[white]) == pytest.approx(0.5, abs=0.05)
    # The same catalogue as detection on an intensity image computed here, independently.
    intensity = 0.5 * (data.min(axis=0) + data.max(axis=0))
    mono = detect_stars(intensity)
    np.testing.assert_allclose(np.sort(catalog.x), np.sort(mono.x), atol=1e-4)


@pytest.mark.slow
def test_colour_outputs_carry_keywords_per_channel(colour_set):
    """NSGS0..2 and NSGSNR0..2 are each channel's own transmission and SNR."""
    for k, frame in enumerate(colour_set.run.frames[1:], start=1):
        _, header = colour_set.output(k)
        transmissions = [header[f"NSGS{c}"] for c in range(3)]
        assert transmissions == pytest.approx(frame.transmission, rel=1e-4)
        assert [header[f"NSGSNR{c}"] for c in range(3)] == pytest.approx(frame.snr, rel=1e-4)
        assert "NSGS3" not in header and "NSGSNR3" not in header
        assert len(set(transmissions)) == 3  # three fits, not one value copied (accuracy: test_accuracy)


def test_filter_differing_from_the_reference_and_a_mosaic_not_debayered_are_warnings(tmp_path):
    """A frame of another filter, and a mono frame whose header names a colour camera's cells
    (a one-shot-colour frame not debayered): each normalized, with its warning."""
    paths = write_synthetic_set(tmp_path / "in", n_frames=3, seed=7, width=700, height=500, n_stars=900)
    with fits.open(paths[2], mode="update") as hdul:
        hdul[0].header["FILTER"] = "Ha"
        hdul[0].header["COLORTYP"] = "Mono"  # MaxIm's word for a mono camera: no cells
    with fits.open(paths[1], mode="update") as hdul:
        hdul[0].header["BAYERPAT"] = "RGGB"
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["normalize", *map(str, paths), "-r", str(paths[0]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["frames"]
    assert [r["status"] for r in rows] == ["reference", "ok", "ok"]
    assert rows[0]["warning"] is None
    assert rows[1]["warning"].startswith("a colour camera's frame (BAYERPAT RGGB) not debayered")
    assert rows[2]["warning"] == (
        "FILTER 'Ha' differs from the reference's 'L': frames of different filters should not be "
        "normalized to one reference"
    )
    assert "warning: light_002.fits: FILTER 'Ha' differs from the reference's 'L'" in result.output
