"""What users see: progress output, diagnostic plots and report.html (``nsg inspect`` is in
test_select.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from nsg_gpu.cli import app
from nsg_gpu.diagnostics import FRAME_PLOTS, chosen_frames, gradient_preview, rejection_thresholds, relative_figures
from nsg_gpu.htmlreport import write_report
from nsg_gpu.io import FrameMeta, read_frame
from nsg_gpu.params import Parameters
from nsg_gpu.pipeline import normalize_frame
from nsg_gpu.reference import prepare_reference
from nsg_gpu.results import FrameResult, RunResult
from nsg_gpu.synthetic import SyntheticField, write_synthetic_set

runner = CliRunner()
SPEC = dict(width=700, height=500, n_frames=4, n_stars=900, seed=4)


@pytest.fixture(scope="module")
def field_frames(tmp_path_factory):
    """Four 700x500 mono synthetic frames and the field that made them."""
    field = SyntheticField(**SPEC)
    return field, write_synthetic_set(tmp_path_factory.mktemp("report") / "in", field.spec)


@pytest.fixture(scope="module")
def plotted_run(field_frames, tmp_path_factory):
    """``nsg normalize --plots --json`` on the frames: (parsed JSON lines, output directory)."""
    _, paths = field_frames
    out = tmp_path_factory.mktemp("report_out") / "o"
    result = runner.invoke(
        app, ["normalize", *map(str, paths), "-r", str(paths[0]), "-o", str(out), "--plots", "--json"]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    return lines, out


def test_diagnostics_record_the_fits_without_changing_them(field_frames):
    """With diagnostics the numbers are identical; the record's scale, pairs and spline agree
    with the result, and the recorded spline follows the true gradient of the synthetic field."""
    field, paths = field_frames
    reference = prepare_reference(read_frame(paths[0]))
    plain = normalize_frame(reference, read_frame(paths[1]))
    recorded = normalize_frame(reference, read_frame(paths[1]), diagnostics=True)
    assert plain.diagnostics is None
    np.testing.assert_array_equal(plain.data, recorded.data)
    assert (plain.scale, plain.weight, plain.star_pairs, plain.samples) == (
        recorded.scale,
        recorded.weight,
        recorded.star_pairs,
        recorded.samples,
    )
    d = recorded.diagnostics
    pairs = d.photometry[0]
    assert pairs.scale == recorded.scale[0]
    assert int(pairs.used.sum()) == recorded.star_pairs
    assert pairs.target_flux.shape == pairs.reference_flux.shape == pairs.used.shape
    assert int(d.used.sum()) == recorded.samples
    assert not (d.used & d.star_rejected).any() and not (d.used & ~d.covered).any()
    # The spline at the preview points against the truth m*sky_1 - sky_0, where both frames have data.
    preview = gradient_preview(d)[0]
    ny, nx = preview.shape
    rows = np.linspace(0, d.height - 1, ny).round().astype(int)
    cols = np.linspace(0, d.width - 1, nx).round().astype(int)
    m = field.frames[1].scale(field.reference)[0]
    truth = (m * field.sky(1)[0] - field.sky(0)[0])[np.ix_(rows, cols)]
    covered = (field.coverage(0) & field.coverage(1))[np.ix_(rows, cols)]
    # Up to a constant: on frames this small the scale is off by up to a few per cent (its
    # accuracy is tested on full-size sets), which shifts the pedestal m*sky level.
    residual = (preview - truth)[covered]
    error = np.abs(residual - np.median(residual)) / field.spec.noise_sigma
    span = np.ptp(truth[covered]) / field.spec.noise_sigma
    assert span > 5 and np.median(error) < 0.3 and error.max() < 1.0, (np.median(error), error.max(), span)


def test_json_lines_are_the_results_rows(plotted_run):
    lines, out = plotted_run
    frames = [line for line in lines if line["event"] == "frame"]
    assert [line["done"] for line in frames] == [1, 2, 3, 4] and all(line["total"] == 4 for line in frames)
    assert lines[-1]["event"] == "run" and lines[-1]["normalized"] == 4
    assert lines[-1]["report"] == str(out / "report.html")
    rows = json.loads((out / "results.json").read_text())["frames"]
    assert [(f["file"], f["weight"], f["transmission_0"]) for f in frames] == [
        (r["file"], r["weight"], r["transmission_0"]) for r in rows
    ]
    assert frames[0]["eta_seconds"] is None and frames[-1]["eta_seconds"] == 0


def test_plots_for_every_frame_and_the_report_links_them(plotted_run):
    lines, out = plotted_run
    targets = [Path(line["file"]) for line in lines if line["event"] == "frame" and line["status"] == "ok"]
    pngs = {p.name for p in (out / "plots").glob("*.png")}
    expected = {f"{t.stem}_{key}.png" for t in targets for key, _ in FRAME_PLOTS} | {"run_transmission_weight.png"}
    assert pngs == expected
    for name in pngs:
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    for name in pngs:
        assert f'src="plots/{name}"' in page
    rows = _report_page(out / "report.html").rows
    frames = [Path(line["file"]).name for line in lines if line["event"] == "frame"]
    assert [cells[0][1] for _, cells in rows] == frames
    assert "highest weight: " in page and "lowest weight: " in page


def test_quiet_prints_only_the_summary(field_frames, tmp_path):
    _, paths = field_frames
    result = runner.invoke(
        app,
        [
            "normalize",
            *map(str, paths[:2]),
            "-r",
            str(paths[0]),
            "-o",
            str(tmp_path / "o"),
            "-q",
            "--no-report",
            "--min-weight",
            "0",
            "--min-transmission",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines() == [
        f"2 of 2 frames normalized on numpy; results in {tmp_path / 'o' / 'results.csv'}"
    ]
    assert not (tmp_path / "o" / "report.html").exists()
    loud = runner.invoke(app, ["normalize", *map(str, paths[:2]), "-r", str(paths[0]), "-o", str(tmp_path / "p")])
    assert f"[2/2] {paths[1].name}: transmission " in loud.output and "weight " in loud.output
    assert f"report: {tmp_path / 'p' / 'report.html'}" in loud.output


def test_chosen_frames_and_relative_figures():
    """Highest, median and lowest weight; figures relative to the best, per second of exposure."""

    def frame(name, weight, transmission, exposure, date):
        return FrameResult(
            path=name,
            status="ok",
            weight=weight,
            transmission=[transmission],
            meta=FrameMeta(exposure=exposure, date_obs=date),
        )

    frames = [
        frame("c", 0.5, 0.9, 60.0, "2025-01-01T22:00:00"),
        frame("a", 1.0, 1.0, 120.0, "2025-01-01T20:00:00"),
        frame("b", 0.2, 0.5, 120.0, "2025-01-01T21:00:00"),
        FrameResult(path="x", status="failed", error="broken"),
    ]
    chosen = chosen_frames(frames)
    assert {k: f.path for k, f in chosen.items()} == {"highest weight": "a", "median weight": "c", "lowest weight": "b"}
    done, weight, transmission, per_exposure, by_time = relative_figures(frames)
    assert [f.path for f in done] == ["a", "b", "c"] and per_exposure and by_time
    np.testing.assert_allclose(weight, [1.0, 0.2 / 120 / (0.5 / 60), 1.0])  # per second of exposure
    np.testing.assert_allclose(transmission, [1.0 / 120 / (0.9 / 60), 0.5 / 120 / (0.9 / 60), 1.0])
    assert rejection_thresholds(Parameters(min_weight=0.4, min_transmission=0.6)) == (0.4, 0.6)


class _ReportPage(HTMLParser):
    """The frames table's rows and the legend's items of a report.html."""

    def __init__(self, page: str):
        super().__init__()
        self.rows: list[tuple[str, list[tuple[str, str]]]] = []  # (row classes, [(cell classes, text)])
        self.legend: list[str] = []
        self._cell = self._item = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "class" in attrs:
            self.rows.append((attrs["class"], []))
        elif tag == "td" and self.rows:
            self._cell = [attrs.get("class") or "", ""]
        elif tag == "ul" and attrs.get("id") == "legend":
            self._item = ""
        elif tag == "li" and self._item is not None:
            self.legend.append("")

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1][1].append(tuple(self._cell))
            self._cell = None
        elif tag == "ul":
            self._item = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data
        elif self._item is not None and self.legend:
            self.legend[-1] += data

    def row(self, name: str) -> tuple[str, dict[str, str]]:
        """The row of the file ``name``: its classes and its cells by heading."""
        for classes, cells in self.rows:
            if cells[0][1] == name:
                return classes, dict(zip(self.headings, (text for _, text in cells)))
        raise KeyError(name)


def _report_page(path: Path) -> _ReportPage:
    text = path.read_text()
    page = _ReportPage(text)
    table = text[text.index('<div class="frames">') :]
    page.headings = re.findall(r"<th>([^<]*)</th>", table[: table.index("</tr>")])
    return page


LONG_NAME = "Light_M31_300.0s_Bin1_L_gain100_20231015-221512_-10.0C_0042_registered_to_Light_0001.fits"


@pytest.fixture(scope="module")
def mixed_report(tmp_path_factory):
    """report.html of a run made up in memory: reference, normalized, rejected, failed with a
    long file name and error, kept from an earlier run; (its path, the frames)."""

    def frame(name, weight, transmission, **kw):
        meta = FrameMeta(exposure=120.0, filter="L", date_obs=f"2025-03-01T21:0{len(name) % 10}:00")
        return FrameResult(
            path=f"/data/{name}", weight=weight, transmission=[transmission], snr=[0.8], star_pairs=400,
            samples=1500, fwhm=2.5, noise=[0.002], meta=meta, **kw
        )  # fmt: skip

    reason = "transmission 0.612 of the best per unit exposure (minimum 0.75)"
    frames = [
        frame("ref.fits", 1.0, 1.0, status="reference"),
        frame("good.fits", 0.8, 0.95, seconds=2.5, ellipticity=0.2771, elongation_angle=54.68),
        frame("cloudy.fits", 0.5, 0.61, seconds=3.5, rejected=reason),
        FrameResult(
            path=f"/data/{LONG_NAME}",
            status="failed",
            error=f"/data/{LONG_NAME}: only 7 star pairs matched the reference (at least 10 needed); is the frame "
            "registered to the reference? /data/calibrated/registered/another/very/long/path/without/spaces.fits",
        ),
        frame("old.fits", 0.7, 0.9, seconds=0.004, resumed=True, ellipticity=0.06, elongation_angle=-30.0),
    ]
    out = tmp_path_factory.mktemp("mixed")
    run = RunResult("/data/ref.fits", frames, Parameters(), "given with --reference")
    return write_report(run, out, chosen=chosen_frames(frames)), frames


def test_report_says_why_a_frame_was_rejected_and_what_the_colours_mean(mixed_report):
    """The rejected row's status says rejected with the reason; a legend names every row kind;
    a kept frame is marked and its header-reading time is not its time."""
    path, frames = mixed_report
    page = _report_page(path)
    classes, cells = page.row("cloudy.fits")
    assert classes.split() == ["rejected"]
    assert cells["status"].startswith("rejected") and frames[2].rejected in cells["status"]
    assert page.row("good.fits")[1]["status"] == "ok"
    # Stars drawn out are named in the note; round ones are not.
    assert page.row("good.fits")[1]["note"] == "stars drawn out: 1 - b/a 0.28 at 55° from x"
    assert page.row("old.fits")[1]["note"] == ""
    assert page.row("ref.fits")[0] == "reference"
    classes, cells = page.row(LONG_NAME)
    assert classes == "failed" and cells["status"] == "failed" and "only 7 star pairs" in cells["note"]
    classes, cells = page.row("old.fits")
    assert classes.split() == ["ok", "kept"] and "kept" in cells["status"] and cells["time (s)"] == "kept"
    legend = " | ".join(page.legend)
    for word in ("normalized", "reference", "rejected", "failed", "kept from an earlier run"):
        assert word in legend, legend
    text = path.read_text()
    summary = re.search(r"time per frame</th><td>([^<]*)", text).group(1)
    assert summary.startswith("median 3.50 s, total 6.0 s over the 2 frame(s) normalized in this run"), summary
    assert "1 kept from an earlier run" in summary
    # The page may use the window's width: no fixed width in pixels on anything.
    style = text[text.index("<style>") : text.index("</style>")]
    assert not re.search(r"(max-)?width:\s*\d+px", style), style


def _chromium_driver():
    """A headless Chromium through chromedriver, or the reason there is none."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed (pip install selenium)"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not browser or not driver_path:
        return None, "Chromium or chromedriver is absent (apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    profile = tempfile.mkdtemp(prefix="nsg-chromium-")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1280,800",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(service=Service(driver_path), options=options), profile
    except WebDriverException as exc:
        shutil.rmtree(profile, ignore_errors=True)
        return None, f"Chromium does not start here: {exc.msg}"


def test_report_renders_in_chromium(plotted_run):
    """report.html opens from disk with no console error, every image decoded, every frame listed."""
    lines, out = plotted_run
    driver, profile = _chromium_driver()
    if driver is None:
        pytest.skip(profile)
    try:
        driver.set_page_load_timeout(60)
        driver.get((out / "report.html").resolve().as_uri())
        driver.execute_script("document.querySelectorAll('details').forEach(d => d.open = true)")
        # Lazy images load once scrolled to; scroll through the page, then wait for them.
        driver.execute_script(
            "document.querySelectorAll('img').forEach(i => i.loading = 'eager'); window.scrollTo(0, 1e6);"
        )
        images = driver.execute_async_script(
            """
            const done = arguments[arguments.length - 1];
            const images = Array.from(document.images);
            Promise.all(images.map(i => i.decode().then(() => true, () => false)))
                .then(() => done(images.map(i => [i.getAttribute('src'), i.naturalWidth])));
            """
        )
        rows = driver.execute_script("return document.querySelectorAll('.frames tr').length")
        title = driver.title
        errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    assert not errors, errors
    assert title.startswith("nsg-gpu report")
    assert rows == 1 + len([line for line in lines if line["event"] == "frame"])
    assert len(images) == len(list((out / "plots").glob("*.png")))
    assert all(width > 0 for _, width in images), images


@pytest.mark.parametrize("width, height", [(1920, 1080), (1280, 800)])
def test_report_table_fits_the_window(mixed_report, width, height):
    """At common widths the whole table, note column included, is on screen: neither the page
    nor the table's wrapper scrolls sideways, though a file name and an error are long."""
    path, _ = mixed_report
    driver, profile = _chromium_driver()
    if driver is None:
        pytest.skip(profile)
    try:
        driver.set_window_size(width, height)
        driver.get(path.resolve().as_uri())
        geometry = driver.execute_script(
            """
            const notes = Array.from(document.querySelectorAll('.frames td.note'));
            const wrapper = document.querySelector('.frames');
            return {
                view: document.documentElement.clientWidth,
                page: document.documentElement.scrollWidth,
                wrapper: [wrapper.scrollWidth, wrapper.clientWidth],
                notes: notes.map(n => n.getBoundingClientRect().right),
                legend: document.querySelectorAll('#legend li').length,
            };
            """
        )
        errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    assert not errors, errors
    assert geometry["page"] <= geometry["view"], geometry
    assert geometry["wrapper"][0] <= geometry["wrapper"][1], geometry
    assert len(geometry["notes"]) == 5 and max(geometry["notes"]) <= geometry["view"], geometry
    assert geometry["legend"] >= 5


def test_resumed_run_keeps_its_report(field_frames, tmp_path):
    """Rerunning the command keeps every output; the report still shows the chosen frames'
    diagnostics (the plots the first run drew, not redrawn) and does not time kept frames as 0 s."""
    _, paths = field_frames
    out = tmp_path / "o"
    command = ["normalize", *map(str, paths[:3]), "-r", str(paths[0]), "-o", str(out), "--json"]
    command += ["--min-weight", "0", "--min-transmission", "0"]
    first = runner.invoke(app, command)
    assert first.exit_code == 0, first.output
    drawn = {p.name: p.stat().st_mtime_ns for p in (out / "plots").glob("*_*.png") if not p.name.startswith("run_")}
    targets = [p for p in paths[1:3]]
    assert set(drawn) == {f"{p.stem}_{key}.png" for p in targets for key, _ in FRAME_PLOTS}
    second = runner.invoke(app, command)
    assert second.exit_code == 0, second.output
    rows = [json.loads(line) for line in second.stdout.splitlines() if '"event": "frame"' in line]
    assert all(row["resumed"] for row in rows)
    page = (out / "report.html").read_text()
    assert '<h2 id="diagnostics">' in page
    for name, made in drawn.items():
        assert f'src="plots/{name}"' in page
        assert (out / "plots" / name).stat().st_mtime_ns == made  # linked, not drawn again
    assert "highest weight: " in page and "kept from an earlier run, plots drawn by that run" in page
    summary = re.search(r"time per frame</th><td>([^<]*)", page).group(1)
    assert summary == "no frame normalized in this run: 2 kept from an earlier run", summary
    assert "0.00 s" not in page


def test_a_rerun_keeps_the_stack_section_while_the_outputs_stand(field_frames, tmp_path):
    """``nsg stack DIR`` puts its section into DIR/report.html; rerunning ``nsg normalize``
    rewrote the page without it (its images left behind, linked from nowhere). A rerun that
    keeps every output keeps the section, saying where it comes from; one that normalizes
    frames again drops it and its images (the master no longer stands for the outputs)."""
    _, paths = field_frames
    out = tmp_path / "o"
    command = ["normalize", *map(str, paths[:3]), "-r", str(paths[0]), "-o", str(out), "-q"]
    command += ["--min-weight", "0", "--min-transmission", "0"]
    assert runner.invoke(app, command).exit_code == 0
    stacked = runner.invoke(app, ["stack", str(out), "-o", str(tmp_path / "m.fits"), "-q"])
    assert stacked.exit_code == 0, stacked.output
    images = sorted(p.name for p in (out / "plots").glob("stack_*.png"))
    assert images and '<h2 id="stack">' in (out / "report.html").read_text()
    assert runner.invoke(app, command).exit_code == 0  # every output kept
    page = (out / "report.html").read_text()
    assert page.count('<h2 id="stack">') == 1 and "From nsg stack before this run of nsg normalize" in page
    assert all(f'src="plots/{name}"' in page for name in images)
    assert runner.invoke(app, [*command, "--overwrite"]).exit_code == 0  # normalized again
    page = (out / "report.html").read_text()
    assert '<h2 id="stack">' not in page and not list((out / "plots").glob("stack_*.png"))


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX only")
def test_report_failure_leaves_the_run_done(field_frames, tmp_path):
    """A plots directory that cannot be made: frames and results are written, the report error is told."""
    _, paths = field_frames
    out = tmp_path / "o"
    out.mkdir()
    (out / "plots").write_text("a file where the plots folder would go")
    result = runner.invoke(app, ["normalize", *map(str, paths[:2]), "-r", str(paths[0]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "report not written: " in result.output and "plots" in result.output
    assert (out / "results.json").exists() and not (out / "report.html").exists()
    row = json.loads((out / "results.json").read_text())["frames"][1]
    assert Path(row["output"]).name == f"{paths[1].stem}_nsg.fits"
    assert fits.getheader(row["output"])["NSGREF"] == paths[0].name
